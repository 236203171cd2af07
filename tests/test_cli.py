from __future__ import annotations

from pathlib import Path

import pytest

from flashmesh import cli


def test_bench_lists_its_benchmarks_and_refuses_an_unknown_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["bench", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert "operator-scale" in names and "provisioning" in names
    assert cli.main(["bench", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark(s) nonsense" in err and "operator-scale" in err


def test_vm_lab_commands_on_a_folder_with_no_lab(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["lab", "status", "--dir", str(tmp_path)]) == 1
    assert "no lab in" in capsys.readouterr().out
    assert cli.main(["lab", "down", "--dir", str(tmp_path)]) == 0  # nothing to do is fine
    assert cli.main(["lab", "exec", "--dir", str(tmp_path), "gpu-0", "--", "true"]) == 1


def test_an_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["nonsense"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err

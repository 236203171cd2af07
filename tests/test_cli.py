from __future__ import annotations

import pytest

from flashmesh import cli


@pytest.mark.parametrize("command", ["operator", "csi", "agent", "status", "bench"])
def test_unbuilt_subcommands_say_so_and_fail(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([command]) == cli.NOT_BUILT
    assert "not built yet" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["up", "down", "status", "exec"])
def test_the_vm_lab_is_not_built_yet(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["lab", action]) == cli.NOT_BUILT
    assert "VM lab is not built yet" in capsys.readouterr().err


def test_an_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["nonsense"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err

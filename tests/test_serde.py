from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from flashmesh.core import serde


@dataclass
class Inner:
    port_number: int
    name: str | None = None


@dataclass
class Outer:
    items: list[Inner] = field(default_factory=list)
    labels: dict[str, str] | None = None
    nqn: str | None = field(default=None, metadata=serde.json_key("subsystemNQN"))
    ratio: float | None = None


def test_camel_case_keys_and_explicit_keys() -> None:
    obj = serde.from_dict(Outer, {"items": [{"portNumber": 4420}], "subsystemNQN": "nqn.x"})
    assert obj.items == [Inner(port_number=4420)]
    assert obj.nqn == "nqn.x"
    assert serde.to_dict(obj) == {"items": [{"portNumber": 4420}], "subsystemNQN": "nqn.x"}


def test_none_is_left_out_and_unknown_keys_ignored() -> None:
    obj = serde.from_dict(Outer, {"labels": {"a": "b"}, "surprise": 1})
    assert serde.to_dict(obj) == {"items": [], "labels": {"a": "b"}}


def test_integers_are_accepted_as_floats() -> None:
    assert serde.from_dict(Outer, {"ratio": 3}).ratio == 3.0


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"items": {"portNumber": 1}}, "items"),
        ({"items": [{"portNumber": "x"}]}, "items[0].portNumber"),
        ({"items": [{"portNumber": True}]}, "items[0].portNumber"),
        ({"labels": ["a"]}, "labels"),
        ({"items": [7]}, "items[0]"),
    ],
)
def test_wrong_shapes_name_the_json_path(data: dict[str, object], path: str) -> None:
    with pytest.raises(serde.SchemaError) as error:
        serde.from_dict(Outer, data)
    assert str(error.value).startswith(f"{path}: expected")


def test_model_keys_recurse_into_nested_models() -> None:
    assert serde.model_keys(Outer) == {
        "items": {"portNumber": None, "name": None},
        "labels": None,
        "subsystemNQN": None,
        "ratio": None,
    }


def test_type_hints_are_resolved_once_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cache read and agent pass decodes hundreds of objects: a model's type hints are
    resolved the first time it is decoded, never again."""

    @dataclass
    class Fresh:
        inner: Inner
        count: int | None = None

    calls: list[object] = []
    real = serde.typing.get_type_hints

    def counting(cls: object) -> dict[str, object]:
        calls.append(cls)
        return real(cls)

    monkeypatch.setattr(serde.typing, "get_type_hints", counting)
    for n in range(5):
        assert serde.from_dict(Fresh, {"inner": {"portNumber": n}, "count": n}).count == n
    assert calls.count(Fresh) == 1
    assert calls.count(Inner) <= 1

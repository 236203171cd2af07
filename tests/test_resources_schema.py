"""Keeps the Python models of core/resources.py in step with the CRD schemas in crds/:
the same fields at every depth, the same required fields, the same defaults."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from flashmesh.core import resources, serde

CRDS = Path(__file__).resolve().parents[1] / "crds"


def crd_for(kind: type[resources.Resource]) -> dict[str, Any]:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind.KIND:
            return dict(crd)
    raise AssertionError(f"no CRD for {kind.KIND} in {CRDS}")


def root_schema(kind: type[resources.Resource]) -> dict[str, Any]:
    (version,) = crd_for(kind)["spec"]["versions"]
    return dict(version["schema"]["openAPIV3Schema"])


def schema_keys(schema: dict[str, Any]) -> dict[str, Any] | None:
    if schema.get("type") == "array":
        return schema_keys(schema["items"])
    if "properties" in schema:
        return {key: schema_keys(sub) for key, sub in schema["properties"].items()}
    return None


def object_schemas(schema: dict[str, Any], model: type[Any], path: str):  # type: ignore[no-untyped-def]
    """Yields (path, object schema, model class) for every nested object that is a model."""
    if schema.get("type") == "array":
        schema = schema["items"]
    yield path, schema, model
    hints = typing.get_type_hints(model)
    for f in dataclasses.fields(model):
        inner = serde._innermost(hints[f.name])
        key = serde.key_of(f)
        if dataclasses.is_dataclass(inner) and key in schema.get("properties", {}):
            yield from object_schemas(schema["properties"][key], inner, f"{path}.{key}")


def part_models(kind: type[resources.Resource]) -> list[tuple[str, type[Any]]]:
    hints = typing.get_type_hints(kind)
    return [(part, serde._innermost(hints[part])) for part in ("spec", "status")]


@pytest.mark.parametrize("kind", resources.KINDS, ids=lambda k: k.KIND)
def test_every_crd_names_its_plural_scope_and_category(kind: type[resources.Resource]) -> None:
    crd = crd_for(kind)
    assert crd["spec"]["group"] == resources.GROUP
    assert crd["spec"]["names"]["plural"] == kind.PLURAL
    assert crd["spec"]["scope"] == ("Namespaced" if kind.NAMESPACED else "Cluster")
    assert "flashmesh" in crd["spec"]["names"]["categories"]
    assert crd["spec"]["names"]["shortNames"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == resources.VERSION
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("kind", resources.KINDS, ids=lambda k: k.KIND)
def test_models_have_the_fields_of_the_schemas(kind: type[resources.Resource]) -> None:
    root = root_schema(kind)
    for part, model in part_models(kind):
        assert serde.model_keys(model) == schema_keys(root["properties"][part]), part


@pytest.mark.parametrize("kind", resources.KINDS, ids=lambda k: k.KIND)
def test_required_fields_are_the_models_fields_without_defaults(
    kind: type[resources.Resource],
) -> None:
    root = root_schema(kind)
    for part, model in part_models(kind):
        for path, schema, cls in object_schemas(root["properties"][part], model, part):
            no_default = {
                serde.key_of(f)
                for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            }
            assert set(schema.get("required", [])) == no_default, path


@pytest.mark.parametrize("kind", resources.KINDS, ids=lambda k: k.KIND)
def test_defaults_are_the_schemas_defaults(kind: type[resources.Resource]) -> None:
    root = root_schema(kind)
    for part, model in part_models(kind):
        for path, schema, cls in object_schemas(root["properties"][part], model, part):
            for f in dataclasses.fields(cls):
                prop = schema["properties"][serde.key_of(f)]
                if f.default_factory is not dataclasses.MISSING:
                    python_default = f.default_factory()
                elif f.default is not dataclasses.MISSING:
                    python_default = f.default
                else:
                    python_default = None
                where = f"{path}.{serde.key_of(f)}"
                if dataclasses.is_dataclass(python_default):
                    # An object default of {} lets the API server fill in nested defaults.
                    assert prop.get("default") == {}, where
                else:
                    assert prop.get("default") == python_default, where


@pytest.mark.parametrize("path", sorted((CRDS / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_parses_into_its_model(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    (kind,) = [k for k in resources.KINDS if data["kind"] == k.KIND]
    obj = kind.from_dict(data)
    assert obj.metadata.name == data["metadata"]["name"]
    assert contains(obj.to_dict()["spec"], data["spec"])


def contains(big: Any, small: Any) -> bool:
    """Whether big holds everything small does (big may add defaults)."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(
            k in big and contains(big[k], v) for k, v in small.items()
        )
    if isinstance(small, list):
        return isinstance(big, list) and len(big) == len(small) and all(map(contains, big, small))
    return bool(big == small)


def test_a_wrong_kind_is_refused() -> None:
    with pytest.raises(serde.SchemaError, match="expected Volume"):
        resources.Volume.from_dict({"kind": "StoragePool", "metadata": {"name": "x"}})

"""Dataclasses to and from the JSON shape of Kubernetes objects.

Python fields are snake_case; their JSON keys are the camelCase of the name unless a
field says otherwise with ``json_key``. ``None`` means absent: it is left out of the
output, so a round trip of what the API server returned gives back the same dict.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_JSON_KEY = "json_key"


def json_key(name: str) -> dict[str, str]:
    """Field metadata for a JSON key that is not the camelCase of the field name."""
    return {_JSON_KEY: name}


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def key_of(field: dataclasses.Field[Any]) -> str:
    return str(field.metadata.get(_JSON_KEY, camel(field.name)))


class SchemaError(ValueError):
    """A value does not have the shape its model declares; names the JSON path."""


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Builds a dataclass from its JSON dict; unknown keys are ignored."""
    return typing.cast(T, _model_decoder(typing.cast(Any, cls))(data, path))


def to_dict(obj: Any) -> dict[str, Any]:
    """The JSON dict of a dataclass, leaving out fields that are None."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if value is not None:
            out[key_of(field)] = _encode(value)
    return out


def model_keys(cls: type[Any]) -> dict[str, Any]:
    """The JSON keys of a model and, for nested models, their own keys (for schema checks)."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        inner = _innermost(hints[field.name])
        nested = dataclasses.is_dataclass(inner) and isinstance(inner, type)
        keys[key_of(field)] = model_keys(inner) if nested else None
    return keys


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _innermost(tp: Any) -> Any:
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is list:
        return _innermost(typing.get_args(tp)[0])
    if origin is dict:
        return _innermost(typing.get_args(tp)[1])
    return tp


# Every agent pass and cache read turns hundreds of objects into models; under emulation
# resolving type hints per object was a fifth of an agent's CPU. So each type gets a
# decoder once, a closure that only checks and converts.
_Decoder = typing.Callable[[Any, str], Any]


@functools.cache
def _model_decoder(cls: Any) -> _Decoder:
    hints = typing.get_type_hints(cls)
    fields = [
        (field.name, key_of(field), _decoder(hints[field.name]))
        for field in dataclasses.fields(cls)
    ]

    def decode(data: Any, path: str) -> Any:
        if not isinstance(data, Mapping):
            raise SchemaError(f"{path or '<root>'}: expected an object, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for name, key, inner in fields:
            value = data.get(key)
            if value is not None:
                kwargs[name] = inner(value, _join(path, key))
        return cls(**kwargs)

    return decode


@functools.cache
def _decoder(tp: Any) -> _Decoder:
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is list:
        item = _decoder(typing.get_args(tp)[0])

        def decode_list(value: Any, path: str) -> Any:
            if not isinstance(value, list):
                raise SchemaError(f"{path}: expected a list, got {type(value).__name__}")
            return [item(v, _join(path, i)) for i, v in enumerate(value)]

        return decode_list
    if origin is dict:
        entry = _decoder(typing.get_args(tp)[1])

        def decode_dict(value: Any, path: str) -> Any:
            if not isinstance(value, Mapping):
                raise SchemaError(f"{path}: expected an object, got {type(value).__name__}")
            return {k: entry(v, _join(path, k)) for k, v in value.items()}

        return decode_dict
    if dataclasses.is_dataclass(tp):
        return _model_decoder(typing.cast(Any, tp))
    if tp is Any:
        return lambda value, path: value
    return functools.partial(_scalar, tp)


def _scalar(tp: type[Any], value: Any, path: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        # int-or-string fields such as quantities may arrive as numbers.
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise SchemaError(f"{path}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value

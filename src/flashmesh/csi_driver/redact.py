"""Requests as log lines, with every field that csi.proto marks csi_secret replaced, so a
secret never reaches a log."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from flashmesh.csi_driver._proto import csi_pb2

REDACTED = "<redacted>"


def redacted(message: Message) -> dict[str, Any]:
    copy = type(message)()
    copy.CopyFrom(message)
    _scrub(copy)
    out: dict[str, Any] = json_format.MessageToDict(copy, preserving_proto_field_name=True)
    return out


def _scrub(message: Message) -> None:
    for field, value in message.ListFields():
        if field.GetOptions().Extensions[csi_pb2.csi_secret]:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key in list(value):
                    value[key] = REDACTED
            else:
                setattr(message, field.name, REDACTED)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if field.is_repeated:
                for item in value:
                    _scrub(item)
            else:
                _scrub(value)

"""DH-HMAC-CHAP key Secrets: a key the kernel would refuse is found before any configfs
write, so it refuses its own host only, and no message ever quotes a key."""

from __future__ import annotations

import base64
import zlib

import pytest

from flashmesh.dataplane.host_keys import key_problem, keys_from_secrets, malformed

HOST = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-000000000001"


def key(secret: bytes, hash_id: str = "00", crc: int | None = None) -> str:
    tail = (zlib.crc32(secret) if crc is None else crc).to_bytes(4, "little")
    return f"DHHC-1:{hash_id}:{base64.b64encode(secret + tail).decode()}:"


@pytest.mark.parametrize("size", [32, 48, 64])
def test_keys_as_nvme_gen_dhchap_key_writes_them_are_well_formed(size: int) -> None:
    assert key_problem(key(bytes(range(size)))) is None


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("s3cr3t", "not of the form DHHC-1:<00-03>:<base64>:"),
        ("DHHC-1:07:AAAA:", "not of the form"),
        (key(bytes(32))[:-1], "not of the form"),  # no closing colon
        ("DHHC-1:00:A:", "does not decode"),
        (key(bytes(20)), "its secret is 20 bytes, not 32, 48 or 64"),
        (key(bytes(32), crc=1), "CRC-32 does not match"),
    ],
)  # fmt: skip
def test_a_malformed_key_says_why_without_quoting_it(bad: str, why: str) -> None:
    problem = key_problem(bad)
    assert problem is not None and why in problem
    [(host, message)] = malformed({HOST: bad, "nqn.other": key(bytes(32))}).items()
    assert host == HOST and why in message and bad not in message
    assert "fix its data.key" in message


def test_a_secret_that_is_not_text_refuses_its_host_instead_of_raising() -> None:
    secret = {"metadata": {"annotations": {"flashmesh.dev/host-nqn": HOST}},
              "data": {"key": base64.b64encode(b"\xff\xfe DHHC").decode()}}  # fmt: skip
    keys = keys_from_secrets([secret])
    assert "not of the form" in malformed(keys)[HOST]

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashmesh.core import naming

csi_names = st.text(min_size=1, max_size=128)


@given(csi_names)
def test_ids_fit_every_name_limit(csi_name: str) -> None:
    vid = naming.volume_id(csi_name)
    assert re.fullmatch(r"fm-[0-9a-f]{12}", vid)  # a valid Kubernetes name
    for index in range(16):
        for replica in range(16):
            assert len(naming.segment_lv(vid, index, replica)) <= 127
            assert len(naming.subsystem_serial(vid, index, replica)) <= 20
            assert len(naming.subsystem_nqn(vid, index, replica)) <= 223
    assert len(vid) <= 32  # device-mapper and md names


def test_ids_are_deterministic_and_case_sensitive() -> None:
    assert naming.volume_id("pvc-1") == naming.volume_id("pvc-1")
    assert naming.volume_id("PVC-1") != naming.volume_id("pvc-1")
    assert naming.snapshot_id("pvc-1").startswith("fs-")
    assert naming.snapshot_id("pvc-1")[3:] == naming.volume_id("pvc-1")[3:]


def test_segment_names_derive_from_the_id() -> None:
    vid = "fm-3f2a9c81d07e"
    assert naming.segment_lv(vid, 1, 0) == "fm-3f2a9c81d07e-s1r0"
    assert naming.subsystem_nqn(vid, 1, 0) == "nqn.2026-11.dev.flashmesh:fm-3f2a9c81d07e.s1r0"
    assert naming.subsystem_serial(vid, 1, 0) == "fm3f2a9c81d07es1r0"
    assert naming.is_flashmesh_nqn(naming.subsystem_nqn(vid, 0, 0))
    assert not naming.is_flashmesh_nqn("nqn.2024-01.io.other:disk")


def test_namespace_identifiers_are_stable_and_distinct() -> None:
    a = naming.subsystem_nqn("fm-000000000001", 0, 0)
    b = naming.subsystem_nqn("fm-000000000001", 1, 0)
    assert naming.namespace_uuid(a) == naming.namespace_uuid(a)
    assert naming.namespace_uuid(a) != naming.namespace_uuid(b)
    assert naming.namespace_nguid(a) != naming.namespace_uuid(a)
    assert re.fullmatch(r"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}", naming.namespace_nguid(a))


def test_host_nqn_derives_from_the_node_identity() -> None:
    one = naming.host_nqn("machine-id-1")
    assert one == naming.host_nqn("machine-id-1")
    assert one != naming.host_nqn("machine-id-2")
    assert one.startswith("nqn.2014-08.org.nvmexpress:uuid:")


def test_an_smbios_uuid_is_the_host_nqn_as_nvme_gen_hostnqn_makes_it() -> None:
    smbios = "3F2504E0-4F89-11D3-9A0C-0305E82C3301\n"
    assert naming.host_nqn(smbios) == (
        "nqn.2014-08.org.nvmexpress:uuid:3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    )


@pytest.mark.parametrize("make", [naming.volume_id, naming.snapshot_id])
def test_an_empty_name_is_refused(make: Callable[[str], str]) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        make("")

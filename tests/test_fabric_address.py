"""The address a storage node serves on: spec.fabricAddress over --address, a change held
while volumes are published, an address on no interface named."""

from __future__ import annotations

from flashmesh.dataplane.agent.fabric_address import choose, is_local


def everywhere(address: str) -> bool:
    """Every address counts as on an interface of this node."""
    return True


def test_the_spec_address_is_taken_over_the_flag() -> None:
    address, cond = choose("10.78.0.5", "10.77.0.5", None, 0, everywhere)
    assert address == "10.78.0.5"
    assert (cond.status, cond.reason) == ("True", "Serving")
    assert cond.message == "serving on 10.78.0.5 (spec.fabricAddress)"
    address, cond = choose(None, "10.77.0.5", "10.77.0.5", 3, everywhere)
    assert address == "10.77.0.5" and "the agent's --address" in cond.message


def test_a_change_waits_while_volumes_are_published() -> None:
    address, cond = choose("10.78.0.5", "10.77.0.5", "10.77.0.5", 2, everywhere)
    assert address == "10.77.0.5"  # hosts were given this one
    assert (cond.status, cond.reason) == ("False", "ChangeWaits")
    assert "until no volume of this node is published (2 are)" in cond.message
    address, _ = choose("10.78.0.5", "10.77.0.5", "10.77.0.5", 0, everywhere)
    assert address == "10.78.0.5"  # nothing published: the change is made


def test_an_address_on_no_interface_is_named() -> None:
    address, cond = choose("192.0.2.77", "10.77.0.5", None, 0)
    assert address == "192.0.2.77"
    assert (cond.status, cond.reason) == ("False", "NotLocal")
    assert "192.0.2.77 (spec.fabricAddress) is on no interface of this node" in cond.message


def test_a_local_address_is_one_a_socket_can_bind() -> None:
    assert is_local("127.0.0.1")
    assert not is_local("192.0.2.77")  # TEST-NET-1: on no interface here

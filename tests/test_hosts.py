from flashmesh.core.hosts import duplicate_message, shared_host_nqns

A, B = "nqn.2014-08.org.nvmexpress:uuid:a", "nqn.2014-08.org.nvmexpress:uuid:b"


def test_a_host_nqn_claimed_by_two_nodes_is_shared() -> None:
    claims = [("storage-0", A), ("storage-1", A), ("gpu-0", B)]
    assert shared_host_nqns(claims) == {A: ["storage-0", "storage-1"]}


def test_one_node_claiming_twice_is_not_shared() -> None:
    # A node that is both a storage node and a GPU node claims its NQN from both objects.
    assert shared_host_nqns([("node-a", A), ("node-a", A), ("node-b", B)]) == {}


def test_an_empty_claim_is_ignored() -> None:
    assert shared_host_nqns([("storage-0", ""), ("storage-1", "")]) == {}


def test_the_message_names_the_other_nodes_and_the_fix() -> None:
    message = duplicate_message(A, "storage-0", ["gpu-3", "storage-0", "storage-1"])
    assert "also claimed by gpu-3, storage-1" in message
    assert "product_uuid" in message

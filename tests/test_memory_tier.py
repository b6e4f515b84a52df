"""The memory tier: steps saved to node-local memory and replicated to the next node, restored
after a node is lost (its directory deleted) at the same layout, at another one and with
fewer ranks; two lost nodes holding all copies of some pieces, and a damaged replica, fall
back to the next candidate. Nodes are simulated: each group of ranks has its own directory."""

import logging
import os

import torch

from dist_checkpointing import CheckpointManager, MemoryTier
from dist_checkpointing.memory_format import piece_paths
from layouts import check_loaded, expected_flat, flat_state_dict, sharded_state_dict
from multirank import run_ranks


def _state(rank, tp, dp, step=None, with_data=True):
    # the rng ShardedObjects are one per TP rank: requested only at the saved TP
    state = sharded_state_dict(rank, tp, dp, with_data=with_data, objects=tp == 2)
    state["optimizer"] = flat_state_dict(rank, tp, dp, with_data=with_data)
    if step is not None:
        state["iteration"] = step
    return state


def _check(loaded, rank, tp, dp, step):
    assert loaded["iteration"] == step
    flat = loaded.pop("optimizer")
    for sh, got in zip(flat_state_dict(rank, tp, dp, with_data=False), flat):
        assert torch.equal(got, expected_flat(sh)), sh.key
    loaded["iteration"] = 7  # what check_loaded's rule expects
    if tp == 2:
        assert loaded.pop("rng") == {"seed": 1000 + rank % tp}
    return check_loaded(loaded, rank, tp, dp) + len(flat)


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _manager(root, nodes_root, rank, ranks_per_node, keep=1, every=5, persistent_every=10):
    tier = MemoryTier(f"{nodes_root}/node{rank // ranks_per_node}", every=every, replicas=1, keep=keep, ranks_per_node=ranks_per_node)
    return CheckpointManager(root, persistent_every=persistent_every, memory=tier)


def _train(rank, world_size, root, nodes_root, tp, dp, ranks_per_node, steps, keep=1):
    manager = _manager(root, nodes_root, rank, ranks_per_node, keep)
    for step in steps:
        manager.save(step, _state(rank, tp, dp, step))
    outcome = {"memory steps": manager.memory_steps(), "persistent steps": manager.steps()}
    manager.close()
    return outcome


def _restore(rank, world_size, root, nodes_root, tp, dp, ranks_per_node):
    handler = _Messages()
    for name in ("dist_checkpointing.memory_restore", "dist_checkpointing.manager"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    manager = _manager(root, nodes_root, rank, ranks_per_node)
    loaded = manager.load(_state(rank, tp, dp, with_data=False))
    step = loaded["iteration"]
    checked = _check(loaded, rank, tp, dp, step)
    outcome = {"step": step, "from": manager.restored_from, "checked": checked, "log": handler.messages}
    manager.close()
    return outcome


def _lose(nodes_root, node):
    for dirpath, _, files in os.walk(f"{nodes_root}/node{node}", topdown=False):
        for name in files:
            os.remove(os.path.join(dirpath, name))
        os.rmdir(dirpath)


def test_lost_node_restored_from_peer_memory_at_any_layout(tmp_path):
    root, nodes = str(tmp_path / "persistent"), str(tmp_path / "memory")
    saved = run_ranks(_train, 4, root, nodes, 2, 2, 2, (5, 10, 15))  # TP2 x DP2, two nodes of two ranks
    assert saved[0] == {"memory steps": [15], "persistent steps": [10]}
    _lose(nodes, 0)
    same = run_ranks(_restore, 4, root, nodes, 2, 2, 2)
    other = run_ranks(_restore, 4, root, nodes, 4, 1, 2)  # TP4 x DP1
    fewer = run_ranks(_restore, 2, root, nodes, 1, 2, 1)  # TP1 x DP2 on two nodes of one rank
    for outcome in same + other + fewer:
        assert (outcome["step"], outcome["from"]) == (15, "memory"), outcome["log"]
        assert outcome["checked"] >= 15
    assert any("Restored step 15 from the memory tier" in m for m in same[0]["log"])


def test_lost_copies_and_a_damaged_replica_fall_back(tmp_path):
    root, nodes = str(tmp_path / "persistent"), str(tmp_path / "memory")
    # four nodes of one rank, each replicated to the next: node 0's pieces live on nodes 0 and 1
    saved = run_ranks(_train, 4, root, nodes, 2, 2, 1, (5, 10, 15), 2)
    assert saved[0] == {"memory steps": [10, 15], "persistent steps": [10]}
    # a flipped byte in node 2's replica of rank 1's step 15, whose own copy is lost
    _lose(nodes, 1)
    data, _ = piece_paths(f"{nodes}/node2", 15, 1)
    with open(data, "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0x01]))
    damaged = run_ranks(_restore, 4, root, nodes, 2, 2, 1)
    for outcome in damaged:
        assert (outcome["step"], outcome["from"]) == (10, "memory"), outcome["log"]
    assert any("fails its CRC-32C" in m for o in damaged for m in o["log"])
    assert any("step 15 cannot be restored" in m for m in damaged[0]["log"])
    # nodes 0 and 1 lost: node 0's pieces are gone from memory; the persistent step 10 loads
    _lose(nodes, 0)
    fallback = run_ranks(_restore, 4, root, nodes, 2, 2, 1)
    for outcome in fallback:
        assert (outcome["step"], outcome["from"]) == (10, "persistent"), outcome["log"]
    assert any("from the persistent tier" in m for m in fallback[0]["log"])

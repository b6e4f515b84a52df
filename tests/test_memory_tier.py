"""The memory tier: steps saved to node-local memory and replicated to the next node, restored
after a node is lost (its directory deleted) at the same layout, at another one and with
fewer ranks; two lost nodes holding all copies of some pieces, and a damaged replica, fall
back to the next candidate. Nodes are simulated: each group of ranks has its own directory."""

import errno
import json
import logging
import os
import signal

import pytest
import torch
from layouts import check_loaded, expected_flat, flat_state_dict, sharded_state_dict
from multirank import run_ranks

from dist_checkpointing import CheckpointingException, CheckpointManager, MemoryTier, cli
from dist_checkpointing.memory_format import BytesPiece, PieceIndex, TensorPiece, decode_index, encode_index, piece_paths


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


def _manager(root, nodes_root, rank, ranks_per_node, keep=1, every=5, persistent_every=10, promote_on_sigterm=False):
    tier = MemoryTier(f"{nodes_root}/node{rank // ranks_per_node}", every=every, replicas=1, keep=keep, ranks_per_node=ranks_per_node)
    return CheckpointManager(root, persistent_every=persistent_every, memory=tier, promote_on_sigterm=promote_on_sigterm)


def _train(rank, world_size, root, nodes_root, tp, dp, ranks_per_node, steps, keep=1, sigterm_at=None, full_at=None):
    """Saves `steps`; with `sigterm_at`, rank 0 gets a SIGTERM after that step's save, and the
    next save call promotes the newest memory step and exits on every rank; with `full_at`,
    rank 3's memory is full at that step (its staging fails)."""
    manager = _manager(root, nodes_root, rank, ranks_per_node, keep, promote_on_sigterm=sigterm_at is not None)
    outcome = {}
    for step in steps:
        if step == full_at and rank == 3:
            stage = manager.memory._stage
            manager.memory._stage = lambda *args: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        manager.save(step, _state(rank, tp, dp, step))
        if step == full_at:
            manager.memory.wait()
            outcome["memory steps after the full one"] = manager.memory_steps()
            if rank == 3:
                manager.memory._stage = stage
                outcome["error"] = manager.memory.last_error
        if step == sigterm_at and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == sigterm_at:
            try:
                manager.save(step + 1, _state(rank, tp, dp, step + 1))
            except SystemExit as e:
                outcome["exit"] = str(e)
            break
    outcome.update({"memory steps": manager.memory_steps() if manager.memory else None, "persistent steps": manager.steps()})
    manager.close()
    return outcome


def _restore(rank, world_size, root, nodes_root, tp, dp, ranks_per_node, persistent_step=None):
    handler = _Messages()
    for name in ("dist_checkpointing.memory_restore", "dist_checkpointing.manager"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    manager = _manager(root, nodes_root, rank, ranks_per_node)
    loaded = manager.load(_state(rank, tp, dp, with_data=False))
    step = loaded["iteration"]
    checked = _check(loaded, rank, tp, dp, step)
    outcome = {"step": step, "from": manager.restored_from, "checked": checked, "log": handler.messages}
    if persistent_step is not None:  # the same from the persistent tier
        _check(manager.load(_state(rank, tp, dp, with_data=False), step=persistent_step), rank, tp, dp, persistent_step)
        outcome["then"] = manager.restored_from
    manager.close()
    return outcome


def _lose(nodes_root, node):
    for dirpath, _, files in os.walk(f"{nodes_root}/node{node}", topdown=False):
        for name in files:
            os.remove(os.path.join(dirpath, name))
        os.rmdir(dirpath)


def test_lost_node_restored_from_peer_memory_at_any_layout(tmp_path):
    root, nodes = str(tmp_path / "persistent"), str(tmp_path / "memory")
    # TP2 x DP2, two nodes of two ranks; SIGTERM after step 15: the next save promotes it to disk
    # rank 3's memory full at step 10: no rank hangs, step 10 is not complete, step 5 stays
    saved = run_ranks(_train, 4, root, nodes, 2, 2, 2, (5, 10, 15, 20), 1, 15, 10)
    assert "No space left on device" in saved[3].pop("error")
    for outcome in saved:
        assert outcome == {"memory steps after the full one": [5], "exit": f"SIGTERM: step 15 is on {root}",
                           "memory steps": None, "persistent steps": [10, 15]}
    _lose(nodes, 0)
    same = run_ranks(_restore, 4, root, nodes, 2, 2, 2)
    other = run_ranks(_restore, 4, root, nodes, 4, 1, 2)  # TP4 x DP1
    fewer = run_ranks(_restore, 2, root, nodes, 1, 2, 1, 15)  # TP1 x DP2 on two nodes of one rank
    for outcome in same + other + fewer:  # memory is preferred at equal steps
        assert (outcome["step"], outcome["from"]) == (15, "memory"), outcome["log"]
        assert outcome["checked"] >= 15
    assert fewer[0]["then"] == "persistent"
    assert any("Restored step 15 from the memory tier" in m for m in same[0]["log"])


def test_lost_copies_and_a_damaged_replica_fall_back(tmp_path, capsys):
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
    # the tools see it: node 2 keeps its own pieces and node 1's replica, steps 10 and 15
    assert cli.main(["verify", f"{nodes}/node2"]) == 1
    assert f"rank 1: {data}: tensor" in capsys.readouterr().out
    assert cli.main(["verify", f"{nodes}/node3"]) == 0
    assert "sound (4 piece files" in capsys.readouterr().out
    assert cli.main(["inspect", "--json", f"{nodes}/node3"]) == 0
    described = json.loads(capsys.readouterr().out)
    steps = [(s["step"], s["ranks"], s["world_size"], s["all_ranks_here"]) for s in described["steps"]]
    assert steps == [(10, [2, 3], 4, False), (15, [2, 3], 4, False)]
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


def test_piece_index_is_checked_before_use():
    """Every field of a piece file's index is type-checked and bounded (a damaged copy is
    refused, never read out of its bounds)."""
    piece = TensorPiece("w", "float32", (4, 6), (2, 0), (2, 6), None, 0, (2, 1), 0, 48, 7)
    index = PieceIndex(5, "run", 1, 2, 64, (piece,), (BytesPiece("rng/shard_0_1", 48, 16, 3),), None)
    assert decode_index(encode_index(index), "x.json") == index
    good = json.loads(encode_index(index))
    damages = {
        "beyond the data file": lambda d: d["tensors"]["at"].__setitem__(0, 40),
        "unknown dtype": lambda d: d["tensors"]["dtype"].__setitem__(0, "complex32"),
        "does not lie in the global shape": lambda d: d["tensors"]["offset"].__setitem__(0, [3, 0]),
        "bytes for 12 elements": lambda d: d["tensors"]["nbytes"].__setitem__(0, 40),
        "columns of 'tensors' must be lists of one length": lambda d: d["tensors"]["key"].append("v"),
        "rank 2 of world size 2": lambda d: d.__setitem__("rank", 2),
        "flat range": lambda d: d["tensors"]["flat"].__setitem__(0, [0, 13]),
        "not a count of leading unit axes": lambda d: d["tensors"]["prepend"].__setitem__(0, 1),
        "not a memory-tier index": lambda d: d.__setitem__("format", "zarr"),
    }
    for message, damage in damages.items():
        doc = json.loads(json.dumps(good))
        damage(doc)
        with pytest.raises(CheckpointingException, match=message):
            decode_index(json.dumps(doc).encode(), "x.json")

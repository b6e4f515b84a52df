"""Save at one layout with real ranks, load at another: every dtype, bit-exact."""

import os

import pytest
import torch
import torch.distributed as dist
from layouts import check_loaded, sharded_state_dict
from multirank import RankFailed, run_ranks

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, ShardedObject, ShardedTensor


def save_and_reload(rank, world_size, ckpt_dir, tp, dp):
    dc.save(sharded_state_dict(rank, tp, dp), ckpt_dir)
    loaded = dc.load(sharded_state_dict(rank, tp, dp, with_data=False), ckpt_dir)
    assert loaded["rng"] == {"seed": 1000 + rank % tp}
    return check_loaded(loaded, rank, tp, dp)


def load_at(rank, world_size, ckpt_dir, tp, dp):
    request = sharded_state_dict(rank, tp, dp, with_data=False, objects=False)
    loaded = dc.load(request, ckpt_dir)
    assert loaded["iteration"] == 7
    return check_loaded(loaded, rank, tp, dp)


def on_four_ranks(rank, world_size, tp2_ckpt, tp2dp2_ckpt):
    """Loads the TP=2 checkpoint at TP=4 and at TP=2 x DP=2, saves one at TP=2 x DP=2, and
    loads Megatron-Core's fixtures at TP=4."""
    counts = load_at(rank, world_size, tp2_ckpt, 4, 1), load_at(rank, world_size, tp2_ckpt, 2, 2)
    return counts + (save_and_reload(rank, world_size, tp2dp2_ckpt, 2, 2),), load_megatron_fixtures(rank, world_size)


def on_two_ranks(rank, world_size, tp2_ckpt):
    """Saves and reloads at TP=2, and loads Megatron-Core's fixtures at TP=2."""
    return save_and_reload(rank, world_size, tp2_ckpt, 2, 1), load_megatron_fixtures(rank, world_size)


def load_megatron_fixtures(rank, world_size):
    """Each fixture's count of checked values, at TP=world_size."""
    from test_megatron_fixture import READS, check_fixture_at_tp

    return [check_fixture_at_tp(fixture, rank, world_size, engine) for fixture, engine in READS]


def test_save_at_tp2_and_tp2dp2_then_load_at_tp1_tp4_and_tp2dp2_with_megatron_fixtures(tmp_path):
    tp2, tp2dp2 = str(tmp_path / "tp2"), str(tmp_path / "tp2dp2")
    counts, fixtures = zip(*run_ranks(on_two_ranks, 2, tp2))
    assert counts[0] == counts[1] > 10
    assert fixtures == ([5] * 5,) * 2  # Megatron-Core's own checkpoints at TP=2
    # TP=1 in this process, without torch.distributed
    assert load_at(0, 1, tp2, 1, 1) == counts[0]
    # TP=4 and TP=2 x DP=2 on four ranks, which also save at TP=2 x DP=2
    assert run_ranks(on_four_ranks, 4, tp2, tp2dp2) == [((counts[0],) * 3, [5] * 5)] * 4  # and at TP=4
    # a chunk that DP ranks both hold is written once
    assert sorted(n for n in os.listdir(os.path.join(tp2dp2, "embedding.weight")) if n.startswith("c.")) == ["c.0.0", "c.1.0"]
    assert load_at(0, 1, tp2dp2, 1, 1) == counts[0]
    assert dc.load_common_state_dict(tp2dp2) == {"iteration": 7}


def save_invalid(rank, world_size, ckpt_dir, problem):
    state = sharded_state_dict(rank, 2)
    if problem == "overlap":  # both ranks claim the first half of the embedding
        data = state["embedding"].data
        state["embedding"] = ShardedTensor.from_rank_offsets("embedding.weight", data, (0, 0, 2))
    elif problem == "dtype":
        if rank == 1:
            state["final_norm"] = ShardedTensor.from_rank_offsets(
                "final_norm", torch.zeros(16, dtype=torch.float64), replica_id=1
            )
    elif problem == "object_gap":
        state["rng"] = ShardedObject("rng_state", {}, (3,), (rank,))
    elif problem == "bad_key":
        if rank == 1:
            state["evil"] = ShardedTensor.from_rank_offsets("../evil", torch.zeros(2))
    try:
        dc.save(state, ckpt_dir)
    except CheckpointingException as e:
        return str(e)
    return None


INVALID = {"overlap": "embedding.weight", "dtype": "final_norm", "object_gap": "rng_state", "bad_key": "../evil"}


def save_every_invalid(rank, world_size, root):
    return {problem: save_invalid(rank, world_size, f"{root}/{problem}/bad", problem) for problem in INVALID}


def test_invalid_sharding_raises_on_every_rank_and_writes_nothing(tmp_path):
    messages_0, messages_1 = run_ranks(save_every_invalid, 2, str(tmp_path))  # one process group for all
    for problem, expected in INVALID.items():
        messages = messages_0[problem], messages_1[problem]
        assert all(m is not None and expected in m for m in messages), (problem, messages)
        assert messages[0] == messages[1]
        ckpt = tmp_path / problem / "bad"
        assert not os.path.exists(ckpt) or os.listdir(ckpt) == []
        assert not os.path.exists(tmp_path / problem / "evil")


def save_with_failing_rank(rank, world_size, ckpt_dir):
    from dist_checkpointing.strategies.zarr import ZarrSaveShardedStrategy

    strategy = ZarrSaveShardedStrategy()
    if rank == 1:
        def failing_save(plan, sharded_state_dict, checkpoint_dir):
            raise OSError(28, "No space left on device")

        strategy.write = failing_save
    with pytest.raises(CheckpointingException) as failure:
        dc.save(sharded_state_dict(rank, 2), ckpt_dir, sharded_strategy=strategy)
    assert not os.path.exists(os.path.join(ckpt_dir, "metadata.json"))
    with pytest.raises(CheckpointingException, match="incomplete checkpoint"):
        dc.load({}, ckpt_dir)
    dist.barrier()
    return str(failure.value), save_and_reload(rank, world_size, ckpt_dir, 2, 1)  # a retry into the same directory


def test_write_failure_on_one_rank_raises_everywhere_and_commits_nothing(tmp_path):
    outcomes = run_ranks(save_with_failing_rank, 2, str(tmp_path / "failed"))
    for message, retried in outcomes:
        assert "No space left on device" in message and "rank(s) 1" in message and "Nothing was committed" in message
        assert retried > 10


def test_multirank_harness_reports_failures():
    with pytest.raises(RankFailed, match="boom"):
        run_ranks(_boom, 2)


def _boom(rank, world_size):
    if rank == 1:
        raise ValueError("boom")


def save_with_rank_dependent_common(rank, world_size, root):
    """Logged messages of a save without, then with, a preprocess that drops `local_time`."""
    import logging

    logs = []
    for name, preprocess in (("a", None), ("b", drop_local_time)):
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("dist_checkpointing.serialization").addHandler(handler)
        state = sharded_state_dict(rank, 2)
        state["local_time"] = rank  # differs per rank
        dc.save(state, f"{root}/{name}", preprocess_common_before_consistancy_check=preprocess)
        logging.getLogger("dist_checkpointing.serialization").removeHandler(handler)
        logs.append([r.getMessage() for r in records])
    return logs


def drop_local_time(common):
    return {k: v for k, v in common.items() if k != "local_time"}


def test_common_state_consistency_is_checked_across_ranks(tmp_path):
    (without_0, with_0), (without_1, with_1) = run_ranks(save_with_rank_dependent_common, 2, str(tmp_path))
    assert any("ranks [1] differ from rank 0" in m for m in without_0)
    assert without_1 == [  # Megatron-Core's message, which its tests look for
        "Rank 1 common state dict differs from rank 0 common state dict. Keys only on rank 0: [], "
        "Keys only on 1: [], Mismatched keys: [(('local_time',), <class 'int'>, <class 'int'>)]"
    ]
    assert dc.load_common_state_dict(str(tmp_path / "a"))["local_time"] == 0
    assert with_0 == with_1 == []  # the preprocess drops what differs

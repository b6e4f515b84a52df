"""Flattened (distributed-optimizer) shards: the data model, saving in every engine, and
loading at other TP/DP layouts, flattened or not."""

import dataclasses
import os

import numpy as np
import pytest
import torch
import zarr
from layouts import FLAT_KEYS, expected_flat, flat_key_shards, flat_state_dict, full
from multirank import run_ranks

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, ShardedTensor
from dist_checkpointing.dtypes import bfloat16_numpy, register_zarr_bfloat16

ENGINES = ["zarr", "tensorstore", "torch_dist"]


def test_from_rank_offsets_flat_follows_megatron():
    data = torch.arange(5.0)
    sh = ShardedTensor.from_rank_offsets_flat("k", data, (3, 4), (0, 1, 2), flattened_range=slice(3, 8))
    assert (sh.local_shape, sh.global_shape, sh.global_offset) == ((3, 4), (6, 4), (3, 0))
    assert sh.axis_fragmentations == (2, 1) and sh.flattened_range == slice(3, 8) and sh.data is data
    with pytest.raises(CheckpointingException, match="from_rank_offsets"):
        ShardedTensor.from_rank_offsets_flat("k", data, (3, 4))
    with pytest.raises(CheckpointingException, match="1-D data"):
        ShardedTensor.from_rank_offsets_flat("k", data.reshape(5, 1), (3, 4), flattened_range=slice(3, 8))
    with pytest.raises(CheckpointingException, match="must equal the length"):
        ShardedTensor.from_rank_offsets_flat("k", data, (3, 4), flattened_range=slice(3, 9))
    with pytest.raises(CheckpointingException, match="exceeds the 12 elements"):
        ShardedTensor.from_rank_offsets_flat("k", data, (3, 4), flattened_range=slice(8, 13))
    with pytest.raises(ValueError, match="from_rank_offsets_flat"):
        ShardedTensor.from_rank_offsets("k", data, flattened_range=slice(0, 5))


@pytest.mark.parametrize("start, stop", [(0, 12), (3, 8), (4, 8), (5, 6), (11, 12), (6, 6)])
def test_covering_box_reads_only_the_rows_a_flat_range_touches(start, stop):
    values = torch.arange(2 * 6 * 4).reshape(2, 6, 4)  # global; the shard is layer 1, rows 3:6
    sh = ShardedTensor.from_rank_offsets_flat(
        "k", torch.zeros(stop - start), (3, 4), (0, 1, 2), (1, 1, 2), prepend_axis_num=1, flattened_range=slice(start, stop)
    )
    (layer, row, col), shape = sh.covering_box()
    assert layer == 1 and col == 0 and shape[0] == 1 and shape[2] == 4
    assert row == 3 + start // 4 and row + shape[1] == 3 + -(-stop // 4)
    box = values[layer : layer + 1, row : row + shape[1]]
    assert torch.equal(sh.from_covering_box(box), values[1, 3:6].reshape(-1)[start:stop])


def save_flat_load_everywhere(rank, world_size, ckpt_dir, engine):
    """Saved at TP2 x DP2 (4 ranks); loaded flattened at TP1 x DP4 and TP4 x DP1, and unflattened
    at TP4; each value checked against the rule."""
    dc.save({"optimizer": flat_state_dict(rank, 2, 2)}, ckpt_dir, sharded_strategy=engine)
    checked = 0
    for tp, dp in [(1, 4), (4, 1), (2, 2)]:
        request = flat_state_dict(rank, tp, dp, with_data=False)
        loaded = dc.load({"optimizer": request}, ckpt_dir)["optimizer"]
        for sh, value in zip(request, loaded):
            assert torch.equal(value, expected_flat(sh)), (sh.key, tp, dp)
            assert value is sh.data  # filled in place
            checked += 1
    shards = flat_key_shards(rank % 4, 4)
    requests = [
        ShardedTensor.from_rank_offsets(key, torch.empty_like(local), *offsets, prepend_axis_num=prepend, replica_id=replica)
        for key, local, offsets, prepend, replica in shards
    ]
    expected = [local for _, local, _, _, _ in shards]
    for request, value, local in zip(requests, dc.load({"x": requests}, ckpt_dir)["x"], expected):
        assert torch.equal(value, local), request.key
        checked += 1
    return checked


@pytest.mark.parametrize("engine", ENGINES)
def test_flattened_save_reshards_across_tp_and_dp(tmp_path, engine):
    ckpt = str(tmp_path / engine)
    counts = run_ranks(save_flat_load_everywhere, 4, ckpt, engine)
    assert all(c >= 12 for c in counts), counts
    plain = dc.load_plain_tensors(ckpt)  # whole tensors, one process (export)
    for key, (gshape, _, dtype) in FLAT_KEYS.items():
        assert torch.equal(plain[key], full(key, gshape, dtype)), key
    if engine != "torch_dist":
        # the stored arrays are plain Zarr arrays of the global shape: any Zarr reader reads them
        key = "optimizer.state.fp32_param.layers.fc2.weight"
        register_zarr_bfloat16()  # zarr-python has no bf16 of its own
        stored = zarr.open_array(os.path.join(ckpt, key), mode="r")[...]
        assert stored.dtype == bfloat16_numpy()
        expected = full(key, FLAT_KEYS[key][0], torch.bfloat16).view(torch.int16).numpy()
        assert np.array_equal(stored.view(np.int16), expected)


def save_with_gap(rank, world_size, ckpt_dir):
    start, stop = [(0, 5), (6, 12)][rank]  # element 5 of the shard is held by nobody
    data = torch.zeros(stop - start)
    sh = ShardedTensor.from_rank_offsets_flat("k", data, (3, 4), flattened_range=slice(start, stop))
    with pytest.raises(CheckpointingException, match="leave a gap at flat element 5"):
        dc.save({"k": sh}, ckpt_dir)
    return os.path.exists(ckpt_dir)


def test_flat_ranges_that_do_not_tile_fail_on_every_rank_before_writing(tmp_path):
    ckpt = str(tmp_path / "c")
    assert run_ranks(save_with_gap, 2, ckpt) == [False, False]


def _to_megatron(sh):
    from megatron.core.dist_checkpointing import ShardedTensor as MTensor

    return MTensor(**{f.name: getattr(sh, f.name) for f in dataclasses.fields(MTensor)})


def save_flat_tp2dp2(rank, world_size, ckpt_dir):
    dc.save({"optimizer": flat_state_dict(rank, 2, 2)}, ckpt_dir, sharded_strategy="torch_dist")


def megatron_loads_our_flat(rank, world_size, ckpt_dir):
    """Megatron-Core's torch_dist loader, flattened requests at TP2 x DP1 (other DP ranges)."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    request = flat_state_dict(rank, 2, 1, with_data=False)
    loaded = TorchDistLoadShardedStrategy().load({"o": [_to_megatron(sh) for sh in request]}, ckpt_dir)["o"]
    for sh, value in zip(request, loaded):
        assert torch.equal(value, expected_flat(sh)), sh.key
    return len(request)


def test_megatron_core_reads_our_flattened_torch_dist(tmp_path):
    pytest.importorskip("megatron.core", reason="installed by `make test` (--no-deps)")
    ckpt = str(tmp_path / "c")
    run_ranks(save_flat_tp2dp2, 4, ckpt)
    assert all(n > 3 for n in run_ranks(megatron_loads_our_flat, 2, ckpt))


def test_each_dp_rank_writes_the_chunks_inside_its_range(monkeypatch):
    """A (12, 4) shard cut at flat elements 18 and 30 over 3 DP ranks, 16-byte rows, 32-byte
    chunk limit: 2-row chunks, each written by the rank holding most of it."""
    from dist_checkpointing.global_plan import GlobalPlan
    from dist_checkpointing.strategies import zarr_plan
    from dist_checkpointing.strategies.config import StrategyConfig

    monkeypatch.setattr(zarr_plan, "FLAT_CHUNK_BYTES", 32)
    ranges = [(0, 18), (18, 30), (30, 48)]
    plan = [[ShardedTensor.from_rank_offsets_flat("k", torch.zeros(b - a), (12, 4), flattened_range=slice(a, b))] for a, b in ranges]
    global_plan = GlobalPlan.of_shards(plan)
    arrays = zarr_plan.plan_arrays(global_plan, StrategyConfig(), 1)
    assert arrays["k"].chunks == (2, 4)
    chunks = zarr_plan.plan_flat_chunks(global_plan, arrays, 1)[("k", (0, 0))]
    assert [c.rows for c in chunks] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    assert [c.writer for c in chunks] == [0, 0, 1, 1, 2, 2]  # chunk 2 (elements 16:24): rank 1 holds 6 of 8
    assert chunks[2].parts == ((16, 18, 0), (18, 24, 1))


def save_big_flat(rank, world_size, ckpt_dir, engine):
    """20 MB: more than one chunk, the DP boundary cutting a chunk."""
    values = torch.arange(1200 * 4096, dtype=torch.float32)
    cut = 1234567
    start, stop = [(0, cut), (cut, values.numel())][rank]
    sh = ShardedTensor.from_rank_offsets_flat("big", values[start:stop].clone(), (1200, 4096), flattened_range=slice(start, stop))
    dc.save({"big": sh}, ckpt_dir, sharded_strategy=engine)
    request = ShardedTensor.from_rank_offsets_flat("big", torch.empty(stop - start), (1200, 4096), flattened_range=slice(start, stop))
    assert torch.equal(dc.load({"big": request}, ckpt_dir)["big"], values[start:stop])
    return sorted(name for name in os.listdir(os.path.join(ckpt_dir, "big")) if name.startswith("c."))


@pytest.mark.parametrize("engine", ["zarr", "tensorstore"])
def test_large_flattened_shard_is_stored_in_row_chunks(tmp_path, engine):
    ckpt = str(tmp_path / engine)
    assert run_ranks(save_big_flat, 2, ckpt, engine)[0] == ["c.0.0", "c.1.0"]  # rows 0:600 and 600:1200
    whole = dc.load_plain_tensors(ckpt)["big"]
    assert torch.equal(whole, torch.arange(1200 * 4096, dtype=torch.float32).reshape(1200, 4096))


def test_torch_dist_refuses_flattened_shards_off_a_regular_grid():
    from dist_checkpointing.global_plan import GlobalPlan
    from dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    uneven = [  # rows 0:3 and 3:4 of a (4, 2) tensor, the first flattened
        ShardedTensor("k", None, torch.float32, (3, 2), (4, 2), (0, 0), None, flattened_range=slice(0, 6)),
        ShardedTensor("k", None, torch.float32, (1, 2), (4, 2), (3, 0), None),
    ]
    with pytest.raises(CheckpointingException, match="needs equal shards on a regular grid.*Use the zarr engine"):
        TorchDistSaveShardedStrategy().plan(GlobalPlan.of_shards([[sh] for sh in uneven]), [None, None], 1)

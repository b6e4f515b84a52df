"""Checkpoints written by Megatron-Core load: 0.15.3 zarr (Zarr v2 arrays, bf16 as "bfloat16"),
0.15.3 torch_dist (DCP with Megatron's own metadata class), 0.16.1 torch_dist, and the newest
format (core_v0.19+: the common state inside the DCP files, no common.pt; integrity.json)."""

import json
import os
import shutil

import pytest
import torch
from layouts import full

import dist_checkpointing as dc
from dist_checkpointing import ShardedObject, ShardedTensor
from dist_checkpointing.inspection import verify

FIXTURES_DIR = os.path.join(os.path.dirname(__file__), "fixtures")
FIXTURE = os.path.join(FIXTURES_DIR, "mcore015_zarr_tp2")
FIXTURES = [
    os.path.join(FIXTURES_DIR, name)
    for name in ("mcore015_zarr_tp2", "mcore015_torch_dist_tp2", "mcore016_torch_dist_tp2", "mcore019_torch_dist_tp2")
]
# (fixture, engine to read it with: None = the one metadata.json names)
READS = [(FIXTURES[0], None), (FIXTURES[0], "tensorstore")] + [(fixture, None) for fixture in FIXTURES[1:]]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "int64": torch.int64}
# How the fixture's model shards each key, as (axis split over TP, stacked layers?).
SPLITS = {
    "embedding.word_embeddings.weight": (0, False),
    "decoder.layers.self_attention.linear_qkv.weight": (1, True),
    "decoder.layers.mlp.linear_fc2.weight": (2, True),
    "decoder.final_layernorm.weight": (None, False),
    "counters.tokens": (None, False),
}


def manifest(fixture=FIXTURE):
    with open(fixture + ".manifest.json") as f:
        return json.load(f)


def request_at_tp(rank, tp, fixture=FIXTURE):
    """The fixture's tensors as a model at TP=`tp` would request them."""
    request, expected = {}, {}
    for entry in manifest(fixture)["tensors"]:
        key, shape, dtype = entry["key"], tuple(entry["global_shape"]), DTYPES[entry["dtype"]]
        axis, stacked = SPLITS[key]
        values = full(key, shape, dtype)
        if axis is None:
            request[key] = ShardedTensor.from_rank_offsets(key, torch.empty_like(values), replica_id=rank)
            expected[key] = values
            continue
        size = shape[axis] // tp
        local = values.narrow(axis, (rank % tp) * size, size)
        if stacked:
            request[key] = [
                ShardedTensor.from_rank_offsets(
                    key, torch.empty_like(local[i]), (0, i, shape[0]), (axis, rank % tp, tp), prepend_axis_num=1
                )
                for i in range(shape[0])
            ]
            expected[key] = [local[i] for i in range(shape[0])]
        else:
            request[key] = ShardedTensor.from_rank_offsets(key, torch.empty_like(local), (axis, rank % tp, tp))
            expected[key] = local
    request["rng"] = [ShardedObject("rng_state", None, (2,), (i,), replica_id=rank) for i in range(2)]
    return request, expected


def check_fixture_at_tp(fixture, rank, tp, engine=None, **load_options):
    request, expected = request_at_tp(rank, tp, fixture)
    loaded = dc.load(request, fixture, sharded_strategy=engine, **load_options)
    assert loaded["common"] == manifest(fixture)["common"]
    assert loaded["rng"] == manifest(fixture)["sharded_objects"]["rng_state"]
    for key, exp in expected.items():
        got = loaded[key]
        for e, g in zip(exp, got) if isinstance(exp, list) else [(exp, got)]:
            assert g.dtype == e.dtype and torch.equal(g, e), key
    return len(expected)


@pytest.mark.parametrize("fixture, engine", READS, ids=lambda x: os.path.basename(str(x)))
def test_fixture_loads_at_tp1(fixture, engine):
    assert check_fixture_at_tp(fixture, 0, 1, engine) == 5


@pytest.mark.parametrize("fixture", FIXTURES, ids=os.path.basename)
def test_fixture_metadata_and_plain_tensors(fixture):
    metadata = dc.load_tensors_metadata(fixture)
    for entry in manifest(fixture)["tensors"]:
        sh = metadata[entry["key"]]
        assert sh.global_shape == tuple(entry["global_shape"]) and sh.dtype == DTYPES[entry["dtype"]]
    plain = dc.load_plain_tensors(fixture)
    assert set(plain) == {entry["key"] for entry in manifest(fixture)["tensors"]}
    for entry in manifest(fixture)["tensors"]:
        key = entry["key"]
        assert torch.equal(plain[key], full(key, tuple(entry["global_shape"]), DTYPES[entry["dtype"]]))
    objects = dc.load_sharded_metadata(fixture)
    assert {"rng_state/shard_0_2", "rng_state/shard_1_2"} <= set(objects)


@pytest.mark.parametrize("fixture", FIXTURES[1:], ids=os.path.basename)
def test_remove_sharded_tensors_on_megatron_torch_dist(fixture, tmp_path):
    copy = str(tmp_path / "c")
    shutil.copytree(fixture, copy)
    dc.remove_sharded_tensors(copy, "decoder.")
    assert sorted(dc.load_tensors_metadata(copy)) == ["counters.tokens", "embedding.word_embeddings.weight"]
    assert verify(copy)[0] == []  # integrity.json, where there is one, was rewritten

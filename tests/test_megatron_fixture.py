"""A checkpoint written by Megatron-Core 0.15.3 (zarr v2 arrays, bf16 as "bfloat16") loads."""

import json
import os

import torch

import dist_checkpointing as dc
from dist_checkpointing import ShardedObject, ShardedTensor
from layouts import full

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "mcore015_zarr_tp2")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "int64": torch.int64}
# How the fixture's model shards each key, as (axis split over TP, stacked layers?).
SPLITS = {
    "embedding.word_embeddings.weight": (0, False),
    "decoder.layers.self_attention.linear_qkv.weight": (1, True),
    "decoder.layers.mlp.linear_fc2.weight": (2, True),
    "decoder.final_layernorm.weight": (None, False),
    "counters.tokens": (None, False),
}


def manifest():
    with open(FIXTURE + ".manifest.json") as f:
        return json.load(f)


def request_at_tp(rank, tp):
    """The fixture's tensors as a model at TP=`tp` would request them."""
    request, expected = {}, {}
    for entry in manifest()["tensors"]:
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


def check_fixture_at_tp(fixture, rank, tp):
    request, expected = request_at_tp(rank, tp)
    loaded = dc.load(request, fixture)
    assert loaded["common"] == manifest()["common"]
    assert loaded["rng"] == manifest()["sharded_objects"]["rng_state"]
    for key, exp in expected.items():
        got = loaded[key]
        for e, g in zip(exp, got) if isinstance(exp, list) else [(exp, got)]:
            assert g.dtype == e.dtype and torch.equal(g, e), key
    return len(expected)


def test_fixture_loads_at_tp1():
    assert check_fixture_at_tp(FIXTURE, 0, 1) == 5


def test_fixture_metadata_and_plain_tensors():
    metadata = dc.load_tensors_metadata(FIXTURE)
    for entry in manifest()["tensors"]:
        sh = metadata[entry["key"]]
        assert sh.global_shape == tuple(entry["global_shape"]) and sh.dtype == DTYPES[entry["dtype"]]
    plain = dc.load_plain_tensors(FIXTURE)
    for entry in manifest()["tensors"]:
        key = entry["key"]
        assert torch.equal(plain[key], full(key, tuple(entry["global_shape"]), DTYPES[entry["dtype"]]))
    objects = dc.load_sharded_metadata(FIXTURE)
    assert {"rng_state/shard_0_2", "rng_state/shard_1_2"} <= set(objects)

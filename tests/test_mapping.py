"""The data model, factories, dict helpers and the sharding checks, without ranks."""

import pytest
import torch

import dist_checkpointing as dc
from dist_checkpointing import (
    CheckpointingException,
    LocalNonpersistentObject,
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)
from dist_checkpointing.dict_utils import diff, extract_matching_values, merge, nested_values
from dist_checkpointing.validation import validate_sharding_integrity


def test_from_rank_offsets_and_global_slice():
    x = torch.zeros(4, 6)
    sh = ShardedTensor.from_rank_offsets("k", x, (0, 2, 3), (2, 1, 4), prepend_axis_num=1)
    assert sh.global_shape == (3, 4, 24) and sh.global_offset == (2, 0, 6)
    assert sh.axis_fragmentations == (3, 1, 4)
    assert sh.global_slice() == (2, slice(0, 4), slice(6, 12))
    assert sh.local_chunk_offset_in_global() == (2, 0, 1)
    assert sh.without_data().data is None and sh.data is x
    with pytest.raises(CheckpointingException, match="Invalid rank offsets"):
        ShardedTensor.from_rank_offsets("k", x, (0, 3, 3))
    with pytest.raises(CheckpointingException, match="data dtype"):
        ShardedTensor("k", x, torch.float16, (4, 6), (4, 6), (0, 0), None)


def test_whole_tensor_metadata_is_the_entry_the_constructor_makes():
    """Built without __init__ (a checkpoint lists 10^4-10^5 entries), it has every field the
    constructor gives, and refuses what the constructor refuses."""
    from dist_checkpointing.mapping import whole_tensor_metadata

    for shape, flattened in (((6, 4), False), ((6, 4), True), ((), False), ((0, 3), True)):
        built = ShardedTensor("k", None, torch.bfloat16, shape, shape, (0,) * len(shape), (1,) * len(shape))
        if flattened:
            built.flattened_range = slice(0, built.nbytes // 2)
        entry = whole_tensor_metadata("k", torch.bfloat16, list(shape), flattened)
        assert vars(entry) == vars(built) and entry == built
    for key, shape in (("", (2,)), (3, (2,)), ("k", (-1, 2))):
        with pytest.raises(CheckpointingException):
            whole_tensor_metadata(key, torch.float32, shape)


def test_narrow_scales_the_global_view():
    sh = ShardedTensor.from_rank_offsets("k", torch.arange(8.0).reshape(4, 2), (0, 1, 2))
    (narrowed,) = sh.narrow(0, 1, 2)
    assert narrowed.global_shape == (4, 2) and narrowed.global_offset == (2, 0)
    assert torch.equal(narrowed.data, sh.data[1:3])


def test_sharded_object_unique_key_roundtrip():
    obj = ShardedObject("rng", {"s": 1}, (2, 3), (1, 2), replica_id=(0, 1))
    assert obj.unique_key == "rng/shard_1.2_2.3"
    back = ShardedObject.empty_from_unique_key(obj.unique_key)
    assert (back.key, back.global_shape, back.global_offset) == ("rng", (2, 3), (1, 2))
    assert not is_main_replica(obj.replica_id) and is_main_replica((0, 0)) and is_main_replica(0)
    with pytest.raises(CheckpointingException):
        ShardedObject.empty_from_unique_key("rng/nonsense")


def swiglu_factory(key, weight, replica_id=0):
    """A fused fc1 weight stored as two keys (SwiGLU's gate and up halves)."""

    def build(key, data, replica_id, flattened_range):
        gate, up = torch.chunk(data, 2)
        return {
            "gate": ShardedTensor.from_rank_offsets(f"{key}.gate", gate, replica_id=replica_id),
            "up": ShardedTensor.from_rank_offsets(f"{key}.up", up, replica_id=replica_id),
        }

    def merge_fn(sub_state_dict):
        return torch.cat([sub_state_dict["gate"], sub_state_dict["up"]])

    return ShardedTensorFactory(key, weight, build, merge_fn, replica_id)


def test_factory_save_load_and_nonpersistent(tmp_path):
    weight = torch.arange(12.0).reshape(4, 3)
    path = str(tmp_path / "f")
    state = {"fc1": swiglu_factory("fc1", weight), "local": LocalNonpersistentObject("mine")}
    dc.save(state, path)
    assert isinstance(state["fc1"], ShardedTensorFactory)  # the caller's dict is left as is
    assert set(dc.load_tensors_metadata(path)) == {"fc1.gate", "fc1.up"}
    loaded = dc.load({"fc1": swiglu_factory("fc1", torch.zeros(4, 3)), "local": LocalNonpersistentObject(42)}, path)
    assert torch.equal(loaded["fc1"], weight) and loaded["local"] == 42


def test_common_state_keeps_empty_containers(tmp_path):
    """As in Megatron-Core's saves: an empty dict or list is common state (e.g. an optimizer's
    `state: {}` before its first step); a container left empty by dropped or sharded leaves is not."""
    path = str(tmp_path / "c")
    common = {"opt": {"state": {}, "groups": [[], {"lr": 0.1}]}, "mixed": [1, {}, 2]}
    state = {
        **common,
        "only_local": {"x": LocalNonpersistentObject(1)},
        "only_sharded": {"w": ShardedTensor.from_rank_offsets("w", torch.ones(3))},
    }
    dc.save(state, path)
    assert dc.load_common_state_dict(path) == common
    loaded = dc.load({"only_sharded": {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(3))}}, path)
    assert loaded["opt"] == common["opt"] and torch.equal(loaded["only_sharded"]["w"], torch.ones(3))


def test_dict_utils():
    x = {"a": [1, {"b": 2}], "c": 3, "e": {}}
    match, rest = extract_matching_values(x, lambda v: v == 2)
    assert match == {"a": [{"b": 2}]} and rest == {"a": [1], "c": 3, "e": {}}
    assert list(nested_values(x)) == [1, 2, 3]
    assert merge({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
    left, right, mismatch = diff({"a": torch.ones(2), "b": 1}, {"a": torch.zeros(2), "c": 1})
    assert left == [("b",)] and right == [("c",)] and mismatch[0][0] == ("a",)


def shard(key, offset, shape, gshape, replica_id=0, dtype=torch.float32, flat=None):
    return ShardedTensor(key, None, dtype, shape, gshape, offset, None, replica_id, flattened_range=flat)


@pytest.mark.parametrize(
    "global_metadata, message",
    [
        ([[shard("k", (0,), (4,), (8,))], [shard("k", (2,), (4,), (8,))]], r"elements \[2:4\] are held by 2"),
        ([[shard("k", (0,), (4,), (8,))], [shard("k", (4,), (4,), (8,), replica_id=1)]], r"\[4:8\] are held by 0"),
        ([[shard("k", (0,), (4,), (8,))], [shard("k", (4,), (4,), (9,))]], "Inconsistent shards"),
        ([[shard("k", (6,), (4,), (8,))]], "exceeds the global shape"),
        ([[shard("k", (0, 0), (2, 2), (2, 2), flat=slice(0, 3))], [shard("k", (0, 0), (2, 2), (2, 2), flat=slice(2, 4))]], "overlap"),
        ([[shard("k", (0, 0), (2, 2), (2, 2), flat=slice(0, 3))]], "cover 3 of 4"),
        ([[shard("k", (0,), (4,), (4,))], [ShardedObject("k", None, (1,), (0,))]], "different kinds"),
    ],
)
def test_sharding_violations_name_the_key(global_metadata, message):
    with pytest.raises(CheckpointingException, match=message):
        validate_sharding_integrity(global_metadata)


def test_irregular_but_exact_cover_is_valid():
    shards = [shard("k", (0, 0), (3, 5), (5, 5)), shard("k", (3, 0), (2, 2), (5, 5)), shard("k", (3, 2), (2, 3), (5, 5))]
    validate_sharding_integrity([[s] for s in shards])
    flat = [shard("f", (0, 0), (2, 2), (2, 2), flat=slice(a, b)) for a, b in [(0, 1), (1, 4)]]
    validate_sharding_integrity([[f] for f in flat])


def test_no_torch_cuda_calls_on_cpu(tmp_path, monkeypatch):
    """CPU-only torch must work: generic code never touches torch.cuda."""

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda was called")

    for name in ("is_available", "current_device", "synchronize", "device_count", "set_device", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    from layouts import check_loaded, sharded_state_dict

    path = str(tmp_path / "cpu")
    dc.save(sharded_state_dict(0, 1), path)
    assert check_loaded(dc.load(sharded_state_dict(0, 1, with_data=False), path), 0, 1) > 10


def test_package_root_exports_megatron_names():
    for name in (
        "ShardedTensor", "ShardedObject", "ShardedTensorFactory", "LocalNonpersistentObject",
        "save", "load", "load_common_state_dict", "load_tensors_metadata", "load_sharded_metadata",
        "load_plain_tensors", "remove_sharded_tensors", "get_default_save_sharded_strategy",
        "get_default_load_sharded_strategy", "CheckpointingException", "CheckpointingConfig",
        "check_is_distributed_checkpoint", "StrictHandling",
    ):
        assert hasattr(dc, name), name
    from dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    # Megatron-Core's function and default arguments; `save` alone uses the library's default
    assert isinstance(dc.get_default_save_sharded_strategy(), TorchDistSaveShardedStrategy)
    assert dc.serialization.DEFAULT_BACKEND == "zarr"

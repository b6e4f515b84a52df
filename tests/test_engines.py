"""The three engines: every save engine x every load engine that reads its format, across
layouts and dtypes; irregular and empty shards; config-driven selection; DCP interop."""

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
import zarr
from layouts import check_loaded, full, sharded_state_dict
from multirank import run_ranks

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, ShardedTensor
from dist_checkpointing.dtypes import register_zarr_bfloat16
from dist_checkpointing.strategies.config import StrategyConfig

SAVE_CONFIGS = {
    "zarr": {"backend": "zarr"},
    "tensorstore": {"backend": "tensorstore"},
    "torch_dist": {"backend": "torch_dist"},
    "zarr-v2-blosc": {"backend": "zarr", "zarr_format": 2, "compression": "blosc"},
    "tensorstore-zstd": {"backend": "tensorstore", "compression": "zstd"},
}


def readers_of(config):
    return ["torch_dist"] if config["backend"] == "torch_dist" else ["zarr", "tensorstore"]


def save_tp2dp2_load_tp4_and_dp4(rank, world_size, ckpt_dir, config):
    dc.save(sharded_state_dict(rank, 2, 2), ckpt_dir, sharded_strategy=config)
    counts = []
    for reader in [None] + readers_of(config):  # None: the engine metadata.json names
        for tp, dp in [(4, 1), (1, 4)]:
            request = sharded_state_dict(rank, tp, dp, with_data=False, objects=False)
            loaded = dc.load(request, ckpt_dir, sharded_strategy=reader)
            counts.append(check_loaded(loaded, rank, tp, dp))
    request = sharded_state_dict(rank, 2, 2, with_data=False)
    assert dc.load(request, ckpt_dir)["rng"] == {"seed": 1000 + rank % 2}
    return counts


@pytest.mark.parametrize("name", SAVE_CONFIGS)
def test_save_engine_x_load_engine_x_layouts_x_dtypes(tmp_path, name):
    config = SAVE_CONFIGS[name]
    ckpt = str(tmp_path / name)
    counts = run_ranks(save_tp2dp2_load_tp4_and_dp4, 4, ckpt, config)
    n_tensors = 1 + 2 * 2 + 1 + 10  # embedding, 2 stacked keys x 2 layers, norm, 10 dtypes
    assert all(c == n_tensors for rank_counts in counts for c in rank_counts)
    with open(os.path.join(ckpt, "metadata.json")) as f:
        assert json.load(f)["sharded_backend"] == config["backend"]
    # and whole, in this process, without torch.distributed
    plain = dc.load_plain_tensors(ckpt)
    assert torch.equal(plain["embedding.weight"], full("embedding.weight", (64, 16), torch.bfloat16))


def irregular_state(rank, with_data=True):
    """`vocab` split 7/5/6/6 rows over 4 ranks; `sparse` with empty shards on ranks 0 and 3."""
    state = {}
    for key, global_shape, rows in [("vocab", (24, 8), [7, 5, 6, 6]), ("sparse", (10,), [0, 4, 6, 0])]:
        start = sum(rows[:rank])
        values = full(key, global_shape, torch.float32)[start : start + rows[rank]]
        data = values.clone() if with_data else torch.empty_like(values)
        offset = (start,) + (0,) * (len(global_shape) - 1)
        state[key] = ShardedTensor(
            key, data, data.dtype, tuple(data.shape), global_shape, offset, None, replica_id=0
        )
    return state


def save_irregular_and_reload_evenly(rank, world_size, ckpt_dir, backend):
    dc.save(irregular_state(rank), ckpt_dir, sharded_strategy=backend)
    # read back at an even 4-way split of the rows (a different layout)
    vocab = full("vocab", (24, 8), torch.float32)[6 * rank : 6 * rank + 6]
    request = {"vocab": ShardedTensor.from_rank_offsets("vocab", torch.empty_like(vocab), (0, rank, 4))}
    loaded = dc.load(request, ckpt_dir)
    assert torch.equal(loaded["vocab"], vocab)
    return True


@pytest.mark.parametrize("backend", ["zarr", "tensorstore", "torch_dist"])
def test_irregular_and_empty_shards(tmp_path, backend):
    ckpt = str(tmp_path / backend)
    assert run_ranks(save_irregular_and_reload_evenly, 4, ckpt, backend) == [True] * 4
    plain = dc.load_plain_tensors(ckpt)
    assert torch.equal(plain["vocab"], full("vocab", (24, 8), torch.float32))
    assert torch.equal(plain["sparse"], full("sparse", (10,), torch.float32))
    if backend != "torch_dist":  # the chunk grid: gcd of the interior boundaries 7, 12, 18
        with open(os.path.join(ckpt, "vocab", "zarr.json")) as f:
            assert json.load(f)["chunk_grid"]["configuration"]["chunk_shape"] == [1, 8]
        with open(os.path.join(ckpt, "sparse", "zarr.json")) as f:
            assert json.load(f)["chunk_grid"]["configuration"]["chunk_shape"] == [4]
        assert len([n for n in os.listdir(os.path.join(ckpt, "vocab")) if n.startswith("c.")]) == 24


def test_chunk_grid_is_the_largest_that_respects_every_shard():
    from dist_checkpointing.strategies.zarr_plan import chunk_grid

    assert chunk_grid((64, 16), [((0, 0), (32, 16)), ((32, 0), (32, 16))]) == (32, 16)
    assert chunk_grid((10,), [((0,), (4,)), ((4,), (4,)), ((8,), (2,))]) == (4,)  # short last
    assert chunk_grid((24,), [((0,), (8,)), ((8,), (16,))]) == (8,)
    assert chunk_grid((12, 6), [((0, 0), (12, 6))]) == (12, 6)
    assert chunk_grid((0, 3), []) == (1, 3)
    assert chunk_grid((), [((), ())]) == ()


@pytest.mark.parametrize("zarr_format, compression", [(2, None), (2, "zstd"), (3, "zstd"), (3, "blosc")])
@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_zarr_format_and_compression_options(tmp_path, backend, zarr_format, compression):
    import tensorstore as ts

    config = StrategyConfig(backend=backend, zarr_format=zarr_format, compression=compression)
    ckpt = str(tmp_path / "c")
    dc.save(sharded_state_dict(0, 1), ckpt, sharded_strategy=config)
    key = "dtypes.bfloat16"
    if zarr_format == 2:
        with open(os.path.join(ckpt, key, ".zarray")) as f:
            doc = json.load(f)
        assert doc["dtype"] == "bfloat16" and doc["dimension_separator"] == "."
        assert (doc["compressor"] or {}).get("id") == compression
        driver = "zarr"
    else:
        with open(os.path.join(ckpt, key, "zarr.json")) as f:
            codecs = [c["name"] for c in json.load(f)["codecs"]]
        assert codecs == ["bytes", compression, "crc32c"]
        driver = "zarr3"
    # stock tensorstore reads it
    array = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": os.path.join(ckpt, key)}}).result()
    stored = torch.from_numpy(array.read().result().view("int16")).view(torch.bfloat16)
    assert torch.equal(stored, full(key, (8, 12), torch.bfloat16))
    # stock zarr-python opens the directory as a group from its consolidated metadata (one read)
    register_zarr_bfloat16()  # zarr-python has no bf16 of its own
    group = zarr.open_consolidated(ckpt, zarr_format=zarr_format)
    assert sorted(group.array_keys()) == sorted(dc.load_tensors_metadata(ckpt))
    assert group[key].metadata.chunks == zarr.open_array(os.path.join(ckpt, key), mode="r").metadata.chunks
    for reader in ("zarr", "tensorstore"):
        loaded = dc.load(sharded_state_dict(0, 1, with_data=False), ckpt, sharded_strategy=reader)
        assert check_loaded(loaded, 0, 1) == 16


def test_config_from_plain_data():
    config = StrategyConfig.from_dict({"backend": "tensorstore", "compression": "zstd", "thread_count": 4})
    assert config.level == 3 and config.zarr_format == 3
    for bad, message in [
        ({"backend": "hdf5"}, "backend 'hdf5'"),
        ({"backned": "zarr"}, "Unknown strategy config fields \\['backned'\\]"),
        ({"zarr_format": 4}, "zarr_format must be 2 or 3"),
        ({"backend": "torch_dist", "compression": "zstd"}, "apply to"),
        ({"compression_level": 3}, "needs a compression"),
        ({"thread_count": 0}, "thread_count"),
    ]:
        with pytest.raises(CheckpointingException, match=message):
            StrategyConfig.from_dict(bad)


def test_load_uses_the_recorded_engine_unless_told(tmp_path):
    from dist_checkpointing.strategies.tensorstore import TensorStoreLoadShardedStrategy
    from dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
    from dist_checkpointing.strategies.zarr import ZarrLoadShardedStrategy

    ts_ckpt, td_ckpt = str(tmp_path / "ts"), str(tmp_path / "td")
    dc.save(sharded_state_dict(0, 1), ts_ckpt, sharded_strategy=("tensorstore", 1))
    dc.save(sharded_state_dict(0, 1), td_ckpt, sharded_strategy=StrategyConfig(backend="torch_dist"))
    assert isinstance(dc.get_default_load_sharded_strategy(ts_ckpt), TensorStoreLoadShardedStrategy)
    assert isinstance(dc.get_default_load_sharded_strategy(td_ckpt), TorchDistLoadShardedStrategy)
    request = sharded_state_dict(0, 1, with_data=False)
    loaded = dc.load(request, ts_ckpt, sharded_strategy=ZarrLoadShardedStrategy())
    assert check_loaded(loaded, 0, 1) == 16
    with pytest.raises(CheckpointingException, match="cannot read a checkpoint written with backend 'torch_dist'"):
        dc.load(sharded_state_dict(0, 1, with_data=False), td_ckpt, sharded_strategy="zarr")


@pytest.mark.parametrize("backend", ["tensorstore", "torch_dist"])
def test_shape_mismatch_padding_and_clear_errors(tmp_path, backend):
    ckpt = str(tmp_path / "c")
    dc.save({"w": ShardedTensor.from_rank_offsets("w", torch.arange(6.0).reshape(2, 3))}, ckpt, sharded_strategy=backend)
    bigger = ShardedTensor.from_rank_offsets("w", torch.empty(3, 4), allow_shape_mismatch=True)
    loaded = dc.load({"w": bigger}, ckpt)["w"]
    assert torch.equal(loaded[:2, :3], torch.arange(6.0).reshape(2, 3)) and loaded[2:].abs().sum() == 0
    assert loaded[:, 3].abs().sum() == 0
    with pytest.raises(CheckpointingException, match="Key 'w' has global shape \\(2, 3\\)"):
        dc.load({"w": ShardedTensor.from_rank_offsets("w", torch.empty(3, 4))}, ckpt)
    # another dtype is converted: into the caller's tensor, or into a new one
    wide = torch.empty(2, 3, dtype=torch.float64)
    assert dc.load({"w": ShardedTensor.from_rank_offsets("w", wide)}, ckpt)["w"] is wide
    assert torch.equal(wide, torch.arange(6.0, dtype=torch.float64).reshape(2, 3))
    narrow = ShardedTensor.from_rank_offsets("w", torch.empty(1, 3, dtype=torch.bfloat16, device="meta"), (0, 1, 2))
    loaded = dc.load({"w": narrow}, ckpt, validate_access_integrity=False)["w"]
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, torch.tensor([[3.0, 4.0, 5.0]], dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", ["zarr", "tensorstore", "torch_dist"])
def test_metadata_apis_and_remove_sharded_tensors(tmp_path, backend):
    ckpt = str(tmp_path / "c")
    dc.save(sharded_state_dict(0, 1), ckpt, sharded_strategy=backend)
    metadata = dc.load_tensors_metadata(ckpt)
    assert metadata["layers.qkv.weight"].global_shape == (2, 48, 16)
    assert metadata["embedding.weight"].dtype == torch.bfloat16
    assert "rng_state/shard_0_1" in dc.load_sharded_metadata(ckpt)
    dc.remove_sharded_tensors(ckpt, "dtypes.")
    assert not any(k.startswith("dtypes.") for k in dc.load_tensors_metadata(ckpt))
    assert not any(k.startswith("dtypes.") for k in dc.load_plain_tensors(ckpt))
    request = sharded_state_dict(0, 1, with_data=False)
    with pytest.raises(CheckpointingException, match="dtypes.bfloat16"):
        dc.load(request, ckpt)
    del request["dtypes"]
    assert dc.load(request, ckpt)["rng"] == {"seed": 1000}


def test_torch_dist_checkpoint_loads_with_stock_dcp(tmp_path):
    import torch.distributed.checkpoint as dcp

    ckpt = str(tmp_path / "c")
    run_ranks(_save_tp2_torch_dist, 2, ckpt)
    assert sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp"))[0] == "__0_0.distcp"
    state = {"embedding.weight": torch.empty(64, 16, dtype=torch.bfloat16), "layers.fc2.weight": torch.empty(2, 16, 64, dtype=torch.float16)}
    dcp.load(state, checkpoint_id=ckpt)  # stock DCP, no process group: keys -> full tensors
    for key, value in state.items():
        assert torch.equal(value, full(key, tuple(value.shape), value.dtype)), key


def test_a_torch_dist_load_does_not_import_dcp(tmp_path):
    """`.metadata` is read without DCP's package (about a second to import): a fresh process
    loads a torch_dist checkpoint, checked, and has not imported it."""
    ckpt = str(tmp_path / "c")
    run_ranks(_save_tp2_torch_dist, 2, ckpt)
    code = f"""
import sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from layouts import check_loaded, sharded_state_dict
import dist_checkpointing as dc
check_loaded(dc.load(sharded_state_dict(0, 2, with_data=False), {ckpt!r}, validate_access_integrity=False), 0, 2)
assert "layers.qkv.weight" in dc.load_tensors_metadata({ckpt!r})
print(sorted(m for m in sys.modules if m.startswith("torch.distributed.checkpoint")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_mcore_load_planner_in_stock_dcp(tmp_path):
    """Megatron-Core's planner under stock DCP's load: our TP2 checkpoint read into another
    layout's boxes (CheckpointableShardedTensor), global shapes checked first."""
    import torch.distributed.checkpoint as dcp

    from dist_checkpointing.strategies.checkpointable import CheckpointableShardedTensor
    from dist_checkpointing.strategies.torch import MCoreLoadPlanner

    ckpt = str(tmp_path / "c")
    run_ranks(_save_tp2_torch_dist, 2, ckpt)
    box = ShardedTensor.from_rank_offsets("embedding.weight", torch.zeros(16, 16, dtype=torch.bfloat16), (0, 1, 4))
    state = {"embedding.weight": CheckpointableShardedTensor.from_sh_ten(box)}
    dcp.load(state, checkpoint_id=ckpt, planner=MCoreLoadPlanner(shapes_validation_sharded_tensors=[box]))
    assert torch.equal(box.data, full("embedding.weight", (64, 16), torch.bfloat16)[16:32])
    wrong = ShardedTensor.from_rank_offsets("embedding.weight", torch.zeros(16, 16, dtype=torch.bfloat16), (0, 1, 5))
    with pytest.raises(BaseException, match=r"Global shape mismatch for loaded \(\(64, 16\)\) and expected \(\(80, 16\)\)"):
        dcp.load(state, checkpoint_id=ckpt, planner=MCoreLoadPlanner(shapes_validation_sharded_tensors=[wrong]))  # DCP wraps it in a BaseException


def _save_tp2_torch_dist(rank, world_size, ckpt_dir):
    dc.save(sharded_state_dict(rank, 2), ckpt_dir, sharded_strategy="torch_dist")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dist_ckpt_pwned",))


def test_tampered_dcp_metadata_does_not_run_code(tmp_path):
    ckpt = str(tmp_path / "c")
    dc.save(sharded_state_dict(0, 1), ckpt, sharded_strategy="torch_dist")
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump({"payload": _RunsCode()}, f)
    if os.path.exists("/tmp/dist_ckpt_pwned"):
        os.unlink("/tmp/dist_ckpt_pwned")
    with pytest.raises(CheckpointingException, match="posix.system, which is not a DCP metadata class"):
        dc.load(sharded_state_dict(0, 1, with_data=False), ckpt)
    assert not os.path.exists("/tmp/dist_ckpt_pwned")


def test_damaged_distcp_file_names_file_and_keys(tmp_path):
    ckpt = str(tmp_path / "c")
    dc.save(sharded_state_dict(0, 1), ckpt, sharded_strategy="torch_dist")
    data_file = os.path.join(ckpt, "__0_0.distcp")
    with open(data_file, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointingException, match="__0_0.distcp") as error:
        dc.load(sharded_state_dict(0, 1, with_data=False), ckpt)
    assert "Key '" in str(error.value) and "truncated" in str(error.value)
    os.unlink(data_file)
    with pytest.raises(CheckpointingException, match="__0_0.distcp"):
        dc.load(sharded_state_dict(0, 1, with_data=False), ckpt)


def test_config_selects_engine_and_records_it(tmp_path):
    ckpt = str(tmp_path / "c")
    dc.save(sharded_state_dict(0, 1), ckpt, sharded_strategy={"backend": "tensorstore", "thread_count": 1})
    with open(os.path.join(ckpt, "metadata.json")) as f:
        assert json.load(f)["sharded_backend"] == "tensorstore"
    shutil.rmtree(ckpt)
    with pytest.raises(CheckpointingException, match="Unknown strategy config fields"):
        dc.save(sharded_state_dict(0, 1), ckpt, sharded_strategy={"engine": "zarr"})
    assert not os.path.exists(ckpt)


@pytest.mark.parametrize("name, engine", [
    ("zarr", None), ("tensorstore", None), ("torch_dist", None), ("zarr_v2", None),
    ("zstd", "zarr"), ("zstd", "tensorstore"),  # compressed: decoded by the engine into the tensors
])
def test_load_fills_the_callers_tensors_in_place(tp2_checkpoints, name, engine):
    """A request holding a tensor of the right shape and dtype gets that very tensor back,
    filled (also a strided view into a larger buffer, and at another layout than saved); one
    without data, or on the meta device, gets a new tensor."""
    request = sharded_state_dict(0, 1, with_data=False, objects=False)  # saved at TP=2
    buffer = torch.zeros(16, 64 + 3, dtype=torch.bfloat16)  # the caller's view into a fused buffer
    request["embedding"].data = buffer[:, 3:].t()
    request["final_norm"].data = torch.empty(16, device="meta")
    request["none"] = dataclasses.replace(request["dtypes"][0], data=None, replica_id=1)
    parameter = request["dtypes"][2].data = torch.nn.Parameter(torch.zeros(8, 12))  # float32, requires grad
    held = {
        "embedding": request["embedding"].data,
        "dtypes": [sh.data for sh in request["dtypes"]],
        "qkv": [sh.data for sh in request["layers"]["qkv"]],
        "fc2": [sh.data for sh in request["layers"]["fc2"]],
    }
    loaded = dc.load(request, f"{tp2_checkpoints}/{name}", engine)
    assert check_loaded({k: v for k, v in loaded.items() if k != "none"}, 0, 1) > 10
    assert loaded["embedding"] is held["embedding"]
    assert torch.equal(buffer[:, 3:].t(), full("embedding.weight", (64, 16), torch.bfloat16))
    assert all(a is b for a, b in zip(loaded["dtypes"], held["dtypes"]))
    assert all(a is b for a, b in zip(loaded["layers"]["qkv"], held["qkv"]))  # prepended axis
    assert all(a is b for a, b in zip(loaded["layers"]["fc2"], held["fc2"]))
    assert loaded["dtypes"][2] is parameter and parameter.requires_grad
    assert loaded["final_norm"].device.type == "cpu"  # the meta request gets a new tensor
    assert torch.equal(loaded["none"], loaded["dtypes"][0]) and loaded["none"] is not held["dtypes"][0]


def test_a_load_imports_only_the_engine_it_needs(tp2_checkpoints):
    import subprocess
    import sys

    script = (
        "import sys, dist_checkpointing as dc\n"
        "from layouts import load_tp1\n"
        f"load_tp1({tp2_checkpoints + '/torch_dist'!r})\n"
        "print(sorted(m for m in ('zarr', 'tensorstore') if m in sys.modules))\n"
        f"load_tp1({tp2_checkpoints + '/zarr'!r})\n"
        f"load_tp1({tp2_checkpoints + '/tensorstore'!r})\n"
        "print(sorted(m for m in ('zarr', 'tensorstore') if m in sys.modules))\n"
        f"load_tp1({tp2_checkpoints + '/zstd'!r})\n"
        "print(sorted(m for m in ('zarr', 'tensorstore') if m in sys.modules))\n"
    )
    here = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", script], cwd=here, capture_output=True, text=True, check=True).stdout
    # raw chunks are read by the layout's own reader; only compressed ones need the engine
    assert out.split("\n")[:3] == ["[]", "[]", "['zarr']"], out


def test_torch_dist_items_are_what_torch_save_writes():
    """An item is written from its layout (head, values, tail) without torch.save: byte for byte
    what torch.save writes with the zip CRC-32s off for a contiguous tensor of its values (a
    one-element tensor's odd strides become the usual ones), and torch.load reads it."""
    import io

    from torch.utils.serialization import config

    from dist_checkpointing.strategies.dcp_save import _layout
    from dist_checkpointing.strategies.reading import host_bytes

    layouts = {}
    with config.patch("save.compute_crc32", False):
        for tensor in (torch.randn(3, 5).to(torch.bfloat16), torch.tensor(2.5), torch.arange(7), torch.rand(4) > 0.5,
                       torch.empty_strided((1, 1), (64, 64)).fill_(3.0), torch.randn(300, 1000)):
            layout = _layout(layouts, tensor)
            written = b"".join((layout.head, host_bytes(tensor).tobytes(), layout.tail))
            expected = io.BytesIO()
            torch.save(tensor.clone(memory_format=torch.contiguous_format), expected)
            assert written == expected.getvalue(), (tensor.dtype, tuple(tensor.shape))
            assert torch.equal(torch.load(io.BytesIO(written), weights_only=True), tensor)
    assert _layout({}, torch.zeros(2)) is None  # with CRC-32s on, torch.save writes the item

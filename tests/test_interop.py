"""Interop: DTensor state dicts, plain PyTorch DCP checkpoints, the newest Megatron-Core format.

- `save`/`load` take DTensor leaves as the ShardedTensors of their local shards, keyed by their
  path joined with '.': Shard(d) (even and uneven, also an empty shard), Replicate and 2-D
  meshes; a checkpoint saved from DTensors on one mesh loads into DTensors on another, into
  ShardedTensors, and (torch_dist) with stock `torch.distributed.checkpoint.load`.
- Plain DCP checkpoints written from DTensors on 2 and 4 ranks load through `load`,
  `load_plain_tensors`, `load_tensors_metadata` and the tools, read-only.
- Hugging Face safetensors directories (written here by the `safetensors` library, one file
  or sharded with `model.safetensors.index.json`) load into TP-sharded requests and DTensors,
  each rank reading only the rows of its slice.
- The newest Megatron-Core format (core_v0.19+; the fixture, and ours with
  `common_state_in_dcp`): the common state inside the DCP files, `integrity.json` (written with
  `save(..., verify_integrity=True)`, checked by `load(..., verify_integrity=True)` and
  `dist-ckpt verify`); `load(..., process_group=)` with two groups loading at once.
All values bit-exact, for every dtype. One process group per rank count.
"""

import json
import os
import shutil

import pytest
import torch
from layouts import DTYPES, full, sharded_state_dict
from multirank import run_ranks
from test_megatron_fixture import FIXTURES, check_fixture_at_tp, manifest
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, ShardedTensor
from dist_checkpointing.cli import main as cli
from dist_checkpointing.inspection import verify

NEWEST = FIXTURES[-1]  # written by Megatron-Core core_v0.19+

SHAPE = (10, 6)  # split 4 ways along axis 0: 3, 3, 3, 1 (as torch.chunk, which DTensor follows)
SMALL = (3, 4)  # split 4 ways along axis 0: 1, 1, 1 and an empty shard


def _name(dtype) -> str:
    return str(dtype).split(".")[-1]


def _meshes():
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    flat = init_device_mesh("cpu", (world,))
    square = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp")) if world == 4 else None
    return flat, square


def _state(layout: str, with_data: bool = True):
    """A model's state dict of DTensors: one tensor per dtype, each layout placing them
    differently ('save': 2-D meshes and uneven shards; 'load': other placements)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    flat, square = _meshes()
    if square is None:  # 2 ranks: 1-D placements only
        placements = {"save": [(flat, [Shard(0)]), (flat, [Replicate()])], "load": [(flat, [Shard(1)]), (flat, [Shard(0)])]}[layout]
    else:
        placements = {
            "save": [(square, [Shard(0), Shard(1)]), (square, [Replicate(), Shard(0)]), (flat, [Shard(0)]), (square, [Shard(0), Shard(0)])],
            "load": [(flat, [Shard(1)]), (square, [Shard(1), Replicate()]), (square, [Shard(1), Shard(0)]), (flat, [Replicate()])],
        }[layout]
    layers = {}
    for i, dtype in enumerate(DTYPES):
        mesh, placement = placements[i % len(placements)]
        value = full(f"model.layers.{_name(dtype)}.weight", SHAPE, dtype)
        if not with_data:
            value = torch.zeros_like(value)
        layers[_name(dtype)] = {"weight": distribute_tensor(value, mesh, placement, src_data_rank=None)}
    small = full("model.small", SMALL, torch.float32) if with_data else torch.zeros(SMALL)
    return {"model": {"layers": layers, "small": distribute_tensor(small, flat, [Shard(0)], src_data_rank=None)}}


def _check_dtensors(loaded, request) -> int:
    """Every DTensor of `request` came back as itself, its local shard holding the rule's values."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    checked = 0
    layers = request["model"]["layers"]
    pairs = [(f"model.layers.{name}.weight", loaded["model"]["layers"][name]["weight"], layers[name]["weight"]) for name in layers]
    pairs.append(("model.small", loaded["model"]["small"], request["model"]["small"]))
    for key, got, asked in pairs:
        assert got is asked, key  # the DTensor itself, filled in place
        shape, offset = compute_local_shape_and_global_offset(got.shape, got.device_mesh, got.placements)
        expected = full(key, tuple(got.shape), got.dtype)[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        assert got.to_local().dtype == expected.dtype and torch.equal(got.to_local(), expected), key
        checked += 1
    return checked


def _check_whole(loaded) -> int:
    for dtype in DTYPES:
        key = f"model.layers.{_name(dtype)}.weight"
        assert torch.equal(loaded[key], full(key, SHAPE, dtype)), key
    assert torch.equal(loaded["model.small"], full("model.small", SMALL, torch.float32))
    return len(DTYPES) + 1


def _whole_request(rank: int):
    """ShardedTensors asking for every whole tensor (each rank a replica)."""
    keys = {d: f"model.layers.{_name(d)}.weight" for d in DTYPES}
    request = {keys[d]: ShardedTensor.from_rank_offsets(keys[d], torch.empty(SHAPE, dtype=d), replica_id=rank) for d in DTYPES}
    request["model.small"] = ShardedTensor.from_rank_offsets("model.small", torch.empty(SMALL), replica_id=rank)
    return request


def write_hugging_face_model(directory: str, shards: int) -> None:
    """The rule's tensors as a Hugging Face model directory, written by the `safetensors`
    library: `model.safetensors`, or `shards` files and `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    tensors = {f"model.layers.{_name(d)}.weight": full(f"model.layers.{_name(d)}.weight", SHAPE, d) for d in DTYPES}
    tensors["model.small"] = full("model.small", SMALL, torch.float32)
    os.makedirs(directory)
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: tensors[key] for key in names[i::shards]}
        save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def _tp_request(rank: int, tp: int):
    """Every tensor split over TP along axis 1 (columns), as a row-parallel layer asks for it."""
    request = {}
    for key, dtype, shape in [(f"model.layers.{_name(d)}.weight", d, SHAPE) for d in DTYPES] + [("model.small", torch.float32, SMALL)]:
        request[key] = ShardedTensor.from_rank_offsets(key, torch.empty(shape[0], shape[1] // tp, dtype=dtype), (1, rank, tp))
    return request


def _check_tp(loaded, rank: int, tp: int) -> int:
    for key, value in loaded.items():
        whole = full(key, SHAPE if key != "model.small" else SMALL, value.dtype)
        width = whole.shape[1] // tp
        assert torch.equal(value, whole[:, rank * width : (rank + 1) * width]), key
    return len(loaded)


def _dtensor_ranks(rank, world_size, root):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Partial, distribute_tensor

    results = {}
    plain = os.path.join(root, f"plain_dcp_{world_size}")
    dcp.save(_state("save"), checkpoint_id=plain)  # stock DCP, as torchtitan saves
    torch.distributed.barrier()
    if world_size == 2:  # Hugging Face models as the start of a TP run
        for shards in (1, 3):
            model = os.path.join(root, f"hf_{shards}")
            results[f"hf {shards} -> tp"] = _check_tp(dc.load(_tp_request(rank, 2), model), rank, 2)
            request = _state("load", with_data=False)
            results[f"hf {shards} -> dtensors"] = _check_dtensors(dc.load(request, model), request)
        return results
    # 4 ranks: the plain DCP checkpoints of 2 and 4 ranks, into DTensors on other meshes and
    # into ShardedTensors; never written into
    for ranks in (2, 4):
        source = os.path.join(root, f"plain_dcp_{ranks}")
        request = _state("load", with_data=False)
        results[f"plain {ranks} -> dtensors"] = _check_dtensors(dc.load(request, source), request)
        results[f"plain {ranks} -> whole"] = _check_whole(dc.load(_whole_request(rank), source))
    with pytest.raises(CheckpointingException, match="already holds a complete checkpoint"):
        dc.save(_state("save"), plain)
    # ours, from DTensors: into DTensors on other meshes, ShardedTensors, stock DCP
    for engine in ("zarr", "torch_dist"):
        ckpt = os.path.join(root, engine)
        dc.save(_state("save"), ckpt, sharded_strategy=engine)
        request = _state("load", with_data=False)
        results[f"{engine} -> dtensors"] = _check_dtensors(dc.load(request, ckpt), request)
        results[f"{engine} -> whole"] = _check_whole(dc.load(_whole_request(rank), ckpt))
    request = _state("load", with_data=False)
    dcp.load(request, checkpoint_id=os.path.join(root, "torch_dist"))  # stock DCP reads ours
    results["torch_dist -> stock dcp"] = _check_dtensors(request, request)
    # placements that are not Shard/Replicate: a clear error on every rank
    flat, _ = _meshes()
    partial = distribute_tensor(torch.ones(4), flat, [Partial()], src_data_rank=None)
    with pytest.raises(CheckpointingException, match=r"DTensor 'opt.sum': placement Partial\(sum\) on mesh dimension 0 is not supported"):
        dc.save({"opt": {"sum": partial}}, os.path.join(root, "partial"))
    results["partial refused"] = True
    # two process groups loading at once, each only with its own ranks
    groups = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]
    results["process group"] = check_fixture_at_tp(NEWEST, rank % 2, 2, process_group=groups[rank // 2])
    return results


@pytest.fixture(scope="module")
def dtensor_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dtensor"))
    for shards in (1, 3):
        write_hugging_face_model(os.path.join(root, f"hf_{shards}"), shards)
    return root, run_ranks(_dtensor_ranks, 2, root), run_ranks(_dtensor_ranks, 4, root)


def test_dtensors_save_and_load_across_meshes_engines_and_stock_dcp(dtensor_runs):
    _, _, results = dtensor_runs
    n = len(DTYPES) + 1
    expected = {"plain 2 -> dtensors": n, "plain 2 -> whole": n, "plain 4 -> dtensors": n, "plain 4 -> whole": n,
                "zarr -> dtensors": n, "zarr -> whole": n, "torch_dist -> dtensors": n, "torch_dist -> whole": n,
                "torch_dist -> stock dcp": n, "partial refused": True, "process group": 5}
    assert results == [expected] * 4


@pytest.mark.parametrize("ranks", [2, 4])
def test_plain_dcp_checkpoints_in_one_process(dtensor_runs, ranks, capsys, tmp_path):
    """Without a process group: metadata, plain tensors, the tools; read-only."""
    root, _, _ = dtensor_runs
    plain = os.path.join(root, f"plain_dcp_{ranks}")
    assert dc.check_is_distributed_checkpoint(plain)
    metadata = dc.load_tensors_metadata(plain)
    assert metadata["model.small"].global_shape == SMALL and metadata["model.layers.bfloat16.weight"].dtype == torch.bfloat16
    assert _check_whole(dc.load_plain_tensors(plain)) == len(DTYPES) + 1
    assert dc.load_common_state_dict(plain) == {}
    assert cli(["inspect", plain]) == 0
    assert "PyTorch DCP (read-only)" in capsys.readouterr().out
    assert cli(["verify", plain]) == 0
    with pytest.raises(CheckpointingException, match="never writes into them"):
        dc.remove_sharded_tensors(plain, "model.small")
    converted = str(tmp_path / "zarr")
    assert cli(["convert", plain, converted, "--to", "zarr"]) == 0
    assert _check_whole(dc.load_plain_tensors(converted)) == len(DTYPES) + 1


def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_newest_megatron_format_integrity_json(tmp_path, capsys):
    """The fixture's integrity.json is checked by `dist-ckpt verify` and `load(verify_integrity=True)`."""
    assert cli(["verify", NEWEST]) == 0
    assert "4 files' SHA-256 (integrity.json)" in capsys.readouterr().out
    assert dc.load_common_state_dict(NEWEST) == manifest(NEWEST)["common_state_dict"]
    assert check_fixture_at_tp(NEWEST, 0, 1, verify_integrity=True) == 5
    damaged = str(tmp_path / "damaged")
    shutil.copytree(NEWEST, damaged)
    shutil.copy(NEWEST + ".manifest.json", damaged + ".manifest.json")
    _flip_byte(os.path.join(damaged, "__1_0.distcp"), 5000)
    assert cli(["verify", damaged]) == 1
    assert "__1_0.distcp: its SHA-256 does not match integrity.json" in capsys.readouterr().out
    with pytest.raises(CheckpointingException, match="__1_0.distcp: its SHA-256 does not match"):
        check_fixture_at_tp(damaged, 0, 1, verify_integrity=True)
    os.remove(os.path.join(damaged, "integrity.json"))
    with pytest.raises(CheckpointingException, match="has no integrity.json to verify against"):
        check_fixture_at_tp(damaged, 0, 1, verify_integrity=True)


@pytest.mark.parametrize("engine", ["torch_dist", "zarr"])
def test_saving_the_newest_megatron_layout(tmp_path, engine, capsys):
    """`common_state_in_dcp` (torch_dist) writes the common state as the fixture does; with
    `verify_integrity=True` any engine writes integrity.json, covering every file."""
    path = str(tmp_path / engine)
    strategy = {"backend": "torch_dist", "common_state_in_dcp": True} if engine == "torch_dist" else "zarr"
    dc.save(sharded_state_dict(0, 1), path, sharded_strategy=strategy, content_metadata={"step": 3}, verify_integrity=True)
    listed = json.load(open(os.path.join(path, "integrity.json")))
    on_disk = sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)
    assert listed["algorithm"] == "sha256" and sorted(listed["files"]) == [f for f in on_disk if f != "integrity.json"]
    assert ("common.pt" in on_disk) == (engine == "zarr")
    if engine == "torch_dist":  # the fixture's entry: a DCP byte entry named as the ShardedObject
        entries = FileSystemReader(path).read_metadata().state_dict_metadata
        assert isinstance(entries["common_state/shard_0_1"], BytesStorageMetadata)
        assert isinstance(FileSystemReader(NEWEST).read_metadata().state_dict_metadata["common_state/shard_0_1"], BytesStorageMetadata)
    assert dc.load_common_state_dict(path) == {"iteration": 7, "content_metadata": {"step": 3}}
    assert dc.load_content_metadata(path) == {"step": 3}
    assert "common_state/shard_0_1" not in dc.load_sharded_metadata(path)
    loaded = dc.load(sharded_state_dict(0, 1, with_data=False), path, verify_integrity=True)
    assert loaded["iteration"] == 7 and torch.equal(loaded["embedding"], sharded_state_dict(0, 1)["embedding"].data)
    assert verify(path)[0] == []
    _flip_byte(os.path.join(path, "index.json"), 3)
    assert any("index.json" in problem for _, problem in verify(path)[0])
    # a save that stopped after `.metadata`: incomplete, not a plain DCP checkpoint without common state
    for name in ("metadata.json", "index.json", "integrity.json"):
        os.remove(os.path.join(path, name))
    with pytest.raises(CheckpointingException, match="incomplete checkpoint"):
        dc.load_common_state_dict(path)


def test_hugging_face_safetensors_load_into_tp_requests_and_dtensors(dtensor_runs):
    _, results, _ = dtensor_runs
    n = len(DTYPES) + 1
    assert results == [{"hf 1 -> tp": n, "hf 1 -> dtensors": n, "hf 3 -> tp": n, "hf 3 -> dtensors": n}] * 2


@pytest.mark.parametrize("shards", [1, 3])
def test_hugging_face_safetensors_in_one_process(dtensor_runs, shards, monkeypatch, capsys):
    """Metadata, plain tensors, the tools; a slice reads only its rows; damage is named."""
    root, _, _ = dtensor_runs
    model = os.path.join(root, f"hf_{shards}")
    assert dc.load_tensors_metadata(model)["model.layers.bfloat16.weight"].global_shape == SHAPE
    assert _check_whole(dc.load_plain_tensors(model)) == len(DTYPES) + 1
    assert cli(["inspect", model]) == 0 and "safetensors (read-only)" in capsys.readouterr().out
    assert cli(["verify", model]) == 0 and f"sound ({len(DTYPES) + 1} tensors" in capsys.readouterr().out
    read = []
    real_preadv = os.preadv

    def counted_preadv(fd, buffers, offset):
        read.append(sum(memoryview(b).nbytes for b in buffers))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counted_preadv)
    key = "model.layers.float64.weight"
    rows = {key: ShardedTensor(key, torch.empty(2, 6, dtype=torch.float64), torch.float64, (2, 6), SHAPE, (4, 0), None)}
    assert torch.equal(dc.load(rows, model, validate_access_integrity=False)[key], full(key, SHAPE, torch.float64)[4:6])
    # each file's header (its 8-byte length, then the header), then rows 4 and 5 only
    assert read[: 2 * shards : 2] == [8] * shards and read[2 * shards :] == [2 * 6 * 8]


def test_damaged_safetensors_are_refused(tmp_path):
    model = str(tmp_path / "hf")
    write_hugging_face_model(model, 1)
    path = os.path.join(model, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(CheckpointingException, match=r"model.safetensors is not a valid safetensors file: '[\w.]+' has bytes"):
        dc.load_plain_tensors(model)
    with open(path, "r+b") as f:
        f.write((2**40).to_bytes(8, "little"))
    with pytest.raises(CheckpointingException, match="header size 1099511627776 does not fit"):
        dc.load_tensors_metadata(model)


def test_documents_of_other_tools_are_not_trusted(tmp_path):
    """integrity.json and a safetensors index may name only files inside the checkpoint, and
    must be well-formed; a config asking for the newest layout of another engine is refused."""
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(NEWEST, ckpt)
    path = os.path.join(ckpt, "integrity.json")
    document = json.load(open(path))
    document["files"]["../outside"] = "0" * 64
    json.dump(document, open(path, "w"))
    problems, _ = verify(ckpt)
    assert any("'../outside'" in problem and "refused" in problem for _, problem in problems)
    with open(path, "w") as f:
        f.write('{"algorithm": "md5", "files": {}}')
    with pytest.raises(CheckpointingException, match="Malformed .*integrity.json"):
        dc.load({}, ckpt, verify_integrity=True)
    model = str(tmp_path / "hf")
    write_hugging_face_model(model, 3)
    index = os.path.join(model, "model.safetensors.index.json")
    document = json.load(open(index))
    document["weight_map"]["model.small"] = "../model.safetensors"
    json.dump(document, open(index, "w"))
    with pytest.raises(CheckpointingException, match="refers to the file '../model.safetensors'.*refused"):
        dc.load_tensors_metadata(model)
    with pytest.raises(CheckpointingException, match="common_state_in_dcp must be a bool, and True only for the torch_dist backend"):
        dc.save({}, str(tmp_path / "z"), sharded_strategy={"backend": "zarr", "common_state_in_dcp": True})

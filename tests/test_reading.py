"""Loads read each stored chunk once, straight into the caller's tensors (strategies/reading.py):
the chunk reader, the torch_dist item locator, the raw Zarr chunk reader, and open-once.
One process, no ranks: these are the per-rank read paths."""

import glob
import io
import os

import pytest
import torch

import dist_checkpointing as dc
from dist_checkpointing import ShardedTensor
from dist_checkpointing.core import CheckpointingException
from dist_checkpointing.integrity import crc32c
from dist_checkpointing.storage import LOCAL
from dist_checkpointing.strategies import reading
from dist_checkpointing.strategies.dcp_format import stored_values, tensor_item

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool]


def _values(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=generator).to(dtype)


def test_read_chunk_direct_strided_and_blocked(tmp_path, monkeypatch):
    chunk = _values((40, 6), torch.float32)
    path = tmp_path / "chunk"
    path.write_bytes(b"head" + chunk.numpy().tobytes() + b"tail")
    with LOCAL.open(str(path)) as file:
        whole = torch.empty(40, 6)
        crc = reading.read_chunk(file, 4, (40, 6), torch.float32, [reading.Piece((slice(0, 40), slice(0, 6)), whole)], 7)
        assert torch.equal(whole, chunk) and crc == crc32c(chunk.numpy().tobytes(), 7)

        monkeypatch.setattr(reading, "SCRATCH_BYTES", 3 * 6 * 4)  # blocks of 3 rows
        target = torch.zeros(12, 50)  # two pieces landing in strided views of another layout
        pieces = [
            reading.Piece((slice(0, 40), slice(2, 5)), target[:, :40].t()[:, 0:3]),
            reading.Piece((slice(10, 22), slice(0, 6)), target[6:12, 1:13].t()),
        ]
        crc = reading.read_chunk(file, 4, (40, 6), torch.float32, pieces, 0)
        assert crc == crc32c(chunk.numpy().tobytes())
        assert torch.equal(target[:, :40].t()[:, 0:3], chunk[:, 2:5])
        assert torch.equal(target[6:12, 1:13].t(), chunk[10:22])

        # without a checksum only the rows the pieces need are read: damage elsewhere is not seen
        rows = torch.empty(5, 6)
        assert reading.read_chunk(file, 4, (40, 6), torch.float32, [reading.Piece((slice(30, 35), slice(0, 6)), rows)], None) is None
        assert torch.equal(rows, chunk[30:35])

        with pytest.raises(CheckpointingException, match="only .* bytes could be read"):
            reading.read_chunk(file, 4, (41, 6), torch.float32, [reading.Piece((slice(0, 41), slice(0, 6)), torch.empty(41, 6))], 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_destinations_are_views_of_the_targets_memory(dtype):
    """`destination` views a CPU target's bytes (numpy) whatever its dtype and strides, so that
    pieces copied into slices of it land in the tensor; a target whose last axis is strided
    stays a tensor. Every kind is filled from one chunk through `fill_pieces`."""
    chunk = _values((6, 4), dtype, seed=3)
    raw = chunk.reshape(-1).view(torch.uint8).numpy()
    parameter = torch.nn.Parameter(torch.zeros(6, 4, dtype=dtype), requires_grad=dtype.is_floating_point)
    targets = {
        "contiguous": torch.zeros(6, 4, dtype=dtype),
        "rows of a larger tensor": torch.zeros(8, 4, dtype=dtype)[1:7],
        "columns of a larger tensor": torch.zeros(6, 9, dtype=dtype)[:, 2:6],
        "transposed (strided last axis)": torch.zeros(4, 6, dtype=dtype).t(),
        "a parameter": parameter,
    }
    for name, target in targets.items():
        into = reading.destination(target)
        assert isinstance(into, torch.Tensor) == (name == "transposed (strided last axis)"), name
        top, bottom = reading.Piece((slice(0, 3), slice(0, 4)), into[0:3]), reading.Piece((slice(3, 6), slice(0, 4)), into[3:6])
        reading.fill_pieces([top, bottom], raw, (6, 4), dtype)
        assert torch.equal(target.detach(), chunk), name
    scalar = torch.zeros((), dtype=dtype)  # 0-d, and a length-1 last axis with any stride
    odd = torch.zeros(3, 1, dtype=dtype).as_strided((3, 1), (1, 5))
    for target, values in [(scalar, chunk[0, 0]), (odd, chunk[0:3, 0:1])]:
        source = values.contiguous().reshape(-1).view(torch.uint8).numpy()
        into = reading.destination(target)
        reading.fill_pieces([reading.Piece(tuple(slice(0, n) for n in values.shape), into)], source, tuple(values.shape), dtype)
        assert torch.equal(target, values)


def _stored(data):
    dtype, shape, values = stored_values(data, "x", "y")
    return torch.frombuffer(bytearray(values.tobytes()) or bytearray(1), dtype=torch.uint8)[: values.nbytes].view(dtype).reshape(shape)


def _reader(data):
    return lambda offset, n: data[offset : offset + n]


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_save_items_are_located_without_loading_them(dtype):
    for tensor in [_values((7, 5), dtype), _values((), dtype), _values((0, 3), dtype)]:
        blob = io.BytesIO()
        torch.save(tensor, blob)
        data = memoryview(bytearray(blob.getvalue()))
        item = tensor_item(_reader(data), data.nbytes)
        assert item is not None and item.record.dtype == dtype and item.record.shape == tuple(tensor.shape)
        assert bytes(data[: item.start]) == item.head and bytes(data[item.start + item.nbytes :]) == item.tail
        assert torch.equal(_stored(data), tensor)
    # a view saved with its whole storage, or a transposed one: not the plain layout, loaded by torch.load
    for tensor in [_values((6, 6), dtype)[1:3], _values((6, 4), dtype).t()]:
        blob = io.BytesIO()
        torch.save(tensor, blob)
        data = memoryview(bytearray(blob.getvalue()))
        assert tensor_item(_reader(data), data.nbytes) is None
        assert torch.equal(_stored(data), tensor)


def test_a_large_view_is_saved_as_its_own_bytes(tmp_path):
    """torch_dist writes a view (as an async save's staged tensors are, of one buffer) as its
    own elements, in the plain layout a load reads in place, not its whole storage."""
    buffer = _values((4096, 512), torch.float32)  # 8 MiB
    view = buffer[1024:2048]  # 2 MiB: above the in-memory item size, written by torch.save
    path = str(tmp_path / "view")
    dc.save({"v": ShardedTensor.from_rank_offsets("v", view)}, path, "torch_dist")
    (data_file,) = [name for name in os.listdir(path) if name.endswith(".distcp")]
    data = memoryview(open(os.path.join(path, data_file), "rb").read())
    assert view.nbytes < data.nbytes < view.nbytes + 4096
    item = tensor_item(_reader(data), data.nbytes)
    assert item is not None and item.record.shape == (1024, 512) and item.record.storage_numel == view.numel()
    loaded = dc.load({"v": ShardedTensor.from_rank_offsets("v", torch.zeros(1024, 512))}, path)["v"]
    assert torch.equal(loaded, view)


def _state(rows=1024, cols=512):
    """A 2 MiB float32 tensor (larger than torch_dist's in-memory items) and a small bf16 one."""
    return {
        "big": ShardedTensor.from_rank_offsets("big", _values((rows, cols), torch.float32)),
        "small": ShardedTensor.from_rank_offsets("small", _values((4, 3), torch.bfloat16, seed=1)),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("reading")
    for backend in ("torch_dist", "zarr"):
        dc.save(_state(), str(root / backend), backend)
    dc.save(_state(), str(root / "zstd"), {"backend": "zarr", "compression": "zstd"})
    return root


@pytest.mark.parametrize("backend", ["torch_dist", "zarr", "tensorstore", "zstd"])
def test_loads_in_place_whole_and_in_parts(saved, backend):
    path = str(saved / ("zarr" if backend == "tensorstore" else backend))
    strategy = backend if backend == "tensorstore" else None
    expected = _state()
    held = torch.zeros(1024, 512)
    request = {"big": ShardedTensor.from_rank_offsets("big", held),
               "small": ShardedTensor.from_rank_offsets("small", torch.zeros(4, 3, dtype=torch.bfloat16))}
    loaded = dc.load(request, path, strategy)
    assert loaded["big"] is held and torch.equal(held, expected["big"].data)
    assert torch.equal(loaded["small"], expected["small"].data)
    # a column block (strided in the stored chunk) and a row block, into held tensors
    columns, rows = torch.zeros(1024, 128), torch.zeros(256, 512)
    parts = dc.load({
        "c": ShardedTensor.from_rank_offsets("big", columns, (1, 2, 4)),
        "r": ShardedTensor.from_rank_offsets("big", rows, (0, 3, 4), replica_id=1),
    }, path, strategy, validate_access_integrity=False)
    assert parts["c"] is columns and torch.equal(columns, expected["big"].data[:, 256:384])
    assert parts["r"] is rows and torch.equal(rows, expected["big"].data[768:])


def test_a_flipped_byte_in_a_large_item_names_the_file(saved, tmp_path):
    import shutil

    path = shutil.copytree(saved / "torch_dist", tmp_path / "ckpt")
    (name,) = [f for f in glob.glob(f"{path}/*.distcp") if os.path.getsize(f) > 2**21]
    with open(name, "r+b") as f:
        f.seek(2**20)
        byte = f.read(1)
        f.seek(2**20)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CheckpointingException, match=rf"Key 'big'.*{os.path.basename(name)}.*CRC-32C"):
        dc.load({"big": ShardedTensor.from_rank_offsets("big", torch.zeros(1024, 512))}, str(path))


def test_raw_zarr_chunks_damaged_truncated_or_linked_are_named(saved, tmp_path):
    import shutil

    request = lambda: {"big": ShardedTensor.from_rank_offsets("big", torch.zeros(1024, 512))}  # noqa: E731
    path = shutil.copytree(saved / "zarr", tmp_path / "ckpt")
    (chunk,) = glob.glob(f"{path}/big/c.*")
    data = bytearray(open(chunk, "rb").read())
    data[100] ^= 1
    open(chunk, "wb").write(data)
    with pytest.raises(CheckpointingException, match=rf"Key 'big'.*{chunk}: fails its CRC-32C"):
        dc.load(request(), str(path))
    open(chunk, "wb").write(data[:-10])
    with pytest.raises(CheckpointingException, match=rf"{chunk}: has \d+ bytes"):
        dc.load(request(), str(path))
    outside = tmp_path / "outside"
    outside.write_bytes(bytes(data))
    os.remove(chunk)
    os.symlink(outside, chunk)
    with pytest.raises(CheckpointingException, match="is a symbolic link"):
        dc.load(request(), str(path))
    os.remove(chunk)
    with pytest.raises(CheckpointingException, match=rf"{chunk}: missing"):
        dc.load(request(), str(path))


@pytest.mark.parametrize("backend", ["torch_dist", "zarr"])
def test_a_load_parses_each_document_once_and_resolves_its_storage_once(saved, backend, monkeypatch):
    import sys

    from dist_checkpointing import core, storage
    from dist_checkpointing.strategies import dcp_format, zarr_spec
    from dist_checkpointing.strategies import torch as torch_engine

    parsed = []
    real_read_json, real_dcp = core.read_json, dcp_format.read_dcp_index
    def read_json(path, missing_ok=False, storage=None):  # counts the documents found
        document = real_read_json(path, missing_ok, storage)
        if document is not core.MISSING:
            parsed.append(os.path.basename(path))
        return document

    monkeypatch.setattr(core, "read_json", read_json)
    monkeypatch.setattr(zarr_spec, "read_json", read_json)
    monkeypatch.setattr(torch_engine, "read_dcp_index", lambda *args: parsed.append(".metadata") or real_dcp(*args))
    resolved = []  # every call of storage_of, whichever module imported it
    sys.setprofile(lambda frame, event, _: event == "call" and frame.f_code is storage.storage_of.__code__ and resolved.append(1))
    try:
        dc.load(_state(), str(saved / backend))
    finally:
        sys.setprofile(None)
    # zarr: the root group's zarr.json holds every array's document (consolidated metadata)
    expected = {"torch_dist": [".metadata", "index.json", "metadata.json"], "zarr": ["index.json", "metadata.json", "zarr.json"]}
    assert sorted(parsed) == expected[backend]
    assert len(resolved) == 1  # open_checkpoint resolves the location; everything below is handed its storage

"""The on-disk format: readable by stock zarr-python and tensorstore; metadata.json strict."""

import io
import json
import logging
import os
import re

import numpy as np
import pytest
import tensorstore as ts
import torch
import zarr
from layouts import DTYPES, dtype_key, full, sharded_state_dict

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, ShardedTensor
from dist_checkpointing.dtypes import register_zarr_bfloat16, to_numpy, to_torch
from dist_checkpointing.strategies.config import StrategyConfig


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fmt") / "ckpt")
    dc.save(sharded_state_dict(0, 1), path)
    return path


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_arrays_readable_by_stock_tensorstore_and_zarr(ckpt, dtype):
    key = dtype_key(dtype)
    expected = full(key, (8, 12), dtype)
    with open(os.path.join(ckpt, key, "zarr.json")) as f:
        doc = json.load(f)
    assert doc["data_type"] == str(dtype).split(".")[-1]
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(ckpt, key)}}).result()
    assert torch.equal(to_torch(np.ascontiguousarray(store.read().result())), expected)
    register_zarr_bfloat16()  # zarr-python has no bf16 of its own
    assert torch.equal(to_torch(zarr.open_array(os.path.join(ckpt, key), mode="r")[:]), expected)


def test_chunk_is_the_save_time_shard(tmp_path):
    path = str(tmp_path / "c")
    state = sharded_state_dict(0, 1)
    state["embedding"] = ShardedTensor.from_rank_offsets(
        "embedding.weight", full("embedding.weight", (64, 16), torch.bfloat16)[:32], (0, 0, 2)
    )
    state["embedding2"] = ShardedTensor.from_rank_offsets(
        "embedding.weight", full("embedding.weight", (64, 16), torch.bfloat16)[32:], (0, 1, 2)
    )
    dc.save(state, path)
    with open(os.path.join(path, "embedding.weight", "zarr.json")) as f:
        doc = json.load(f)
    assert doc["chunk_grid"]["configuration"]["chunk_shape"] == [32, 16]
    assert doc["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    assert doc["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "."}}
    assert sorted(os.listdir(os.path.join(path, "embedding.weight"))) == ["c.0.0", "c.1.0", "zarr.json"]
    stacked = json.load(open(os.path.join(path, "layers.qkv.weight", "zarr.json")))
    assert stacked["shape"] == [2, 48, 16] and stacked["chunk_grid"]["configuration"]["chunk_shape"] == [1, 48, 16]


def test_metadata_json_is_megatron_config_and_index_json_ours(ckpt):
    with open(os.path.join(ckpt, "metadata.json")) as f:
        doc = json.load(f)
    # exactly the fields of Megatron-Core's CheckpointingConfig (it builds one from all of them)
    assert doc == {"sharded_backend": "zarr", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}
    with open(os.path.join(ckpt, "index.json")) as f:
        index = json.load(f)
    assert index["format_version"] == 2
    assert index["tensors"]["embedding.weight"] == {"shape": [64, 16], "dtype": "bfloat16"}
    assert index["objects"] == ["rng_state/shard_0_1"]
    assert "common.pt" in index["checksums"]
    assert dc.check_is_distributed_checkpoint(ckpt)


FIXTURES_DIR = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.mark.parametrize("engine", ["zarr", "torch_dist"])
def test_format_version_1_checkpoints_still_load(engine, tmp_path):
    """Written by this library before the index moved out of metadata.json (the fixture)."""
    import shutil

    path = str(tmp_path / "v1")
    shutil.copytree(os.path.join(FIXTURES_DIR, f"ours_format1_{engine}"), path)
    assert json.load(open(os.path.join(path, "metadata.json")))["format_version"] == 1
    loaded = dc.load(sharded_state_dict(0, 1, with_data=False), path)
    expected = sharded_state_dict(0, 1)
    assert torch.equal(loaded["embedding"], expected["embedding"].data)
    assert loaded["rng"] == expected["rng"].data
    assert sorted(dc.load_tensors_metadata(path)) == sorted(json.load(open(os.path.join(path, "metadata.json")))["tensors"])
    # its checksums still count: a changed byte of common.pt is found
    with open(os.path.join(path, "common.pt"), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CheckpointingException, match="common.pt are damaged"):
        dc.load_common_state_dict(path)
    # removing tensors rewrites it in the current layout
    dc.remove_sharded_tensors(path, "dtypes.")
    assert "format_version" not in json.load(open(os.path.join(path, "metadata.json")))
    assert not any(k.startswith("dtypes.") for k in dc.load_tensors_metadata(path))


def corrupt_copy(src, dst, content, name="metadata.json"):
    import shutil

    shutil.copytree(src, dst)
    with open(os.path.join(dst, name), "w") as f:
        f.write(content)
    return dst


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("metadata.json", "{not json", "not valid JSON"),
        ("metadata.json", "[]", "expected a JSON object"),
        ("metadata.json", '{"sharded_backend": 3}', "'sharded_backend' must be a string"),
        ("metadata.json", '{"sharded_backend": "zarr", "format_version": 99, "tensors": {}, "objects": []}', "newer"),
        ("metadata.json",
         '{"sharded_backend": "zarr", "format_version": 1, "tensors": {"a": {"shape": [-1], "dtype": "x"}}, "objects": []}',
         "tensor entry"),
        ("metadata.json", '{"sharded_backend": "zarr", "tensors": {}}', "without 'format_version'"),
        ("metadata.json", '{"sharded_backend": "nope"}', "No default load_sharded strategy"),
        ("index.json", "{not json", "index.json: not valid JSON"),
        ("index.json", '{"format_version": 2, "tensors": {}, "objects": [], "surprise": 1}', "unknown fields"),
        ("index.json", '{"format_version": 99, "tensors": {}, "objects": []}', "newer"),
        ("index.json", '{"format_version": 1, "tensors": {}, "objects": []}', "keeps its index in metadata.json"),
        ("index.json", '{"format_version": 2, "tensors": {"a": {"shape": [-1], "dtype": "x"}}, "objects": []}', "tensor entry"),
    ],
)
def test_malformed_metadata_json_is_a_clear_error(ckpt, tmp_path, name, content, message):
    bad = corrupt_copy(ckpt, str(tmp_path / "bad"), content, name)
    with pytest.raises(CheckpointingException, match=message):
        dc.load(sharded_state_dict(0, 1, with_data=False), bad)
    assert not dc.check_is_distributed_checkpoint(bad) or "nope" in content


def test_unknown_fields_of_metadata_json_are_ignored(ckpt, tmp_path):
    """As newer Megatron-Core versions do: the document is Megatron's, and may grow."""
    path = corrupt_copy(ckpt, str(tmp_path / "newer"), '{"sharded_backend": "zarr", "surprise": 1}')
    assert sorted(dc.load_tensors_metadata(path)) == sorted(dc.load_tensors_metadata(ckpt))


def test_incomplete_and_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointingException, match="does not exist"):
        dc.load({}, str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointingException, match="not a distributed checkpoint"):
        dc.load({}, str(tmp_path / "empty"))
    os.makedirs(tmp_path / "partial" / "embedding.weight")
    with pytest.raises(CheckpointingException, match="incomplete checkpoint"):
        dc.load_tensors_metadata(str(tmp_path / "partial"))


def test_complete_checkpoint_is_never_overwritten(ckpt):
    before = open(os.path.join(ckpt, "metadata.json")).read()
    with pytest.raises(CheckpointingException, match="refusing to overwrite"):
        dc.save(sharded_state_dict(0, 1), ckpt)
    assert open(os.path.join(ckpt, "metadata.json")).read() == before


def test_stale_arrays_from_an_interrupted_save_are_not_part_of_the_checkpoint(tmp_path):
    path = str(tmp_path / "reused")
    os.makedirs(os.path.join(path, "stale.key"))
    with open(os.path.join(path, "stale.key", "zarr.json"), "w") as f:
        json.dump({"node_type": "array"}, f)
    dc.save(sharded_state_dict(0, 1), path)
    assert "stale.key" not in dc.load_tensors_metadata(path)
    request = {"x": ShardedTensor.from_rank_offsets("stale.key", torch.zeros(2))}
    with pytest.raises(CheckpointingException, match="'stale.key' is not in the checkpoint"):
        dc.load(request, path)


DURABLE_SAVES = {
    "zarr": "zarr", "torch_dist": "torch_dist", "zarr_v2": StrategyConfig(zarr_format=2),
    "zstd-zarr": StrategyConfig(compression="zstd"),
    "zstd-tensorstore": StrategyConfig(backend="tensorstore", compression="zstd"),
}


@pytest.mark.parametrize("mode", ["syncfs", "fsync"])
@pytest.mark.parametrize("save", ["zarr", "torch_dist", "zarr_v2", "zstd-zarr", "zstd-tensorstore", "async"])
def test_data_is_durable_before_metadata_json_is_renamed_into_place(tmp_path, monkeypatch, save, mode):
    """Every file is on stable storage before the commit: fsync'd (with every new directory), or
    complete when one syncfs of the file system is issued, which then precedes the rename."""
    from dist_checkpointing import fs

    events, renamed = [], {}
    real_fsync, real_libc = os.fsync, fs._libc

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def placing(real):
        """os.replace, or os.link (how metadata.json is put in place without replacing one),
        recorded as the step that makes `dst` appear."""

        def place(src, dst):
            events.append(("rename", str(dst)))
            renamed[str(dst)] = str(src)
            return real(src, dst)

        return place

    class Libc:
        def __getattr__(self, name):
            return getattr(real_libc(), name)

        def syncfs(self, fd):
            on_disk = {os.path.join(r, f): os.path.getsize(os.path.join(r, f)) for r, _, fs_ in os.walk(path) for f in fs_}
            events.append(("syncfs", on_disk))
            return real_libc().syncfs(fd)

    monkeypatch.setattr(fs.os, "fsync", fsync)
    monkeypatch.setattr(fs.os, "replace", placing(os.replace))
    monkeypatch.setattr(fs.os, "link", placing(os.link))
    monkeypatch.setattr(fs, "_libc", Libc)
    if mode == "fsync":
        monkeypatch.setattr(fs, "syncfs_covers", lambda path: False)
    path = str(tmp_path / "durable")
    if save == "async":
        dc.save(sharded_state_dict(0, 1), path, async_sharded_save=True).execute_sync()
    else:
        dc.save(sharded_state_dict(0, 1), path, DURABLE_SAVES[save])
    commit = events.index(("rename", os.path.join(path, "metadata.json")))
    written = {os.path.join(root, f): os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files}
    del written[os.path.join(path, "metadata.json")]
    assert written
    synced = {p for kind, p in events[:commit] if kind == "fsync"}
    synced |= {dst for dst, src in renamed.items() if src in synced}  # e.g. the engine's index
    if mode == "syncfs":
        [(_, on_disk)] = [e for e in events[:commit] if e[0] == "syncfs"]
        complete = {name for name, size in on_disk.items() if written.get(name) == size}
        assert set(written) <= complete | synced
    else:
        assert not any(kind == "syncfs" for kind, _ in events)
        by_engine = {p for p in written if save == "zstd-tensorstore" and "/c." in p}  # its own fsyncs
        assert set(written) - by_engine <= synced
        assert {root for root, _, _ in os.walk(path)} <= synced  # new directories too
        assert str(tmp_path) in synced  # it gained the checkpoint directory
    assert events[commit + 1] == ("fsync", path)  # the rename itself is made durable


@pytest.mark.parametrize("made_elsewhere", [True, False])
def test_a_file_in_a_directory_another_rank_makes_is_durable(tmp_path, monkeypatch, made_elsewhere):
    """`DurableDir.write_if_made` (a Zarr chunk in an array directory that the rank writing the
    array's document makes): written into the directory as another writer made it, nothing
    written where it is still missing; in fsync mode the directory that gained the file is synced."""
    from dist_checkpointing import fs

    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(fs.os, "fsync", fsync)
    monkeypatch.setattr(fs, "syncfs_covers", lambda path: False)
    directory = str(tmp_path / "ckpt" / "key")
    with fs.DurableDir(tmp_path / "ckpt") as target:
        if made_elsewhere:
            os.mkdir(directory)
        assert target.write_if_made(directory, directory + "/c.0", [b"abc", b"d"]) == made_elsewhere
        if not made_elsewhere:
            assert not os.path.exists(directory)
            target.makedirs(directory)  # as a Zarr save does at the end of its batch
            target.write(directory + "/c.0", [b"abc", b"d"])
        target.sync()
    assert open(directory + "/c.0", "rb").read() == b"abcd"
    assert {directory, directory + "/c.0"} <= set(synced)


def test_shape_and_dtype_mismatch_and_padding(ckpt):
    key = "embedding.weight"
    stored = full(key, (64, 16), torch.bfloat16)
    # another dtype is converted, as Megatron-Core and DCP do: bf16 weights into fp32 masters
    master = torch.zeros(64, 16)
    assert dc.load({"e": ShardedTensor.from_rank_offsets(key, master)}, ckpt)["e"] is master
    assert torch.equal(master, stored.float())
    with pytest.raises(CheckpointingException, match="allow_shape_mismatch"):
        dc.load({"e": ShardedTensor.from_rank_offsets(key, torch.zeros(70, 16, dtype=torch.bfloat16))}, ckpt)
    # a padded vocabulary: 80 rows requested over 2 ranks, 64 stored
    parts = [
        ShardedTensor.from_rank_offsets(
            key, torch.zeros(40, 16, dtype=torch.bfloat16), (0, i, 2), allow_shape_mismatch=True
        )
        for i in range(2)
    ]
    loaded = dc.load({"e": parts}, ckpt)["e"]
    assert torch.equal(loaded[0], stored[:40])
    assert torch.equal(loaded[1][:24], stored[40:]) and not loaded[1][24:].any()
    # a request wholly outside the stored rows reads zeros
    outside = ShardedTensor(key, torch.zeros(4, 16, dtype=torch.bfloat16), torch.bfloat16, (4, 16), (68, 16), (64, 0), None,
                            allow_shape_mismatch=True)
    assert not dc.load({"e": outside}, ckpt, validate_access_integrity=False)["e"].any()


def test_zero_dim_and_empty_tensors_roundtrip(tmp_path):
    path = str(tmp_path / "small")
    state = {
        "scalar": ShardedTensor.from_rank_offsets("scalar", torch.tensor(3.5, dtype=torch.float64)),
        "empty": ShardedTensor.from_rank_offsets("empty", torch.zeros(0, 4)),
    }
    dc.save(state, path)
    request = {
        "scalar": ShardedTensor.from_rank_offsets("scalar", torch.tensor(0.0, dtype=torch.float64)),
        "empty": ShardedTensor.from_rank_offsets("empty", torch.zeros(0, 4)),
    }
    loaded = dc.load(request, path)
    assert loaded["scalar"].item() == 3.5 and loaded["scalar"].shape == ()
    assert loaded["empty"].shape == (0, 4)


def test_remove_sharded_tensors_updates_the_index(ckpt, tmp_path):
    import shutil

    path = str(tmp_path / "rm")
    shutil.copytree(ckpt, path)
    dc.remove_sharded_tensors(path, "dtypes.")
    keys = set(dc.load_tensors_metadata(path))
    assert keys and not any(k.startswith("dtypes.") for k in keys)
    assert not any(name.startswith("dtypes.") for name in os.listdir(path))
    assert set(dc.load_plain_tensors(path)) == keys


def test_dcp_metadata_is_encoded_as_pickle_writes_dcps_metadata(tmp_path):
    """`.metadata` is encoded without DCP's classes; unpickled, it is the `Metadata` DCP's own
    pickle of the same entries gives: every dtype, 0-d and n-d shapes, more entries, chunks and
    memoized strings than one batch or a one-byte memo index holds, 64-bit offsets, long
    non-ASCII names, byte entries, Megatron-Core's mcore_data; keys of one layout share one
    entry object. Stock DCP reads the file."""
    import pickle
    import pickletools

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    from dist_checkpointing.pickling import DcpStorageRecords, DcpTensorEntry, encode_dcp_metadata
    from dist_checkpointing.strategies.dcp_format import read_dcp_index

    entries, dcp_entries, dcp_storage = {}, {}, {}
    records = [DcpStorageRecords(f"__{r}_0.distcp", [], [], [], []) for r in range(2)]

    def stored(name, chunk, file, offset, length):
        placed = records[file]
        placed.keys.append(name), placed.chunks.append(chunk), placed.offsets.append(offset), placed.lengths.append(length)
        dcp_storage[MetadataIndex(name, chunk)] = _StorageInfo(placed.file, offset, length)

    for i in range(1200):
        name = f"layers.{i}.weight" + ("é" * 200 if i == 3 else "")
        dtype = DTYPES[i % len(DTYPES)]
        shape = () if i == 1 else (2 * (i + 1), 3, 2)
        chunks = [((), ())] if i == 1 else [((0, 0, 0), (i + 1, 3, 2)), ((i + 1, 0, 0), (i + 1, 3, 2))]
        if i == 2:  # more chunks than one APPENDS batch
            shape, chunks = (1500,), [((k,), (1,)) for k in range(1500)]
        entries[name] = DcpTensorEntry(dtype, shape, chunks)
        dcp_entries[name] = TensorStorageMetadata(
            TensorProperties(dtype=dtype), torch.Size(shape), [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks]
        )
        for k, (offsets, _) in enumerate(chunks):
            stored(name, offsets, k % 2, i * 2**33 + k * 1000, 7 + i + 2**31 * (i == 4))
    for j in range(3):  # keys of one dtype, size and chunks (a model's layers) share one entry object
        name = f"shared.{j}.weight"
        entries[name] = DcpTensorEntry(torch.bfloat16, (4, 2), [((0, 0), (2, 2)), ((2, 0), (2, 2))])
        dcp_entries[name] = TensorStorageMetadata(
            TensorProperties(dtype=torch.bfloat16), torch.Size((4, 2)), [ChunkStorageMetadata(torch.Size((o, 0)), torch.Size((2, 2))) for o in (0, 2)]
        )
        for k, o in enumerate((0, 2)):
            stored(name, (o, 0), k, 2**40 + 100 * j + 50 * k, 50)
    for name in ("common_state/shard_0_1", "opt/shard_3_4"):
        entries[name], dcp_entries[name] = None, BytesStorageMetadata()
        stored(name, None, 1, 5, 300)
    mcore_data = {"layers.5.weight": {"nd_reformulated_orig_global_shape": (12, 3, 2)}}
    encoded = encode_dcp_metadata(entries, records, mcore_data, ("/ckpt/it_7", "a-save-id"), "1.0.0")
    pickletools.dis(encoded, out=io.StringIO())  # a well-formed pickle, opcode by opcode

    expected = Metadata(dcp_entries, storage_data=dcp_storage, storage_meta=StorageMeta("/ckpt/it_7", "a-save-id"), version="1.0.0")
    expected.mcore_data = mcore_data
    expected = pickle.loads(pickle.dumps(expected))  # as a reader of DCP's own pickle has it
    got = pickle.loads(encoded)
    assert got == expected and list(got.state_dict_metadata) == list(expected.state_dict_metadata)
    assert vars(got.storage_meta) == vars(expected.storage_meta) and got.mcore_data == mcore_data
    assert len(got.storage_data) == len(expected.storage_data)
    for index, info in expected.storage_data.items():
        assert vars(got.storage_data[index]) == vars(info)
    for name, entry in got.state_dict_metadata.items():
        if name in mcore_data or not isinstance(entry, TensorStorageMetadata):
            continue
        assert vars(entry.properties) == vars(expected.state_dict_metadata[name].properties)
        assert [vars(c) for c in entry.chunks] == [vars(c) for c in expected.state_dict_metadata[name].chunks]
    assert got.state_dict_metadata["shared.0.weight"] is got.state_dict_metadata["shared.2.weight"]
    (tmp_path / ".metadata").write_bytes(encoded)
    index = read_dcp_index(str(tmp_path))  # the library's own reading: the shared entry checked once, each key its own items
    assert [item.offset for item in index.tensors["shared.1.weight"].items] == [2**40 + 100, 2**40 + 150]
    assert index.tensors["shared.1.weight"].chunks == (((0, 0), (2, 2)), ((2, 0), (2, 2)))
    read = FileSystemReader(str(tmp_path)).read_metadata()
    assert (read.storage_meta.checkpoint_id, read.storage_meta.save_id) == ("/ckpt/it_7", "a-save-id")
    read.storage_meta = expected.storage_meta  # the reader sets its own load_id
    assert read == expected


def test_each_save_logs_what_it_wrote_and_how_long_each_step_took(tmp_path, caplog):
    path = str(tmp_path / "logged")
    with caplog.at_level(logging.DEBUG, logger="dist_checkpointing.serialization"):
        dc.save(sharded_state_dict(0, 1), path)
    commit_files = {os.path.join(path, f) for f in ("metadata.json", "index.json", "zarr.json")}  # rank 0's, at commit
    files = [os.path.join(r, f) for r, _, names in os.walk(path) for f in names if os.path.join(r, f) not in commit_files]
    nbytes = sum(os.path.getsize(f) for f in files)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Saved")]
    assert f"{nbytes} bytes in {len(files)} files by 1 rank(s)" in line
    assert re.search(r"plan [0-9.]+ s, stage [0-9.]+ s, write [0-9.]+ s, commit [0-9.]+ s; [0-9.e+-]+ GB/s written", line)


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_chunk_files_are_byte_identical_to_zarr_pythons(tmp_path, zarr_format):
    """Our raw chunk writer (values and CRC-32C written straight from the shard, edge chunks
    padded) produces exactly the files zarr-python's own codec pipeline writes."""
    register_zarr_bfloat16()
    values = torch.randn(10, 6).to(torch.bfloat16)
    state = {  # shards of 4 and 6 rows: chunks of 4 rows, the last one cut by the array's end
        "a": ShardedTensor("edge.weight", values[:4], values.dtype, (4, 6), (10, 6), (0, 0), None),
        "b": ShardedTensor("edge.weight", values[4:], values.dtype, (6, 6), (10, 6), (4, 0), None),
    }
    ours = str(tmp_path / "ours")
    dc.save(state, ours, StrategyConfig(zarr_format=zarr_format))
    theirs = str(tmp_path / "theirs" / "edge.weight")
    document = {3: "zarr.json", 2: ".zarray"}[zarr_format]
    os.makedirs(theirs)
    with open(os.path.join(ours, "edge.weight", document)) as f, open(os.path.join(theirs, document), "w") as g:
        g.write(f.read())
    array = zarr.open_array(theirs, mode="r+")
    array[...] = to_numpy(values)

    def chunk_files(root):
        return {os.path.relpath(os.path.join(r, f), root): open(os.path.join(r, f), "rb").read()
                for r, _, names in os.walk(root) for f in names if f != document}

    mine = chunk_files(os.path.join(ours, "edge.weight"))
    assert len(mine) == 3 and mine == chunk_files(theirs)

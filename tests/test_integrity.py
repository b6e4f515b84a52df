"""Checksums and damaged checkpoints: a changed, truncated or missing file, or a malformed
metadata.json or index.json, raises a CheckpointingException naming the key and the file; never wrong values."""

import json
import os

import pytest
import torch
from layouts import TP2_SAVES, check_loaded, full, load_tp1, sharded_state_dict

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException
from dist_checkpointing.strategies.config import StrategyConfig
from dist_checkpointing.strategies.dcp_format import read_dcp_index


@pytest.fixture
def saved(tp2_checkpoints):
    return tp2_checkpoints


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_checksums_are_recorded(saved):
    for name in TP2_SAVES:
        with open(f"{saved}/{name}/index.json") as f:
            checksums = json.load(f)["checksums"]
        assert "common.pt" in checksums and all(len(r) == 3 for rs in checksums.values() for r in rs)
        if name == "torch_dist":  # one range per item of every .distcp file
            items = [item for _, item in read_dcp_index(f"{saved}/{name}").stored_items()]
            recorded = {(n, o) for n, rs in checksums.items() for o, _, _ in rs}
            assert {(i.file, i.offset) for i in items} <= recorded
        else:  # objects are files of their own; v3 chunks carry their own CRC-32C
            assert "rng_state/shard_0_2.pt" in checksums
    with open(f"{saved}/zarr/embedding.weight/zarr.json") as f:
        assert json.load(f)["codecs"][-1] == {"name": "crc32c"}


CHUNK = "embedding.weight/c.1.0"  # TP rank 1's half of the embedding (Zarr v3)


@pytest.mark.parametrize("reader", ["zarr", "tensorstore"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_damaged_zarr_chunk_raises_naming_key_and_file(copy_of, reader, damage):
    ckpt = copy_of("zarr")
    path = os.path.join(ckpt, CHUNK)
    {"flip": lambda: flip_byte(path, 10), "truncate": lambda: truncate(path), "remove": lambda: os.remove(path)}[damage]()
    with pytest.raises(CheckpointingException, match="embedding.weight") as error:
        load_tp1(ckpt, sharded_strategy=reader)
    assert path in str(error.value)
    # the other keys still load, and the undamaged half of the embedding too
    request = {"norm": sharded_state_dict(0, 1, with_data=False, objects=False)["final_norm"]}
    assert torch.equal(dc.load(request, ckpt)["norm"], full("final_norm", (16,), torch.float32))


@pytest.mark.parametrize("reader", ["zarr", "tensorstore"])
def test_missing_zarr_v2_chunk_is_an_error_not_zeros(copy_of, reader):
    ckpt = copy_of("zarr_v2")
    os.remove(os.path.join(ckpt, "embedding.weight", "1.0"))
    with pytest.raises(CheckpointingException, match=r"embedding\.weight.*1\.0.*missing"):
        load_tp1(ckpt, sharded_strategy=reader)


def _offset_of(path, values: torch.Tensor) -> int:
    with open(path, "rb") as f:
        data = f.read()
    offset = data.find(values.contiguous().view(torch.uint8).numpy().tobytes())
    assert offset >= 0
    return offset


def test_damaged_torch_dist_item_raises_unless_verification_is_off(copy_of):
    ckpt = copy_of("torch_dist")
    stored = read_dcp_index(ckpt).tensors["embedding.weight"]
    item = next(item for (offsets, _), item in zip(stored.chunks, stored.items) if offsets[0] == 32)
    path = os.path.join(ckpt, item.file)
    second_half = full("embedding.weight", (64, 16), torch.bfloat16)[32:]
    flip_byte(path, _offset_of(path, second_half) + 100)
    with pytest.raises(CheckpointingException, match=r"embedding\.weight.*CRC-32C") as error:
        load_tp1(ckpt)
    assert path in str(error.value)
    # verification off: the same bytes load, and they are wrong (what checksums exist to catch)
    unchecked = StrategyConfig(backend="torch_dist", verify_checksums=False)
    loaded = load_tp1(ckpt, sharded_strategy=unchecked)
    assert not torch.equal(loaded["embedding"], full("embedding.weight", (64, 16), torch.bfloat16))


def test_truncated_or_missing_torch_dist_file(copy_of):
    ckpt = copy_of("torch_dist")
    names = sorted(n for n in os.listdir(ckpt) if n.endswith(".distcp"))
    truncate(os.path.join(ckpt, names[0]))
    with pytest.raises(CheckpointingException, match=names[0]):
        load_tp1(ckpt)
    os.remove(os.path.join(ckpt, names[0]))
    with pytest.raises(CheckpointingException, match=names[0]):
        load_tp1(ckpt)


@pytest.mark.parametrize("name", ["zarr", "torch_dist"])
def test_damaged_common_state(copy_of, name):
    ckpt = copy_of(name)
    flip_byte(os.path.join(ckpt, "common.pt"), os.path.getsize(os.path.join(ckpt, "common.pt")) // 2)
    with pytest.raises(CheckpointingException, match=r"common\.pt.*CRC-32C"):
        load_tp1(ckpt)


def test_damaged_object_file(copy_of):
    ckpt = copy_of("zarr")
    path = os.path.join(ckpt, "rng_state", "shard_1_2.pt")
    flip_byte(path, os.path.getsize(path) // 2)
    request = {"rng": sharded_state_dict(1, 2, with_data=False)["rng"]}
    with pytest.raises(CheckpointingException, match=r"rng_state/shard_1_2.*CRC-32C"):
        dc.load(request, ckpt, validate_access_integrity=False)


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"sharded_backend": 3}', b"\xff\xfe"])
def test_malformed_metadata_json(copy_of, content):
    ckpt = copy_of("zarr")
    with open(os.path.join(ckpt, "metadata.json"), "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointingException, match="metadata.json"):
        load_tp1(ckpt)


def test_checksums_in_the_index_are_checked_strictly(copy_of):
    ckpt = copy_of("zarr")
    path = os.path.join(ckpt, "index.json")
    with open(path) as f:
        doc = json.load(f)
    doc["checksums"]["common.pt"] = [[0, -1, 5]]
    with open(path, "w") as f:
        json.dump(doc, f)
    with pytest.raises(CheckpointingException, match="'checksums'"):
        load_tp1(ckpt)


def test_sound_checkpoints_load(saved):
    for name in TP2_SAVES:
        assert check_loaded(load_tp1(f"{saved}/{name}"), 0, 1) > 10, name

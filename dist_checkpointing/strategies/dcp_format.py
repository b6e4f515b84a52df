"""The DCP (torch_dist) format as read from disk: `.metadata`, checked, and the stored entries.

`.metadata` is a pickle of DCP's `Metadata` (unpickled with an allow-list, pickling.py). What the
allow-list lets through is still untrusted, so `read_dcp_metadata` type-checks the whole
document: every entry's dtype, size and chunks (64-bit bounded, inside the tensor), every
chunk's storage record (a file inside the checkpoint, non-negative bounded offset and length),
and Megatron-Core's `mcore_data`. Damage raises a `CheckpointingException` naming the file and
the key. Whether a key's chunks tile its tensor is checked per key (`check_chunks_tile`): by the
load for the keys it reads, and by `dist-ckpt verify` for all.
"""

import io
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from ..core import CheckpointingException, is_count
from ..geometry import cover_fault, inside
from ..layout import DCP_METADATA_FNAME, relative_path_problem
from ..mapping import ShardedObject, whole_tensor_metadata
from ..pickling import TensorRecord, load_dcp_metadata, load_object, tensor_record

METADATA_FNAME = DCP_METADATA_FNAME
ORIG_SHAPE = "nd_reformulated_orig_global_shape"  # Megatron-Core's `mcore_data` field
DCP_VERSION = "1.0.0"  # the `Metadata.version` DCP of torch 2.6+ writes


def read_dcp_metadata(checkpoint_dir: str) -> Metadata:
    """The checkpoint's `.metadata`, unpickled with an allow-list and type-checked."""
    path = os.path.join(checkpoint_dir, METADATA_FNAME)
    metadata = load_dcp_metadata(path)
    problem = _metadata_problem(metadata)
    if problem:
        raise CheckpointingException(f"{path} is damaged or was tampered with: {problem}")
    return metadata


def _is_shape(x, ndim: Optional[int] = None) -> bool:
    return (
        isinstance(x, (torch.Size, tuple, list))
        and (ndim is None or len(x) == ndim)
        and all(is_count(n) for n in x)
        and math.prod(x) < 2**63
    )


def _metadata_problem(metadata) -> str:
    """What is wrong with an unpickled `.metadata` ("" if it is well-formed)."""
    if not isinstance(metadata, Metadata):
        return f"it holds a {type(metadata).__name__}, not DCP's Metadata"
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return "state_dict_metadata and storage_data must be dicts"
    for key, entry in entries.items():
        if not isinstance(key, str):
            return f"entry name {key!r} is not a string"
        problem = _entry_problem(entry)
        if problem:
            return f"key '{key}': {problem}"
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
            return f"storage_data key {index!r} is not a MetadataIndex"
        if index.offset is not None and not _is_shape(index.offset):
            return f"key '{index.fqn}': chunk offset {index.offset!r} is not a tuple of 64-bit counts"
        relative_path = getattr(info, "relative_path", None)
        if not (is_count(getattr(info, "offset", None)) and is_count(getattr(info, "length", None))):
            return f"key '{index.fqn}': its storage record {info!r} needs a non-negative offset and length"
        problem = relative_path_problem(relative_path)
        if problem:
            return f"key '{index.fqn}': its data file {relative_path!r} cannot be inside the checkpoint: {problem}"
    mcore_data = getattr(metadata, "mcore_data", None) or {}
    if not isinstance(mcore_data, dict):
        return "mcore_data must be a dict"
    for key, data in mcore_data.items():
        if not isinstance(data, dict) or (ORIG_SHAPE in data and not _is_shape(data[ORIG_SHAPE])):
            return f"key '{key}': mcore_data must hold {ORIG_SHAPE} as a shape"
    return ""


def _entry_problem(entry) -> str:
    if isinstance(entry, BytesStorageMetadata):
        return ""
    if not isinstance(entry, TensorStorageMetadata):
        return f"a {type(entry).__name__}, not a tensor or bytes entry"
    if not isinstance(entry.properties, TensorProperties) or not isinstance(entry.properties.dtype, torch.dtype):
        return "its properties have no torch dtype"
    if not _is_shape(entry.size):
        return f"size {entry.size!r} is not a tuple of 64-bit counts"
    if not isinstance(entry.chunks, list):
        return "its chunks are not a list"
    for chunk in entry.chunks:
        if not isinstance(chunk, ChunkStorageMetadata):
            return f"chunk {chunk!r} is not a ChunkStorageMetadata"
        ndim = len(entry.size)
        if not _is_shape(chunk.offsets, ndim) or not _is_shape(chunk.sizes, ndim):
            return f"chunk offsets {chunk.offsets!r} and sizes {chunk.sizes!r} must be {ndim} counts each"
        if not inside((tuple(chunk.offsets), tuple(chunk.sizes)), entry.size):
            return f"chunk at {tuple(chunk.offsets)} of size {tuple(chunk.sizes)} lies outside the size {tuple(entry.size)}"
    return ""


def check_chunks_tile(checkpoint_dir: str, key: str, entry: TensorStorageMetadata) -> None:
    """Raises unless the chunks `.metadata` lists for `key` cover its tensor exactly once:
    an element no chunk holds would otherwise load as whatever the buffer held."""
    boxes = [((tuple(c.offsets), tuple(c.sizes)), 1) for c in entry.chunks]
    fault = cover_fault(tuple(entry.size), boxes)
    if fault:
        region, n = fault
        what = "no chunk holds" if n == 0 else f"{n} chunks hold"
        raise CheckpointingException(
            f"Key '{key}': {os.path.join(checkpoint_dir, METADATA_FNAME)} is damaged: {what} elements "
            f"[{', '.join(f'{a}:{b}' for a, b in region)}] of the stored size {tuple(entry.size)}, "
            f"each element must be in exactly one chunk. Restore the checkpoint from a copy."
        )


def stored_entries(metadata: Metadata, with_objects: bool) -> dict:
    """key -> data-less whole ShardedTensor (and unique key -> ShardedObject) from `.metadata`;
    a key in the n-d formulation as its whole flat range, as Megatron-Core lists it."""
    result = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            flattened = reformulated_from(metadata, key) is not None
            result[key] = whole_tensor_metadata(key, md.properties.dtype, global_shape(metadata, key), flattened)
        elif with_objects and isinstance(md, BytesStorageMetadata):
            result[key] = ShardedObject.empty_from_unique_key(key)
    return result


def global_shape(metadata: Metadata, key: str) -> Tuple[int, ...]:
    """The tensor's shape as saved (not its n-d reformulation)."""
    original = reformulated_from(metadata, key)
    return original if original is not None else tuple(metadata.state_dict_metadata[key].size)


def reformulated_from(metadata: Metadata, key: str) -> Optional[Tuple[int, ...]]:
    """The original global shape of a key stored in the n-d formulation, else None."""
    original = mcore_data(metadata).get(key, {}).get(ORIG_SHAPE)
    return None if original is None else tuple(original)


def mcore_data(metadata: Metadata) -> dict:
    return getattr(metadata, "mcore_data", None) or {}


# A DCP item is one `torch.save` zip archive: `<archive>/data.pkl` (the tensor's dtype, shape and
# strides), small records, `<archive>/data/<n>` (the storage's bytes, stored uncompressed) and the
# central directory; the records' local headers carry no sizes (they are in data descriptors),
# so an item is read from its central directory at the end.
_MAX_DIRECTORY = 2**20  # bytes; a tensor item's directory has a handful of entries
_TAIL = 4096  # what is read first from an item's end: its directories, usually


@dataclass(frozen=True)
class TensorItem:
    """Where the values of a `torch.save`d tensor lie in its item, found without loading it:
    `head` (the item's bytes before the values), `nbytes` of values, `tail` (the bytes after)."""

    record: TensorRecord
    head: bytes
    nbytes: int
    tail: bytes

    @property
    def start(self) -> int:
        return len(self.head)


def tensor_item(read: Callable[[int, int], bytes], length: int) -> Optional[TensorItem]:
    """The TensorItem of the `torch.save` item of `length` bytes that `read(offset, n)` reads;
    None unless it is one plain contiguous tensor in one uncompressed record (a reader then
    falls back to `load_object`, which also says what is wrong with a damaged item)."""
    try:
        return _tensor_item(read, length)
    except (struct.error, ValueError, IndexError, UnicodeDecodeError):
        return None


def _tensor_item(read, length: int) -> Optional[TensorItem]:
    tail_start = max(0, length - _TAIL)
    tail = read(tail_start, length - tail_start)
    entries = _central_directory(read, length, tail_start, tail)
    if entries is None:
        return None
    pickles = [n for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        return None
    prefix = pickles[0][: -len("data.pkl")]
    records = [n for n in entries if n.startswith(prefix + "data/")]
    if len(records) != 1 or any(entries[n][0] != 0 for n in (pickles[0], records[0])):
        return None  # compressed, or more than one storage
    storage = records[0]
    head = read(0, min(length, entries[storage][2] + 30 + len(storage) + 256))

    def content(name: str) -> Tuple[int, int]:  # (start, size) of an entry's bytes
        _, size, offset = entries[name]
        signature, name_length, extra_length = struct.unpack_from("<4s22xHH", head, offset)
        if signature != b"PK\x03\x04":
            raise ValueError(name)
        return offset + 30 + name_length + extra_length, size

    byteorder = prefix + "byteorder"
    if byteorder in entries:
        at, size = content(byteorder)
        if bytes(head[at : at + size]) != b"little":
            return None
    at, size = content(pickles[0])
    record = tensor_record(bytes(head[at : at + size]))
    start, nbytes = content(storage)
    if (
        record is None
        or storage != prefix + "data/" + record.storage_key
        or record.storage_offset != 0
        or record.stride != _contiguous_strides(record.shape)
        or record.storage_numel != math.prod(record.shape)
        or nbytes != record.storage_numel * record.dtype.itemsize
        or start + nbytes > length
    ):
        return None
    if start > len(head):
        head = read(0, start)
    end = start + nbytes
    rest = tail[end - tail_start :] if end >= tail_start else read(end, length - end)
    return TensorItem(record, bytes(head[:start]), nbytes, bytes(rest))


def _central_directory(read, length: int, tail_start: int, tail) -> Optional[Dict[str, Tuple[int, int, int]]]:
    """name -> (compression method, size, local header offset) of each entry of the item's zip
    directory (Zip64 records read where present, as `torch.save` writes them)."""
    end = bytes(tail).rfind(b"PK\x05\x06")
    if end < 0:
        return None
    count, size, offset = struct.unpack_from("<10xHII", tail, end)
    locator = end - 20
    if locator >= 0 and bytes(tail[locator : locator + 4]) == b"PK\x06\x07":
        (record_at,) = struct.unpack_from("<8xQ", tail, locator)
        record = read(record_at, 56) if record_at < tail_start else tail[record_at - tail_start :]
        signature, count, size, offset = struct.unpack_from("<4s28xQQQ", record)
        if signature != b"PK\x06\x06":
            return None
    if size > _MAX_DIRECTORY or offset + size > length:
        return None
    directory = read(offset, size) if offset < tail_start else tail[offset - tail_start : offset - tail_start + size]
    entries, at = {}, 0
    for _ in range(count):
        signature, method, compressed, uncompressed, name_length, extra_length, comment_length, header = (
            struct.unpack_from("<4s6xH8xIIHHH8xI", directory, at)
        )
        if signature != b"PK\x01\x02":
            return None
        name = bytes(directory[at + 46 : at + 46 + name_length]).decode()
        extra = bytes(directory[at + 46 + name_length : at + 46 + name_length + extra_length])
        compressed, header = _zip64_sizes(extra, uncompressed, compressed, header)
        entries[name] = (method, compressed, header)
        at += 46 + name_length + extra_length + comment_length
    return entries


def _zip64_sizes(extra: bytes, uncompressed: int, compressed: int, header: int) -> Tuple[int, int]:
    """(compressed size, header offset) of a directory entry, from its Zip64 extra field where
    the 32-bit fields are saturated."""
    at = 0
    while at + 4 <= len(extra):
        kind, size = struct.unpack_from("<HH", extra, at)
        if kind == 1:
            values = iter(struct.unpack_from(f"<{size // 8}Q", extra, at + 4))
            if uncompressed == 0xFFFFFFFF:
                next(values)
            if compressed == 0xFFFFFFFF:
                compressed = next(values)
            if header == 0xFFFFFFFF:
                header = next(values)
        at += 4 + size
    return compressed, header


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(math.prod(shape[axis + 1 :]) for axis in range(len(shape)))


def stored_tensor(blob, what: str, path: str) -> torch.Tensor:
    """The tensor of an in-memory `torch.save` item, as a view of its bytes where it is one
    plain tensor (what DCP writers produce), else as `torch.load` builds it."""
    blob = memoryview(blob).cast("B")
    item = tensor_item(lambda offset, n: blob[offset : offset + n], blob.nbytes)
    if item is None:
        tensor = load_object(io.BytesIO(blob), what, path)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointingException(f"{what} in {path}: expected a tensor, found {type(tensor).__name__}")
        return tensor
    values = torch.frombuffer(blob, dtype=torch.uint8, count=item.nbytes, offset=item.start) if item.nbytes else torch.empty(0, dtype=torch.uint8)
    return values.view(item.record.dtype).reshape(item.record.shape)

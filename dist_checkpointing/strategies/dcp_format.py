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
import re
import zipfile
from typing import Optional, Tuple

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from ..core import CheckpointingException, is_int
from ..geometry import cover_fault, inside
from ..layout import relative_path_problem
from ..mapping import ShardedObject, whole_tensor_metadata
from ..pickling import load_dcp_metadata, load_object

METADATA_FNAME = ".metadata"
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


def _is_count(x) -> bool:
    return is_int(x) and x >= 0


def _is_shape(x, ndim: Optional[int] = None) -> bool:
    return (
        isinstance(x, (torch.Size, tuple, list))
        and (ndim is None or len(x) == ndim)
        and all(_is_count(n) for n in x)
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
        if not (_is_count(getattr(info, "offset", None)) and _is_count(getattr(info, "length", None))):
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
    """key -> data-less whole ShardedTensor (and unique key -> ShardedObject) from `.metadata`."""
    result = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            result[key] = whole_tensor_metadata(key, md.properties.dtype, global_shape(metadata, key))
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


def stored_tensor(blob: memoryview, what: str, path: str) -> torch.Tensor:
    """The tensor of a `torch.save` blob, as a view of the blob's bytes when it is one stored
    (uncompressed) storage record, which is what DCP writers produce: one copy less than
    `torch.load`, which copies the record into a new storage."""
    meta = load_object(io.BytesIO(blob), what, path, map_location="meta")
    if not isinstance(meta, torch.Tensor):
        raise CheckpointingException(f"{what} in {path}: expected a tensor, found {type(meta).__name__}")
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        records = [i for i in archive.infolist() if re.fullmatch(r"[^/]+/data/\d+", i.filename)]
    if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED or not records[0].file_size:
        return load_object(io.BytesIO(blob), what, path)
    record = records[0]
    header = blob[record.header_offset : record.header_offset + 30]  # the local file header
    start = record.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    storage = torch.frombuffer(blob, dtype=torch.uint8, count=record.file_size, offset=start)
    return storage.view(meta.dtype).as_strided(meta.shape, meta.stride(), meta.storage_offset())

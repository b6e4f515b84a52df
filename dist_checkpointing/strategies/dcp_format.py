"""The DCP (torch_dist) format as read from disk: `.metadata`, checked, as the library's own index.

`.metadata` is a pickle of DCP's `Metadata`. It is unpickled with an allow-list into inert
records (pickling.py: no DCP class is built, so reading needs no import of
`torch.distributed.checkpoint`, ~0.5-1.2 s), and what the records say is untrusted:
`read_dcp_index` type-checks the whole document into a `DcpIndex` (every entry's dtype, size
and chunks, 64-bit bounded and inside the tensor; every chunk's storage record a file inside
the checkpoint with a non-negative bounded offset and length; Megatron-Core's `mcore_data`).
Damage raises a `CheckpointingException` naming the file and the key. Whether a key's chunks
tile its tensor is checked per key (`check_chunks_tile`): by the load for the keys it reads,
and by `dist-ckpt verify` for all.
"""

import io
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..core import CheckpointingException, is_count
from ..geometry import inside, tiling_fault
from ..layout import DCP_METADATA_FNAME, relative_path_problem
from ..mapping import ShardedObject, whole_tensor_metadata
from ..pickling import TensorRecord, dcp_record_class, load_dcp_metadata, load_object, tensor_record
from ..storage_interface import Storage

METADATA_FNAME = DCP_METADATA_FNAME
ORIG_SHAPE = "nd_reformulated_orig_global_shape"  # Megatron-Core's `mcore_data` field
DCP_VERSION = "1.0.0"  # the `Metadata.version` DCP of torch 2.6+ writes
IN_MEMORY_ITEM_BYTES = 2**20  # smaller items are written and read whole (one call each), larger ones in place


class StoredItem(NamedTuple):
    """Where one DCP item's bytes are (DCP's `_StorageInfo`)."""

    file: str  # relative to the checkpoint
    offset: int
    length: int
    transforms: tuple  # DCP's transform_descriptors (e.g. compression); () for a plain item


Box = Tuple[Tuple[int, ...], Tuple[int, ...]]  # (offsets, sizes)


class DcpTensor(NamedTuple):
    """One tensor entry of `.metadata`."""

    dtype: torch.dtype
    size: Tuple[int, ...]  # as stored: for a key in Megatron-Core's n-d formulation, that
    chunks: Tuple[Box, ...]
    items: Tuple[Optional[StoredItem], ...]  # per chunk (None: `.metadata` lists no bytes for it)
    original_shape: Optional[Tuple[int, ...]]  # the n-d formulation's shape as saved, else None

    @property
    def global_shape(self) -> Tuple[int, ...]:
        """The tensor's shape as saved (not its n-d reformulation)."""
        return self.size if self.original_shape is None else self.original_shape


@dataclass(frozen=True)
class DcpIndex:
    """`.metadata` as the library reads it: tensor entries, and byte entries (ShardedObjects,
    the common state) with where their bytes are."""

    path: str  # of `.metadata`
    tensors: Dict[str, DcpTensor]
    objects: Dict[str, Optional[StoredItem]]

    def stored_items(self) -> Iterator[Tuple[str, StoredItem]]:
        """(key, where its bytes are) of every byte entry and tensor chunk with bytes listed."""
        for key, item in self.objects.items():
            if item is not None:
                yield key, item
        for key, tensor in self.tensors.items():
            yield from ((key, item) for item in tensor.items if item is not None)

    def files(self) -> set:
        """The data files the entries' bytes are in."""
        return {item.file for _, item in self.stored_items()}


def read_dcp_index(checkpoint_dir: str, storage: Optional[Storage] = None) -> DcpIndex:
    """The checkpoint's `.metadata` (on `storage`, where the caller has it), unpickled into
    records with an allow-list and type-checked into a DcpIndex."""
    path = os.path.join(checkpoint_dir, METADATA_FNAME)
    try:
        return _index(path, load_dcp_metadata(path, storage=storage))
    except _Damaged as e:
        raise CheckpointingException(f"{path} is damaged or was tampered with: {e}") from None


class _Damaged(Exception):
    pass


# the records of DCP's classes `.metadata` holds (as read: pickling.DcpRecord)
_METADATA, _TENSOR_ENTRY, _BYTES_ENTRY, _CHUNK, _PROPERTIES, _INDEX_KEY, _STORAGE_INFO = map(dcp_record_class, (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "_StorageInfo"))


def _fields(record, kind: type, what: str) -> dict:
    """The attributes of a record of DCP's class `kind` (a `dcp_record_class`)."""
    if type(record) is kind and type(record.state) is dict:
        return record.state
    if type(record) is kind:
        raise _Damaged(f"{what}: DCP's {kind.kind} without attributes")
    raise _Damaged(f"{what} is a {type(record).__name__}, not DCP's {kind.kind}")  # (a record's class is named as its kind)


def _shape(x, what: str, ndim: Optional[int] = None, checked: Optional[set] = None) -> Tuple[int, ...]:
    """`x` as a shape (or offsets): 64-bit counts, `ndim` of them where given. `checked`:
    shapes already found good (a model's chunks share few distinct shapes)."""
    if checked is not None and type(x) is tuple and x in checked:
        if ndim is None or len(x) == ndim:
            return x
    if (
        not isinstance(x, (tuple, list))
        or (ndim is not None and len(x) != ndim)
        or not all(is_count(n) for n in x)
        or math.prod(x) >= 2**63
    ):
        raise _Damaged(f"{what} {x!r} is not {'a tuple' if ndim is None else ndim} of 64-bit counts")
    x = tuple(x)
    if checked is not None:
        checked.add(x)
    return x


class _Checked:
    """What `_index` found good so far: a `.metadata` of 10^4 entries names few distinct
    shapes, chunk placements and data files, each checked once."""

    def __init__(self):
        self.shapes: set = set()
        self.placements: set = set()  # (chunk offsets, chunk sizes, tensor size) inside the tensor
        self.files: set = set()
        self.entries: dict = {}  # id of an entry record -> its (dtype, size, chunks): keys whose
        # entry is one shared object (as this library writes a model's layers) are checked once


def _index(path: str, metadata) -> DcpIndex:
    fields = _fields(metadata, _METADATA, "the document")
    entries, storage = fields.get("state_dict_metadata"), fields.get("storage_data")
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise _Damaged("state_dict_metadata and storage_data must be dicts")
    mcore_data = fields.get("mcore_data") or {}
    if not isinstance(mcore_data, dict):
        raise _Damaged("mcore_data must be a dict")
    checked = _Checked()
    originals = {}  # key -> its shape as saved, for keys in the n-d formulation
    for key, data in mcore_data.items():
        if not isinstance(data, dict):
            raise _Damaged(f"key '{key}': mcore_data must hold {ORIG_SHAPE} as a shape")
        if ORIG_SHAPE in data:
            originals[key] = _shape(data[ORIG_SHAPE], f"key '{key}': mcore_data's {ORIG_SHAPE}", checked=checked.shapes)
    items = {}  # (key, chunk offsets or None) -> StoredItem
    for index, info in storage.items():  # (messages are built on failure only: 10^5 records)
        at = _fields(index, _INDEX_KEY, "a storage_data key")
        key = at.get("fqn")
        if type(key) is not str:
            raise _Damaged(f"storage_data key {index!r} names no key")
        try:
            offset = at.get("offset")
            if offset is not None:
                offset = _shape(offset, "chunk offset", checked=checked.shapes)
            items[key, offset] = _stored_item(info, checked.files)
        except _Damaged as e:
            raise _Damaged(f"key '{key}': {e}") from None
    tensors, objects = {}, {}
    for key, entry in entries.items():
        if type(key) is not str:
            raise _Damaged(f"entry name {key!r} is not a string")
        if type(entry) is _BYTES_ENTRY:
            objects[key] = items.get((key, None))
            continue
        try:
            tensors[key] = _tensor(entry, originals.get(key), items, key, checked)
        except _Damaged as e:
            raise _Damaged(f"key '{key}': {e}") from None
    return DcpIndex(path, tensors, objects)


def _stored_item(info, files: set) -> StoredItem:
    record = _fields(info, _STORAGE_INFO, "its storage record")
    file, start, length = record.get("relative_path"), record.get("offset"), record.get("length")
    if not (is_count(start) and is_count(length)):
        raise _Damaged(f"its storage record {record!r} needs a non-negative offset and length")
    if not (type(file) is str and file in files):  # a few data files, named by 10^5 records
        problem = relative_path_problem(file)
        if problem:
            raise _Damaged(f"its data file {file!r} cannot be inside the checkpoint: {problem}")
        files.add(file)
    transforms = record.get("transform_descriptors") or ()
    return StoredItem(file, start, length, tuple(transforms) if isinstance(transforms, (list, tuple)) else (transforms,))


def _tensor(entry, original: Optional[Tuple[int, ...]], items: dict, key: str, checked: _Checked) -> DcpTensor:
    known = checked.entries.get(id(entry))  # (the records live as long as the index is built)
    if known is None:
        known = checked.entries[id(entry)] = _entry(entry, checked)
    dtype, size, boxes = known
    return DcpTensor(dtype, size, boxes, tuple([items.get((key, o)) for o, _ in boxes]), original)


def _entry(entry, checked: _Checked) -> Tuple[torch.dtype, Tuple[int, ...], Tuple[Box, ...]]:
    fields = _fields(entry, _TENSOR_ENTRY, "the entry")
    properties = fields.get("properties")
    if type(properties) is not _PROPERTIES:
        raise _Damaged("its properties have no torch dtype")
    state = properties.state  # DCP's tuple (a dict in older pickles)
    dtype = state[0] if isinstance(state, tuple) and state else state.get("dtype") if isinstance(state, dict) else None
    if not isinstance(dtype, torch.dtype):
        raise _Damaged("its properties have no torch dtype")
    size = _shape(fields.get("size"), "size", checked=checked.shapes)
    chunks = fields.get("chunks")
    if type(chunks) is not list:
        raise _Damaged("its chunks are not a list")
    boxes, ndim = [], len(size)
    for chunk in chunks:
        box = _fields(chunk, _CHUNK, "a chunk")
        offsets = _shape(box.get("offsets"), "chunk offsets", ndim, checked.shapes)
        sizes = _shape(box.get("sizes"), "chunk sizes", ndim, checked.shapes)
        placement = (offsets, sizes, size)
        if placement not in checked.placements:
            if not inside((offsets, sizes), size):
                raise _Damaged(f"chunk at {offsets} of size {sizes} lies outside the size {size}")
            checked.placements.add(placement)
        boxes.append((offsets, sizes))
    return dtype, size, tuple(boxes)


def check_chunks_tile(checkpoint_dir: str, key: str, entry: DcpTensor) -> None:
    """Raises unless the chunks `.metadata` lists for `key` cover its tensor exactly once:
    an element no chunk holds would otherwise load as whatever the buffer held."""
    fault = tiling_fault(entry.size, entry.chunks)
    if fault:
        region, n = fault
        what = "no chunk holds" if n == 0 else f"{n} chunks hold"
        raise CheckpointingException(
            f"Key '{key}': {os.path.join(checkpoint_dir, METADATA_FNAME)} is damaged: {what} elements "
            f"[{', '.join(f'{a}:{b}' for a, b in region)}] of the stored size {entry.size}, "
            f"each element must be in exactly one chunk. Restore the checkpoint from a copy."
        )


def stored_entries(index: DcpIndex, with_objects: bool) -> dict:
    """key -> data-less whole ShardedTensor (and unique key -> ShardedObject) from `.metadata`;
    a key in the n-d formulation as its whole flat range, as Megatron-Core lists it."""
    result = {
        key: whole_tensor_metadata(key, t.dtype, t.global_shape, t.original_shape is not None)
        for key, t in index.tensors.items()
    }
    if with_objects:
        result.update((key, ShardedObject.empty_from_unique_key(key)) for key in index.objects)
    return result


# A DCP item is one `torch.save` zip archive: `<archive>/data.pkl` (the tensor's dtype, shape and
# strides), small records, `<archive>/data/<n>` (the storage's bytes, stored uncompressed) and the
# central directory; the records' local headers carry no sizes (they are in data descriptors),
# so an item is read from its central directory at the end.
_MAX_DIRECTORY = 2**20  # bytes; a tensor item's directory has a handful of entries
_TAIL = 4096  # what is read first from an item's end: its directories, usually
_LAYOUTS_PER_LENGTH = 8  # layouts `stored_values` remembers per item length


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


def stored_values(blob, what: str, path: str, layouts: Optional[Dict[int, Dict[int, Dict[bytes, TensorItem]]]] = None):
    """The tensor of an in-memory `torch.save` item as (dtype, shape, its values' bytes: a
    flat numpy array, C order): a view of `blob` where it is one plain tensor (what DCP
    writers produce), else from what `torch.load` builds.

    `layouts` (item length -> head length -> head -> TensorItem, filled here) spares parsing
    items laid out like one parsed before: of its length, with the same bytes before the
    values (its zip records' local headers and `data.pkl`: the same dtype and shape, written
    alike). In a model of many small tensors most items are; the lookup costs a fraction of a
    parse."""
    blob = memoryview(blob).cast("B")
    heads = layouts.setdefault(blob.nbytes, {}) if layouts is not None else {}
    item = None
    for start, known in heads.items():  # (one head length, usually)
        item = known.get(blob[:start].tobytes())
        if item is not None:
            break
    if item is None:
        item = tensor_item(lambda offset, n: blob[offset : offset + n], blob.nbytes)
        if item is not None and sum(map(len, heads.values())) < _LAYOUTS_PER_LENGTH:
            heads.setdefault(item.start, {})[item.head] = item
    if item is not None:
        return item.record.dtype, item.record.shape, np.frombuffer(blob, np.uint8, item.nbytes, item.start)
    tensor = load_object(io.BytesIO(blob), what, path)
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointingException(f"{what} in {path}: expected a tensor, found {type(tensor).__name__}")
    values = tensor.contiguous().reshape(-1)
    return tensor.dtype, tuple(tensor.shape), values.view(torch.uint8).numpy() if values.numel() else np.empty(0, np.uint8)

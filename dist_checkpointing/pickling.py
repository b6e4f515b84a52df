"""The one place for pickling rules: nothing read from a checkpoint may run code.

Objects are written with `torch.save` and read with `torch.load(weights_only=True)`, whose
unpickler only builds tensors, containers, primitives and explicitly allowed classes. We allow,
for the duration of a load only, the plain-data classes Megatron-LM's checkpoints hold
(`argparse.Namespace`, `SimpleNamespace`, `PosixPath`, numpy arrays, scalars and RNG states,
and `io.BytesIO`, Transformer Engine's extra state).
Users allow their own classes globally with `torch.serialization.add_safe_globals([...])`.
"""

import argparse
import collections
import hashlib
import io
import pathlib
import pickle
import struct
import types
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .core import CheckpointingException, is_int
from .fs import DurableDir
from .integrity import Range, write_checksummed
from .storage import storage_of
from .storage_interface import Storage

SAFE_GLOBALS = [
    io.BytesIO,  # Transformer Engine's `_extra_state`: rebuilt from its bytes, it runs no code
    argparse.Namespace,
    types.SimpleNamespace,
    pathlib.PosixPath,
    np.ndarray,
    np.dtype,
    np._core.multiarray._reconstruct,
    np._core.multiarray.scalar,
    *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUV"},
]


def save_object(obj, target: DurableDir, path: str) -> List[Range]:
    """`torch.save` to `path` through `target`; returns the file's checksummed Range."""
    return write_checksummed(target, path, dump_object(obj).getbuffer())


def dump_object(obj) -> io.BytesIO:
    """`torch.save` of `obj` into memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer


def digest_object(obj) -> str:
    """A digest of `obj`'s `torch.save` bytes (deterministic for equal content)."""
    return hashlib.sha256(dump_object(obj).getbuffer()).hexdigest()


def load_object(source, what: str, where: str = None, map_location="cpu"):
    """`torch.load(source, weights_only=True)` of a path or binary stream.

    `what` names the entry and `where` the file (default: `source`) in error messages;
    `map_location="meta"` gives tensors' shapes and strides without reading their data.
    """
    where = where or str(source)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointingException(
            f"{what}: file {where} is missing; the checkpoint is damaged or incomplete"
        ) from None
    except pickle.UnpicklingError as e:
        raise _not_allowed(source, where, what, e) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointingException(f"{what}: cannot read {where}: {e}") from None


def _not_allowed(source, path: str, what: str, error: Exception) -> CheckpointingException:
    try:
        if hasattr(source, "seek"):
            source.seek(0)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # a file too damaged to list its globals: report the original error
        unsafe = []
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in torch.serialization.get_safe_globals()}
    blocked = [name for name in unsafe if name not in allowed]
    if not blocked:
        return CheckpointingException(f"{what}: {path} is not a valid torch.save file ({error})")
    names = ", ".join(blocked)
    return CheckpointingException(
        f"{what}: {path} contains objects of classes that are not allowed to be unpickled: "
        f"{names}. Loading runs with weights_only=True so that a checkpoint cannot run code. "
        f"If you trust these classes, allow them before loading with "
        f"torch.serialization.add_safe_globals([{names}])."
    )


_DCP = "torch.distributed.checkpoint"
_MCORE = "megatron.core.dist_checkpointing.strategies.torch"
# Every DCP class a `.metadata` pickle may reference: (module, name) -> DCP's name for it
# (Megatron-Core <= 0.15 pickles subclasses that only add plain-data attributes).
_DCP_METADATA_CLASSES = {
    **{(f"{_DCP}.metadata", n): n for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")},
    **{(f"{_DCP}.planner", n): n for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")},
    **{(f"{_DCP}.filesystem", n): n for n in ("_StorageInfo", "_StoragePrefix")},
    (_MCORE, "MCoreMetadata"): "Metadata",
    (_MCORE, "MCoreSavePlan"): "SavePlan",
}


class DcpRecord:
    """An object of one of DCP's metadata classes as read here: inert, no DCP class and no
    code, just the class's name (`kind`) and what the pickle gave it: `state` (a dataclass's
    attribute dict; TensorProperties' tuple) or constructor `args` (an enum member's value).
    dcp_format.py type-checks records into its own index."""

    kind = ""
    state = None
    args = ()

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def dcp_record_class(kind: str) -> type:
    """The DcpRecord class of DCP's class `kind`: `type(record) is dcp_record_class(kind)` says
    what a record is in one comparison (10^5 records per `.metadata`)."""
    return _RECORD_CLASSES[kind]


_RECORD_CLASSES = {kind: type(kind, (DcpRecord,), {"kind": kind}) for kind in set(_DCP_METADATA_CLASSES.values())}


def _dcp_metadata_globals(as_dcp_objects: bool) -> dict:
    """(module, name) -> what a DCP `.metadata` pickle's reference builds: a DcpRecord class,
    or with `as_dcp_objects` DCP's own class (to rewrite the file; imports DCP's package)."""
    if as_dcp_objects:
        from torch.distributed.checkpoint import filesystem, metadata, planner

        classes = {**vars(metadata), **vars(planner), **vars(filesystem)}
        table = {name: classes[kind] for name, kind in _DCP_METADATA_CLASSES.items()}
        table[("torch", "Size")] = torch.Size
    else:
        table = {name: _RECORD_CLASSES[kind] for name, kind in _DCP_METADATA_CLASSES.items()}
        table[("torch", "Size")] = tuple
    table[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a torch.layout by name
    table[("pathlib", "PosixPath")] = pathlib.PosixPath  # stock DCP's StorageMeta.checkpoint_id
    table.update({("torch", n): d for n, d in vars(torch).items() if isinstance(d, torch.dtype)})
    return table


class _DcpMetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: dict):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name}") from None


def load_dcp_metadata(path: str, as_dcp_objects: bool = False, storage: Optional[Storage] = None):
    """Reads a DCP `.metadata` pickle with an allow-list of DCP's metadata classes, into
    DcpRecords (or, `as_dcp_objects`, DCP's own classes).

    DCP itself uses `pickle.load`, which runs whatever a tampered file says; here a class
    outside the list fails the load instead. `storage`: the one holding `path`, where the
    caller has it.
    """
    try:
        return _DcpMetadataUnpickler(io.BytesIO((storage or storage_of(path)).read(path)), _dcp_metadata_globals(as_dcp_objects)).load()
    except FileNotFoundError:
        raise CheckpointingException(f"{path} is missing; the torch_dist checkpoint is damaged") from None
    except pickle.UnpicklingError as e:
        raise CheckpointingException(
            f"{path} references {e}, which is not a DCP metadata class; refusing to unpickle it "
            f"(the file is damaged or was tampered with)"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointingException(f"{path} is not a valid DCP metadata file: {e!r}") from None


def dump_dcp_metadata(metadata) -> bytes:
    """The `.metadata` bytes DCP readers expect, of DCP's own `Metadata` (a plain pickle)."""
    return pickle.dumps(metadata)


DcpChunk = Tuple[Tuple[int, ...], Tuple[int, ...]]  # (offsets, sizes)


class DcpTensorEntry(NamedTuple):
    """A tensor entry of `.metadata` (DCP's TensorStorageMetadata)."""

    dtype: torch.dtype
    size: Tuple[int, ...]
    chunks: List[DcpChunk]


class DcpStorageRecords(NamedTuple):
    """Where items are, in one data file (DCP's `storage_data` entries), as columns."""

    file: str
    keys: List[str]
    chunks: List[Optional[Tuple[int, ...]]]  # an item's chunk offsets; None for a byte entry
    offsets: List[int]
    lengths: List[int]


def encode_dcp_metadata(
    entries: Dict[str, Optional[DcpTensorEntry]],  # None: a byte entry
    records: Iterable[DcpStorageRecords],
    mcore_data: Dict[str, dict],
    storage_meta: Tuple[str, str],  # (checkpoint_id, save_id)
    version: str,
) -> bytes:
    """`.metadata` for these entries: a pickle of DCP's `Metadata` of them (the objects
    `pickle.dumps` writes, opcode for opcode but for what the memo shares), built without
    DCP's classes. pickle.dumps of 10^4 entries and 10^5 storage records takes ~0.5 s, most of
    it calling each object's reduction, plus as long again to build the objects."""
    w = _PickleWriter()
    string, size, integer = w.string, w.size, _PickleWriter.integer
    byte_entry = w.new_object(_DCP_METADATA, "BytesStorageMetadata")
    pairs = [string(name) + (byte_entry if entry is None else w.tensor_entry(entry)) for name, entry in entries.items()]
    out = [w.new_object(_DCP_METADATA, "Metadata") + b"}(" + string("state_dict_metadata") + _batched(pairs, b"}", b"u")]
    index_head = w.new_object(_DCP_METADATA, "MetadataIndex") + b"}(" + string("fqn")
    index_none, index_offset = string("index") + b"N", string("offset")
    info_head = w.new_object(_DCP_FILESYSTEM, "_StorageInfo") + b"}(" + string("relative_path")
    info_offset, info_length = string("offset"), string("length")
    pairs = [
        index_head + string(key) + index_none
        + (b"ub" if chunk is None else index_offset + size(chunk) + b"ub")
        + info_head + file + info_offset + integer(offset) + info_length + integer(length) + b"ub"
        for placed in records
        for file in (string(placed.file),)
        for key, chunk, offset, length in zip(placed.keys, placed.chunks, placed.offsets, placed.lengths)
    ]
    out.append(string("planner_data") + b"N" + string("storage_data") + _batched(pairs, b"}", b"u"))
    checkpoint_id, save_id = storage_meta
    out.append(string("storage_meta") + w.new_object(_DCP_METADATA, "StorageMeta"))
    out.append(w.plain({"checkpoint_id": checkpoint_id, "save_id": save_id, "load_id": None, "modules": []}) + b"b")
    out.append(string("version") + string(version) + string("mcore_data") + w.plain(mcore_data) + b"ub.")
    body = b"".join(w.preamble + out)
    return b"\x80\x04\x95" + len(body).to_bytes(8, "little") + body  # PROTO 4, one FRAME: the
    # unpickler then reads it in one call instead of calling `read` per opcode


_DCP_METADATA, _DCP_FILESYSTEM = f"{_DCP}.metadata", f"{_DCP}.filesystem"
_TUPLE_OF = (b")", b"\x85", b"\x86", b"\x87")  # EMPTY_TUPLE, TUPLE1-3: tuples of 0-3 pushed items


def _batched(items: List[bytes], empty: bytes, add: bytes) -> bytes:
    """A container (`empty` pushes it) and its items (each item's opcodes), added in batches
    of 1000 (MARK, items, `add`) as pickle does."""
    if len(items) <= 1000:
        return empty + b"(" + b"".join(items) + add if items else empty
    return empty + b"".join(b"(" + b"".join(items[i : i + 1000]) + add for i in range(0, len(items), 1000))


class _PickleWriter:
    """Opcodes of a protocol-4 pickle, for encode_dcp_metadata. Strings, class references and
    shared objects are put in the memo by a preamble (pushed, stored at a chosen index,
    popped), so the body fetches them wherever it uses them, in whatever order it is built."""

    _SMALL = [b"K" + bytes((n,)) for n in range(256)]

    def __init__(self):
        self.preamble = []
        self.memo: Dict[object, bytes] = {}  # value -> the opcode fetching it from the memo
        self.torch_size = self.global_("torch", "Size")

    def _memoized(self, key, push: bytes) -> bytes:
        """A fetch of the value `push` builds, which the preamble memoizes under `key`."""
        n = len(self.memo)
        index = bytes((n,)) if n < 256 else struct.pack("<I", n)
        self.preamble.append(push + (b"q" if n < 256 else b"r") + index + b"0")  # BINPUT, POP
        got = self.memo[key] = (b"h" if n < 256 else b"j") + index
        return got

    def string(self, s: str) -> bytes:
        got = self.memo.get(s)
        if got is not None:
            return got
        data = s.encode("utf-8", "surrogatepass")
        push = b"\x8c" + bytes((len(data),)) + data if len(data) < 256 else b"X" + struct.pack("<I", len(data)) + data
        return self._memoized(s, push)

    def global_(self, module: str, name: str) -> bytes:
        key = ("global", module, name)
        return self.memo.get(key) or self._memoized(key, self.string(module) + self.string(name) + b"\x93")

    def new_object(self, module: str, name: str) -> bytes:
        """An object of class `module.name` built without arguments (state follows: BUILD)."""
        return self.global_(module, name) + b")\x81"

    @staticmethod
    def integer(n: int) -> bytes:
        if 0 <= n < 256:
            return _PickleWriter._SMALL[n]
        if 0 <= n < 65536:
            return b"M" + n.to_bytes(2, "little")
        if -(2**31) <= n < 2**31:
            return b"J" + n.to_bytes(4, "little", signed=True)
        data = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
        return b"\x8a" + bytes((len(data),)) + data

    def tuple_(self, values) -> bytes:
        items = b"".join(map(self.plain, values))
        return items + _TUPLE_OF[len(values)] if len(values) < len(_TUPLE_OF) else b"(" + items + b"t"

    def size(self, shape: Tuple[int, ...]) -> bytes:
        """A torch.Size of `shape`, memoized: one object per distinct shape or offset, as DCP
        shares them (each built anew would cost the unpickler a call)."""
        key = ("size", shape)
        return self.memo.get(key) or self._memoized(key, self.torch_size + self.tuple_(shape) + b"\x85R")

    def tensor_entry(self, entry: DcpTensorEntry) -> bytes:
        """DCP's TensorStorageMetadata of `entry`, memoized: keys of one dtype, size and chunks
        (a model's layers) share one, which a reader then checks once."""
        key = ("entry", entry.dtype, entry.size, tuple(entry.chunks))
        got = self.memo.get(key)
        if got is not None:
            return got
        chunk, sizes = self.new_object(_DCP_METADATA, "ChunkStorageMetadata") + b"}(" + self.string("offsets"), self.string("sizes")
        chunks = [chunk + self.size(o) + sizes + self.size(s) + b"ub" for o, s in entry.chunks]
        push = (
            self.new_object(_DCP_METADATA, "TensorStorageMetadata") + b"}(" + self.string("properties")
            + self.tensor_properties(entry.dtype) + self.string("size") + self.size(entry.size) + self.string("chunks")
            + _batched(chunks, b"]", b"e") + b"ub"
        )
        return self._memoized(key, push)

    def tensor_properties(self, dtype: torch.dtype) -> bytes:
        """DCP's TensorProperties of a plain tensor of `dtype` (strided, contiguous, no grad,
        not pinned), as its __getstate__ tuple, memoized: entries of one dtype share it."""
        key = ("properties", dtype)
        if key in self.memo:
            return self.memo[key]
        module, name = str(dtype).split(".")
        layout = self.global_("torch.serialization", "_get_layout") + self.string("torch.strided") + b"\x85R"
        contiguous = self.global_(_DCP_METADATA, "_MEM_FORMAT_ENCODING") + b"K\x00\x85R"
        state = b"(" + self.global_(module, name) + layout + b"\x89" + contiguous + b"\x89tb"
        return self._memoized(key, self.new_object(_DCP_METADATA, "TensorProperties") + state)

    def plain(self, value) -> bytes:
        """Plain data: None, bool, int, str, tuple, list, dict."""
        if value is None:
            return b"N"
        if isinstance(value, bool):
            return b"\x88" if value else b"\x89"
        if isinstance(value, int):
            return self.integer(value)
        if isinstance(value, str):
            return self.string(value)
        if isinstance(value, tuple):
            return self.tuple_(value)
        if isinstance(value, list):
            return _batched([self.plain(v) for v in value], b"]", b"e")
        if isinstance(value, dict):
            return _batched([self.plain(k) + self.plain(v) for k, v in value.items()], b"}", b"u")
        raise TypeError(f"cannot encode {type(value).__name__} in .metadata")


@dataclass(frozen=True)
class TensorRecord:
    """What the `data.pkl` of a `torch.save`d tensor says about it, short of building it."""

    storage_key: str  # the name of its storage record, `<archive>/data/<storage_key>`
    dtype: torch.dtype
    storage_numel: int
    storage_offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]


def _storage_dtypes() -> dict:
    """Storage class name (what a torch.save pickle names, e.g. "BFloat16Storage") -> dtype."""
    return {name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()}


class _TensorRecordUnpickler(pickle.Unpickler):
    """Reads a tensor's `data.pkl` into a TensorRecord: it can build nothing but that."""

    _STORAGES = _storage_dtypes()

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _record
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in self._STORAGES:
            return self._STORAGES[name]
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not is_int(numel):
            raise pickle.UnpicklingError(f"storage {pid!r}")
        return key, dtype, numel


def _record(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    key, dtype, numel = storage
    return TensorRecord(key, dtype, numel, storage_offset, tuple(size), tuple(stride))


def tensor_record(pickled: bytes) -> Optional[TensorRecord]:
    """The TensorRecord of a `data.pkl`; None when it holds anything but one plain tensor (a
    reader then falls back to `load_object`, which also explains what is wrong)."""
    try:
        record = _TensorRecordUnpickler(io.BytesIO(pickled)).load()
    except Exception:
        return None
    return record if isinstance(record, TensorRecord) else None

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
import types
from dataclasses import dataclass
from typing import List, Optional, Tuple

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
    """The `.metadata` bytes DCP readers expect (a plain pickle of DCP's `Metadata`)."""
    return pickle.dumps(metadata)


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

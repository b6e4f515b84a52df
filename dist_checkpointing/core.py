"""The checkpoint directory's commit marker, `metadata.json`, and the library's exception.

`metadata.json` is written last, atomically, by rank 0: its presence is what makes a directory a
complete checkpoint. It holds exactly Megatron-Core's four backend fields, so Megatron-Core's
own `load` reads our checkpoints; our index of the content (format version, tensors, objects,
checksums) is `index.json`, written just before it (docs/format.md). Checkpoints of
format_version 1 kept the index inside `metadata.json`; those written by Megatron-Core have no
index and are read as legacy checkpoints.
"""

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from .errors import CheckpointingException
from .layout import (
    COMMON_FNAME,
    COMMON_STATE_UNIQUE_KEY,
    CONFIG_FNAME,
    DCP_METADATA_FNAME,
    INDEX_FNAME,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    relative_path_problem,
    split_unique_key,
)
from .storage import storage_of
from .storage_interface import Storage

FORMAT_VERSION = 2  # 1: the index was inside metadata.json


@dataclass
class CheckpointingConfig:
    """Documents the backends used in a checkpoint (Megatron-Core's `CheckpointingConfig`).

    Versions describe the on-disk format, not the content (which is the application's business).
    """

    sharded_backend: str
    sharded_backend_version: int = 1
    common_backend: str = "torch"
    common_backend_version: int = 1


@dataclass
class TensorEntry:
    """What the index records of one global tensor."""

    shape: List[int]
    dtype: str  # a name from dtypes.py, e.g. "bfloat16"


@dataclass
class CheckpointMetadata:
    """The parsed `metadata.json` and index. `tensors`/`objects` are None for legacy (Megatron,
    foreign) checkpoints."""

    config: CheckpointingConfig
    format_version: Optional[int] = None
    tensors: Optional[Dict[str, TensorEntry]] = None
    objects: Optional[List[str]] = field(default=None)  # ShardedObject unique keys
    # file (relative path) -> [[offset, length, crc32c], ...] (see integrity.py)
    checksums: Optional[Dict[str, List[List[int]]]] = None
    # a checkpoint of another tool, read-only and tensors only: FOREIGN_FORMATS
    foreign: Optional[str] = None

    @property
    def is_legacy(self) -> bool:
        return self.format_version is None


# checkpoints without metadata.json that a load reads: name -> the config they are read as
FOREIGN_FORMATS = {
    "PyTorch DCP": CheckpointingConfig("torch_dist", 1, "torch", 1),  # torch.distributed.checkpoint.save
    "safetensors": CheckpointingConfig("safetensors", 1, "torch", 1),  # Hugging Face
}


def check_is_distributed_checkpoint(checkpoint_dir) -> bool:
    """True if `checkpoint_dir` holds a valid `metadata.json` (a complete checkpoint)."""
    try:
        return maybe_load_config(checkpoint_dir) is not None
    except CheckpointingException:
        return False


def maybe_load_config(checkpoint_dir) -> Optional[CheckpointingConfig]:
    """The checkpoint's config, or None if `checkpoint_dir` has no `metadata.json`."""
    metadata = read_metadata(checkpoint_dir)
    return None if metadata is None else metadata.config


def read_metadata(checkpoint_dir, storage: Optional[Storage] = None) -> Optional[CheckpointMetadata]:
    """Parses `metadata.json` strictly; None if the checkpoint is not complete. Malformed
    content raises. A checkpoint of another tool (`foreign_format`) reads as a legacy one.
    `storage`: the checkpoint's, where the caller has resolved it."""
    storage = storage or storage_of(checkpoint_dir)
    path = os.path.join(str(checkpoint_dir), CONFIG_FNAME)
    document = read_json(path, missing_ok=True, storage=storage)
    if document is MISSING:
        foreign = foreign_format(checkpoint_dir, storage)
        return None if foreign is None else CheckpointMetadata(FOREIGN_FORMATS[foreign], foreign=foreign)
    return _parse_metadata(document, path, storage)


def foreign_format(checkpoint_dir, storage: Optional[Storage] = None) -> Optional[str]:
    """The name (in FOREIGN_FORMATS) of the tool that wrote a directory without `metadata.json`:
    - "PyTorch DCP": `torch.distributed.checkpoint.save` (e.g. torchtitan's): DCP's `.metadata`,
      which DCP writes once all data is written, and none of the files that a save of this
      library or of Megatron-Core writes before `metadata.json` (`common.pt`, `index.json`, or
      the DCP entry of the common state, whose name the pickled `.metadata` then holds):
      without `metadata.json` those are incomplete;
    - "safetensors": Hugging Face's `model.safetensors.index.json` or `model.safetensors`.
    None for anything else (an incomplete checkpoint, or no checkpoint)."""
    root, storage = str(checkpoint_dir), storage or storage_of(checkpoint_dir)
    if storage.exists(os.path.join(root, CONFIG_FNAME)):
        return None
    dcp_metadata = os.path.join(root, DCP_METADATA_FNAME)
    if (
        storage.is_file(dcp_metadata)
        and not storage.exists(os.path.join(root, COMMON_FNAME))
        and not storage.exists(os.path.join(root, INDEX_FNAME))
        and not _mentions(storage, dcp_metadata, COMMON_STATE_UNIQUE_KEY.encode())
    ):
        return "PyTorch DCP"
    if any(storage.is_file(os.path.join(root, name)) for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE)):
        return "safetensors"
    return None


MISSING = object()  # what `read_json(..., missing_ok=True)` returns for a file that is not there


def read_json(path: str, missing_ok: bool = False, storage: Optional[Storage] = None):
    """A JSON document of a checkpoint (MISSING for a missing file with `missing_ok`). Anything
    but well-formed JSON (a file that cannot be read, bad syntax, nesting too deep, NaN, an
    integer of more than 4300 digits) raises a `CheckpointingException` naming the file.
    `storage`: the one holding `path`, where the caller has it."""
    try:
        raw = (storage or storage_of(path)).read(path)
    except (FileNotFoundError, NotADirectoryError):
        if missing_ok:
            return MISSING
        raise CheckpointingException(f"{path} is missing; the checkpoint is damaged or incomplete") from None
    except OSError as e:
        raise CheckpointingException(f"Cannot read {path}: {e.strerror or e}") from None
    return parse_json(raw, path)


def parse_json(raw: bytes, path: str):
    """`read_json` of bytes already read from `path`. (Integers beyond 64 bits that Python
    still parses are refused by the documents' type checks, `is_int`.)"""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, >4300 digits
        raise CheckpointingException(
            f"Malformed {path}: not valid JSON ({type(e).__name__}: {str(e)[:200]}). The checkpoint "
            f"is damaged; restore it from a copy or save again."
        ) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def is_int(x) -> bool:
    """A JSON integer a checkpoint may hold: an int (not a bool) that fits in 64 bits."""
    return (type(x) is int or isinstance(x, int) and not isinstance(x, bool)) and -(2**63) <= x < 2**63


def is_count(x, least: int = 0) -> bool:
    """`is_int` and at least `least` (a size, an offset, a setting such as `keep_latest`)."""
    return is_int(x) and x >= least


_CONFIG_FIELDS = ("sharded_backend", "sharded_backend_version", "common_backend", "common_backend_version")
_INDEX_FIELDS = ("format_version", "tensors", "objects", "checksums")


def _mentions(storage: Storage, path: str, name: bytes) -> bool:
    """Whether file `path` contains the bytes `name` (read, never unpickled)."""
    try:
        return name in storage.read(path)
    except OSError:
        return False


def _parse_metadata(doc, path: str, storage: Storage) -> CheckpointMetadata:
    """`metadata.json`: Megatron-Core's config fields (unknown ones are ignored, as newer
    Megatron-Core versions do); an index inside it is the layout of format_version 1."""
    if not isinstance(doc, dict):
        raise CheckpointingException(f"Malformed {path}: expected a JSON object, got {type(doc).__name__}")
    config = _parse_config(doc, path)
    if "format_version" not in doc:
        if any(name in doc for name in _INDEX_FIELDS):
            raise CheckpointingException(f"Malformed {path}: an index ('tensors'/'objects'/'checksums') without 'format_version'")
        index_path = os.path.join(os.path.dirname(path), INDEX_FNAME)
        index = read_json(index_path, missing_ok=True, storage=storage)
        if index is MISSING:
            return CheckpointMetadata(config)
        return _parse_index(index, index_path, config, set(_INDEX_FIELDS))
    return _parse_index(doc, path, config, set(_INDEX_FIELDS) | set(_CONFIG_FIELDS), in_config=True)


def _parse_config(doc: dict, path: str) -> CheckpointingConfig:
    def fail(what: str):
        raise CheckpointingException(f"Malformed {path}: {what}")

    if not isinstance(doc.get("sharded_backend"), str):
        fail("'sharded_backend' must be a string")
    for name in ("sharded_backend_version", "common_backend_version"):
        if not is_int(doc.get(name, 1)):
            fail(f"'{name}' must be an integer")
    if not isinstance(doc.get("common_backend", "torch"), str):
        fail("'common_backend' must be a string")
    return CheckpointingConfig(
        doc["sharded_backend"],
        doc.get("sharded_backend_version", 1),
        doc.get("common_backend", "torch"),
        doc.get("common_backend_version", 1),
    )


def _parse_index(doc, path: str, config: CheckpointingConfig, known, in_config: bool = False) -> CheckpointMetadata:
    """The index (`index.json`, or the fields of a format_version 1 `metadata.json`)."""

    def fail(what: str):
        raise CheckpointingException(f"Malformed {path}: {what}")

    if not isinstance(doc, dict):
        fail(f"expected a JSON object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - known)
    if unknown:
        fail(f"unknown fields {unknown}")
    version = doc.get("format_version")
    if not is_int(version) or version < 1:
        fail(f"'format_version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointingException(
            f"{path} has format_version {version}, newer than this library understands "
            f"({FORMAT_VERSION}). Upgrade dist_checkpointing to read it."
        )
    if in_config != (version == 1):
        fail(f"format_version {version} keeps its index in {INDEX_FNAME if version > 1 else CONFIG_FNAME}, not here")
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict):
        fail("'tensors' must be an object mapping keys to {shape, dtype}")
    if not _are_tensor_entries(tensors.values()):
        key = next(key for key, entry in tensors.items() if not _are_tensor_entries([entry]))
        fail(f"tensor entry for key '{key}' must be {{'shape': [ints >= 0], 'dtype': str}}")
    entries = {key: TensorEntry(entry["shape"], entry["dtype"]) for key, entry in tensors.items()}
    objects = doc.get("objects")
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        fail("'objects' must be a list of strings")
    for unique_key in objects:
        try:
            split_unique_key(unique_key)
        except CheckpointingException as e:
            fail(f"'objects': {e}")
    checksums = doc.get("checksums", {})
    if not isinstance(checksums, dict) or not all(map(_are_ranges, checksums.values())):
        fail("'checksums' must map file names to lists of [offset, length, crc32c] (integers >= 0)")
    for name in checksums:
        problem = relative_path_problem(name)
        if problem:
            fail(f"'checksums' names the file {name!r}, which cannot be inside the checkpoint: {problem}")
    return CheckpointMetadata(config, version, entries, list(objects), {k: list(v) for k, v in checksums.items()})


_TENSOR_ENTRY_FIELDS = frozenset(("shape", "dtype"))


def _are_tensor_entries(entries) -> bool:
    """Whether every entry is {'shape': [64-bit integers >= 0], 'dtype': str} (checked in
    bulk: an index has 10^4-10^5 entries)."""
    if not all(
        type(e) is dict and e.keys() == _TENSOR_ENTRY_FIELDS and type(e["shape"]) is list and type(e["dtype"]) is str
        for e in entries
    ):
        return False
    return _are_counts(list(itertools.chain.from_iterable(e["shape"] for e in entries)))


def _are_ranges(ranges) -> bool:
    """Whether `ranges` is a list of [offset, length, crc32c]: 64-bit integers >= 0, the CRC
    32-bit (checked in bulk: a file of a many-tensor checkpoint has 10^4 ranges)."""
    if not isinstance(ranges, list) or not all(type(r) is list and len(r) == 3 for r in ranges):
        return False
    values = list(itertools.chain.from_iterable(ranges))
    return _are_counts(values) and max(values[2::3], default=0) < 2**32


def _are_counts(values: list) -> bool:
    """Whether `values` are all 64-bit integers >= 0 (no bool, float or string among them)."""
    return set(map(type, values)) <= {int} and (not values or (min(values) >= 0 and max(values) < 2**63))


def write_index(checkpoint_dir, metadata: CheckpointMetadata, tensors_json: Optional[str] = None) -> None:
    """Atomically writes `index.json`: our index of the checkpoint (before the commit marker).
    `tensors_json`: `metadata.tensors` as `index_tensors_json` encodes them, where the caller
    has them already (a save plan's, encoded once per plan)."""
    doc = {
        "format_version": FORMAT_VERSION,
        "tensors": tensors_json if tensors_json is not None else index_tensors_json(metadata.tensors),
        "objects": sorted(metadata.objects),
        "checksums": {k: [list(r) for r in v] for k, v in sorted((metadata.checksums or {}).items())},
    }
    path = os.path.join(str(checkpoint_dir), INDEX_FNAME)
    storage_of(path).write_atomic(path, _readable_json(doc).encode())


def index_tensors_json(tensors: Dict[str, TensorEntry]) -> str:
    """The `tensors` field of `index.json` as written (one line per entry)."""
    entries = {}  # (shape, dtype) -> its JSON: a model's tensors have few distinct ones

    def entry(v) -> _Json:
        key = (tuple(v.shape), v.dtype)
        return entries.get(key) or entries.setdefault(key, _Json(_COMPACT_JSON.encode({"shape": list(v.shape), "dtype": v.dtype})))

    return _Json(_readable_value({k: entry(v) for k, v in sorted(tensors.items())}))  # not asdict: it deep-copies


def config_bytes(config: CheckpointingConfig) -> bytes:
    """`metadata.json` as written: exactly the fields of Megatron-Core's `CheckpointingConfig`
    (Megatron-Core 0.15/0.16 build their config from every field of it)."""
    return _readable_json(asdict(config)).encode()


def commit_config(checkpoint_dir, config: CheckpointingConfig, replace: bool = False) -> None:
    """Commits the checkpoint: atomically writes `metadata.json` (locally: temp file, fsync,
    link; in an object store: one conditional PUT). Unless `replace`, an existing
    `metadata.json` (a save that committed meanwhile) is never replaced: that raises."""
    path = os.path.join(str(checkpoint_dir), CONFIG_FNAME)
    try:
        storage_of(path).write_atomic(path, config_bytes(config), exclusive=not replace)
    except FileExistsError:
        raise CheckpointingException(
            f"{checkpoint_dir} was committed by another save while this one ran; the complete "
            f"checkpoint there is kept and this save is not committed. Save to a new directory."
        ) from None


def write_metadata(checkpoint_dir, metadata: CheckpointMetadata) -> None:
    """`index.json`, then the commit marker `metadata.json` (each replaced atomically: a
    format_version 1 `metadata.json` keeps naming the old index until it is replaced)."""
    write_index(checkpoint_dir, metadata)
    commit_config(checkpoint_dir, metadata.config, replace=True)


_COMPACT_JSON = json.JSONEncoder(separators=(", ", ": "))


class _Json(str):
    """A value already encoded as JSON."""


def _readable_json(doc: dict) -> str:
    """JSON with one line per field and per entry of the index (not one per number)."""
    return "{\n" + ",\n".join(f" {_COMPACT_JSON.encode(name)}: {_readable_value(value)}" for name, value in doc.items()) + "\n}\n"


def _readable_value(value) -> str:
    """A field's value in `_readable_json`: a non-empty dict one line per entry."""
    if isinstance(value, _Json):
        return value
    compact = _COMPACT_JSON.encode  # one encoder for 10^5 entries (json.dumps builds one per call)
    if isinstance(value, dict) and value:
        quote = json.encoder.encode_basestring_ascii  # an entry's name, as `compact` writes a str
        entries = ",\n".join(f"  {quote(k)}: {v if type(v) is _Json else compact(v)}" for k, v in value.items())
        return f"{{\n{entries}\n }}"
    return compact(value)


def require_complete_checkpoint(checkpoint_dir, storage: Optional[Storage] = None) -> CheckpointMetadata:
    """The metadata of a complete checkpoint; a clear error for anything else."""
    checkpoint_dir, storage = str(checkpoint_dir), storage or storage_of(checkpoint_dir)
    metadata = read_metadata(checkpoint_dir, storage)
    if metadata is None and not storage.is_dir(checkpoint_dir):
        raise CheckpointingException(f"Checkpoint directory {checkpoint_dir} does not exist")
    if metadata is None:
        if storage.entries(checkpoint_dir):
            raise CheckpointingException(
                f"{checkpoint_dir} is an incomplete checkpoint: it has no {CONFIG_FNAME}, "
                f"which is written last. The save that wrote it did not finish; "
                f"load an earlier checkpoint or save again."
            )
        raise CheckpointingException(
            f"{checkpoint_dir} is not a distributed checkpoint (no {CONFIG_FNAME})"
        )
    return metadata

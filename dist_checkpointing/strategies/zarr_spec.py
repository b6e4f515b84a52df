"""The Zarr layout on disk, which both Zarr engines write and read (docs/format.md §4): array
documents and how a reader checks them, chunk file names, and which arrays hold raw chunks."""

import functools
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..core import MISSING, CheckpointingException, is_int, read_json
from ..dtypes import DTYPES, name_of_zarr_v2, torch_dtype, zarr_v2_dtype
from ..layout import ZARR_GROUP_FNAME, check_key, contained_path
from ..storage import storage_of
from ..storage_interface import Storage
from .config import StrategyConfig

METADATA_FNAME = {3: "zarr.json", 2: ".zarray"}


def chunk_shape(document: dict) -> Tuple[int, ...]:
    if document["zarr_format"] == 2:
        return tuple(document["chunks"])
    return tuple(document["chunk_grid"]["configuration"]["chunk_shape"])


def array_document(global_shape, chunks, dtype_name: str, config: StrategyConfig) -> dict:
    """The array metadata document (`zarr.json` or `.zarray`), specified in docs/format.md.

    Every chunk is written, so the fill value is never read. Zarr v2 arrays say `null` there,
    as Megatron-Core's do: its zarr reader fails on a number for bfloat16."""
    fill_value = False if dtype_name == "bool" else 0
    itemsize = DTYPES[dtype_name][0].itemsize
    if config.zarr_format == 2:
        fill_value = None
        return {
            "zarr_format": 2,
            "shape": list(global_shape),
            "chunks": list(chunks),
            "dtype": zarr_v2_dtype(dtype_name),
            "compressor": _v2_compressor(config, itemsize),
            "fill_value": fill_value,
            "order": "C",
            "filters": None,
            "dimension_separator": ".",
        }
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(global_shape),
        "data_type": dtype_name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        # "c.0.1", not "c/0/1": one directory per array instead of one per axis (mkdir is most
        # of a save's file-system cost with many small tensors); stock readers take either
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": fill_value,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]
        + _v3_compressor(config, itemsize)
        + [{"name": "crc32c"}],  # last: the checksum covers the stored bytes
        "attributes": {},
    }


def _v3_compressor(config: StrategyConfig, itemsize: int) -> List[dict]:
    if config.compression == "zstd":
        return [{"name": "zstd", "configuration": {"level": config.level, "checksum": False}}]
    if config.compression == "blosc":
        blosc = {"cname": "zstd", "clevel": config.level, "shuffle": "shuffle", "typesize": itemsize, "blocksize": 0}
        return [{"name": "blosc", "configuration": blosc}]
    return []


def _v2_compressor(config: StrategyConfig, itemsize: int) -> Optional[dict]:
    if config.compression == "zstd":
        return {"id": "zstd", "level": config.level}
    if config.compression == "blosc":
        return {"id": "blosc", "cname": "zstd", "clevel": config.level, "shuffle": 1, "blocksize": 0}
    return None


def chunk_key(zarr_format: int, chunk_index: Sequence[int], separator: str) -> str:
    """A chunk's file path inside its array directory ("c.1.0" or "c/1/0" in v3, "1.0" in v2,
    by the array's `separator`)."""
    if zarr_format == 2:
        return separator.join(map(str, chunk_index)) or "0"
    return separator.join(["c", *map(str, chunk_index)])


def chunks_checksummed(document: dict) -> bool:
    """Whether each chunk file ends with the CRC-32C of what precedes it (the Zarr v3 `crc32c`
    codec, last)."""
    return document["zarr_format"] == 3 and [c["name"] for c in document["codecs"][-1:]] == ["crc32c"]


def key_separator(document: dict) -> Optional[str]:
    """The separator of the array's chunk file names; None for an encoding other than the
    default one (only the engines read those)."""
    if document["zarr_format"] == 2:
        return document.get("dimension_separator") or "."
    encoding = document.get("chunk_key_encoding", {"name": "default"})
    if not isinstance(encoding, dict) or encoding.get("name") != "default":
        return None
    separator = (encoding.get("configuration") or {}).get("separator", "/")
    return separator if separator in ("/", ".") else None


def chunk_indices(offset: Sequence[int], shape: Sequence[int], chunks: Sequence[int]):
    """The grid positions of the chunks that box (offset, shape) covers."""
    return itertools.product(*(range(o // c, -(-(o + s) // c)) for o, s, c in zip(offset, shape, chunks)))


def document_bytes(document: dict) -> bytes:
    """An array document as stored (compact JSON: the C encoder, ~10x faster than indented)."""
    return json.dumps(document, separators=(",", ":")).encode()


def list_arrays(checkpoint_dir) -> List[str]:
    """Keys of the arrays in a checkpoint directory (those with `zarr.json` or `.zarray`)."""
    root = str(checkpoint_dir)
    return [name for name in storage_of(root).entries(root) if array_format(root, name) is not None]


def array_format(checkpoint_dir, key: str) -> Optional[int]:
    """2 or 3 for the Zarr array stored at `key`, None if there is none."""
    path, storage = os.path.join(str(checkpoint_dir), key), storage_of(checkpoint_dir)
    if storage.is_file(os.path.join(path, METADATA_FNAME[2])):
        return 2
    v3 = os.path.join(path, METADATA_FNAME[3])
    if storage.is_file(v3):
        document = read_json(v3)
        if isinstance(document, dict) and document.get("node_type") == "array":
            return 3
    return None


# The checkpoint directory is also a Zarr group whose root document holds every array's
# document (zarr-python's consolidated metadata), so a load reads one document, not one per array.
CONSOLIDATED_FNAME = {3: ZARR_GROUP_FNAME, 2: ".zmetadata"}


def consolidated_documents(documents: Dict[str, dict], zarr_format: int) -> Dict[str, bytes]:
    """The root group's files holding `documents` (key -> array document): v3 `zarr.json`
    with inline `consolidated_metadata`; v2 `.zgroup` and `.zmetadata`."""
    if zarr_format == 2:
        group = {"zarr_format": 2}
        members = [(f"{key}/{METADATA_FNAME[2]}", doc) for key, doc in sorted(documents.items())]
        metadata = _encoded_members([(".zgroup", group), *members])
        return {".zgroup": document_bytes(group), ".zmetadata": _with_members({"zarr_consolidated_format": 1}, metadata)}
    consolidated = {"kind": "inline", "must_understand": False}
    root = {"zarr_format": 3, "node_type": "group", "attributes": {}, "consolidated_metadata": consolidated}
    return {CONSOLIDATED_FNAME[3]: _with_members(root, _encoded_members(sorted(documents.items())), consolidated)}


_MEMBERS = "\0members\0"  # stands for the encoded members while the rest is encoded


def _encoded_members(members: Sequence[Tuple[str, dict]]) -> str:
    """`"key":document,...` of the (key, document) pairs in order, as `document_bytes` writes
    them: each distinct document object encoded once (the arrays of a model share a few)."""
    encoded: Dict[int, str] = {}
    parts = []
    for key, document in members:
        text = encoded.get(id(document))
        if text is None:
            text = encoded[id(document)] = json.dumps(document, separators=(",", ":"))
        parts.append(f"{json.encoder.encode_basestring_ascii(key)}:{text}")
    return ",".join(parts)


def _with_members(document: dict, members: str, parent: Optional[dict] = None) -> bytes:
    """`document_bytes` of `document` with `"metadata": {members}` added to `parent` (a dict
    inside it; default: itself)."""
    (parent if parent is not None else document)["metadata"] = _MEMBERS
    placeholder = json.dumps(_MEMBERS)
    return document_bytes(document).replace(placeholder.encode(), b"{" + members.encode() + b"}", 1)


class Consolidated(NamedTuple):
    """The root group's consolidated metadata: its file, and key -> array document (unchecked:
    `read_array_document` checks the one it uses)."""

    path: str
    documents: Dict[str, object]
    checked: Dict[str, List[dict]]  # repr of a shape -> documents with it found good

    def found_good(self, document) -> Optional[dict]:
        """A document found good before that equals `document`: the arrays of a model share
        few documents, and checking an equal one again would find the same. The one returned
        is the checked one (an equal document may differ in number types: 1.0 == 1)."""
        if isinstance(document, dict):
            for good in self.checked.get(repr(document.get("shape")), ()):
                if good is document or good == document:
                    return good
        return None

    def add_good(self, document: dict) -> None:
        known = self.checked.setdefault(repr(document["shape"]), [])
        if len(known) < _GOOD_PER_SHAPE:
            known.append(document)

    def share_good(self) -> None:
        """Replaces each document that is good and equal to one found before by that one: the
        parsed documents of 10^4 arrays take tens of MB, their distinct ones a few kB. A
        document with a problem stays as it is, refused only by a read of its key."""
        for key, document in self.documents.items():
            good = self.found_good(document)
            if good is not None:
                self.documents[key] = good
            elif not _document_problem(document):
                self.add_good(document)


_GOOD_PER_SHAPE = 8  # distinct documents remembered per shape: a lookup compares at most these


def read_consolidated(checkpoint_dir, storage: Optional[Storage] = None) -> Optional[Consolidated]:
    """The root's consolidated metadata; None where there is none (a checkpoint of
    Megatron-Core, or of an older version of this library). A malformed root document raises.
    `storage`: the checkpoint's, where the caller has it."""
    root = str(checkpoint_dir)
    for zarr_format in (3, 2):
        path = os.path.join(root, CONSOLIDATED_FNAME[zarr_format])
        found = read_json(path, missing_ok=True, storage=storage)
        if found is MISSING:
            continue
        if zarr_format == 3:
            metadata = found.get("consolidated_metadata") if isinstance(found, dict) else None
            documents = metadata.get("metadata") if isinstance(metadata, dict) else None
        else:
            metadata = found.get("metadata") if isinstance(found, dict) else None
            documents = None if not isinstance(metadata, dict) else {
                name[: -len(METADATA_FNAME[2]) - 1]: doc for name, doc in metadata.items() if name.endswith("/" + METADATA_FNAME[2])
            }
        if not isinstance(documents, dict):
            raise CheckpointingException(
                f"Malformed {path}: its consolidated metadata is not a mapping of array documents. "
                f"The checkpoint is damaged; restore it from a copy."
            )
        consolidated = Consolidated(path, documents, {})
        consolidated.share_good()
        return consolidated
    return None


MAX_CHUNKS = 2**26  # per array; more chunk files than any checkpoint writes means damage


def read_array_document(checkpoint_dir, key: str, consolidated: Optional[Consolidated] = None,
                        storage: Optional[Storage] = None, linked: Optional[FrozenSet[str]] = None) -> dict:
    """The array document of `key` (from the root's `consolidated` documents, else `.zarray`,
    else `zarr.json`), checked: a Zarr array of a known dtype whose shape and chunk grid are
    bounded (numbers from a checkpoint are not trusted). A key with no array raises a clear
    error. The array's directory must lie inside the checkpoint, whichever document is read.
    `storage`: the checkpoint's, where the caller has it; `linked`: the checkpoint's
    `linked_entries`, where the caller reads many documents."""
    storage = storage or storage_of(checkpoint_dir)
    array_dir = os.path.join(str(checkpoint_dir), check_key(key))  # one component, checked
    if storage.links and (os.path.islink(array_dir) if linked is None else key in linked):
        # allowed if it stays inside (resolving costs; links are rare)
        contained_path(checkpoint_dir, key, f"Key '{key}'", storage)
    if consolidated is not None and key in consolidated.documents:
        document = consolidated.documents[key]
        good = consolidated.found_good(document)
        if good is not None:
            return good
        problem = _document_problem(document)
        if problem:
            raise CheckpointingException(
                f"Key '{key}': its array document in the consolidated metadata {consolidated.path} is "
                f"damaged: {problem}. Restore the checkpoint from a copy."
            )
        consolidated.add_good(document)
        return document
    paths = [os.path.join(array_dir, METADATA_FNAME[zarr_format]) for zarr_format in (2, 3)]
    path, document = None, None
    for candidate in paths:
        found = read_json(candidate, missing_ok=True, storage=storage)
        if found is not MISSING:
            path, document = candidate, found
            break
    if path is None or (path == paths[1] and isinstance(document, dict) and document.get("node_type") != "array"):
        raise CheckpointingException(
            f"Key '{key}' is not in the checkpoint {checkpoint_dir} (no Zarr array at "
            f"{array_dir}). Check the key, or load with strict='log_unexpected' to skip it."
        )
    problem = _document_problem(document)
    if problem:
        raise CheckpointingException(
            f"Key '{key}': the array document {path} is damaged: {problem}. Restore the checkpoint from a copy."
        )
    return document


def _document_problem(document) -> str:
    """What is wrong with an array document ("" if it is one this library can read)."""
    if not isinstance(document, dict) or document.get("zarr_format") not in (2, 3):
        return "not a Zarr v2 or v3 array document"
    shape = document.get("shape")
    if not isinstance(shape, list) or not all(is_int(n) and n >= 0 for n in shape):
        return f"shape {shape!r} is not a list of non-negative 64-bit integers"
    if document["zarr_format"] == 3:
        grid = document.get("chunk_grid")
        if not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(grid.get("configuration"), dict):
            return "its chunk_grid is not a regular grid"
        codecs = document.get("codecs")
        if not isinstance(codecs, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in codecs):
            return "its codecs are not a list of named codecs"
        chunks, dtype = grid["configuration"].get("chunk_shape"), document.get("data_type")
    else:
        chunks, dtype = document.get("chunks"), document.get("dtype")
        if document.get("dimension_separator", ".") not in (".", "/"):
            return f"dimension_separator {document['dimension_separator']!r} is not '.' or '/'"
    if not isinstance(dtype, str):
        return f"its data type {dtype!r} is not a string"
    if (
        not isinstance(chunks, list)
        or len(chunks) != len(shape)
        or not all(is_int(c) and 1 <= c <= max(n, 1) for c, n in zip(chunks, shape))
    ):
        return f"chunk shape {chunks!r} must have one positive extent, at most the array's, per axis of {shape}"
    if math.prod(shape) >= 2**63:
        return f"shape {shape} has more than 2**63 elements"
    n_chunks = math.prod(-(-n // c) for n, c in zip(shape, chunks))
    if n_chunks > MAX_CHUNKS:
        return f"shape {shape} in chunks {chunks} makes {n_chunks} chunks, more than {MAX_CHUNKS}"
    return ""


@dataclass(frozen=True, eq=False)
class ArrayLayout:
    """What reading and writing an array's files needs from its (checked) document."""

    document: dict
    zarr_format: int
    chunks: Tuple[int, ...]
    raw: Optional[torch.dtype]  # `raw_dtype`
    checksummed: bool  # `chunks_checksummed`
    separator: Optional[str]  # `key_separator`

    def chunk_file(self, index: Tuple[int, ...]) -> str:
        name = self._chunk_files.get(index)
        if name is None:
            name = self._chunk_files[index] = chunk_key(self.zarr_format, index, self.separator)
        return name

    @functools.cached_property
    def _chunk_files(self) -> Dict[Tuple[int, ...], str]:
        """Chunk index -> file name, as named so far (the arrays sharing a layout share them)."""
        return {}

    @functools.cached_property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.document["shape"])

    @functools.cached_property
    def chunk_nbytes(self) -> int:
        """Of a chunk's values (a raw array's; edge chunks are stored whole)."""
        return math.prod(self.chunks) * self.raw.itemsize

    @functools.cached_property
    def content(self) -> bytes:
        """The document as stored."""
        return document_bytes(self.document)


class ArrayLayouts:
    """The ArrayLayout of documents, worked out once per document object: arrays of one shape
    and dtype share one (a save plan's; a load's, checked from consolidated metadata)."""

    def __init__(self):
        self._by_id: Dict[int, ArrayLayout] = {}  # (a layout holds its document: the id stays its)

    def __call__(self, document: dict) -> ArrayLayout:
        layout = self._by_id.get(id(document))
        if layout is None:
            layout = self._by_id[id(document)] = ArrayLayout(
                document, document["zarr_format"], chunk_shape(document), raw_dtype(document),
                chunks_checksummed(document), key_separator(document),
            )
        return layout


def raw_dtype(document: dict) -> Optional[torch.dtype]:
    """The dtype of an array whose chunk files are its values as stored in memory (C order,
    little-endian, uncompressed; in Zarr v3 followed by their CRC-32C), which a load reads
    without an engine; None for any other array."""
    if key_separator(document) is None:
        return None
    if document["zarr_format"] == 2:
        name = name_of_zarr_v2(document.get("dtype"))
        plain = document.get("compressor") is None and not document.get("filters") and document.get("order") == "C"
    else:
        name = document.get("data_type")
        codecs = document["codecs"]
        names = [c["name"] for c in codecs]
        little = (codecs[0].get("configuration") or {}).get("endian", "little") == "little"
        plain = names in (["bytes"], ["bytes", "crc32c"]) and little
    return torch_dtype(name) if plain and name in DTYPES else None

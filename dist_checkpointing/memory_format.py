"""The memory tier's files (docs/format.md §8): what one node holds of in-memory checkpoints.

A node's directory (node-local memory: a tmpfs such as `/dev/shm`) holds, per step, one piece
file per saving rank whose pieces the node keeps (its own ranks', and those it holds as a
replica for other nodes):

    <directory>/iter_<step:07d>/rank_<rank:05d>.bin    the pieces' bytes, C order, 64-byte aligned
    <directory>/iter_<step:07d>/rank_<rank:05d>.json   their index; written last (the file's commit)
    <directory>/spare/                                 emptied files kept for reuse (no index)
    <directory>/node                                   a random token naming the node

A piece file holds what its rank saved: its main-replica ShardedTensors (their global box, or
for a flattened shard the flat range of its box), its main-replica ShardedObjects (pickled),
and on rank 0 the common state (pickled); each with its CRC-32C. Nothing here is trusted: an
index is type-checked and bounded before use, and names are never taken from a document.
"""

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .core import CheckpointingException, is_count, is_int, parse_json
from .dtypes import DTYPES
from .fs import atomic_write
from .integrity import crc32c

FORMAT_NAME = "dist_checkpointing memory tier"
FORMAT_VERSION = 1
ALIGNMENT = 64
SPARE_DIR = "spare"
NODE_FNAME = "node"  # a random token: the node's identity
STEP_DIR = re.compile(r"iter_(\d{7,})")
PIECE_FILE = re.compile(r"rank_(\d{5,})\.json")
MAX_RANKS = 2**24  # bounds what a document may claim


def step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"iter_{step:07d}")


def piece_paths(directory: str, step: int, rank: int) -> Tuple[str, str]:
    """(data file, index file) of saving rank `rank`'s pieces of step `step`."""
    stem = os.path.join(step_dir(directory, step), f"rank_{rank:05d}")
    return stem + ".bin", stem + ".json"


def aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class TensorPiece:
    """A stored piece of a ShardedTensor: its global box, and the flat range of the box it
    holds for a flattened shard (None: the whole box)."""

    key: str
    dtype: str
    global_shape: Tuple[int, ...]
    offset: Tuple[int, ...]  # of the box in the global tensor
    shape: Tuple[int, ...]  # of the box (prepended axes as 1)
    flat: Optional[Tuple[int, int]]
    prepend: int  # the ShardedTensor's prepend_axis_num
    fragments: Optional[Tuple[int, ...]]  # its axis_fragmentations
    at: int  # byte offset in the data file
    nbytes: int
    crc: int


@dataclass(frozen=True)
class BytesPiece:
    """Pickled bytes: a ShardedObject (by unique key) or the common state (key None)."""

    key: Optional[str]
    at: int
    nbytes: int
    crc: int


@dataclass(frozen=True)
class PieceIndex:
    """The index of one piece file."""

    step: int
    save_id: str
    rank: int
    world_size: int
    nbytes: int  # in use in the data file (which may be longer)
    tensors: Tuple[TensorPiece, ...]
    objects: Tuple[BytesPiece, ...]
    common: Optional[BytesPiece]

    def damaged(self, data) -> List[str]:
        """What fails its CRC-32C among the pieces in `data` (the file's bytes: any buffer)."""
        pieces = [(f"tensor '{p.key}' at {list(p.offset)}", p) for p in self.tensors]
        pieces += [(f"object '{p.key}'", p) for p in self.objects]
        pieces += [("the common state", self.common)] if self.common else []
        data = memoryview(data).cast("B")
        return [f"{what} fails its CRC-32C" for what, p in pieces if crc32c(data[p.at : p.at + p.nbytes]) != p.crc]


def encode_index(index: PieceIndex) -> bytes:
    """The index document: tensors as columns (tens of thousands of pieces encode and parse
    in milliseconds)."""
    t = index.tensors
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": index.step,
        "save_id": index.save_id,
        "rank": index.rank,
        "world_size": index.world_size,
        "nbytes": index.nbytes,
        "tensors": {
            "key": [p.key for p in t],
            "dtype": [p.dtype for p in t],
            "global_shape": [p.global_shape for p in t],
            "offset": [p.offset for p in t],
            "shape": [p.shape for p in t],
            "flat": [p.flat for p in t],
            "prepend": [p.prepend for p in t],
            "fragments": [p.fragments for p in t],
            "at": [p.at for p in t],
            "nbytes": [p.nbytes for p in t],
            "crc32c": [p.crc for p in t],
        },
        "objects": {
            "key": [p.key for p in index.objects],
            "at": [p.at for p in index.objects],
            "nbytes": [p.nbytes for p in index.objects],
            "crc32c": [p.crc for p in index.objects],
        },
        "common": None if index.common is None else [index.common.at, index.common.nbytes, index.common.crc],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def write_index(path: str, index: PieceIndex) -> None:
    atomic_write(path, encode_index(index))


def decode_index(raw: bytes, path: str) -> PieceIndex:
    """The index in `raw` (read from `path`), checked: every field of its type, every piece
    inside the data file and the sizes consistent with shapes and dtypes; raises a
    CheckpointingException naming the file and the first problem."""

    def fail(what: str):
        raise CheckpointingException(f"Memory-tier index {path}: {what}; the in-memory checkpoint is damaged")

    doc = parse_json(raw, path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        fail("not a memory-tier index")
    if doc.get("format_version") != FORMAT_VERSION:
        fail(f"format_version {doc.get('format_version')!r}, this library reads {FORMAT_VERSION}")
    for name in ("step", "rank", "world_size", "nbytes"):
        if not is_count(doc.get(name)):
            fail(f"'{name}' must be a non-negative integer")
    if not 0 <= doc["rank"] < doc["world_size"] <= MAX_RANKS:
        fail(f"rank {doc['rank']} of world size {doc['world_size']}")
    if not isinstance(doc.get("save_id"), str) or not doc["save_id"]:
        fail("'save_id' must be a non-empty string")
    size = doc["nbytes"]

    def span(at, nbytes, crc, what: str) -> Tuple[int, int, int]:
        if not (is_count(at) and is_count(nbytes) and is_count(crc)) or crc >= 2**32:
            fail(f"{what}: byte offset, size and CRC-32C must be non-negative integers")
        if at + nbytes > size:
            fail(f"{what}: bytes [{at}, {at + nbytes}) lie beyond the data file's {size} bytes")
        return at, nbytes, crc

    def columns(name: str, fields: Sequence[str]) -> List[list]:
        table = doc.get(name)
        if not isinstance(table, dict) or set(table) != set(fields):
            fail(f"'{name}' must have the columns {list(fields)}")
        cols = [table[f] for f in fields]
        if not all(isinstance(c, list) for c in cols) or len({len(c) for c in cols}) > 1:
            fail(f"the columns of '{name}' must be lists of one length")
        return cols

    def dims(value, what: str) -> Tuple[int, ...]:
        if not isinstance(value, list) or not all(is_count(x) for x in value):
            fail(f"{what} must be a list of non-negative integers")
        return tuple(value)

    tensors = []
    names = ("key", "dtype", "global_shape", "offset", "shape", "flat", "prepend", "fragments", "at", "nbytes", "crc32c")
    for key, dtype, global_shape, offset, shape, flat, prepend, fragments, at, nbytes, crc in zip(*columns("tensors", names)):
        what = f"tensor piece of {key!r}"
        if not isinstance(key, str) or not key:
            fail("a tensor piece's key must be a non-empty string")
        if dtype not in DTYPES:
            fail(f"{what}: unknown dtype {dtype!r}")
        global_shape, offset, shape = dims(global_shape, what), dims(offset, what), dims(shape, what)
        if not len(global_shape) == len(offset) == len(shape) or any(o + s > g for o, s, g in zip(offset, shape, global_shape)):
            fail(f"{what}: box {offset} + {shape} does not lie in the global shape {global_shape}")
        elements = math.prod(shape)
        if flat is not None:
            if not (isinstance(flat, list) and len(flat) == 2 and all(is_int(x) for x in flat) and 0 <= flat[0] <= flat[1] <= elements):
                fail(f"{what}: flat range {flat!r} outside its box of {elements} elements")
            flat, elements = tuple(flat), flat[1] - flat[0]
        if not is_int(prepend) or not 0 <= prepend <= len(shape) or any(s != 1 for s in shape[:prepend]):
            fail(f"{what}: prepend {prepend!r} is not a count of leading unit axes")
        if fragments is not None:
            fragments = dims(fragments, what)
            if len(fragments) != len(shape):
                fail(f"{what}: fragments {list(fragments)} for {len(shape)} axes")
        at, nbytes, crc = span(at, nbytes, crc, what)
        if nbytes != elements * DTYPES[dtype][0].itemsize:
            fail(f"{what}: {nbytes} bytes for {elements} elements of {dtype}")
        tensors.append(TensorPiece(key, dtype, global_shape, offset, shape, flat, prepend, fragments, at, nbytes, crc))
    objects = []
    for key, at, nbytes, crc in zip(*columns("objects", ("key", "at", "nbytes", "crc32c"))):
        if not isinstance(key, str) or not key:
            fail("an object's key must be a non-empty string")
        objects.append(BytesPiece(key, *span(at, nbytes, crc, f"object {key!r}")))
    common = doc.get("common")
    if common is not None:
        if not isinstance(common, list) or len(common) != 3:
            fail("'common' must be [byte offset, size, CRC-32C] or null")
        common = BytesPiece(None, *span(*common, "the common state"))
    return PieceIndex(doc["step"], doc["save_id"], doc["rank"], doc["world_size"], size, tuple(tensors), tuple(objects), common)


@dataclass(frozen=True)
class Held:
    """A committed piece file found in a node's directory (its index not yet checked)."""

    step: int
    rank: int  # the saving rank
    save_id: str
    world_size: int


def _header(raw: bytes) -> Optional[Tuple[str, int]]:
    """(save_id, world_size) from an index document, or None if it has none of the kind."""
    try:
        doc = parse_json(raw, "")
    except CheckpointingException:
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        return None
    save_id, world_size = doc.get("save_id"), doc.get("world_size")
    if not isinstance(save_id, str) or not is_int(world_size) or not 0 < world_size <= MAX_RANKS:
        return None
    return save_id, world_size


def list_node(directory: str) -> List[Held]:
    """The committed piece files in a node's directory: an index file and its data file, both
    regular files (not links). Files that are not so are skipped: what a restore cannot use
    must not stop it (it uses other copies)."""
    held = []
    for step, path in step_dirs(directory).items():
        if os.path.islink(path):
            continue
        try:
            files = os.listdir(path)
        except FileNotFoundError:  # retired meanwhile
            continue
        for file in files:
            found = PIECE_FILE.fullmatch(file)
            if not found:
                continue
            rank = int(found.group(1))
            data, index = piece_paths(directory, step, rank)
            if os.path.islink(data) or os.path.islink(index) or not os.path.isfile(data):
                continue
            try:
                with open(index, "rb") as f:
                    header = _header(f.read())
            except OSError:
                continue
            if header is not None and rank < header[1]:
                held.append(Held(step, rank, *header))
    return sorted(held, key=lambda h: (h.step, h.rank))


def read_index(directory: str, step: int, rank: int) -> bytes:
    with open(piece_paths(directory, step, rank)[1], "rb") as f:
        return f.read()


def step_dirs(directory: str) -> Dict[int, str]:
    """step -> directory, for every step directory below a node's directory."""
    if not os.path.isdir(directory):
        return {}
    found = {}
    for name in os.listdir(directory):
        match = STEP_DIR.fullmatch(name)
        if match:
            found[int(match.group(1))] = os.path.join(directory, name)
    return found


def is_node_directory(directory: str) -> bool:
    """Whether `directory` is a node's memory-tier directory (it holds a committed piece file)."""
    return bool(list_node(directory))


def piece_file_problems(directory: str, step: int, rank: int) -> Tuple[Optional[PieceIndex], List[str]]:
    """A piece file's index, and what is wrong with it: an index that does not parse or check,
    a data file of another size, pieces that fail their CRC-32C."""
    data_path, index_path = piece_paths(directory, step, rank)
    try:
        with open(index_path, "rb") as f:
            index = decode_index(f.read(), index_path)
    except (OSError, CheckpointingException) as e:
        return None, [str(e)]
    if (index.step, index.rank) != (step, rank):
        return index, [f"{index_path}: describes rank {index.rank}'s step {index.step}"]
    try:
        with open(data_path, "rb") as f:
            data = f.read()
    except OSError as e:
        return index, [f"{data_path}: {e.strerror or e}"]
    if len(data) < index.nbytes:
        return index, [f"{data_path}: {len(data)} bytes, its index says {index.nbytes}"]
    return index, [f"{data_path}: {problem}" for problem in index.damaged(data)]

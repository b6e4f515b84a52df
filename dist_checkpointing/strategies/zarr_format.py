"""The Zarr layout that both Zarr engines (zarr-python and tensorstore) write and read.

One Zarr array per ShardedTensor key at `<dir>/<key>`. The chunk grid is chosen from the global
plan so that every main shard is a whole number of chunks (`chunk_grid`): each rank writes only
its own chunk files, so no two ranks touch one file (no locks, no read-modify-write), and any
rectangle can be read back. Specified in docs/format.md.
"""

import itertools
import json
import logging
import math
import os
import shutil
from abc import ABC, abstractmethod
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..collectives import get_rank, send_and_receive
from ..core import MISSING, CheckpointingException, is_int, read_json
from ..dict_utils import dict_list_map_inplace, nested_values
from ..dtypes import DTYPES, name_of_numpy, name_of_torch, name_of_zarr_v2, to_numpy, torch_dtype, zarr_v2_dtype
from ..fs import DurableDir, balance, fsync_dirs
from ..integrity import crc32c
from ..geometry import intersection
from ..layout import LinkFreeTree, check_key, contained_path, entry_dir
from ..mapping import ShardedTensor, is_main_replica, whole_tensor_metadata
from ..opening import OpenCheckpoint, open_checkpoint
from ..validation import ShardsByKey, check_request_against_stored, shards_of, validate_flat_tiling
from .base import LoadShardedStrategy, SaveShardedStrategy, ShardedSavePlan
from .config import ZARR_ENGINES, StrategyConfig
from .reading import THREAD_BYTES, Piece, piece_of, read_chunk

logger = logging.getLogger(__name__)

METADATA_FNAME = {3: "zarr.json", 2: ".zarray"}
Box = Tuple[Tuple[int, ...], Tuple[int, ...]]  # (global offset, shape)


@dataclass(frozen=True)
class ArrayPlan:
    """How one key is stored: its array document and which rank writes it."""

    document: dict  # the content of zarr.json (v3) or .zarray (v2)
    metadata_writer: int

    @property
    def zarr_format(self) -> int:
        return self.document["zarr_format"]

    @property
    def chunks(self) -> Tuple[int, ...]:
        return chunk_shape(self.document)


def chunk_shape(document: dict) -> Tuple[int, ...]:
    if document["zarr_format"] == 2:
        return tuple(document["chunks"])
    return tuple(document["chunk_grid"]["configuration"]["chunk_shape"])


def chunk_grid(global_shape: Sequence[int], boxes: Sequence[Box]) -> Tuple[int, ...]:
    """The largest regular chunk shape whose chunks never straddle a shard boundary.

    Along each axis the chunk extent is the gcd of all interior shard boundaries (the global
    end may cut the last chunk short). A regular grid from `from_rank_offsets` gives the local
    shard shape; an irregular split such as 7/5/6/6 gives gcd(7, 12, 18) = 1.
    """
    chunks = []
    for axis, size in enumerate(global_shape):
        cuts = {p for offset, shape in boxes for p in (offset[axis], offset[axis] + shape[axis])}
        cuts -= {0, size}
        chunks.append(math.gcd(*cuts) if cuts else max(size, 1))
    return tuple(chunks)


def plan_arrays(shards_by_key: ShardsByKey, config: StrategyConfig) -> Dict[str, ArrayPlan]:
    """The array of every tensor key in the global plan (the same result on every rank)."""
    plans = {}
    for key, ranked in shards_by_key.items():
        tensors = [(rank, sh) for rank, sh in ranked if isinstance(sh, ShardedTensor)]
        if not tensors:
            continue
        check_key(key)
        main = [(rank, sh) for rank, sh in tensors if is_main_replica(sh.replica_id)]
        first = tensors[0][1]
        boxes = list({sh.global_box() for _, sh in main})  # flat pieces of a shard share its box
        chunks = chunk_grid(first.global_shape, boxes)
        _warn_if_many_chunks(key, first.global_shape, chunks, len(boxes))
        flat = [sh for _, sh in main if sh.flattened_range is not None]
        if flat and flat[0].local_shape:
            chunks = _split_rows(chunks, flat[0].prepend_axis_num, first.dtype.itemsize)
        document = array_document(first.global_shape, chunks, name_of_torch(first.dtype, key), config)
        writer = min(rank for rank, _ in (main or tensors))
        plans[key] = ArrayPlan(document, writer)
    return plans


FLAT_CHUNK_BYTES = 16 * 2**20


def _split_rows(chunks: Tuple[int, ...], axis: int, itemsize: int) -> Tuple[int, ...]:
    """Chunks of a key with flattened shards: along the shards' first local axis, the largest
    divisor of the extent whose chunks stay within FLAT_CHUNK_BYTES (at least one row), so that
    each DP rank can write the chunks inside its own flat range (plan_flat_chunks)."""
    row_bytes = math.prod(chunks[axis + 1 :]) * itemsize
    extent = chunks[axis]
    limit = max(1, FLAT_CHUNK_BYTES // max(row_bytes, 1))
    divisors = {d for i in range(1, math.isqrt(extent) + 1) if extent % i == 0 for d in (i, extent // i)}
    return chunks[:axis] + (max(d for d in divisors if d <= limit),) + chunks[axis + 1 :]


@dataclass(frozen=True)
class FlatChunk:
    """A chunk of a flattened shard (a row block of it), assembled and written by `writer`,
    the rank holding most of it; `parts` are the (start, stop, holder) flat ranges of the shard
    that make it up."""

    writer: int
    rows: Tuple[int, int]  # [first, last) along the shard's first local axis
    parts: Tuple[Tuple[int, int, int], ...]


FlatShardId = Tuple[str, Tuple[int, ...]]  # (key, global offset of the shard)


def plan_flat_chunks(shards_by_key: ShardsByKey, arrays: Dict[str, ArrayPlan]) -> Dict[FlatShardId, List[FlatChunk]]:
    """Who writes each chunk of each flattened shard (the same result on every rank).

    Each DP rank writes the chunks it holds most of; only chunks cut by a flat range boundary
    need pieces from other ranks.
    """
    pieces = defaultdict(list)
    for key, ranked in shards_by_key.items():
        for rank, sh in ranked:
            if isinstance(sh, ShardedTensor) and sh.flattened_range is not None and is_main_replica(sh.replica_id):
                pieces[(key, sh.global_offset)].append((rank, sh))
    plans = {}
    for (key, offset), held in pieces.items():
        validate_flat_tiling(key, offset, held)  # also when the save skips validation
        template = held[0][1]
        ranges = sorted((sh.flattened_range.start, sh.flattened_range.stop, rank) for rank, sh in held)
        rows = template.local_shape[0] if template.local_shape else 1
        row = math.prod(template.local_shape[1:])
        step = arrays[key].chunks[template.prepend_axis_num] if template.local_shape else 1
        chunks = []
        for first in range(0, rows, step):
            last = min(first + step, rows)
            lo, hi = first * row, last * row
            parts = tuple((max(a, lo), min(b, hi), r) for a, b, r in ranges if max(a, lo) < min(b, hi))
            if not parts:
                continue
            share = defaultdict(int)
            for a, b, r in parts:
                share[r] += b - a
            writer = min(share, key=lambda r: (-share[r], r))
            chunks.append(FlatChunk(writer, (first, last), parts))
        plans[(key, offset)] = chunks
    return plans


def assemble_flat_chunks(sharded_state_dict, plans: Dict[FlatShardId, List[FlatChunk]]) -> list:
    """The shards this rank writes: its flattened pieces replaced by the chunks it writes,
    assembled from the pieces of all ranks (collective: every rank calls it with the same
    `plans`)."""
    rank = get_rank()
    mine, kept = defaultdict(list), []
    for sh in nested_values(sharded_state_dict):
        if not isinstance(sh, ShardedTensor) or sh.flattened_range is None:
            kept.append(sh)
        elif is_main_replica(sh.replica_id) and sh.flattened_range.stop > sh.flattened_range.start:
            mine[(sh.key, sh.global_offset)].append(sh)
    sends, receives = [], []
    tag = 0
    for shard_id, chunks in sorted(plans.items()):
        local = mine.pop(shard_id, [])

        def my_values(start, stop):
            piece = next(p for p in local if p.flattened_range.start <= start and stop <= p.flattened_range.stop)
            return piece.data.detach()[start - piece.flattened_range.start : stop - piece.flattened_range.start]

        for chunk in chunks:
            base = chunk.parts[0][0]
            if chunk.parts == ((base, chunk.parts[-1][1], rank),):  # all mine: no copy
                tag += 1  # every rank counts every part, so tags match
                kept.append(_chunk_shard(local[0], chunk.rows, my_values(base, chunk.parts[-1][1])))
                continue
            if chunk.writer == rank:
                # on the shards' device, so that NCCL receives into it directly
                values = torch.empty(chunk.parts[-1][1] - base, dtype=local[0].dtype, device=local[0].data.device)
            for start, stop, holder in chunk.parts:
                tag += 1
                if chunk.writer == rank and holder == rank:
                    values[start - base : stop - base].copy_(my_values(start, stop))
                elif chunk.writer == rank:
                    receives.append((values[start - base : stop - base], holder, tag))
                elif holder == rank:
                    sends.append((my_values(start, stop), chunk.writer, tag))
            if chunk.writer == rank:
                kept.append(_chunk_shard(local[0], chunk.rows, values))
    send_and_receive(sends, receives)
    if mine:
        raise CheckpointingException(f"Flattened shards {sorted(mine)} were not in the planned layout")
    return kept


def _chunk_shard(piece: ShardedTensor, rows: Tuple[int, int], values: torch.Tensor) -> ShardedTensor:
    """Rows [first, last) of the local shard of flat `piece`, as an ordinary (irregular) shard."""
    if not piece.local_shape:
        return replace(piece, data=values.reshape(()), flattened_range=None)
    axis = piece.prepend_axis_num
    shape = (rows[1] - rows[0],) + piece.local_shape[1:]
    offset = list(piece.global_offset)
    offset[axis] += rows[0]
    return replace(
        piece, data=values.view(shape), local_shape=shape, global_offset=tuple(offset),
        axis_fragmentations=None, flattened_range=None,
    )


def _warn_if_many_chunks(key: str, global_shape, chunks, n_shards: int) -> None:
    n_chunks = math.prod(math.ceil(g / c) for g, c in zip(global_shape, chunks))
    if n_chunks > 16 * max(n_shards, 1):
        logger.warning(
            "Key '%s': its shards (%d) do not form a regular grid, so it is stored in %d chunks "
            "of shape %s. Shard sizes with a large common divisor (or the torch_dist engine) "
            "avoid the many small files.",
            key, n_shards, n_chunks, chunks,
        )


def array_document(global_shape, chunks, dtype_name: str, config: StrategyConfig) -> dict:
    """The array metadata document (`zarr.json` or `.zarray`), specified in docs/format.md."""
    fill_value = False if dtype_name == "bool" else 0
    itemsize = DTYPES[dtype_name][1].itemsize
    if config.zarr_format == 2:
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
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
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


def chunk_key(zarr_format: int, chunk_index: Sequence[int], separator: Optional[str] = None) -> str:
    """A chunk's file path inside its array directory ("c/1/0" in v3, "1.0" in v2, with the
    array's separator where it names another)."""
    if zarr_format == 2:
        return (separator or ".").join(map(str, chunk_index)) or "0"
    return (separator or "/").join(["c", *map(str, chunk_index)])


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
    keys = []
    for name in sorted(os.listdir(str(checkpoint_dir))):
        if array_format(checkpoint_dir, name) is not None:
            keys.append(name)
    return keys


def array_format(checkpoint_dir, key: str) -> Optional[int]:
    """2 or 3 for the Zarr array stored at `key`, None if there is none."""
    path = os.path.join(str(checkpoint_dir), key)
    if os.path.isfile(os.path.join(path, METADATA_FNAME[2])):
        return 2
    v3 = os.path.join(path, METADATA_FNAME[3])
    if os.path.isfile(v3):
        document = read_json(v3)
        if isinstance(document, dict) and document.get("node_type") == "array":
            return 3
    return None


MAX_CHUNKS = 2**26  # per array; more chunk files than any checkpoint writes means damage


def read_array_document(checkpoint_dir, key: str) -> dict:
    """The array document of `key` (`.zarray`, else `zarr.json`), read once and checked: a Zarr
    array of a known dtype whose shape and chunk grid are bounded (numbers from a checkpoint are
    not trusted). A key with no array raises a clear error."""
    array_dir = os.path.join(str(checkpoint_dir), check_key(key))  # one component, checked
    if os.path.islink(array_dir):  # allowed if it stays inside (resolving costs; links are rare)
        contained_path(checkpoint_dir, key, f"Key '{key}'")
    paths = [os.path.join(array_dir, METADATA_FNAME[zarr_format]) for zarr_format in (2, 3)]
    path, document = None, None
    for candidate in paths:
        found = read_json(candidate, missing_ok=True)
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
        if not isinstance(document.get("codecs"), list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in document["codecs"]):
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


def damaged_chunks(checkpoint_dir, key: str, offset=None, shape=None) -> List[str]:
    """What is wrong with the chunk files of `key` that box (offset, shape) covers (default:
    all): missing files and, in Zarr v3, files whose CRC-32C does not match. Empty if sound."""
    document = read_array_document(checkpoint_dir, key)
    chunks, global_shape = chunk_shape(document), document["shape"]
    checksummed = chunks_checksummed(document)
    separator = key_separator(document)
    offset = [0] * len(global_shape) if offset is None else offset
    shape = global_shape if shape is None else shape
    stops = [min(o + s, g) for o, s, g in zip(offset, shape, global_shape)]
    problems = []
    for index in chunk_indices(offset, [max(0, e - o) for o, e in zip(offset, stops)], chunks):
        path = os.path.join(entry_dir(checkpoint_dir, key), chunk_key(document["zarr_format"], index, separator))
        if os.path.islink(path):
            problems.append(f"{path}: a symbolic link, not a chunk file of the checkpoint")
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        except OSError as e:
            problems.append(f"{path}: cannot be read ({e.strerror or e})")
            continue
        if checksummed and (len(data) < 4 or crc32c(data[:-4]) != int.from_bytes(data[-4:], "little")):
            problems.append(f"{path}: fails its CRC-32C (truncated or changed)")
    return problems


def read_box(array: "StoredArray", offset, target: torch.Tensor) -> None:
    """Reads the box of `target`'s shape at `offset` into `target` (a CPU tensor of the
    array's dtype); where the box extends past the stored shape, zeros."""
    shape = tuple(target.shape)
    stops = [min(o + s, n) for o, s, n in zip(offset, shape, array.shape)]
    if any(stop != o + s for stop, o, s in zip(stops, offset, shape)):
        target.zero_()
    if all(stop > o for stop, o in zip(stops, offset)):
        inside = tuple(slice(o, stop) for o, stop in zip(offset, stops))
        array.read_into(inside, to_numpy(target[tuple(slice(0, stop - o) for stop, o in zip(stops, offset))]))


class StoredArray(ABC):
    """What the load side needs of an opened array: its shape, numpy dtype, and box reads."""

    shape: Tuple[int, ...]
    dtype: np.dtype

    @abstractmethod
    def read_into(self, selection: Tuple[slice, ...], out: np.ndarray) -> None:
        """Decodes `selection` (inside the array) into `out` (a writable view of its shape,
        any strides): straight in where the dtypes agree, else converted."""


@dataclass(frozen=True)
class ZarrSavePlan(ShardedSavePlan):
    """One save's Zarr layout: every key's array, and who writes each flattened chunk."""

    arrays: Dict[str, ArrayPlan]
    flat_chunks: Dict[FlatShardId, List[FlatChunk]]


class ZarrFormatSaveStrategy(SaveShardedStrategy):
    """Save side shared by the Zarr engines; an engine supplies `write_shards`."""

    def __init__(self, backend: str, version: int = 1, config: Optional[StrategyConfig] = None):
        super().__init__(backend, version)
        self.config = config or StrategyConfig(backend=backend)

    def plan(self, shards_by_key: ShardsByKey, planning_infos=()) -> ZarrSavePlan:
        arrays = plan_arrays(shards_by_key, self.config)
        return ZarrSavePlan(get_rank(), arrays, plan_flat_chunks(shards_by_key, arrays))

    def stage(self, plan: ZarrSavePlan, sharded_state_dict):
        """Flattened pieces become the chunks this rank writes (docs/format.md §4.4)."""
        return assemble_flat_chunks(sharded_state_dict, plan.flat_chunks)

    def save(self, plan: ZarrSavePlan, sharded_state_dict, checkpoint_dir: DurableDir):
        """Writes the array documents this rank owns and its chunks: those of raw arrays
        (`raw_dtype`) by the layout's own writer (`RawChunkWrites`), the others encoded by the
        engine (`write_shards`). No checksums to report: v3 chunks carry their own."""
        writes = RawChunkWrites(checkpoint_dir)
        for key, array in plan.arrays.items():
            if array.metadata_writer == plan.rank:
                writes.add_document(key, array)
        encoded = []
        for sh in shards_of(sharded_state_dict, ShardedTensor):
            offset, shape = sh.global_box()
            if is_main_replica(sh.replica_id) and 0 not in shape:
                if sh.key not in plan.arrays or sh.flattened_range is not None:
                    raise CheckpointingException(f"Key '{sh.key}' was not in the planned layout")
                data = sh.data.detach().to("cpu").reshape(shape)
                if not writes.add_shard(sh.key, plan.arrays[sh.key], offset, data):
                    encoded.append((sh.key, offset, to_numpy(data.contiguous())))
        writes.run(self.config.thread_count)
        if encoded:
            self.write_shards(plan, encoded, checkpoint_dir)
        return {}, None

    @abstractmethod
    def write_shards(self, plan: ZarrSavePlan, shards: List[Tuple[str, Tuple[int, ...], np.ndarray]], checkpoint_dir: DurableDir) -> None:
        """Encodes each (key, global offset, values) into `plan.arrays[key]`, writing its
        files through `checkpoint_dir` (whose `sync` then makes them durable)."""


class RawChunkWrites:
    """The files one rank writes for one save without an engine: array documents, and the
    chunks of raw arrays (`raw_dtype`). A chunk that is a contiguous part of its shard is
    written straight from the shard's memory with its CRC-32C (no copy); others (cut by the
    array's end, or strided) are assembled in a zero-filled buffer first. Files are written by
    `thread_count` threads, each given a batch of similar total size."""

    def __init__(self, checkpoint_dir: DurableDir):
        self.target = checkpoint_dir
        self.files: List[Tuple[str, int, object]] = []  # (path, bytes, document bytes or a _ChunkWrite)

    def add_document(self, key: str, array: ArrayPlan) -> None:
        content = document_bytes(array.document)
        self.files.append((os.path.join(entry_dir(self.target, key), METADATA_FNAME[array.zarr_format]), len(content), content))

    def add_shard(self, key: str, array: ArrayPlan, offset, data: torch.Tensor) -> bool:
        """Plans the chunk files of shard `data` at `offset`; False if its array is not raw."""
        if raw_dtype(array.document) is None:
            return False
        chunks, checksummed = array.chunks, chunks_checksummed(array.document)
        root = entry_dir(self.target, key)
        for index in chunk_indices(offset, data.shape, chunks):
            origin = [i * c for i, c in zip(index, chunks)]
            region = intersection((tuple(offset), tuple(data.shape)), (tuple(origin), chunks))
            source = data[tuple(slice(a - o, b - o) for (a, b), o in zip(region, offset))]
            within = tuple(slice(a - o, b - o) for (a, b), o in zip(region, origin))
            write = _ChunkWrite(source, chunks, within, checksummed)
            self.files.append((os.path.join(root, chunk_key(array.zarr_format, index)), write.nbytes, write))
        return True

    def run(self, thread_count: int) -> None:
        batches = balance(self.files, thread_count, lambda file: file[1])
        with ThreadPoolExecutor(max(1, len(batches))) as pool:
            list(pool.map(self._write_batch, batches))

    def _write_batch(self, batch) -> None:
        for path, _, content in batch:
            self.target.makedirs(os.path.dirname(path))
            self.target.write(path, content.buffers() if isinstance(content, _ChunkWrite) else [content])


@dataclass(frozen=True)
class _ChunkWrite:
    source: torch.Tensor  # the part of a shard in the chunk
    shape: Tuple[int, ...]  # of the chunk (edge chunks are stored whole)
    within: Tuple[slice, ...]  # where `source` lies in the chunk
    checksummed: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.source.element_size()

    def buffers(self) -> list:
        """The chunk file's content: the values, then (v3) their CRC-32C."""
        values = self.source
        if tuple(values.shape) != self.shape or not values.is_contiguous():
            values = torch.zeros(self.shape, dtype=self.source.dtype)  # the fill value, 0
            values[self.within] = self.source
        raw = values.reshape(-1).view(torch.uint8).numpy()
        return [raw, crc32c(raw).to_bytes(4, "little")] if self.checksummed else [raw]


def engine_chunk_files(checkpoint_dir: DurableDir, key: str, array: ArrayPlan, offset, shape) -> List[str]:
    """The chunk files of box (offset, shape) of `array`, whose directories are created here
    for an engine that writes the files itself."""
    root, paths = entry_dir(checkpoint_dir, key), []
    for index in chunk_indices(offset, shape, array.chunks):
        paths.append(os.path.join(root, chunk_key(array.zarr_format, index)))
        checkpoint_dir.makedirs(os.path.dirname(paths[-1]))
    return paths


class ZarrFormatLoadStrategy(LoadShardedStrategy):
    """Load side shared by the Zarr engines; an engine supplies `open_array`."""

    def __init__(self, backend: str, version: int = 1, config: Optional[StrategyConfig] = None):
        super().__init__(backend, version)
        self.config = config or StrategyConfig(backend=backend)

    def readable_backends(self):
        return ZARR_ENGINES

    @abstractmethod
    def open_array(self, checkpoint_dir: str, key: str, zarr_format: int) -> StoredArray:
        """Opens the existing array of `key` read-only."""

    def _open(self, checkpoint: OpenCheckpoint, key: str) -> StoredArray:
        """The engine's array of `key`, whose document was checked first."""
        zarr_format = _array_document(checkpoint, key)["zarr_format"]
        try:
            return self.open_array(checkpoint.path, key, zarr_format)
        except Exception as e:  # engines raise many types for a damaged array
            where = entry_dir(checkpoint.path, key)
            raise CheckpointingException(f"Key '{key}': cannot open the Zarr array at {where}: {e}") from e

    def load(self, sharded_state_dict, checkpoint_dir):
        """Reads every request: arrays of raw chunks by the layout's own reader, straight into
        the destinations (`RawChunkReads`); others (compressed) through the engine, opened once
        per key. Both run their reads concurrently (the engines release the GIL)."""
        checkpoint = open_checkpoint(checkpoint_dir)
        checkpoint_dir = checkpoint.path
        requests = [sh for sh in nested_values(sharded_state_dict) if isinstance(sh, ShardedTensor)]
        documents = {key: _array_document(checkpoint, key) for key in dict.fromkeys(sh.key for sh in requests)}
        raw = RawChunkReads(checkpoint_dir)
        decoded = [sh for sh in requests if not raw.plan(sh, documents[sh.key])]
        loaded = raw.run(self.config.thread_count)
        arrays = {key: self._open(checkpoint, key) for key in dict.fromkeys(sh.key for sh in decoded)}
        with ThreadPoolExecutor(self.config.thread_count) as pool:
            values = pool.map(lambda sh: read_request(arrays[sh.key], sh, checkpoint_dir), decoded)
            loaded.update((id(sh), value) for sh, value in zip(decoded, values))
        return dict_list_map_inplace(lambda sh: loaded.get(id(sh), sh), sharded_state_dict)

    def load_tensors_metadata(self, checkpoint_dir):
        checkpoint, result = open_checkpoint(checkpoint_dir), {}
        for key in list_arrays(checkpoint.path):
            array = self._open(checkpoint, key)
            dtype = torch_dtype(name_of_numpy(array.dtype, key))
            result[key] = whole_tensor_metadata(key, dtype, tuple(array.shape))
        return result

    def remove_sharded_tensors(self, checkpoint_dir, key_prefix: str) -> None:
        for key in list_arrays(checkpoint_dir):
            if key.startswith(key_prefix):
                shutil.rmtree(entry_dir(checkpoint_dir, key))
        fsync_dirs([str(checkpoint_dir)])


def _array_document(checkpoint: OpenCheckpoint, key: str) -> dict:
    """The array document of `key`, read and checked once per open checkpoint."""
    return checkpoint.parsed(("array", key), lambda: read_array_document(checkpoint.path, key))


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


class RawChunkReads:
    """The reads of one load from arrays of raw chunks (`raw_dtype`): every chunk file a
    request needs is read once, straight into the request's tensor where it is the whole chunk
    (reading.py), its CRC-32C checked on the bytes as they land."""

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir
        self.targets: List[Tuple[ShardedTensor, torch.Tensor]] = []
        self.chunks: Dict[str, "_ChunkFile"] = {}  # by path relative to the checkpoint

    def plan(self, sh: ShardedTensor, document: dict) -> bool:
        """Plans the reads of request `sh`; False if its array is not one of raw chunks."""
        dtype = raw_dtype(document)
        if dtype is None:
            return False
        stored_shape = tuple(document["shape"])
        where = entry_dir(self.checkpoint_dir, sh.key)
        check_request_against_stored(sh, name_of_torch(dtype, sh.key), stored_shape, where)
        offset, shape = sh.covering_box()
        target = sh.box_target()
        if any(o + n > g for o, n, g in zip(offset, shape, stored_shape)):
            target.zero_()  # the allow_shape_mismatch pad beyond the stored shape
        stops = [min(o + n, g) for o, n, g in zip(offset, shape, stored_shape)]
        inside = [max(0, e - o) for o, e in zip(offset, stops)]
        chunks, separator = chunk_shape(document), key_separator(document)
        for index in chunk_indices(offset, inside, chunks):
            origin = [i * c for i, c in zip(index, chunks)]
            box = intersection((tuple(offset), tuple(inside)), (tuple(origin), tuple(chunks)))
            if box is None:
                continue
            name = f"{sh.key}/{chunk_key(document['zarr_format'], index, separator)}"
            if name not in self.chunks:
                self.chunks[name] = _ChunkFile(sh.key, tuple(chunks), dtype, chunks_checksummed(document), [])
            region = (tuple(a for a, _ in box), tuple(b - a for a, b in box))
            self.chunks[name].pieces.append(piece_of(origin, region, target, offset))
        self.targets.append((sh, target))
        return True

    def run(self, thread_count: int) -> Dict[int, torch.Tensor]:
        """Reads every planned chunk, in `thread_count` batches of similar size (one task per
        thread: thousands of small chunks would otherwise cost more in hand-offs than in
        reading); returns each request's value by `id` of the request."""
        batches = balance(list(self.chunks.items()), thread_count, lambda entry: entry[1].nbytes, THREAD_BYTES)
        with ThreadPoolExecutor(max(1, len(batches))) as pool:
            list(pool.map(self._read_batch, batches))
        return {id(sh): sh.deliver(target) for sh, target in self.targets}

    def _read_batch(self, batch) -> None:
        trees = {}  # key -> its array directory's files
        for name, chunk in batch:
            if chunk.key not in trees:
                trees[chunk.key] = LinkFreeTree(entry_dir(self.checkpoint_dir, chunk.key), f"Key '{chunk.key}'")
            self._read(trees[chunk.key], name[len(chunk.key) + 1 :], chunk)

    def _read(self, tree: LinkFreeTree, name: str, chunk: "_ChunkFile") -> None:
        path = os.path.join(tree.root, name)
        nbytes = chunk.nbytes
        try:
            fd = tree.open(name)
        except FileNotFoundError:
            raise _damaged(chunk.key, self.checkpoint_dir, [f"{path}: missing"]) from None
        try:
            size = os.fstat(fd).st_size
            if size != nbytes + 4 * chunk.checksummed:
                raise _damaged(chunk.key, self.checkpoint_dir, [
                    f"{path}: has {size} bytes, a chunk of shape {list(chunk.shape)} has {nbytes + 4 * chunk.checksummed} (truncated or changed)"
                ])
            crc = read_chunk(fd, 0, chunk.shape, chunk.dtype, chunk.pieces, 0 if chunk.checksummed else None, path)
            if chunk.checksummed and os.pread(fd, 4, nbytes) != crc.to_bytes(4, "little"):
                raise _damaged(chunk.key, self.checkpoint_dir, [f"{path}: fails its CRC-32C (truncated or changed)"])
        finally:
            os.close(fd)


@dataclass(frozen=True)
class _ChunkFile:
    key: str
    shape: Tuple[int, ...]  # of the chunk (edge chunks are stored whole)
    dtype: torch.dtype
    checksummed: bool  # ends with the CRC-32C of the values (Zarr v3's `crc32c` codec)
    pieces: List[Piece]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _damaged(key: str, checkpoint_dir, problems: List[str], cause: str = "") -> CheckpointingException:
    """The error for a request that cannot be read: the damaged chunk files it needs."""
    return CheckpointingException(
        f"Key '{key}': cannot read from {entry_dir(checkpoint_dir, key)}: "
        + ("; ".join(problems) if problems else cause)
        + ". The checkpoint is damaged; restore these files from a copy or save again."
    )


def read_request(array: StoredArray, sh: ShardedTensor, checkpoint_dir) -> torch.Tensor:
    """The values of request `sh`, decoded by the engine straight into `sh.data` when it can
    hold them (`ShardedTensor.box_target`, in host memory), else into a new tensor that
    `ShardedTensor.deliver` moves to the device of `sh.data` (CPU if it has none).

    A chunk that is missing or fails its checksum raises, naming the damaged files."""
    where = entry_dir(checkpoint_dir, sh.key)
    check_request_against_stored(sh, name_of_numpy(array.dtype, sh.key), array.shape, where)
    offset, shape = sh.covering_box()
    target = sh.box_target(host_only=True)  # engines decode into host memory
    try:
        read_box(array, offset, target)
    except Exception as e:  # engines raise ValueError, OSError, ... for damaged chunks
        damaged = damaged_chunks(checkpoint_dir, sh.key, offset, shape)
        raise _damaged(sh.key, checkpoint_dir, damaged, f"{type(e).__name__}: {e}") from e
    return sh.deliver(target)

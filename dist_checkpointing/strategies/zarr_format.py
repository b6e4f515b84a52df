"""The save and load strategies both Zarr engines share (zarr-python and tensorstore): the
layout (zarr_spec.py) planned as zarr_plan.py decides, raw chunks written and read by this
module's own readers and writers, compressed ones encoded and decoded by the engine.
"""

import errno
import os
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..core import CheckpointingException
from ..dict_utils import dict_list_map_inplace, nested_values
from ..dtypes import name_of_numpy, to_numpy, torch_dtype
from ..fs import DurableDir
from ..geometry import grid_overlaps
from ..global_plan import GlobalPlan
from ..integrity import crc32c
from ..layout import LinkFreeTree, entry_dir, linked_entries
from ..mapping import ShardedTensor, is_main_replica, whole_tensor_metadata
from ..opening import OpenCheckpoint, open_checkpoint
from ..storage import storage_of
from ..storage_interface import Storage
from ..validation import check_request_against_stored, request_fits_stored, shards_of
from .base import LoadShardedStrategy, PlannedSaveStrategy
from .config import ZARR_ENGINES, StrategyConfig
from .reading import SCRATCH_BYTES, Piece, destination, fill_pieces, host_bytes, host_tensor, read_chunk, scratch_bytes, whole_destination
from .zarr_plan import ArrayPlan, ZarrSavePlan, assemble_flat_chunks, plan_arrays, plan_flat_chunks
from .zarr_spec import (
    CONSOLIDATED_FNAME,
    METADATA_FNAME,
    ArrayLayouts,
    chunk_indices,
    chunk_key,
    chunk_shape,
    chunks_checksummed,
    consolidated_documents,
    key_separator,
    list_arrays,
    read_array_document,
    read_consolidated,
)


def damaged_chunks(checkpoint_dir, key: str, offset=None, shape=None) -> List[str]:
    """What is wrong with the chunk files of `key` that box (offset, shape) covers (default:
    all): missing files and, in Zarr v3, files whose CRC-32C does not match. Empty if sound."""
    document = read_array_document(checkpoint_dir, key)
    chunks, global_shape = chunk_shape(document), document["shape"]
    checksummed = chunks_checksummed(document)
    separator = key_separator(document)
    if separator is None:
        return [f"{entry_dir(checkpoint_dir, key)}: its chunk_key_encoding is not Zarr's default one, which this library writes and checks"]
    offset = [0] * len(global_shape) if offset is None else offset
    shape = global_shape if shape is None else shape
    stops = [min(o + s, g) for o, s, g in zip(offset, shape, global_shape)]
    problems, storage = [], storage_of(checkpoint_dir)
    for index in chunk_indices(offset, [max(0, e - o) for o, e in zip(offset, stops)], chunks):
        path = os.path.join(entry_dir(checkpoint_dir, key), chunk_key(document["zarr_format"], index, separator))
        if storage.links and os.path.islink(path):
            problems.append(f"{path}: a symbolic link, not a chunk file of the checkpoint")
            continue
        try:
            data = storage.read(path)
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


class ZarrFormatSaveStrategy(PlannedSaveStrategy):
    """Save side shared by the Zarr engines; an engine supplies `write_shards`."""

    def __init__(self, backend: str, version: int = 1, config: Optional[StrategyConfig] = None):
        super().__init__(backend, version)
        self.config = config or StrategyConfig(backend=backend)

    def plan(self, global_plan: GlobalPlan, planning_infos, rank: int) -> ZarrSavePlan:
        arrays = plan_arrays(global_plan, self.config, rank, every_key=rank == 0)
        return ZarrSavePlan(rank, arrays, plan_flat_chunks(global_plan, arrays, rank), self.config.zarr_format)

    def stage(self, plan: ZarrSavePlan, sharded_state_dict):
        """Flattened pieces become the chunks this rank writes (docs/format.md §4.4)."""
        return assemble_flat_chunks(sharded_state_dict, plan.flat_chunks)

    def write(self, plan: ZarrSavePlan, sharded_state_dict, checkpoint_dir: DurableDir):
        """Writes the array documents this rank owns and its chunks: those of raw arrays
        (`raw_dtype`) by the layout's own writer (`RawChunkWrites`), the others encoded by the
        engine (`write_shards`). Nothing to report: v3 chunks carry their own checksums, and
        rank 0's plan holds every array's document."""
        writes = RawChunkWrites(checkpoint_dir)
        for key, array in plan.arrays.items():
            if array.metadata_writer == plan.rank:
                writes.add_document(key, array)
        encoded, arrays = [], plan.arrays
        for sh in shards_of(sharded_state_dict, ShardedTensor):
            if not is_main_replica(sh.replica_id):
                continue
            offset, shape = sh.global_box()
            if 0 in shape:
                continue
            array = arrays.get(sh.key)
            if array is None or sh.flattened_range is not None:
                raise CheckpointingException(f"Key '{sh.key}' was not in the planned layout")
            data = host_tensor(sh.data, shape)
            if not writes.add_shard(sh.key, array, offset, data):
                encoded.append((sh.key, offset, to_numpy(data.contiguous())))
        writes.run(self.config.thread_count)
        if encoded:
            self.write_shards(plan, encoded, checkpoint_dir)
        return {}, None

    def finalize(self, plan: ZarrSavePlan, checkpoint_dir, write_results) -> None:
        """Writes the root group's consolidated metadata (rank 0's plan: every array's)."""
        for name, data in plan.root_documents.items():
            path = os.path.join(str(checkpoint_dir), name)
            storage_of(path).write_atomic(path, data)

    @abstractmethod
    def write_shards(self, plan: ZarrSavePlan, shards: List[Tuple[str, Tuple[int, ...], np.ndarray]], checkpoint_dir: DurableDir) -> None:
        """Encodes each (key, global offset, values) into `plan.arrays[key]`, writing its
        files through `checkpoint_dir` (whose `sync` then makes them durable)."""


class RawChunkWrites:
    """The files one rank writes for one save without an engine: array documents, and the
    chunks of raw arrays (`raw_dtype`). A chunk that is a contiguous part of its shard is
    written straight from the shard's memory with its CRC-32C (no copy); others (cut by the
    array's end, or strided) are assembled in a zero-filled buffer first. Files are written by
    up to `thread_count` threads, each given a batch of arrays of similar total size (one thread
    per `Storage.thread_bytes`: locally, for many small files more threads only contend for the
    GIL); an array's directory is made once, by the rank writing its document (another rank's
    file goes straight into it, or waits for the end of its batch while it is still missing).
    Kept lean: a model of many small tensors pays this per file."""

    def __init__(self, checkpoint_dir: DurableDir):
        self.target = checkpoint_dir
        # key -> its files: (name, size, content, checksummed); content: a document's bytes, a
        # chunk's tensor (all of the chunk, contiguous) or a _ChunkWrite (to be assembled)
        self.arrays: Dict[str, list] = {}
        self.layouts = ArrayLayouts()

    def add_document(self, key: str, array: ArrayPlan) -> None:
        content = self.layouts(array.document).content
        self.arrays.setdefault(key, []).append((METADATA_FNAME[array.zarr_format], len(content), content, False))

    def add_shard(self, key: str, array: ArrayPlan, offset, data: torch.Tensor) -> bool:
        """Plans the chunk files of shard `data` at `offset`; False if its array is not raw."""
        layout = self.layouts(array.document)
        if layout.raw is None:
            return False
        files, chunks, checksummed = self.arrays.setdefault(key, []), layout.chunks, layout.checksummed
        size = layout.chunk_nbytes + 4 * checksummed
        for index, within, in_shard in grid_overlaps(tuple(offset), tuple(data.shape), layout.shape, chunks):
            part = data if in_shard is None else data[in_shard]
            if part.shape != chunks or not part.is_contiguous():
                part = _ChunkWrite(part, chunks, within)
            files.append((layout.chunk_file(index), size, part, checksummed))
        return True

    def run(self, thread_count: int) -> None:
        arrays = [(entry_dir(self.target, key), files) for key, files in self.arrays.items()]
        batches = storage_of(self.target).io_batches(arrays, thread_count, lambda array: sum(f[1] for f in array[1]))
        with ThreadPoolExecutor(max(1, len(batches))) as pool:
            list(pool.map(self._write_batch, batches))

    def _write_batch(self, batch) -> None:
        target, waiting = self.target, []
        for directory, files in batch:
            # the rank writing an array's document makes its directory; another rank's files
            # mostly come later (each lists its documents' arrays first), when it exists, else
            # at the end of the batch (made here only if still missing then)
            made_here = type(files[0][2]) is bytes
            if made_here:
                target.makedirs(directory)
            for name, size, content, checksummed in files:
                path = directory + "/" + name
                if type(content) is bytes:
                    buffers = [content]
                else:
                    raw = host_bytes(content.assembled() if type(content) is _ChunkWrite else content)
                    buffers = [raw, crc32c(raw).to_bytes(4, "little")] if checksummed else [raw]
                nested = "/" in name  # a chunk key with "/" separators: a directory per axis
                if nested:
                    target.makedirs(os.path.dirname(path))
                if made_here or nested:
                    target.write(path, buffers, size)
                elif not target.write_if_made(directory, path, buffers, size):
                    waiting.append((directory, path, buffers, size))
        for directory, path, buffers, size in waiting:
            if not target.write_if_made(directory, path, buffers, size):
                target.makedirs(directory)
                target.write(path, buffers, size)


@dataclass(frozen=True)
class _ChunkWrite:
    """A chunk that is not a contiguous part of its shard: `source` lies at `within` of it."""

    source: torch.Tensor
    shape: Tuple[int, ...]  # of the chunk (edge chunks are stored whole)
    within: Tuple[slice, ...]

    def assembled(self) -> torch.Tensor:
        values = torch.zeros(self.shape, dtype=self.source.dtype)  # the fill value, 0
        values[self.within] = self.source
        return values


def engine_chunk_files(checkpoint_dir: DurableDir, key: str, array: ArrayPlan, offset, shape) -> List[str]:
    """The chunk files of box (offset, shape) of `array`, whose directories are created here
    for an engine that writes the files itself."""
    root, paths, separator = entry_dir(checkpoint_dir, key), [], key_separator(array.document)
    for index in chunk_indices(offset, shape, array.chunks):
        paths.append(os.path.join(root, chunk_key(array.zarr_format, index, separator)))
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
    def open_array(self, checkpoint_dir, key: str, zarr_format: int) -> StoredArray:
        """Opens the existing array of `key` read-only (`checkpoint_dir`: a path or an
        OpenCheckpoint)."""

    def _open(self, checkpoint: OpenCheckpoint, key: str) -> StoredArray:
        """The engine's array of `key`, whose document was checked first."""
        zarr_format = _array_document(checkpoint, key)["zarr_format"]
        try:
            return self.open_array(checkpoint, key, zarr_format)
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
        raw = RawChunkReads(checkpoint_dir, checkpoint.storage)
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
        """Drops the keys from the consolidated metadata (rewritten atomically), then deletes
        their arrays."""
        storage = storage_of(checkpoint_dir)
        consolidated = read_consolidated(checkpoint_dir)
        if consolidated is not None:
            kept = {key: doc for key, doc in consolidated.documents.items() if not key.startswith(key_prefix)}
            zarr_format = 2 if os.path.basename(consolidated.path) == CONSOLIDATED_FNAME[2] else 3
            for name, data in consolidated_documents(kept, zarr_format).items():
                storage.write_atomic(os.path.join(str(checkpoint_dir), name), data)
        for key in list_arrays(checkpoint_dir):
            if key.startswith(key_prefix):
                storage.remove_tree(entry_dir(checkpoint_dir, key))


def _array_document(checkpoint: OpenCheckpoint, key: str) -> dict:
    """The array document of `key`, read and checked once per open checkpoint (the root's
    consolidated metadata is read once for all)."""
    consolidated = checkpoint.parsed("zarr consolidated", lambda: read_consolidated(checkpoint.path, checkpoint.storage))
    linked = checkpoint.parsed("linked entries", lambda: linked_entries(checkpoint.path, checkpoint.storage))
    return checkpoint.parsed(("array", key), lambda: read_array_document(checkpoint.path, key, consolidated, checkpoint.storage, linked))


class RawChunkReads:
    """The reads of one load from arrays of raw chunks (`raw_dtype`): every chunk file a
    request needs is read once, straight into the request's tensor where it is the whole chunk
    (reading.py), its CRC-32C checked on the bytes as they land."""

    def __init__(self, checkpoint_dir: str, storage: Storage):
        self.checkpoint_dir, self.storage = checkpoint_dir, storage
        self.layouts = ArrayLayouts()
        self.targets: List[Tuple[ShardedTensor, torch.Tensor]] = []
        self.chunks: Dict[Tuple[str, str], "_ChunkFile"] = {}  # by key and file name

    def plan(self, sh: ShardedTensor, document: dict) -> bool:
        """Plans the reads of request `sh`; False if its array is not one of raw chunks."""
        layout = self.layouts(document)
        dtype = layout.raw
        if dtype is None:
            return False
        stored_shape = layout.shape
        offset, shape = sh.covering_box()
        fits = request_fits_stored(sh, (offset, shape), stored_shape, lambda: entry_dir(self.checkpoint_dir, sh.key))
        target = sh.box_target(dtype)
        if not fits:
            target.zero_()  # the allow_shape_mismatch pad beyond the stored shape
        into = destination(target)
        for index, in_chunk, in_target in grid_overlaps(offset, shape, stored_shape, layout.chunks):
            name = layout.chunk_file(index)
            chunk = self.chunks.get((sh.key, name))
            if chunk is None:
                chunk = self.chunks[sh.key, name] = _ChunkFile(sh.key, name, layout.chunks, dtype, layout.chunk_nbytes, layout.checksummed, [])
            chunk.pieces.append(Piece(in_chunk, into if in_target is None else into[in_target]))
        self.targets.append((sh, target))
        return True

    def run(self, thread_count: int) -> Dict[int, torch.Tensor]:
        """Reads every planned chunk, in `thread_count` batches of similar size (one task per
        thread: thousands of small chunks would otherwise cost more in hand-offs than in
        reading); returns each request's value by `id` of the request."""
        batches = self.storage.read_batches(list(self.chunks.items()), thread_count, lambda entry: (entry[1].nbytes,))
        with ThreadPoolExecutor(max(1, len(batches))) as pool:
            list(pool.map(self._read_batch, batches))
        return {id(sh): sh.deliver(target) for sh, target in self.targets}

    def _read_batch(self, batch) -> None:
        """Reads a thread's chunk files: whole, one request each, handed to the storage in
        groups (its per-file costs paid in one loop), where a chunk lands in a destination as
        it is or fits in scratch memory (most chunks); others in blocks of rows."""
        trees: Dict[str, LinkFreeTree] = {}  # key -> its array directory's files
        group, scratch, used = [], None, 0  # a group's chunks that need copying share the scratch buffer
        for _, chunk in batch:
            tree = trees.get(chunk.key)
            if tree is None:
                tree = trees[chunk.key] = LinkFreeTree(entry_dir(self.checkpoint_dir, chunk.key), f"Key '{chunk.key}'", self.storage)
            name = chunk.name
            into = whole_destination(chunk.pieces, chunk.shape)
            if into is None and chunk.nbytes > SCRATCH_BYTES:
                self._read_in_blocks(tree, name, chunk)
                continue
            if len(group) == _FILES_PER_CALL or (into is None and used and used + chunk.nbytes > _GROUP_SCRATCH_BYTES):
                self._read_whole(group)
                group, used = [], 0
            direct = into is not None
            if not direct:
                scratch = scratch_bytes(SCRATCH_BYTES) if scratch is None else scratch
                into, used = scratch[used : used + chunk.nbytes], used + chunk.nbytes
            group.append(_WholeRead(tree, name, chunk, into, bytearray(4 * chunk.checksummed), direct))
        self._read_whole(group)

    def _read_whole(self, group: List["_WholeRead"]) -> None:
        reads = [(r.tree.path(r.name), [r.values, r.crc] if r.chunk.checksummed else [r.values]) for r in group]
        try:
            sizes = self.storage.read_files(reads, follow_links=False)
        except OSError as e:
            failed = next((r for r, (path, _) in zip(group, reads) if path == e.filename), None)
            raise (e if failed is None else self._unreadable(e, failed.tree, failed.name, failed.chunk)) from None
        for r, size in zip(group, sizes):
            chunk = r.chunk
            self._check(r.tree, r.name, chunk, size, chunk.checksummed and crc32c(r.values) != int.from_bytes(r.crc, "little"))
            if not r.direct:
                fill_pieces(chunk.pieces, r.values, chunk.shape, chunk.dtype)

    def _read_in_blocks(self, tree: LinkFreeTree, name: str, chunk: "_ChunkFile") -> None:
        try:
            file = self.storage.open(tree.path(name), follow_links=False, whole=chunk.checksummed)
        except OSError as e:
            raise self._unreadable(e, tree, name, chunk) from None
        with file:
            self._check(tree, name, chunk, file.size, False)
            crc = read_chunk(file, 0, chunk.shape, chunk.dtype, chunk.pieces, 0 if chunk.checksummed else None)
            if chunk.checksummed:
                self._check(tree, name, chunk, file.size, file.read(chunk.nbytes, 4) != crc.to_bytes(4, "little"))

    def _unreadable(self, error: OSError, tree: LinkFreeTree, name: str, chunk: "_ChunkFile") -> Exception:
        """The error for a chunk file that could not be opened: missing, or a link."""
        if isinstance(error, FileNotFoundError):
            return _damaged(chunk.key, self.checkpoint_dir, [f"{tree.prefix + name}: missing"])
        if error.errno == errno.ELOOP:
            return tree.refused(name)
        return error

    def _check(self, tree: LinkFreeTree, name: str, chunk: "_ChunkFile", size: int, crc_mismatch: bool) -> None:
        """Raises, naming the file, where a chunk file's size is not its chunk's or its values
        fail their CRC-32C."""
        expected = chunk.nbytes + 4 * chunk.checksummed
        if size != expected:
            raise _damaged(chunk.key, self.checkpoint_dir, [
                f"{tree.prefix + name}: has {size} bytes, a chunk of shape {list(chunk.shape)} has {expected} (truncated or changed)"
            ])
        if crc_mismatch:
            raise _damaged(chunk.key, self.checkpoint_dir, [f"{tree.prefix + name}: fails its CRC-32C (truncated or changed)"])


_FILES_PER_CALL = 256  # chunk files handed to the storage at once
_GROUP_SCRATCH_BYTES = 2**20  # chunks to copy out share this much scratch memory per group (a larger one is alone)


class _WholeRead(NamedTuple):
    """A chunk file read whole: its values into `values` (a destination's bytes where
    `direct`, else memory to copy pieces from), then its CRC-32C into `crc` (v3)."""

    tree: LinkFreeTree
    name: str
    chunk: "_ChunkFile"
    values: np.ndarray
    crc: bytearray
    direct: bool


class _ChunkFile(NamedTuple):
    """A chunk file of a raw array (`name` inside the directory of `key`) and the pieces of
    it that requests need."""

    key: str
    name: str
    shape: Tuple[int, ...]  # of the chunk (edge chunks are stored whole)
    dtype: torch.dtype
    nbytes: int  # of the values
    checksummed: bool  # ends with the CRC-32C of the values (Zarr v3's `crc32c` codec)
    pieces: List[Piece]


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
    check_request_against_stored(sh, array.shape, where)
    offset, shape = sh.covering_box()
    target = sh.box_target(torch_dtype(name_of_numpy(array.dtype, sh.key)), host_only=True)  # engines decode into host memory
    try:
        read_box(array, offset, target)
    except Exception as e:  # engines raise ValueError, OSError, ... for damaged chunks
        damaged = damaged_chunks(checkpoint_dir, sh.key, offset, shape)
        raise _damaged(sh.key, checkpoint_dir, damaged, f"{type(e).__name__}: {e}") from e
    return sh.deliver(target)

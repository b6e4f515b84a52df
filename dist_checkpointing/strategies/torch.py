"""The torch_dist engine (module name as in Megatron-Core): PyTorch's DCP format, laid out as
Megatron-Core lays it out.

Files: `.metadata` (a pickle of DCP's `Metadata`: each key's global size, dtype and chunk boxes,
and where each chunk's bytes are) and `__<rank>_<n>.distcp` data files, each a concatenation of
`torch.save` blobs. A DCP tensor is named by the ShardedTensor key and its chunks are the main
replicas' boxes (prepended axes included); a ShardedObject is a byte entry named by its
unique key holding `torch.save([value])`. Stock `torch.distributed.checkpoint.load` and
Megatron-Core's loader read it.

This module loads: `.metadata` is read into the library's own index (dcp_format.py, without
DCP's package, which takes ~1 s to import), each request planned against its chunks, and the
data files read ourselves, small items in coalesced reads, each item's bytes checked against
the CRC-32C recorded in the index (`index.json`) before they are used (integrity.py). Saving
is dcp_save.py (it encodes `.metadata` without DCP's package too); Megatron-Core's planner for
stock DCP loads (checkpointable.py) needs DCP's package and is imported on first use.
"""

import io
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Set

import numpy as np
import torch

from ..core import CheckpointingException
from ..dict_utils import dict_list_map_inplace, nested_values
from ..geometry import box_overlaps
from ..integrity import ChecksumIndex, crc32c
from ..layout import contained_path
from ..mapping import ShardedObject, ShardedTensor
from ..opening import OpenCheckpoint, open_checkpoint
from ..pickling import dump_dcp_metadata, load_dcp_metadata, load_object
from ..storage_interface import Reader
from ..validation import request_fits_stored
from .base import LoadShardedStrategy
from .config import StrategyConfig
from .dcp_format import (
    IN_MEMORY_ITEM_BYTES,
    METADATA_FNAME,
    ORIG_SHAPE,
    DcpIndex,
    DcpTensor,
    StoredItem,
    TensorItem,
    check_chunks_tile,
    read_dcp_index,
    stored_entries,
    stored_values,
    tensor_item,
)
from .dcp_save import DcpSavePlan, TorchDistSaveShardedStrategy  # noqa: F401 (Megatron-Core's names)
from .reading import Piece, destination, fill_pieces, read_chunk
from .resharding import TensorReformulationMetadata, is_nd_flattened_tensor


def __getattr__(name: str):
    if name == "MCoreLoadPlanner":  # Megatron-Core's name; it needs DCP's package: on first use
        from .checkpointable import MCoreLoadPlanner

        return MCoreLoadPlanner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TorchDistLoadShardedStrategy(LoadShardedStrategy):
    """Reads DCP checkpoints: ours and Megatron-Core's (v0.15 and v0.16 layouts)."""

    def __init__(self, backend: str = "torch_dist", version: int = 1, config: Optional[StrategyConfig] = None):
        super().__init__(backend, version)
        self.config = config or StrategyConfig(backend="torch_dist")

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def load(self, sharded_state_dict, checkpoint_dir):
        checkpoint = open_checkpoint(checkpoint_dir)
        reads = _Reads(checkpoint, dcp_index(checkpoint))
        placeholders = dict_list_map_inplace(reads.plan, sharded_state_dict)
        reads.run(checkpoint.checksums if self.config.verify_checksums else ChecksumIndex(None), self.config.thread_count)
        return dict_list_map_inplace(reads.result, placeholders)

    def load_tensors_metadata(self, checkpoint_dir):
        return stored_entries(dcp_index(open_checkpoint(checkpoint_dir)), with_objects=False)

    def load_sharded_metadata(self, checkpoint_dir):
        return stored_entries(dcp_index(open_checkpoint(checkpoint_dir)), with_objects=True)

    def flattened_keys(self, checkpoint_dir) -> Set[str]:
        tensors = dcp_index(open_checkpoint(checkpoint_dir)).tensors
        return {key for key, entry in tensors.items() if entry.original_shape is not None}

    def remove_sharded_tensors(self, checkpoint_dir, key_prefix: str) -> None:
        """Drops the keys from `.metadata` (rewritten atomically), then deletes the data files
        that held nothing else (e.g. those of a `separation_hint`); bytes of the keys in files
        shared with other keys stay, unreferenced."""
        checkpoint = open_checkpoint(checkpoint_dir)
        index = dcp_index(checkpoint)
        kept_files = {item.file for key, item in index.stored_items() if not key.startswith(key_prefix)}
        metadata = load_dcp_metadata(index.path, as_dcp_objects=True, storage=checkpoint.storage)  # DCP's classes, to write back
        metadata.state_dict_metadata = {k: v for k, v in metadata.state_dict_metadata.items() if not k.startswith(key_prefix)}
        metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if not k.fqn.startswith(key_prefix)}
        metadata.mcore_data = {k: v for k, v in (getattr(metadata, "mcore_data", None) or {}).items() if not k.startswith(key_prefix)}
        checkpoint.storage.write_atomic(index.path, dump_dcp_metadata(metadata))
        for name in sorted(index.files() - kept_files):
            checkpoint.storage.remove(contained_path(checkpoint.path, name, METADATA_FNAME, checkpoint.storage))


def get_reformulation_metadata(sharded_state_dict, checkpoint_dir) -> Dict[str, TensorReformulationMetadata]:
    """Per flattened request of `sharded_state_dict`, its key's original and stored global
    shapes in the checkpoint (Megatron-Core's n-d formulation, resharding.py). A 1-D key
    stored without them (before the n-d formulation) has no entry; any other raises."""
    index = dcp_index(open_checkpoint(checkpoint_dir))
    result = {}
    for sh in nested_values(sharded_state_dict):
        if not is_nd_flattened_tensor(sh):
            continue
        stored = index.tensors.get(sh.key)
        if stored is None:
            raise CheckpointingException(f"Key '{sh.key}' is not a tensor in {index.path}")
        if stored.original_shape is None:
            if len(sh.global_shape) == 1:
                continue
            raise CheckpointingException(
                f"Key '{sh.key}' is requested flattened, but {index.path} has no "
                f"n-d formulation of it (no '{ORIG_SHAPE}' in its mcore_data)"
            )
        result[sh.key] = TensorReformulationMetadata(stored.original_shape, stored.size)
    return result


def dcp_index(checkpoint: OpenCheckpoint) -> DcpIndex:
    """`.metadata`, read once per open checkpoint."""
    return checkpoint.parsed(METADATA_FNAME, lambda: read_dcp_index(checkpoint.path, checkpoint.storage))


class _Pending:
    """Stands in the state dict for a value until the reads are done."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n


class _Fill:
    """What one stored tensor item fills: the pieces of its chunk that requests need."""

    __slots__ = ("key", "dtype", "shape", "pieces")

    def __init__(self, key: str, dtype: torch.dtype, shape):
        self.key, self.dtype, self.shape = key, dtype, shape
        self.pieces: List[Piece] = []


COALESCED_READ_BYTES = 8 * 2**20  # small items next to each other are read together, up to this much
_GAP_BYTES = 4096  # bytes between two items that a coalesced read reads rather than skips


class _Reads:
    """The reads of one load: the requests planned against the stored chunks, then read.

    Every request is read as its covering box, into the caller's tensor where it can hold it
    (`ShardedTensor.box_target`) or a new one, zeroed where it reaches beyond the stored tensor
    (the allow_shape_mismatch pad; the stored chunks tile the rest). Each stored item a box
    overlaps gets a Piece (reading.py). From a reformulated key, each stored shard the box
    overlaps is read as the smallest flat range holding the overlap, and copied out through a
    strided view. The files are then read concurrently, each needed item once: small items
    (most of them, in models of many tensors) in coalesced reads of neighbouring items, large
    ones straight into their destinations.
    """

    def __init__(self, checkpoint: OpenCheckpoint, index: DcpIndex):
        self.checkpoint_dir, self.storage, self.index = checkpoint.path, checkpoint.storage, index
        self.requests: List = []  # per _Pending.n: the request
        self.values: List = []  # per _Pending.n: the target tensor or the loaded object
        self.objects: Dict[str, List[int]] = {}  # unique key -> the _Pending.n requesting it
        self.fills: Dict[StoredItem, _Fill] = {}
        self.copy_outs: List = []  # (target view, read view)
        self.tiled: Set[str] = set()  # keys whose stored chunks were checked to tile the tensor
        self.layouts: Dict[int, Dict[int, Dict[bytes, TensorItem]]] = {}  # item layouts seen (`stored_values`)
        # requests are checked against `.metadata` as they are planned (`request_fits_stored`)

    def plan(self, sh):
        if isinstance(sh, ShardedObject):
            if sh.unique_key not in self.index.objects:
                raise self._missing("ShardedObject", sh.unique_key)
            n = self._add(sh, None)
            self.objects.setdefault(sh.unique_key, []).append(n)
            return _Pending(n)
        if not isinstance(sh, ShardedTensor):
            return sh
        stored = self.index.tensors.get(sh.key)
        if stored is None:
            raise self._missing("ShardedTensor", sh.key)
        if sh.key not in self.tiled:
            check_chunks_tile(self.checkpoint_dir, sh.key, stored)
            self.tiled.add(sh.key)
        stored_shape = stored.global_shape
        offset, shape = sh.covering_box()
        fits = request_fits_stored(sh, (offset, shape), stored_shape, lambda: self.index.path)
        target = sh.box_target(stored.dtype)
        if not fits:
            target.zero_()  # the allow_shape_mismatch pad
        if stored.original_shape is not None:
            self._plan_reformulated(sh.key, stored, stored_shape, offset, target)
        else:
            self._fill(sh.key, stored, offset, target)
        return _Pending(self._add(sh, target))

    def _fill(self, key: str, stored: DcpTensor, offset, target: torch.Tensor) -> None:
        """Plans the reads of the box at `offset` of `target`'s shape into `target`: a piece
        of each stored chunk it overlaps."""
        into = destination(target)
        for number, in_chunk, in_target in box_overlaps(tuple(offset), tuple(target.shape), stored.chunks):
            item = stored.items[number]
            if item is None:
                raise CheckpointingException(
                    f"Key '{key}': {self.index.path} lists no bytes for the chunk at {stored.chunks[number][0]}; it is damaged"
                )
            fill = self.fills.get(item)
            if fill is None:
                fill = self.fills[item] = _Fill(key, stored.dtype, stored.chunks[number][1])
            elif fill.key != key:
                raise self._shared(fill.key, key, item)
            fill.pieces.append(Piece(in_chunk, into if in_target is None else into[in_target]))

    def _plan_reformulated(self, key: str, stored: DcpTensor, global_shape, offset, target) -> None:
        grid, numel = tuple(stored.size[:-1]), stored.size[-1]
        shard = [g // n for g, n in zip(global_shape, grid)]
        if len(grid) != len(global_shape) or any(s * n != g for s, n, g in zip(shard, grid, global_shape)) or math.prod(shard) != numel:
            raise CheckpointingException(
                f"Key '{key}' in {self.index.path}: stored shape "
                f"{stored.size} is not an n-d reformulation of {global_shape}; it is damaged"
            )
        strides = [math.prod(shard[axis + 1 :]) for axis in range(len(shard))]
        stop = [min(o + s, g) for o, s, g in zip(offset, target.shape, global_shape)]
        cells = [range(o // s, -(-e // s)) for o, e, s in zip(offset, stop, shard)]
        for cell in itertools.product(*cells):
            lo = [max(o, c * s) for o, c, s in zip(offset, cell, shard)]
            hi = [min(e, (c + 1) * s) for e, c, s in zip(stop, cell, shard)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            first = sum((low - c * s) * st for low, c, s, st in zip(lo, cell, shard, strides))
            last = sum((h - 1 - c * s) * st for h, c, s, st in zip(hi, cell, shard, strides))
            flat = torch.empty((1,) * len(grid) + (last + 1 - first,), dtype=target.dtype)
            self._fill(key, stored, tuple(cell) + (first,), flat)
            overlap = [h - low for low, h in zip(lo, hi)]
            into = target[tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, offset))]
            self.copy_outs.append((into, flat.reshape(-1).as_strided(overlap, strides)))

    def _missing(self, what: str, name: str) -> CheckpointingException:
        return CheckpointingException(
            f"{what} '{name}' is not in the checkpoint {self.checkpoint_dir}. Check the key, "
            f"or load with strict='log_unexpected' to skip keys the checkpoint does not have."
        )

    def _shared(self, first: str, second: str, item: StoredItem) -> CheckpointingException:
        return CheckpointingException(
            f"Keys '{first}' and '{second}': {self.index.path} stores both in the same bytes "
            f"({item.file} at {item.offset}); it is damaged"
        )

    def _add(self, sh, value) -> int:
        self.requests.append(sh)
        self.values.append(value)
        return len(self.values) - 1

    def run(self, checksums: ChecksumIndex, thread_count: int) -> None:
        """Reads the files concurrently; each needed item once, verified, then copied into
        every destination that needs part of it."""
        by_file: Dict[str, List[StoredItem]] = {}
        for item in self.fills:
            by_file.setdefault(item.file, []).append(item)
        object_keys: Dict[StoredItem, str] = {}
        for key in self.objects:
            item = self.index.objects[key]
            if item is None:
                raise CheckpointingException(f"ShardedObject '{key}': {self.index.path} lists no bytes for it; it is damaged")
            if item in self.fills or item in object_keys:  # each would fill only one of them
                raise self._shared(self._owner(item, object_keys), key, item)
            object_keys[item] = key
            by_file.setdefault(item.file, []).append(item)

        def read_files(batch) -> None:
            for name, items in batch:
                self._read_file(name, sorted(items, key=lambda item: item.offset), object_keys, checksums)

        batches = self.storage.read_batches(
            list(by_file.items()), thread_count, lambda entry: (item.length for item in entry[1])
        )
        with ThreadPoolExecutor(len(batches) or 1) as pool:
            list(pool.map(read_files, batches))
        for into, read in self.copy_outs:
            into.copy_(read)

    def _read_file(self, name: str, items: List[StoredItem], object_keys: dict, checksums: ChecksumIndex) -> None:
        keys = sorted({self._owner(item, object_keys) for item in items[:3]})
        keys = ", ".join(f"'{key}'" for key in keys) + (", ..." if len(items) > 3 else "")  # for messages
        path = contained_path(self.checkpoint_dir, name, f"{METADATA_FNAME} (keys {keys})", self.storage)
        try:
            with self.storage.open(path) as file:
                for run in _coalesced(items):
                    self._check_items(run, file.size, path, object_keys)
                    first, last = run[0], run[-1]
                    if len(run) == 1 and first.length > IN_MEMORY_ITEM_BYTES:
                        self._read_large(file, first, path, checksums)
                        continue
                    data = np.frombuffer(file.read(first.offset, last.offset + last.length - first.offset), np.uint8)
                    for item in run:
                        blob = data[item.offset - first.offset : item.offset - first.offset + item.length]
                        fill, what = self.fills.get(item), self._what(item, object_keys)
                        checksums.verify(blob, self.checkpoint_dir, name, item.offset, what)
                        if fill is not None:
                            self._fill_from(blob, fill, what, path)
                        else:
                            self._load_object(object_keys[item], blob)
        except CheckpointingException:
            raise
        except Exception as e:  # a missing, truncated or corrupt data file
            raise CheckpointingException(
                f"Cannot read keys {keys} from {path}: {type(e).__name__}: {e}. The checkpoint is damaged."
            ) from e

    def _owner(self, item: StoredItem, object_keys: dict) -> str:
        """The key (or a ShardedObject's unique key) whose bytes `item` holds."""
        return self.fills[item].key if item in self.fills else object_keys[item]

    def _what(self, item: StoredItem, object_keys: dict) -> str:
        return f"{'Key' if item in self.fills else 'ShardedObject'} '{self._owner(item, object_keys)}'"

    def _check_items(self, items: List[StoredItem], size: int, path: str, object_keys: dict) -> None:
        for item in items:
            if item.transforms:
                raise CheckpointingException(
                    f"{self._what(item, object_keys)} in {path} is stored with transforms {list(item.transforms)} "
                    f"(e.g. compression), which this reader does not support"
                )
            if item.offset + item.length > size:
                raise CheckpointingException(
                    f"{self._what(item, object_keys)}: {path} ends at byte {size}, before the item's bytes "
                    f"{item.offset}..{item.offset + item.length}; the file is truncated or the "
                    f"checkpoint is damaged"
                )

    def _read_large(self, file: Reader, item: StoredItem, path: str, checksums: ChecksumIndex) -> None:
        """A large item read straight into its destinations, checked as it lands (or read
        whole and copied out, where it is not one plain tensor)."""
        fill, what = self.fills[item], f"Key '{self.fills[item].key}'"
        recorded = checksums.recorded(self.checkpoint_dir, item.file, item.offset, what)
        source = file if recorded is None else file.prefetch(item.offset, item.length)  # every byte is read where checked
        layout = tensor_item(lambda offset, n: source.read(item.offset + offset, n), item.length)
        if layout is None:
            blob = source.read(item.offset, item.length)
            checksums.verify(blob, self.checkpoint_dir, item.file, item.offset, what)
            self._fill_from(blob, fill, what, path)
            return
        record = layout.record
        self._check_chunk(fill, record.dtype, record.shape, what, path)
        crc = None if recorded is None else crc32c(layout.head)
        crc = read_chunk(source, item.offset + layout.start, record.shape, record.dtype, fill.pieces, crc)
        if recorded is not None:
            crc = crc32c(layout.tail, crc)
            checksums.verify_crc(crc, item.length, self.checkpoint_dir, item.file, item.offset, what)

    def _fill_from(self, blob, fill: _Fill, what: str, path: str) -> None:
        """Copies the pieces of a tensor item read whole (`blob`, already verified)."""
        dtype, shape, values = stored_values(blob, what, path, self.layouts)
        self._check_chunk(fill, dtype, shape, what, path)
        fill_pieces(fill.pieces, values, fill.shape, fill.dtype)

    def _check_chunk(self, fill: _Fill, dtype: torch.dtype, shape, what: str, path: str) -> None:
        """A stored item must hold a tensor of its chunk's size and the key's dtype (one that
        disagrees with `.metadata` is damage, not data)."""
        if tuple(shape) != fill.shape or dtype != fill.dtype:
            raise CheckpointingException(
                f"{what}: an item in {path} holds a {dtype} tensor of shape {tuple(shape)}, "
                f"{METADATA_FNAME} says {fill.dtype} of shape {fill.shape}; the checkpoint is damaged"
            )

    def _load_object(self, key: str, blob) -> None:
        what = f"ShardedObject '{key}'"
        where = f"{self.checkpoint_dir} (DCP byte entry)"
        values = load_object(io.BytesIO(blob), what, where)
        if not isinstance(values, list) or not values:
            raise CheckpointingException(f"{what} in {where}: expected a non-empty list of values")
        for n in self.objects[key]:
            self.values[n] = values[0]

    def result(self, value):
        if not isinstance(value, _Pending):
            return value
        sh, loaded = self.requests[value.n], self.values[value.n]
        if isinstance(sh, ShardedObject):
            return loaded
        return sh.deliver(loaded)


def _coalesced(items: List[StoredItem]) -> List[List[StoredItem]]:
    """Items sorted by offset in runs to read at once: neighbouring small items (up to
    COALESCED_READ_BYTES a run); a large item alone."""
    runs: List[List[StoredItem]] = []
    for item in items:
        run = runs[-1] if runs else None
        if (
            run is not None
            and item.length <= IN_MEMORY_ITEM_BYTES
            and run[-1].length <= IN_MEMORY_ITEM_BYTES
            and 0 <= item.offset - (run[-1].offset + run[-1].length) <= _GAP_BYTES
            and item.offset + item.length - run[0].offset <= COALESCED_READ_BYTES
        ):
            run.append(item)
        else:
            runs.append([item])
    return runs

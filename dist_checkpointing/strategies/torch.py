"""The torch_dist engine (module name as in Megatron-Core): PyTorch's DCP format, laid out as
Megatron-Core lays it out.

Files: `.metadata` (a pickle of DCP's `Metadata`: each key's global size, dtype and chunk boxes,
and where each chunk's bytes are) and `__<rank>_<n>.distcp` data files, each a concatenation of
`torch.save` blobs. A DCP tensor is named by the ShardedTensor key and its chunks are the main
replicas' boxes (prepended axes included); a ShardedObject is a byte entry named by its
unique key holding `torch.save([value])`. Stock `torch.distributed.checkpoint.load` and
Megatron-Core's loader read it.

We write and read the data files ourselves instead of calling DCP's `save`/`load`:
`serialization.save` has already exchanged and validated the plan (DCP would do both again,
with its own collectives), fs.py makes every file durable, and each item's bytes are checked
against the CRC-32C recorded in the index (`index.json`) before they are unpickled (integrity.py).
`.metadata` is unpickled with an allow-list (pickling.py) and type-checked (dcp_format.py).
"""

import io
import itertools
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.storage import WriteResult
from torch.utils.serialization import config as serialization_config

from ..core import CheckpointingException
from ..dict_utils import dict_list_map_inplace, nested_values
from ..dtypes import torch_dtype
from ..fs import DurableDir
from ..geometry import inside, intersection
from ..global_plan import FLAT, OBJECT, GlobalPlan
from ..integrity import ChecksumIndex, Checksums, Range, crc32c, write_items_checksummed
from ..layout import check_key, contained_path
from ..mapping import ShardedObject, ShardedTensor, is_main_replica
from ..opening import OpenCheckpoint, open_checkpoint
from ..pickling import dump_dcp_metadata, dump_object, load_object
from ..storage import storage_of
from ..storage_interface import Reader
from ..validation import check_request_against_stored
from .base import LoadShardedStrategy, PlannedSaveStrategy, ShardedSavePlan
from .checkpointable import BoxesToRead
from .config import StrategyConfig
from .dcp_format import (
    DCP_VERSION,
    METADATA_FNAME,
    ORIG_SHAPE,
    TensorItem,
    check_chunks_tile,
    global_shape,
    mcore_data,
    read_dcp_metadata,
    reformulated_from,
    stored_entries,
    stored_tensor,
    tensor_item,
)
from .filesystem_async import write_buckets
from .reading import Piece, read_chunk
from .resharding import TensorReformulationMetadata, is_nd_flattened_tensor, nd_flattened_tensor_reformulated_global_shape


@dataclass(frozen=True)
class DcpSavePlan(ShardedSavePlan):
    """One save's DCP layout: `.metadata`'s per-key entries, and the n-d reformulated keys."""

    state_dict_metadata: Dict[str, object]
    mcore_data: Dict[str, dict]  # key -> {ORIG_SHAPE: global shape}, flattened keys

    def chunk_box(self, sh: ShardedTensor):
        return _chunk_box(self.mcore_data, sh)


def _chunk_box(mcore_data: Dict[str, dict], sh: ShardedTensor):
    """Where shard `sh` is stored: its global box, or for a key with flattened shards
    (Megatron's n-d reformulation) its flat range in its shard's row of the last axis."""
    if sh.key not in mcore_data:
        return sh.global_box()
    r = sh.flattened_range or slice(0, math.prod(sh.local_shape))
    ones = (1,) * len(sh.global_shape)
    return sh.local_chunk_offset_in_global() + (r.start,), ones + (r.stop - r.start,)


class TorchDistSaveShardedStrategy(PlannedSaveStrategy):
    """Writes ShardedTensors and ShardedObjects in the DCP format.

    Megatron-Core's arguments: `thread_count` (at most that many files per rank) overrides the
    config's; with `separation_hint`, the items of keys starting with it go to files of their
    own, `<hint>__<rank>_<n>.distcp`, which `remove_sharded_tensors(dir, hint)` then deletes.
    `keep_only_main_replica` and `cached_metadata` change nothing here: only main replicas
    are ever written, and an unchanged save always reuses its plan.
    """

    def __init__(
        self,
        backend: str = "torch_dist",
        version: int = 1,
        keep_only_main_replica: bool = True,
        thread_count: Optional[int] = None,
        cached_metadata: bool = False,
        separation_hint: Optional[str] = None,
        *,
        config: Optional[StrategyConfig] = None,
    ):
        super().__init__(backend, version)
        config = config or StrategyConfig(backend="torch_dist")
        self.config = config if thread_count is None else replace(config, thread_count=thread_count)
        if separation_hint is not None:
            check_key(separation_hint)  # it starts file names
        self.separation_hint = separation_hint

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    @property
    def stores_common_state(self) -> bool:
        return self.config.common_state_in_dcp

    def plan(self, global_plan: GlobalPlan, planning_infos, rank: int) -> DcpSavePlan:
        """The keys stored in Megatron-Core's n-d formulation (those with flattened shards),
        and on rank 0, which writes `.metadata`, DCP's per-key entries from the main replicas."""
        plan = global_plan
        rows = plan.main_rows  # a shard that is main on two ranks is one chunk
        keys = plan.row_key[rows]
        order = np.argsort(keys, kind="stable")
        rows, keys = rows[order], keys[order]
        bounds = np.searchsorted(keys, np.arange(len(plan.keys) + 1))  # key k: rows[bounds[k]:bounds[k + 1]]
        reformulated, flat_keys = {}, {}  # flat_keys: name -> (main shards, n-d shape)
        for key in np.unique(keys[(plan.flags[rows] & FLAT) != 0]).tolist():
            name, main = plan.keys[key], [plan.shard(row) for row in rows[bounds[key] : bounds[key + 1]].tolist()]
            reformulated[name] = {ORIG_SHAPE: plan.global_shape(key)}
            flat_keys[name] = main, _reformulated_size(name, main)
        state_dict_metadata = {}
        if rank == 0:
            state_dict_metadata = self._dcp_entries(plan, rows, bounds, reformulated, flat_keys)
        return DcpSavePlan(rank, state_dict_metadata, reformulated)

    @staticmethod
    def _dcp_entries(plan: GlobalPlan, rows: np.ndarray, bounds: np.ndarray, reformulated, flat_keys) -> Dict[str, object]:
        """DCP's entry of every key: a tensor's chunks (its main shards' boxes), or an object."""
        offsets, extents = plan.offset[rows].tolist(), plan.extent[rows].tolist()
        sizes = {}  # equal chunk shapes share one torch.Size
        entries = {}
        for key, name in enumerate(plan.keys):
            held = range(bounds[key], bounds[key + 1])
            if not len(held):
                continue
            if plan.key_kind[key] == OBJECT:
                for i in held:
                    entries[plan.shard(rows[i]).unique_key] = BytesStorageMetadata()
                continue
            shape = plan.global_shape(key)
            ndim = len(shape)
            if name in reformulated:
                main, shape = flat_keys[name]
                boxes = [_chunk_box(reformulated, sh) for sh in main]
            else:
                boxes = [(tuple(offsets[i][:ndim]), tuple(extents[i][:ndim])) for i in held]
            chunks = [
                ChunkStorageMetadata(torch.Size(o), sizes.get(s) or sizes.setdefault(s, torch.Size(s)))
                for o, s in boxes
                if 0 not in s
            ]
            properties = TensorProperties(dtype=torch_dtype(plan.dtype_name(key)))
            entries[name] = TensorStorageMetadata(properties, torch.Size(shape), chunks)
        return entries

    def write(self, plan: DcpSavePlan, sharded_state_dict, checkpoint_dir) -> Tuple[Checksums, List[WriteResult]]:
        items = []  # (index, tensor or BytesIO)
        for sh in nested_values(sharded_state_dict):
            if not isinstance(sh, (ShardedTensor, ShardedObject)) or not is_main_replica(sh.replica_id):
                continue
            if isinstance(sh, ShardedObject):
                # Megatron-Core's byte entry: a list of the values stored under the unique key
                items.append((MetadataIndex(sh.unique_key), dump_object([sh.data])))
                continue
            offset, shape = plan.chunk_box(sh)
            if 0 not in shape:
                items.append((MetadataIndex(sh.key, torch.Size(offset)), _compact_cpu(sh.data).reshape(shape)))
        hint = self.separation_hint
        groups = {"": items} if hint is None else {
            "": [item for item in items if not item[0].fqn.startswith(hint)],
            hint: [item for item in items if item[0].fqn.startswith(hint)],
        }
        threads = self.config.thread_count if hint is None else max(1, self.config.thread_count // 2)
        files, names = [], []
        for prefix, group in groups.items():
            for batch in storage_of(checkpoint_dir).io_batches(group, threads, _nbytes) if group else []:
                names.append(f"{prefix}__{plan.rank}_{len(files)}.distcp")
                files.append(batch)
        # Each item is checksummed (CRC-32C, index.json), so torch.save's own zlib CRC-32 of
        # every record is skipped: it costs ~1/3 of a small item's save and 40 ms per 100 MB.
        # torch.load (DCP's and Megatron's readers) reads such records; the setting is
        # process-wide, hence set once around all writer threads.
        with serialization_config.patch("save.compute_crc32", False):
            written = write_buckets([(checkpoint_dir, name, items) for name, items in zip(names, files)], _write_file)
        checksums = {name: ranges for name, (_, ranges) in zip(names, written)}
        return checksums, [r for results, _ in written for r in results]

    def finalize(self, plan: DcpSavePlan, checkpoint_dir, write_results: List[List[WriteResult]]) -> None:
        """Writes `.metadata` (rank 0), pointing at every rank's chunks."""
        storage_data = {r.index: r.storage_data for results in write_results for r in results}
        metadata = Metadata(
            state_dict_metadata=dict(plan.state_dict_metadata),
            storage_data=storage_data,
            storage_meta=StorageMeta(checkpoint_id=str(checkpoint_dir), save_id=str(uuid.uuid4())),
            version=DCP_VERSION,
        )
        metadata.mcore_data = dict(plan.mcore_data)  # where Megatron-Core looks for the original shapes
        path = os.path.join(str(checkpoint_dir), METADATA_FNAME)
        storage_of(path).write_atomic(path, dump_dcp_metadata(metadata))


def _reformulated_size(key: str, main: List[ShardedTensor]) -> Tuple[int, ...]:
    """Megatron-Core's n-d formulation of a key with flattened shards: global shape [X, Y, Z]
    split into local [x, y, z] is stored as [X/x, Y/y, Z/z, x*y*z], each flat piece a range of
    the last axis. That needs one regular grid of equal shards."""
    first = main[0]
    for sh in main:
        box_shape = sh.global_box()[1]
        if (
            sh.axis_fragmentations is None
            or (sh.local_shape, sh.axis_fragmentations) != (first.local_shape, first.axis_fragmentations)
            or any(b * f != g for b, f, g in zip(box_shape, sh.axis_fragmentations, sh.global_shape))
        ):
            raise CheckpointingException(
                f"Key '{key}' has flattened shards, which the torch_dist engine stores in "
                f"Megatron-Core's n-d formulation; that needs equal shards on a regular grid, but "
                f"shards have local shapes {first.local_shape} and {sh.local_shape} (grids "
                f"{first.axis_fragmentations}, {sh.axis_fragmentations}). Use the zarr engine."
            )
    return first.axis_fragmentations + (math.prod(first.local_shape),)


def _compact_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly its elements (`torch.save` of a view writes its whole storage)."""
    tensor = tensor.detach().to("cpu")
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def _nbytes(item) -> int:
    data = item[1]
    return data.numel() * data.element_size() if isinstance(data, torch.Tensor) else data.getbuffer().nbytes


def _write_file(checkpoint_dir: DurableDir, name: str, items) -> Tuple[List[WriteResult], List[Range]]:
    """One `.distcp` file: the items' `torch.save` blobs back to back, each checksummed."""
    results = []

    def write(f):
        for item in items:
            index, data = item
            if isinstance(data, torch.Tensor) and _nbytes(item) >= IN_MEMORY_ITEM_BYTES:
                torch.save(data, f)  # its values in one write, from the tensor's memory
            else:  # one write, not torch.save's ~40 small ones, each checksummed
                f.write((dump_object(data) if isinstance(data, torch.Tensor) else data).getbuffer())
            offset, length, _ = f.end_item()
            results.append(WriteResult(index, length, _StorageInfo(name, offset, length)))

    ranges = write_items_checksummed(checkpoint_dir, os.path.join(checkpoint_dir, name), write)
    return results, ranges


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
        reads = _Reads(checkpoint.path, _dcp_metadata(checkpoint))
        placeholders = dict_list_map_inplace(reads.plan, sharded_state_dict)
        reads.run(checkpoint.checksums if self.config.verify_checksums else ChecksumIndex(None), self.config.thread_count)
        return dict_list_map_inplace(reads.result, placeholders)

    def load_tensors_metadata(self, checkpoint_dir):
        return stored_entries(_dcp_metadata(open_checkpoint(checkpoint_dir)), with_objects=False)

    def load_sharded_metadata(self, checkpoint_dir):
        return stored_entries(_dcp_metadata(open_checkpoint(checkpoint_dir)), with_objects=True)

    def flattened_keys(self, checkpoint_dir) -> Set[str]:
        metadata = _dcp_metadata(open_checkpoint(checkpoint_dir))
        return {key for key in mcore_data(metadata) if reformulated_from(metadata, key) is not None}

    def remove_sharded_tensors(self, checkpoint_dir, key_prefix: str) -> None:
        """Drops the keys from `.metadata` (rewritten atomically), then deletes the data files
        that held nothing else (e.g. those of a `separation_hint`); bytes of the keys in files
        shared with other keys stay, unreferenced."""
        path = os.path.join(str(checkpoint_dir), METADATA_FNAME)
        metadata = read_dcp_metadata(str(checkpoint_dir))
        files_before = {info.relative_path for info in metadata.storage_data.values()}
        metadata.state_dict_metadata = {
            k: v for k, v in metadata.state_dict_metadata.items() if not k.startswith(key_prefix)
        }
        metadata.storage_data = {
            k: v for k, v in metadata.storage_data.items() if not k.fqn.startswith(key_prefix)
        }
        metadata.mcore_data = {k: v for k, v in mcore_data(metadata).items() if not k.startswith(key_prefix)}
        storage = storage_of(path)
        storage.write_atomic(path, dump_dcp_metadata(metadata))
        unused = files_before - {info.relative_path for info in metadata.storage_data.values()}
        for name in sorted(unused):
            storage.remove(contained_path(str(checkpoint_dir), name, METADATA_FNAME))


def get_reformulation_metadata(sharded_state_dict, checkpoint_dir) -> Dict[str, TensorReformulationMetadata]:
    """Per flattened request of `sharded_state_dict`, its key's original and stored global
    shapes in the checkpoint (Megatron-Core's n-d formulation, resharding.py). A 1-D key
    stored without them (before the n-d formulation) has no entry; any other raises."""
    metadata = _dcp_metadata(open_checkpoint(checkpoint_dir))
    result = {}
    for sh in nested_values(sharded_state_dict):
        if not is_nd_flattened_tensor(sh):
            continue
        original = reformulated_from(metadata, sh.key)
        if original is None:
            if len(sh.global_shape) == 1:
                continue
            raise CheckpointingException(
                f"Key '{sh.key}' is requested flattened, but {checkpoint_dir}/{METADATA_FNAME} has no "
                f"n-d formulation of it (no '{ORIG_SHAPE}' in its mcore_data)"
            )
        stored = metadata.state_dict_metadata.get(sh.key)
        if not isinstance(stored, TensorStorageMetadata):
            raise CheckpointingException(f"Key '{sh.key}' is not a tensor in {checkpoint_dir}/{METADATA_FNAME}")
        result[sh.key] = TensorReformulationMetadata(original, tuple(stored.size))
    return result


def _dcp_metadata(checkpoint: OpenCheckpoint) -> Metadata:
    """`.metadata`, parsed once per open checkpoint."""
    return checkpoint.parsed(METADATA_FNAME, lambda: read_dcp_metadata(checkpoint.path))


def _narrow(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for axis, (start, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(axis, start, length)
    return tensor


IN_MEMORY_ITEM_BYTES = 2**20  # smaller items are written and read whole (one call each), larger ones in place


@dataclass(frozen=True)
class _ItemRead:
    """One stored item being read: where it is, and how it is checked."""

    name: str  # of its file, relative to the checkpoint
    file: Reader
    info: _StorageInfo
    what: str
    checksums: ChecksumIndex

    @property
    def path(self) -> str:
        return self.file.path

    def read(self, offset: int, n: int) -> memoryview:
        """`n` bytes of the item from `offset` (fewer at the file's end)."""
        return self.file.read(self.info.offset + offset, n)


class _Pending:
    """Stands in the state dict for a value until the reads are done."""

    def __init__(self, n: int):
        self.n = n


class MCoreLoadPlanner(DefaultLoadPlanner):
    """Megatron-Core's DCP load planner: DCP's default planner that first checks the global
    shapes of `shapes_validation_sharded_tensors` against the checkpoint's (a flattened one
    against its n-d formulation); `allow_shape_mismatch_sharded_tensors` are not checked. Usable
    with stock `torch.distributed.checkpoint.load`.

    The torch_dist engine plans its reads with one too: its state dict holds a `BoxesToRead`
    per stored key (the boxes the engine reads into, in the stored tensor's coordinates), whose
    ReadItems are listed directly, each box against the stored chunks it overlaps; DCP's
    generic planning of those boxes gives the same items."""

    def __init__(self, *args, shapes_validation_sharded_tensors=(), allow_shape_mismatch_sharded_tensors=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.shapes_validation_sharded_tensors = shapes_validation_sharded_tensors
        self.allow_shape_mismatch_sharded_tensors = allow_shape_mismatch_sharded_tensors

    def _validate_global_shapes(self, metadata: Metadata, sharded_tensors) -> None:
        for sh in sharded_tensors:
            stored = metadata.state_dict_metadata.get(sh.key)
            if not isinstance(stored, TensorStorageMetadata):
                raise CheckpointingException(f"Key '{sh.key}' is not a tensor of the checkpoint")
            reformulated = is_nd_flattened_tensor(sh) and len(sh.global_shape) > 1
            expected = nd_flattened_tensor_reformulated_global_shape(sh) if reformulated else sh.global_shape
            if tuple(stored.size) != tuple(expected):
                raise CheckpointingException(
                    f"Global shape mismatch for loaded ({tuple(stored.size)}) and expected ({tuple(expected)}) "
                    f"tensor for key {sh.key}"
                )

    def create_local_plan(self) -> LoadPlan:
        self._validate_global_shapes(self.metadata, self.shapes_validation_sharded_tensors)
        if not all(isinstance(obj, (BoxesToRead, io.BytesIO)) for obj in self.state_dict.values()):
            return super().create_local_plan()
        items = []
        for fqn, obj in self.state_dict.items():
            stored = self.metadata.state_dict_metadata[fqn]
            items += _box_read_items(fqn, stored, obj) if isinstance(obj, BoxesToRead) else [
                ReadItem(LoadItemType.BYTE_IO, MetadataIndex(fqn), torch.Size([]), MetadataIndex(fqn), torch.Size([]), torch.Size([]))
            ]
        return LoadPlan(items)


def _box_read_items(fqn: str, stored: TensorStorageMetadata, boxes: BoxesToRead) -> List[ReadItem]:
    """The ReadItems of each box of `boxes`, from the stored chunks it overlaps (DCP's
    `create_read_items_for_chunk_list`, one box at a time)."""
    items = []
    for index, (offset, target) in enumerate(zip(boxes.offsets, boxes.targets)):
        for chunk in stored.chunks:
            region = intersection((tuple(offset), tuple(target.shape)), (chunk.offsets, chunk.sizes))
            if region is None:
                continue
            items.append(
                ReadItem(
                    LoadItemType.TENSOR,
                    dest_index=MetadataIndex(fqn, offset, index),
                    dest_offsets=torch.Size([a - o for (a, _), o in zip(region, offset)]),
                    storage_index=MetadataIndex(fqn, chunk.offsets),
                    storage_offsets=torch.Size([a - c for (a, _), c in zip(region, chunk.offsets)]),
                    lengths=torch.Size([b - a for a, b in region]),
                )
            )
    return items


class _Reads:
    """The reads of one load: the requests' boxes, planned and read.

    Every request is read as its covering box, into the caller's tensor where it can hold it
    (`ShardedTensor.box_target`) or a new one, zeroed where it reaches beyond the stored tensor
    (the allow_shape_mismatch pad; the stored chunks tile the rest). From a reformulated key,
    each stored shard the box overlaps is read as the smallest flat range holding the overlap,
    and copied out through a strided view. An `MCoreLoadPlanner` turns the boxes into DCP
    ReadItems; the files are then read concurrently, each stored item once.
    """

    def __init__(self, checkpoint_dir: str, metadata: Metadata):
        self.checkpoint_dir, self.metadata = checkpoint_dir, metadata
        self.requests: List = []  # per _Pending.n: the request
        self.values: List = []  # per _Pending.n: the target tensor or the loaded object
        self.objects: Dict[str, List[int]] = {}  # unique key -> the _Pending.n requesting it
        self.copy_outs: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (target view, read view)
        self.tiled: Set[str] = set()  # keys whose stored chunks were checked to tile the tensor
        self.chunk_sizes: Dict[MetadataIndex, torch.Size] = {}  # what each stored item must hold
        # requests are checked as they are planned (`check_request_against_stored`), not again
        self.planner = MCoreLoadPlanner(flatten_state_dict=False, allow_partial_load=True)
        self.planner.set_up_planner({}, metadata)

    def plan(self, sh):
        if isinstance(sh, ShardedObject):
            self._stored(sh.unique_key, BytesStorageMetadata, "ShardedObject")
            self.planner.state_dict.setdefault(sh.unique_key, io.BytesIO())
            n = self._add(sh, None)
            self.objects.setdefault(sh.unique_key, []).append(n)
            return _Pending(n)
        if not isinstance(sh, ShardedTensor):
            return sh
        stored = self._stored(sh.key, TensorStorageMetadata, "ShardedTensor")
        if sh.key not in self.tiled:
            check_chunks_tile(self.checkpoint_dir, sh.key, stored)
            self.tiled.add(sh.key)
        where = os.path.join(self.checkpoint_dir, METADATA_FNAME)
        stored_shape = global_shape(self.metadata, sh.key)
        check_request_against_stored(sh, stored_shape, where)
        offset, shape = sh.covering_box()
        target = sh.box_target(stored.properties.dtype)
        if not inside((offset, shape), stored_shape):
            target.zero_()  # the allow_shape_mismatch pad
        boxes = self.planner.state_dict.get(sh.key)
        if boxes is None:
            boxes = self.planner.state_dict[sh.key] = BoxesToRead(stored.size, stored.properties.dtype)
        if reformulated_from(self.metadata, sh.key) is not None:
            self._plan_reformulated(sh.key, boxes, stored, stored_shape, offset, target)
        else:
            boxes.add(offset, target)
        return _Pending(self._add(sh, target))

    def _plan_reformulated(self, key, boxes: BoxesToRead, stored, global_shape, offset, target) -> None:
        grid, numel = tuple(stored.size[:-1]), stored.size[-1]
        shard = [g // n for g, n in zip(global_shape, grid)]
        if len(grid) != len(global_shape) or any(s * n != g for s, n, g in zip(shard, grid, global_shape)) or math.prod(shard) != numel:
            raise CheckpointingException(
                f"Key '{key}' in {self.checkpoint_dir}/{METADATA_FNAME}: stored shape "
                f"{tuple(stored.size)} is not an n-d reformulation of {global_shape}; it is damaged"
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
            boxes.add(tuple(cell) + (first,), flat)
            overlap = [h - low for low, h in zip(lo, hi)]
            into = target[tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, offset))]
            self.copy_outs.append((into, flat.reshape(-1).as_strided(overlap, strides)))

    def _stored(self, name: str, kind, what: str):
        stored = self.metadata.state_dict_metadata.get(name)
        if not isinstance(stored, kind):
            raise CheckpointingException(
                f"{what} '{name}' is not in the checkpoint {self.checkpoint_dir}. Check the key, "
                f"or load with strict='log_unexpected' to skip keys the checkpoint does not have."
            )
        return stored

    def _add(self, sh, value) -> int:
        self.requests.append(sh)
        self.values.append(value)
        return len(self.values) - 1

    def run(self, checksums: ChecksumIndex, thread_count: int) -> None:
        """Reads the files concurrently; each stored item once, verified, then copied into
        every destination that needs part of it."""
        by_file: Dict[str, Dict[MetadataIndex, List[ReadItem]]] = {}
        for item in self.planner.create_local_plan().items:
            info = self.metadata.storage_data.get(item.storage_index)
            if info is None:
                raise CheckpointingException(
                    f"Key '{item.storage_index.fqn}': {self.checkpoint_dir}/{METADATA_FNAME} "
                    f"lists no bytes for the chunk at {item.storage_index.offset}; it is damaged"
                )
            by_file.setdefault(info.relative_path, {}).setdefault(item.storage_index, []).append(item)
        def nbytes(entry) -> int:
            return sum(self.metadata.storage_data[index].length for index in entry[1])

        def read_files(batch) -> None:
            for name, stored in batch:
                self._read_file(name, stored, checksums)

        batches = storage_of(self.checkpoint_dir).io_batches(list(by_file.items()), thread_count, nbytes)
        with ThreadPoolExecutor(len(batches) or 1) as pool:
            list(pool.map(read_files, batches))
        for into, read in self.copy_outs:
            into.copy_(read)

    def _read_file(self, name: str, stored: Dict[MetadataIndex, List[ReadItem]], checksums: ChecksumIndex) -> None:
        keys = sorted({index.fqn for index in stored})
        path = contained_path(self.checkpoint_dir, name, f"{METADATA_FNAME} (keys {keys})")
        infos = sorted(((self.metadata.storage_data[index], index) for index in stored), key=lambda e: e[0].offset)
        try:
            with storage_of(path).open(path) as file:
                size = file.size
                for info, index in infos:
                    what = f"Key '{index.fqn}'"
                    if getattr(info, "transform_descriptors", None):
                        raise CheckpointingException(
                            f"{what} in {path} is stored with transforms {info.transform_descriptors} "
                            f"(e.g. compression), which this reader does not support"
                        )
                    if info.offset + info.length > size:
                        raise CheckpointingException(
                            f"{what}: {path} ends at byte {size}, before the item's bytes "
                            f"{info.offset}..{info.offset + info.length}; the file is truncated or the "
                            f"checkpoint is damaged"
                        )
                    readers = stored[index]
                    # every byte of the item is read where it is checked (or small): fetched at once
                    whole = info.length <= IN_MEMORY_ITEM_BYTES or checksums.recorded(self.checkpoint_dir, name, info.offset, what) is not None
                    item = _ItemRead(name, file.prefetch(info.offset, info.length) if whole else file, info, what, checksums)
                    if readers[0].type == LoadItemType.TENSOR and info.length > IN_MEMORY_ITEM_BYTES:
                        layout = tensor_item(item.read, info.length)
                        if layout is not None:
                            self._read_in_place(item, index, layout, readers)
                            continue
                    self._read_in_memory(item, index, readers)
        except CheckpointingException:
            raise
        except Exception as e:  # a missing, truncated or corrupt data file
            raise CheckpointingException(
                f"Cannot read keys {keys} from {path}: {type(e).__name__}: {e}. The checkpoint is damaged."
            ) from e

    def _read_in_place(self, item: "_ItemRead", index: MetadataIndex, layout: TensorItem, readers: List[ReadItem]) -> None:
        """The item's values read straight into their destinations, checked as they land."""
        record = layout.record
        self._check_chunk(index, record.dtype, record.shape, item.what, item.path)
        pieces = [
            Piece(tuple(slice(o, o + n) for o, n in zip(r.storage_offsets, r.lengths)), self.resolve_tensor(r))
            for r in readers
        ]
        recorded = item.checksums.recorded(self.checkpoint_dir, item.name, item.info.offset, item.what)
        crc = None if recorded is None else crc32c(layout.head)
        crc = read_chunk(item.file, item.info.offset + layout.start, record.shape, record.dtype, pieces, crc)
        if recorded is not None:
            crc = crc32c(layout.tail, crc)
            item.checksums.verify_crc(crc, item.info.length, self.checkpoint_dir, item.name, item.info.offset, item.what)

    def _read_in_memory(self, item: "_ItemRead", index: MetadataIndex, readers: List[ReadItem]) -> None:
        """The item read whole into memory, verified, then copied where it is needed."""
        data = item.read(0, item.info.length)
        item.checksums.verify(data, self.checkpoint_dir, item.name, item.info.offset, item.what)
        if readers[0].type == LoadItemType.BYTE_IO:
            for reader in readers:
                self.load_bytes(reader, io.BytesIO(data))
            return
        tensor = stored_tensor(data, item.what, item.path)
        self._check_chunk(index, tensor.dtype, tensor.shape, item.what, item.path)
        for reader in readers:
            self.resolve_tensor(reader).copy_(_narrow(tensor, reader.storage_offsets, reader.lengths))

    def _check_chunk(self, index: MetadataIndex, dtype: torch.dtype, shape, what: str, path: str) -> None:
        """A stored item must hold a tensor of its chunk's size and the key's dtype (one that
        disagrees with `.metadata` is damage, not data)."""
        stored = self.metadata.state_dict_metadata[index.fqn]
        if index not in self.chunk_sizes:
            self.chunk_sizes.update((MetadataIndex(index.fqn, chunk.offsets), chunk.sizes) for chunk in stored.chunks)
        expected, size = stored.properties.dtype, self.chunk_sizes[index]
        if tuple(shape) != tuple(size) or dtype != expected:
            raise CheckpointingException(
                f"{what}: the item at chunk {tuple(index.offset)} in {path} holds a {dtype} tensor "
                f"of shape {tuple(shape)}, {METADATA_FNAME} says {expected} of shape "
                f"{tuple(size)}; the checkpoint is damaged"
            )

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        return self.planner.resolve_tensor(item)

    def load_bytes(self, item: ReadItem, value) -> None:
        name = item.dest_index.fqn
        what = f"ShardedObject '{name}'"
        where = f"{self.checkpoint_dir} (DCP byte entry)"
        values = load_object(value, what, where)
        if not isinstance(values, list) or not values:
            raise CheckpointingException(f"{what} in {where}: expected a non-empty list of values")
        for n in self.objects[name]:
            self.values[n] = values[0]

    def result(self, value):
        if not isinstance(value, _Pending):
            return value
        sh, loaded = self.requests[value.n], self.values[value.n]
        if isinstance(sh, ShardedObject):
            return loaded
        return sh.deliver(loaded)

"""The torch_dist engine's saving: PyTorch's DCP format, laid out as Megatron-Core lays it out
(strategies/torch.py says what the files hold).

We write the data files ourselves instead of calling DCP's `save`: `serialization.save` has
already exchanged and validated the plan (DCP would do both again, with its own collectives),
fs.py makes every file durable, and each item is checksummed (CRC-32C, `index.json`). `.metadata`
is a pickle of DCP's own `Metadata`, encoded without DCP's classes (pickling.py), so neither
saves nor loads import DCP's package.
"""

import math
import os
import uuid
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.serialization import config as serialization_config

from ..core import CheckpointingException
from ..dict_utils import nested_values
from ..dtypes import torch_dtype
from ..fs import DurableDir
from ..global_plan import FLAT, OBJECT, GlobalPlan
from ..integrity import Checksums, Range, write_items_checksummed
from ..layout import check_key
from ..mapping import ShardedObject, ShardedTensor, is_main_replica
from ..pickling import DcpStorageRecords, DcpTensorEntry, dump_object, encode_dcp_metadata
from ..storage import storage_of
from .base import PlannedSaveStrategy, ShardedSavePlan
from .config import StrategyConfig
from .dcp_format import DCP_VERSION, IN_MEMORY_ITEM_BYTES, METADATA_FNAME, ORIG_SHAPE, TensorItem, tensor_item
from .filesystem_async import write_buckets
from .reading import host_bytes, host_tensor


@dataclass(frozen=True)
class DcpSavePlan(ShardedSavePlan):
    """One save's DCP layout: `.metadata`'s per-key entries, and the n-d reformulated keys."""

    entries: Dict[str, Optional[DcpTensorEntry]]  # on rank 0; None: a byte entry
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
        entries = self._dcp_entries(plan, rows, bounds, reformulated, flat_keys) if rank == 0 else {}
        return DcpSavePlan(rank, entries, reformulated)

    @staticmethod
    @staticmethod
    def _dcp_entries(plan: GlobalPlan, rows: np.ndarray, bounds: np.ndarray, reformulated, flat_keys) -> Dict[str, Optional[DcpTensorEntry]]:
        """DCP's entry of every key: a tensor's chunks (its main shards' boxes), or an object."""
        offsets, extents = plan.offset[rows].tolist(), plan.extent[rows].tolist()
        entries = {}
        for key, name in enumerate(plan.keys):
            held = range(bounds[key], bounds[key + 1])
            if not len(held):
                continue
            if plan.key_kind[key] == OBJECT:
                for i in held:
                    entries[plan.shard(rows[i]).unique_key] = None
                continue
            shape = plan.global_shape(key)
            ndim = len(shape)
            if name in reformulated:
                main, shape = flat_keys[name]
                boxes = [_chunk_box(reformulated, sh) for sh in main]
            else:
                boxes = [(tuple(offsets[i][:ndim]), tuple(extents[i][:ndim])) for i in held]
            entries[name] = DcpTensorEntry(torch_dtype(plan.dtype_name(key)), tuple(shape), [box for box in boxes if 0 not in box[1]])
        return entries

    def write(self, plan: DcpSavePlan, sharded_state_dict, checkpoint_dir) -> Tuple[Checksums, List[DcpStorageRecords]]:
        items = []  # (key, chunk offset or None, tensor or BytesIO)
        for sh in nested_values(sharded_state_dict):
            if not isinstance(sh, (ShardedTensor, ShardedObject)) or not is_main_replica(sh.replica_id):
                continue
            if isinstance(sh, ShardedObject):
                # Megatron-Core's byte entry: a list of the values stored under the unique key
                items.append((sh.unique_key, None, dump_object([sh.data])))
                continue
            offset, shape = plan.chunk_box(sh)
            if 0 not in shape:
                data = host_tensor(sh.data, shape)
                items.append((sh.key, tuple(offset), data if data.is_contiguous() else data.contiguous()))
        hint = self.separation_hint
        groups = {"": items} if hint is None else {
            "": [item for item in items if not item[0].startswith(hint)],
            hint: [item for item in items if item[0].startswith(hint)],
        }
        threads = self.config.thread_count if hint is None else max(1, self.config.thread_count // 2)
        files, names = [], []
        for prefix, group in groups.items():
            for batch in storage_of(checkpoint_dir).io_batches(group, threads, _nbytes) if group else []:
                names.append(f"{prefix}__{plan.rank}_{len(files)}.distcp")
                files.append(batch)
        written = write_buckets([(checkpoint_dir, name, items) for name, items in zip(names, files)], _write_file)
        checksums = {name: ranges for name, (_, ranges) in zip(names, written)}
        return checksums, [placed for placed, _ in written]

    def finalize(self, plan: DcpSavePlan, checkpoint_dir, write_results: List[List[DcpStorageRecords]]) -> None:
        """Writes `.metadata` (rank 0), pointing at every rank's chunks."""
        records = (placed for files in write_results for placed in files)
        document = encode_dcp_metadata(plan.entries, records, plan.mcore_data, (str(checkpoint_dir), str(uuid.uuid4())), DCP_VERSION)
        path = os.path.join(str(checkpoint_dir), METADATA_FNAME)
        storage_of(path).write_atomic(path, document)


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


def _owning(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous `tensor` over a storage of exactly its bytes, the same memory (`torch.save`
    of a view writes its whole storage: an async save's staged tensors are views of one
    buffer)."""
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.untyped_storage().nbytes() == nbytes:
        return tensor
    start = tensor.storage_offset() * tensor.element_size()
    storage = tensor.untyped_storage()[start : start + nbytes]  # a slice shares the memory
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(storage, 0, tensor.shape, tensor.stride())


def _nbytes(item) -> int:
    data = item[2]
    return data.numel() * data.element_size() if isinstance(data, torch.Tensor) else data.getbuffer().nbytes


_ITEMS_PER_WRITE = 64  # small items (< 1 MiB each) written in one write


def _write_file(checkpoint_dir: DurableDir, name: str, items) -> Tuple[DcpStorageRecords, List[Range]]:
    """One `.distcp` file: the items' `torch.save` blobs back to back, each checksummed; what
    every rank sends rank 0 for `.metadata` (plain lists: 10^4 of DCP's WriteResults would
    pickle as many objects, twice)."""
    placed = DcpStorageRecords(name, [key for key, _, _ in items], [chunk for _, chunk, _ in items], [], [])
    layouts: Dict[Tuple[torch.dtype, Tuple[int, ...]], Optional[TensorItem]] = {}

    def write(f):
        pending = []  # small items' bytes, written together

        def place(ranges):
            placed.offsets.extend(offset for offset, _, _ in ranges)
            placed.lengths.extend(length for _, length, _ in ranges)

        def flush():
            place(f.write_items(pending))
            pending.clear()

        for _, _, data in items:
            small = isinstance(data, torch.Tensor) and data.numel() * data.element_size() < IN_MEMORY_ITEM_BYTES
            layout = _layout(layouts, data) if small else None
            if layout is not None:  # no torch.save: its ~40 small writes cost more than the bytes
                pending.append(b"".join((layout.head, host_bytes(data), layout.tail)))
                if len(pending) >= _ITEMS_PER_WRITE:
                    flush()
                continue
            flush()
            if isinstance(data, torch.Tensor):
                torch.save(_owning(data), f)  # its values in one write, from the tensor's memory
            else:
                f.write(data.getbuffer())
            place([f.end_item()])
        flush()

    # Each item is checksummed (CRC-32C, index.json), so torch.save's own zlib CRC-32 of every
    # record is skipped: it costs ~1/3 of a small item's save and 40 ms per 100 MB. torch.load
    # (DCP's and Megatron's readers) reads such records. The setting is per thread.
    with serialization_config.patch("save.compute_crc32", False):
        ranges = write_items_checksummed(checkpoint_dir, os.path.join(checkpoint_dir, name), write)
    return placed, ranges


def _layout(layouts: dict, tensor: torch.Tensor) -> Optional[TensorItem]:
    """The bytes `torch.save` writes around the values of a contiguous CPU tensor of `tensor`'s
    dtype and shape (with the usual strides, which a one-element tensor need not have): they
    depend on the dtype and shape only, as the zip records' CRC-32s are not computed
    (`save.compute_crc32` is off while a file's items are written). One `torch.save` (of zeros)
    per distinct layout, so for small items only; then an item is its layout's head, its values
    and its tail (a small tensor's `torch.save` costs ~50 µs, most of a many-tensor save). None
    where that does not hold (a subclass, a conjugate or negative view, CRC-32s on), and
    `torch.save` writes the item."""
    if type(tensor) is not torch.Tensor or tensor.is_conj() or tensor.is_neg():
        return None
    key = (tensor.dtype, tuple(tensor.shape))
    if key not in layouts:
        if serialization_config.save.compute_crc32:
            return None
        blob = dump_object(torch.zeros(key[1], dtype=key[0])).getbuffer()
        layouts[key] = tensor_item(lambda offset, n: blob[offset : offset + n], blob.nbytes)
    return layouts[key]

"""Step 2 of a save: what one rank writes, run here (sync) or staged for a writer process (async).

A `WriteJob` holds everything the write needs: the strategies, this save's plan, and this rank's
common state, ShardedObjects and staged shards. `stage()` turns it into a copy that no longer refers to
the caller's memory, so the caller may change its tensors as soon as `save` returns:
- the tensors of the shards to write are copied into one shared-memory buffer, which travels to
  the writer process as a single file descriptor (its pages are shared, not pickled) and is
  reused by the next save of the same size;
- everything else (common state, objects) is a deep copy on the CPU, small by design.
"""

import copy
from dataclasses import dataclass, field, replace
from threading import Lock
from typing import Any, List, Optional, Tuple

import torch

from .dict_utils import dict_list_map_inplace, nested_values
from .fs import DurableDir, file_size_limit_raises
from .integrity import Checksums
from .mapping import ShardedObject, ShardedTensor, is_main_replica
from .strategies.base import SaveCommonStrategy, SaveShardedStrategy, ShardedSavePlan

ALIGNMENT = 64  # bytes; every staged tensor starts at a multiple, so any dtype view is valid


@dataclass
class WriteJob:
    checkpoint_dir: str
    common_strategy: SaveCommonStrategy
    sharded_strategy: SaveShardedStrategy
    plan: ShardedSavePlan  # this save's, from `sharded_strategy.plan`
    common: Optional[dict]  # rank 0 writes `common.pt`; None elsewhere
    objects: list  # ShardedObjects written by the common strategy
    shards: Any  # what `sharded_strategy.stage` returned
    staged: Optional["SharedTensors"] = None  # the shards' tensors, when staged

    def run(self) -> Tuple[Checksums, Any]:
        """Writes everything durably; returns the checksums of the files written and the
        sharded strategy's write result."""
        with file_size_limit_raises():
            return self._write()

    def _write(self) -> Tuple[Checksums, Any]:
        with DurableDir(self.checkpoint_dir) as target:
            checksums = {}
            if self.common is not None:
                checksums.update(self.common_strategy.save_common(self.common, target))
            if self.objects:
                checksums.update(self.common_strategy.save_sharded_objects(self.objects, target))
            shards = self.shards
            if self.staged is not None:
                tensors = iter(self.staged.tensors())
                shards = [replace(sh, data=next(tensors)) if isinstance(sh, ShardedTensor) else sh for sh in shards]
            sharded_checksums, result = self.sharded_strategy.save(self.plan, shards, target)
            checksums.update(sharded_checksums)
            target.sync()  # before any rank may report success
        return checksums, result

    def stage(self) -> "WriteJob":
        """A copy holding its own data: shard tensors in shared memory, the rest copied.

        Only main replicas are kept (the others are not written)."""
        written = [
            sh for sh in nested_values(self.shards)
            if isinstance(sh, (ShardedTensor, ShardedObject)) and is_main_replica(sh.replica_id)
        ]
        tensors = [sh.data for sh in written if isinstance(sh, ShardedTensor)]
        shards = [sh.without_data() if isinstance(sh, ShardedTensor) else _cpu_copy(sh) for sh in written]
        return replace(
            self,
            common=_cpu_copy(self.common),
            objects=[_cpu_copy(obj) for obj in self.objects],
            shards=shards,
            staged=SharedTensors.copy_of(tensors),
        )

    def release(self) -> None:
        """Returns the staging buffer for reuse (once the write is over)."""
        if self.staged is not None:
            _pool.release(self.staged.buffer)
            self.staged = None


def _cpu_copy(obj):
    obj = copy.deepcopy(obj)
    if isinstance(obj, (dict, list)):
        dict_list_map_inplace(lambda v: v.to("cpu") if isinstance(v, torch.Tensor) else v, obj)
    elif isinstance(obj, ShardedObject) and isinstance(obj.data, torch.Tensor):
        obj.data = obj.data.to("cpu")
    return obj


@dataclass
class SharedTensors:
    """Tensors laid out in one shared-memory byte buffer: (offset, dtype, shape) each."""

    buffer: torch.Tensor
    layout: List[Tuple[int, torch.dtype, Tuple[int, ...]]] = field(default_factory=list)

    @classmethod
    def copy_of(cls, tensors: List[torch.Tensor]) -> "SharedTensors":
        layout, end = [], 0
        for t in tensors:
            layout.append((end, t.dtype, tuple(t.shape)))
            end += -(-t.numel() * t.element_size() // ALIGNMENT) * ALIGNMENT
        staged = cls(_pool.acquire(end), layout)
        for view, t in zip(staged.tensors(), tensors):
            view.copy_(t.detach())  # device to host for CUDA tensors
        return staged

    def tensors(self) -> List[torch.Tensor]:
        views = []
        for offset, dtype, shape in self.layout:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            views.append(self.buffer[offset : offset + nbytes].view(dtype).view(shape))
        return views


class _BufferPool:
    """Shared-memory buffers kept between saves: a fresh buffer costs a page fault per 4 KiB
    on first touch, which is most of the staging time; a reused one is a plain copy."""

    def __init__(self):
        self.free: List[torch.Tensor] = []
        self.lock = Lock()

    def acquire(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            fitting = [b for b in self.free if b.numel() >= nbytes]
            if fitting:
                buffer = min(fitting, key=torch.Tensor.numel)
                self.free.remove(buffer)
                return buffer
            self.free.clear()  # all too small for this state: let them go
        return torch.empty(max(nbytes, 1), dtype=torch.uint8).share_memory_()

    def release(self, buffer: torch.Tensor) -> None:
        with self.lock:
            self.free.append(buffer)

    def clear(self) -> None:
        with self.lock:
            self.free.clear()


_pool = _BufferPool()


def release_staging_buffers() -> None:
    """Frees the shared-memory buffers kept for reuse by async saves."""
    _pool.clear()

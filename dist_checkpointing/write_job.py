"""Step 2 of a save: what one rank writes, run here (sync) or staged for a writer process (async).

A `WriteJob` holds everything the write needs: the strategies, this save's plan, and this rank's
common state, ShardedObjects and staged shards. `stage()` turns it into a copy that no longer refers to
the caller's memory, so the caller may change its tensors as soon as `save` returns:
- the tensors of the shards to write are copied into one shared-memory buffer, which travels to
  the writer process as a single file descriptor (its pages are shared, not pickled) and is
  reused by the next save of the same size (`reserve_staging_memory` allocates it ahead of the
  first save). From CUDA tensors the copies go to the buffer pinned (page-locked), all issued
  before one wait;
- everything else (common state, objects) is a deep copy on the CPU, small by design.
"""

import copy
import time
from dataclasses import dataclass, field, replace
from threading import Lock
from typing import Any, List, Optional, Tuple

import torch

from .dict_utils import dict_list_map_inplace, nested_values
from .fs import file_size_limit_raises
from .integrity import Checksums
from .mapping import ShardedObject, ShardedTensor, is_main_replica
from .storage import storage_of
from .strategies.base import PlannedSaveStrategy, SaveCommonStrategy, ShardedSavePlan

ALIGNMENT = 64  # bytes; every staged tensor starts at a multiple, so any dtype view is valid


@dataclass
class WriteJob:
    checkpoint_dir: str
    common_strategy: SaveCommonStrategy
    sharded_strategy: Optional[PlannedSaveStrategy]  # None: a strategy of Megatron-Core's interface writes the shards itself
    plan: ShardedSavePlan  # this save's, from `sharded_strategy.plan`
    common: Optional[dict]  # rank 0 writes `common.pt`; None elsewhere
    objects: list  # ShardedObjects written by the common strategy
    shards: Any  # what `sharded_strategy.stage` returned
    staged: Optional["SharedTensors"] = None  # the shards' tensors, when staged

    def run(self) -> "WriteOutcome":
        """Writes everything durably; returns what the commit needs to know of it."""
        with file_size_limit_raises():
            return self._write()

    def _write(self) -> "WriteOutcome":
        started = time.perf_counter()
        with storage_of(self.checkpoint_dir).target(self.checkpoint_dir) as target:
            checksums = {}
            if self.common is not None:
                checksums.update(self.common_strategy.save_common(self.common, target))
            if self.objects:
                checksums.update(self.common_strategy.save_sharded_objects(self.objects, target))
            shards = self.shards
            if self.staged is not None:
                tensors = iter(self.staged.tensors())
                shards = [replace(sh, data=next(tensors)) if isinstance(sh, ShardedTensor) else sh for sh in shards]
            result = None
            if self.sharded_strategy is not None:
                sharded_checksums, result = self.sharded_strategy.write(self.plan, shards, target)
                checksums.update(sharded_checksums)
            target.sync()  # before any rank may report success
        return WriteOutcome(checksums, result, target.files, target.nbytes, time.perf_counter() - started)

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


@dataclass(frozen=True)
class WriteOutcome:
    """What one rank's write step reports to the commit."""

    checksums: Checksums  # of the files written (integrity.py)
    result: Any  # the sharded strategy's write result, for its `finalize`
    files: int
    nbytes: int
    seconds: float  # from the first write until everything was durable


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
            end += staged_size(t.numel() * t.element_size())
        devices = {t.device for t in tensors if t.is_cuda}
        staged = cls(_pool.acquire(end, pinned=bool(devices)), layout)
        for view, t in zip(staged.tensors(), tensors):
            view.copy_(t.detach(), non_blocking=bool(devices))
        for device in devices:  # the copies from each GPU are done
            torch.cuda.synchronize(device)
        return staged

    def tensors(self) -> List[torch.Tensor]:
        views = []
        for offset, dtype, shape in self.layout:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            views.append(self.buffer[offset : offset + nbytes].view(dtype).view(shape))
        return views


def staged_size(nbytes: int) -> int:
    """The bytes a tensor of `nbytes` takes in the staging buffer."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class _BufferPool:
    """Shared-memory buffers kept between saves: a fresh buffer costs a page fault per 4 KiB
    on first touch, which is most of the staging time; a reused one is a plain copy."""

    def __init__(self):
        self.free: List[torch.Tensor] = []
        self.pinned = set()  # data pointers of buffers registered with CUDA
        self.lock = Lock()

    def acquire(self, nbytes: int, pinned: bool = False) -> torch.Tensor:
        with self.lock:
            fitting = [i for i, b in enumerate(self.free) if b.numel() >= nbytes]
            if fitting:  # the smallest that fits (by position: `list.remove` would compare tensors with ==)
                buffer = self.free.pop(min(fitting, key=lambda i: self.free[i].numel()))
            else:
                self._drop(self.free)  # all too small for this state: let them go
                buffer = _shared_buffer(nbytes)
            if pinned and buffer.data_ptr() not in self.pinned:
                # page-locked in place (a shared buffer cannot be allocated pinned), so that
                # device-to-host copies run at full speed and asynchronously
                torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
                self.pinned.add(buffer.data_ptr())
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        with self.lock:
            self.free.append(buffer)

    def reserve(self, nbytes: int) -> None:
        """Makes a faulted-in buffer of at least `nbytes` available for the next save."""
        with self.lock:
            if any(b.numel() >= nbytes for b in self.free):
                return
        self.release(self.acquire(nbytes))

    def clear(self) -> None:
        with self.lock:
            self._drop(self.free)

    def _drop(self, buffers: List[torch.Tensor]) -> None:
        for buffer in buffers:
            if buffer.data_ptr() in self.pinned:
                self.pinned.discard(buffer.data_ptr())
                torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        buffers.clear()


def _shared_buffer(nbytes: int) -> torch.Tensor:
    """A byte tensor in shared memory, allocated there directly (not copied in, as
    `share_memory_()` would) and faulted in now rather than during the copy."""
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
    buffer.zero_()
    return buffer


_pool = _BufferPool()


def reserve_staging_memory(nbytes: int) -> None:
    """Allocates (once) the shared memory that async saves staging `nbytes` on this rank use."""
    _pool.reserve(nbytes)


def release_staging_buffers() -> None:
    """Frees the shared-memory buffers kept for reuse by async saves."""
    _pool.clear()

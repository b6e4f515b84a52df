"""`CheckpointManager`: where each step's checkpoint goes, which is the newest complete one, how
many are kept, and when an async save is done (what Orbax's and torchtitan's managers do).

Layout: `<root>/iter_<step:07d>` per step (Megatron-LM's names) and Megatron-LM's tracker file
`<root>/latest_checkpointed_iteration.txt` (the newest committed step), so Megatron-LM's
training scripts find our checkpoints. A step counts only once its `metadata.json` exists.
Every method is called on every rank, like `save` and `load`; rank 0 alone deletes and writes
the tracker, and its failures raise on every rank.

With a `MemoryTier`, steps are also saved to node-local memory and replicated to other nodes
(memory_tier.py); `load` restores the newest step either tier can give.
"""

import logging
import os
import re
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional

from .collectives import broadcast_object, exchange, get_rank
from .core import CheckpointingException, check_is_distributed_checkpoint, is_count
from .layout import CONFIG_FNAME
from .memory_restore import holdings, restore
from .memory_tier import MemoryTier, NodeMemory
from .serialization import load, save
from .storage import storage_of
from .strategies.async_utils import AsyncCallsQueue, start_spare_writer

logger = logging.getLogger(__name__)

TRACKER_FNAME = "latest_checkpointed_iteration.txt"
_STEP_DIR = re.compile(r"iter_(\d{7,})")



def _complete(dirs: Dict[int, bool]) -> List[int]:
    return [step for step, complete in dirs.items() if complete]


def step_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


_PROMOTED = "memory tier pieces"  # where a promoted step's pieces sit in the state dict it saves


class _Signal:
    """Records that a signal arrived (the handler only sets a flag: a collective started from
    a handler could interleave with the training's own)."""

    def __init__(self, signum: int):
        self.signum, self.received = signum, False
        self.previous = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True
        logger.warning("Received signal %d: the next save promotes the newest memory step, then exits", signum)

    def restore(self) -> None:
        signal.signal(self.signum, self.previous)


class CheckpointManager:
    """Saves and loads the checkpoints of a training run under `root` (a directory or an
    `s3://` prefix).

    Args:
        root: where the checkpoints go (created by the first save)
        keep_latest: how many of the newest complete checkpoints retention keeps (>= 1)
        keep_every: also keep every step that is a multiple of it (None: none)
        sharded_strategy: as `save` takes it (default: zarr)
        async_save: `save` returns once the data is staged; the checkpoint commits (and
            retention runs) when the next `save`, `wait` or `close` finalizes it. A failed
            async save raises there, on every rank; its step may be saved again.
        persistent_every: save to `root` at the steps that are multiples of it
        memory: a MemoryTier: also save to node-local memory at its own steps, replicated
            to other nodes; `load` then restores from memory when it has the newest step
        promote_on_sigterm: (with a memory tier) when any rank receives SIGTERM, what
            schedulers send before they kill a job, the next `save` call (on every rank: they
            agree on it in one small exchange per call) promotes the newest memory step to
            `root` (`promote`) and raises SystemExit
    """

    def __init__(self, root, keep_latest: int = 2, keep_every: Optional[int] = None, sharded_strategy=None,
                 async_save: bool = False, persistent_every: int = 1, memory: Optional[MemoryTier] = None,
                 promote_on_sigterm: bool = False):
        for name, value in (("keep_latest", keep_latest), ("keep_every", keep_every), ("persistent_every", persistent_every)):
            if (value is not None or name != "keep_every") and not is_count(value, least=1):
                raise CheckpointingException(f"CheckpointManager: {name} must be an integer >= 1, got {value!r}")
        if memory is not None and not isinstance(memory, MemoryTier):
            raise CheckpointingException(f"CheckpointManager: memory must be a MemoryTier, got {type(memory).__name__}")
        if promote_on_sigterm and memory is None:
            raise CheckpointingException("CheckpointManager: promote_on_sigterm needs a memory tier (memory=MemoryTier(...))")
        self.root, self.storage = str(root).rstrip("/"), storage_of(root)
        if self.storage.is_file(self.root):
            raise CheckpointingException(f"CheckpointManager: {self.root} is a file; the root must be a directory")
        self.keep_latest, self.keep_every = keep_latest, keep_every
        self.sharded_strategy = sharded_strategy
        self.queue = AsyncCallsQueue(persistent=True) if async_save else None
        self.persistent_every = persistent_every
        self.loaded: Optional[int] = None  # the step last loaded: retention keeps it
        self.restored_from: Optional[str] = None  # "memory" or "persistent": where `load` found its step
        self.deleter: Optional[ThreadPoolExecutor] = None  # rank 0: retention's deletions
        self.deletions: List[Future] = []
        exchange(self._remove_leftovers if get_rank() == 0 else (lambda: None), f"opening checkpoints at {self.root}")
        self.memory = NodeMemory(memory) if memory is not None else None
        self.sigterm = _Signal(signal.SIGTERM) if promote_on_sigterm else None

    def path(self, step: int) -> str:
        return os.path.join(self.root, step_dir_name(step))

    def _step_dirs(self) -> Dict[int, bool]:
        """step -> complete, for every `iter_*` entry below the root."""
        if not self.storage.is_dir(self.root):
            return {}
        found = {}
        for name in self.storage.entries(self.root):
            match = _STEP_DIR.fullmatch(name)
            if match:
                found[int(match.group(1))] = check_is_distributed_checkpoint(os.path.join(self.root, name))
        return dict(sorted(found.items()))

    def steps(self) -> List[int]:
        """Every complete step, ascending."""
        return _complete(self._step_dirs())

    def latest_step(self) -> Optional[int]:
        """The newest complete step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, sharded_state_dict) -> None:
        """Saves `sharded_state_dict` as step `step` (newer than every saved step): to memory
        when `step` is a multiple of the memory tier's `every`, to `root` when it is one of
        `persistent_every`, to both or neither."""
        if not is_count(step, least=0):
            raise CheckpointingException(f"CheckpointManager.save: step must be an integer >= 0, got {step!r}")
        self._start_writer()
        if self.memory is not None and step % self.memory.tier.every == 0:
            self.memory.save(step, sharded_state_dict)
        if self.sigterm is not None and any(exchange(lambda: self.sigterm.received, "checking for SIGTERM")):
            promoted = self.promote()
            self.close()
            raise SystemExit(f"SIGTERM: step {promoted} is on {self.root}" if promoted is not None else "SIGTERM")
        if step % self.persistent_every:
            return
        # One async save in flight at a time (as Orbax's and torchtitan's managers do): the
        # previous one commits first, so its retention has run and its staging memory is free.
        self.wait()
        exchange(lambda: self._claim(step) if get_rank() == 0 else None, f"saving step {step} at {self.root}")
        if self.queue is None:
            save(sharded_state_dict, self.path(step), self.sharded_strategy)
            self._committed(step)
            return
        request = save(sharded_state_dict, self.path(step), self.sharded_strategy, async_sharded_save=True)
        request.add_finalize_fn(lambda: self._committed(step))
        self.queue.schedule_async_request(request)

    def load(self, sharded_state_dict, step: Optional[int] = None, **kwargs):
        """Loads step `step` (default: the newest one restorable from either tier, from memory
        where both have it); `kwargs` as `load` takes them (for the persistent tier).
        `restored_from` says which tier it came from."""
        if step is None and self.memory is not None:
            restored = restore(self.memory, sharded_state_dict, not_older_than=self.latest_step())
            if restored is not None:
                self.loaded, self.restored_from = restored[0], "memory"
                self._start_writer()
                return restored[1]
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointingException(f"No complete checkpoint under {self.root} to load")
        self.loaded, self.restored_from = step, "persistent"
        if self.memory is not None:
            logger.info("Loading step %d from the persistent tier (%s)", step, self.path(step))
        state = load(sharded_state_dict, self.path(step), **kwargs)
        self._start_writer()
        return state

    def _start_writer(self) -> None:
        """With async saves: the writer process boots while the job trains, after the load (a
        restore is the critical path after a failure; the boot would compete with it for the
        CPUs), so that no save waits for an interpreter to start."""
        if self.queue is not None and self.queue.writer is None:
            start_spare_writer()

    def promote(self) -> Optional[int]:
        """Saves the newest memory step to `root` (synchronously, collective), unless the
        persistent tier has it or a newer one; returns the step now newest there (None if
        none). Each rank saves its own pieces, read back from its node's memory: only the
        layout that saved them can (after a restore at another layout, until the next memory
        save, there is nothing to promote)."""
        self.wait()
        self.memory.wait()
        latest = self.latest_step()
        candidates = [s for s in self.memory_steps() if latest is None or s > latest]
        if not candidates:
            return latest
        step = candidates[-1]
        own = self.memory.own_pieces(step)
        if not all(exchange(lambda: own is not None, f"reading memory step {step} to promote it")):
            logger.warning("Memory step %d cannot be promoted: not every rank holds its own pieces (saved at another layout?)", step)
            return latest
        pieces, common = own
        state = dict(broadcast_object(common, f"the common state of memory step {step}"))
        state[_PROMOTED] = pieces
        exchange(lambda: self._claim(step) if get_rank() == 0 else None, f"saving step {step} at {self.root}")
        save(state, self.path(step), self.sharded_strategy)
        self._committed(step)
        logger.info("Promoted memory step %d to %s", step, self.path(step))
        return step

    def memory_steps(self) -> List[int]:
        """The memory steps that can be restored: every piece held by a live node (collective)."""
        if self.memory is None:
            return []
        self.memory.wait()
        return sorted({step for step, _ in holdings(self.memory).restorable()})

    def wait(self) -> None:
        """Commits every pending async save (collective; raises on every rank if one failed)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        """Commits every pending async save and finishes the deletions retention started
        (collective)."""
        try:
            self.wait()
        finally:
            if self.queue is not None:
                self.queue.close(abort=True)
                self.queue = None
            if self.memory is not None:
                self.memory.close()
                self.memory = None
            if self.sigterm is not None:
                self.sigterm.restore()
                self.sigterm = None
        exchange(self._finish_deletions, f"deleting old checkpoints under {self.root}")

    def _committed(self, step: int) -> None:
        """After step `step` committed (every rank): rank 0 writes the tracker, then starts
        deleting what retention does not keep."""
        exchange(lambda: self._track_and_retain(step) if get_rank() == 0 else None, f"retention after step {step} at {self.root}")

    def _track_and_retain(self, step: int) -> None:
        self._raise_failed_deletion()
        tracker = os.path.join(self.root, TRACKER_FNAME)
        self.storage.write_atomic(tracker, f"{step}\n".encode())
        complete = self.steps()
        kept = set(complete[-self.keep_latest :]) | {step}
        if self.keep_every:
            kept |= {s for s in complete if s % self.keep_every == 0}
        if self.loaded is not None:
            kept.add(self.loaded)
        for old in (s for s in complete if s not in kept):
            self._remove(old)
            logger.info("Removed checkpoint %s (retention: keep_latest=%s, keep_every=%s)", self.path(old), self.keep_latest, self.keep_every)

    def _remove(self, step: int) -> None:
        """Deletes a checkpoint, its commit marker first: a crash part-way leaves an incomplete
        directory (removed by the next manager), never a damaged complete one. The files go in
        the background (thousands of them: seconds that training would wait for)."""
        path = self.path(step)
        self.storage.remove(os.path.join(path, CONFIG_FNAME))
        if self.deleter is None:
            self.deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist-ckpt-retention")
        self.deletions.append(self.deleter.submit(self.storage.remove_tree, path))

    def _raise_failed_deletion(self) -> None:
        """The first error of a finished background deletion (the next retention or `close`
        raises it on every rank: a run must not fill its storage unnoticed)."""
        for future in [f for f in self.deletions if f.done()]:
            self.deletions.remove(future)
            future.result()

    def _finish_deletions(self) -> None:
        if self.deleter is not None:
            self.deleter.shutdown(wait=True)
            self.deleter = None
        self._raise_failed_deletion()

    def _claim(self, step: int) -> None:
        """Rank 0, before step `step` is saved: refuses a step that is not newer than every
        saved one, and removes what a crashed save of this very step left (its files, perhaps
        of another layout, must not mix with the new save's)."""
        dirs = self._step_dirs()
        complete = _complete(dirs)
        if step in complete:
            raise CheckpointingException(f"Step {step} is already saved at {self.path(step)}; a checkpoint is never overwritten")
        if complete and step < complete[-1]:
            raise CheckpointingException(
                f"Step {step} is older than step {complete[-1]}, already saved under {self.root}; steps must increase"
            )
        if step in dirs:
            self.storage.remove_tree(self.path(step))
            logger.warning("Removed %s before saving step %d again: an incomplete checkpoint (a save that did not finish)",
                           self.path(step), step)

    def _remove_leftovers(self) -> None:
        """Incomplete step directories older than the newest complete one: crashed saves."""
        dirs = self._step_dirs()
        complete = _complete(dirs)
        for step, done in dirs.items():
            if not done and complete and step < complete[-1]:
                self.storage.remove_tree(self.path(step))
                logger.warning("Removed %s: an incomplete checkpoint (a save or a deletion that did not finish) older than step %d",
                               self.path(step), complete[-1])

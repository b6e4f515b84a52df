"""Async save: `AsyncRequest` and `AsyncCallsQueue` (Megatron-Core's names and semantics).

    request = save(state, dir, async_sharded_save=True)   # returns once the data is staged
    queue.schedule_async_request(request)                  # the write starts in the background
    ...training...
    queue.maybe_finalize_async_calls(blocking=False)       # every rank, e.g. once per step

The write runs in a writer process per rank (spawned, not forked: a fork would inherit the
engines' I/O threads in an undefined state; not a thread: the GIL would stall training). It
receives the staged data as shared memory (write_job.py). Finalizing is collective: once every
rank's writer is done, every rank's success or error travels in one exchange, so a failed or
dead writer on any rank raises the same `CheckpointingException` everywhere; then the results
are gathered to rank 0 (which commits; no other rank needs them), and only then do the
finalize functions run (the save's commit, which writes `metadata.json`, is the first).
"""

import ctypes
import functools
import importlib
import os
import platform
import queue
import signal
import sys
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import torch.multiprocessing as mp

from ..collectives import describe_error, exchange, gather
from ..core import CheckpointingException

_POLL_S = 0.05


class AsyncRequest:
    """A function to run in the background, and what to do once it is done on every rank.

    Args:
        async_fn: runs in the writer process (None: nothing to run)
        async_fn_args, async_fn_kwargs: its arguments (pickled to the writer)
        preload_fn: called in this process when the request is scheduled (or executed); what
            it returns replaces `async_fn_args[1]` (Megatron-Core's convention: the state,
            staged to host memory)
        finalize_fns: called with no arguments, in order, on every rank, after `async_fn`
            finished on every rank; they can read `results`: on rank 0 every rank's return
            value of `async_fn` (in rank order), elsewhere None
        what: what the call does, for error messages (e.g. "async save to DIR")
        consequence: what a failure means, appended to its error (e.g. "nothing was committed")

    `committed` is a Future resolved when the request was finalized on this rank: with
    `results` once every finalize function ran (for a save: `metadata.json` is written, the
    checkpoint is complete), or with the exception finalizing raised. (A save hands its request
    over once its data is staged: the caller may change its tensors as soon as `save` returns.)
    """

    def __init__(
        self,
        async_fn: Optional[Callable],
        async_fn_args: Tuple,
        finalize_fns: List[Callable],
        async_fn_kwargs: Optional[Dict] = None,
        preload_fn: Optional[Callable] = None,
        is_frozen: bool = False,
        call_idx: int = 0,
        what: str = "",
        consequence: str = "",
    ):
        self.async_fn = async_fn
        self.async_fn_args = tuple(async_fn_args or ())
        self.preload_fn = preload_fn
        self.finalize_fns = list(finalize_fns)
        self.async_fn_kwargs = dict(async_fn_kwargs or {})
        self.is_frozen = is_frozen
        self.call_idx = call_idx
        self.what, self.consequence = what, consequence
        self.results: Optional[List[Any]] = None
        self.committed: Future = Future()

    def add_finalize_fn(self, fn: Callable) -> None:
        """Adds `fn`, to be called after the existing finalize functions."""
        if self.is_frozen:
            raise RuntimeError("Cannot add finalization functions to a frozen AsyncRequest")
        self.finalize_fns.append(fn)

    def freeze(self) -> "AsyncRequest":
        """Forbids adding finalize functions (done when the request is scheduled)."""
        self.is_frozen = True
        return self

    def preload(self) -> None:
        """Runs `preload_fn` (once), putting what it returns in place of `async_fn_args[1]`."""
        if self.preload_fn is not None:
            args = list(self.async_fn_args)
            args[1] = self.preload_fn()
            self.async_fn_args, self.preload_fn = tuple(args), None

    def execute_sync(self) -> None:
        """Runs the request in this process: `async_fn`, then the finalize functions."""
        try:
            self.preload()
            outcome = (True, self.async_fn(*self.async_fn_args, **self.async_fn_kwargs) if self.async_fn else None)
        except Exception as e:  # raised on every rank by finalize
            outcome = (False, describe_error(e))
        self.finalize(outcome)

    def finalize(self, outcome: Tuple[bool, Any]) -> None:
        """Collective: exchanges every rank's success or error and raises everywhere if any
        rank failed; else gathers the results to rank 0 (`results`) and calls the finalize
        functions."""
        ok, value = outcome

        def succeeded():
            if not ok:
                raise CheckpointingException(value)

        what = f"async call {self.call_idx}" + (f" ({self.what})" if self.what else "")
        try:
            exchange(succeeded, what, consequence=self.consequence)
            self.results = gather(lambda: value, what, consequence=self.consequence)()
            for fn in self.finalize_fns:
                fn()
        except BaseException as e:
            self.committed.set_exception(e)
            raise
        self.committed.set_result(self.results)


class AsyncCallsQueue:
    """The async requests of this rank, run one after another by a writer process.

    Args:
        persistent: keep the writer process between calls (recommended: starting one costs a
            Python interpreter and the torch import); otherwise it is stopped whenever no call
            is pending
    """

    def __init__(self, persistent: bool = False):
        self.persistent = persistent  # if not, a spare writer is started for the next call (`start_spare_writer`)
        self.calls: Deque[AsyncRequest] = deque()
        self.call_idx = -1
        self.writer: Optional[_Writer] = None

    def schedule_async_request(self, async_request: AsyncRequest) -> int:
        """Starts `async_request` in the background (call on every rank); returns its index."""
        self.call_idx += 1
        async_request.freeze()
        async_request.call_idx = self.call_idx
        async_request.preload()
        if self.writer is None or (not self.calls and not self.writer.process.is_alive()):
            self.writer = _take_writer()  # (a dead writer with calls unfinalized is how they learn they failed)
        self.writer.submit(async_request)
        self.calls.append(async_request)
        return self.call_idx

    def maybe_finalize_async_calls(self, blocking: bool = False, no_dist: bool = False) -> List[int]:
        """Finalizes the calls that are done on every rank, oldest first (call on every rank).

        Args:
            blocking: wait until every scheduled call is done
            no_dist: decide from this rank's writer alone whether a call is done, without
                asking the other ranks (finalizing is still collective)

        Returns the indices of the finalized calls. Raises `CheckpointingException` on every
        rank if a writer failed or died on any rank.
        """
        finalized = []
        try:
            while self.calls:
                request = self.calls[0]
                done = self.writer.poll(request.call_idx, blocking)
                if not no_dist:
                    done = all(exchange(functools.partial(bool, done), "async save status"))
                if not done:
                    break
                self.calls.popleft()
                request.finalize(self.writer.outcomes.pop(request.call_idx))
                finalized.append(request.call_idx)
        finally:
            if not self.persistent and not self.calls:
                self._stop_writer(wait=False)  # an interpreter with torch takes ~0.5 s to exit
                start_spare_writer()  # the next call need not wait for an interpreter and the torch import
        return finalized

    def get_num_unfinalized_calls(self) -> int:
        return len(self.calls)

    def close(self, abort: bool = False) -> None:
        """Finalizes every call (unless `abort`), then stops the writer process."""
        try:
            if not abort:
                self.maybe_finalize_async_calls(blocking=True)
        finally:
            self.calls.clear()
            self._stop_writer()

    def _stop_writer(self, wait: bool = True) -> None:
        if self.writer is not None:
            self.writer.stop(wait)
            self.writer = None


_spare: Optional["_Writer"] = None  # a writer started ahead, idle until a queue takes it


def start_spare_writer() -> None:
    """Starts a writer process ahead of the next async save (none if one is ready): the queue
    that schedules it takes this one, so no save waits for a new interpreter to import torch
    (seconds) before writing. `prepare_async_save` calls it, and a non-persistent queue after
    stopping its writer. The spare inherits this process's state (limits, environment) as of
    now; it exits with this process."""
    global _spare
    if _spare is None or not _spare.process.is_alive():
        _spare = _Writer(warm_up=True)


def _take_writer() -> "_Writer":
    """The spare writer if it is alive, else a new one."""
    global _spare
    writer, _spare = _spare, None
    return writer if writer is not None and writer.process.is_alive() else _Writer()


class _Writer:
    """A spawned process that runs the submitted calls in order and reports each outcome."""

    def __init__(self, warm_up: bool = False):
        """`warm_up`: a writer started ahead of its first call imports the engines meanwhile."""
        context = mp.get_context("spawn")
        self.jobs, self.results = context.Queue(), context.Queue()
        self.outcomes: Dict[int, Tuple[bool, Any]] = {}
        self.process = context.Process(
            target=_writer_loop, args=(self.jobs, self.results, os.getpid(), warm_up), daemon=True, name="dist-ckpt-writer"
        )
        self.process.start()

    def submit(self, request: AsyncRequest) -> None:
        self.jobs.put((request.call_idx, request.async_fn, request.async_fn_args, request.async_fn_kwargs))

    def poll(self, call_idx: int, blocking: bool) -> bool:
        """Whether the outcome of `call_idx` is known (waits for it if `blocking`)."""
        while call_idx not in self.outcomes:
            try:
                done_idx, ok, value = self.results.get(timeout=_POLL_S) if blocking else self.results.get_nowait()
            except queue.Empty:
                if self.process.is_alive():
                    if not blocking:
                        return False
                    continue
                try:  # it may have reported just before exiting
                    done_idx, ok, value = self.results.get(timeout=_POLL_S)
                except queue.Empty:
                    self.outcomes[call_idx] = (
                        False,
                        f"the async checkpoint writer process died (exit code {self.process.exitcode}) "
                        f"before finishing call {call_idx}; the checkpoint was not committed",
                    )
                    return True
            self.outcomes[done_idx] = (ok, value)
        return True

    def stop(self, wait: bool = True) -> None:
        """Asks the writer to exit; unless `wait`, returns at once (the process exits on its
        own, a daemon reaped by multiprocessing when the next process starts)."""
        if self.process.is_alive():
            self.jobs.put(None)
            if not wait:
                return
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


WRITER_NICENESS = 10
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}  # Linux syscall numbers
_IOPRIO_BEST_EFFORT_LOWEST = (2 << 13) | 7  # IOPRIO_PRIO_VALUE(IOPRIO_CLASS_BE, 7)


def lower_priority() -> None:
    """The calling process yields the CPU and the disk to the training processes: niceness
    +10, and on Linux the lowest best-effort I/O priority (where the scheduler honours it).
    Best effort: a platform without these keeps the default priorities."""
    try:
        os.nice(WRITER_NICENESS)
    except OSError:
        pass
    number = _IOPRIO_SET.get(platform.machine()) if sys.platform.startswith("linux") else None
    if number is not None:
        ctypes.CDLL(None, use_errno=True).syscall(number, 1, 0, _IOPRIO_BEST_EFFORT_LOWEST)  # this process


def _writer_loop(jobs, results, parent_pid: int, warm_up: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the training process
    lower_priority()
    if warm_up:  # idle until its first call: import now what unpickling the call would (the
        # engines' saving code, ~1 s); a writer started for a waiting call imports only its own
        for module in ("..write_job", ".dcp_save", ".zarr"):
            importlib.import_module(module, __package__)
    while True:
        try:
            job = jobs.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:  # the training process is gone
                return
            continue
        except Exception:  # e.g. a job cut off by the training process's death: nobody waits for it
            if os.getppid() != parent_pid:
                return
            raise
        if job is None:
            return
        call_idx, fn, args, kwargs = job
        try:
            results.put((call_idx, True, fn(*args, **kwargs) if fn else None))
        except Exception as e:
            results.put((call_idx, False, describe_error(e)))
        del job, fn, args, kwargs  # drop the staged data before waiting for the next call

"""Runs a function on N real ranks: spawned processes, gloo on 127.0.0.1, a free port, a timeout.

The parent owns the rendezvous store (bound to port 0, so the port is free by construction).
Each rank reports its return value or its traceback; a rank that dies without reporting (e.g.
killed by a signal) or hangs past the timeout fails the test instead of blocking the suite.
"""

import os
import queue
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120
COLLECTIVE_TIMEOUT_S = 60


class RankFailed(AssertionError):
    pass


def _worker(rank, world_size, port, fn, args, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # The ranks share the CPUs: more threads than cores stall every collective on a busy peer.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        store = dist.TCPStore(
            "127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=30)
        )
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT_S):
    """Calls `fn(rank, world_size, *args)` on `world_size` ranks; returns results by rank.

    Raises RankFailed with every failing rank's traceback, or on timeout.
    """
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    results = ctx.Queue()
    procs = [
        # not daemonic: a rank may start its own async checkpoint writer process
        ctx.Process(target=_worker, args=(r, world_size, store.port, fn, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcome = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
                outcome[rank] = (ok, value)
                continue
            except queue.Empty:
                pass
            for rank, p in enumerate(procs):
                if rank not in outcome and p.exitcode is not None and results.empty():
                    outcome[rank] = (False, f"died without reporting (exit code {p.exitcode})")
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise RankFailed(f"ranks {missing} did not finish within {timeout}s (hang?)")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(outcome.items()) if not ok]
    if failures:
        raise RankFailed("\n".join(failures))
    return [outcome[r][1] for r in range(world_size)]

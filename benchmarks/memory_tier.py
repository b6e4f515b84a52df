"""The memory tier on the gpt workload (534 MB, TP=2 on 2 ranks, each rank its own "node"
with its own directory under /dev/shm, replicas=1): what a memory save costs training, how
fast it writes, and how fast a lost node's state comes back.

Per run, in alternating order:
- a memory save through `CheckpointManager` (memory every step, no persistent save): the
  training stall (what `save` blocks, the slower rank's), the time to this rank's piece file
  committed in node memory (write throughput = its bytes / (stall + commit)), and to every
  piece replicated and agreed;
- a persistent sync save of the same state (zarr, local disk): what the stall is compared to.
Then recovery, alternating: node 1's directory is deleted (a lost node) and the job restores
from peer memory (rank 1's pieces come from node 0's replica); against a load of the same step
from the persistent tier on local disk (warm page cache) and on S3 (moto's server on
127.0.0.1, as object_storage.py uses it: its Python shares the 2 cores).
Round 0 is a warm-up (first-touch files, imports, connections); the table gives medians of
the others. Each rank runs one thread (the 2 ranks share the 2 cores).

    .venv/bin/python benchmarks/memory_tier.py [--runs 3] [--json]
"""

import argparse
import os
import shutil
import statistics
import sys
import time

import torch.distributed as dist
from harness import moto_s3, report, run_on_ranks, scratch_dir
from loads import TP, WORKLOADS
from workload import gpt_state


def _gathered_max(value: float) -> float:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return max(values)


def measure(rank, world, work, shm, url, runs):
    import dist_checkpointing as dc
    from dist_checkpointing import CheckpointManager, MemoryTier
    from dist_checkpointing.storage import storage_of

    state = gpt_state(rank, TP, 0, **WORKLOADS["gpt"])
    request = gpt_state(rank, TP, 0, with_data=False, **WORKLOADS["gpt"])
    node = lambda r: os.path.join(shm, f"node{r}")  # noqa: E731
    tier = MemoryTier(node(rank), every=1, replicas=1, keep=1, ranks_per_node=1)
    manager = CheckpointManager(os.path.join(work, "managed"), persistent_every=10**9, memory=tier)
    saves = {"memory": [], "persistent": []}
    for run in range(runs + 1):
        for kind in ("memory", "persistent") if run % 2 == 0 else ("persistent", "memory"):
            dist.barrier()
            start = time.perf_counter()
            if kind == "memory":
                manager.save(run + 1, state)
                stall = time.perf_counter() - start
                manager.memory.wait()
                timings = dict(manager.memory.timings)
                saves[kind].append((_gathered_max(stall), _gathered_max(time.perf_counter() - start),
                                    _gathered_max(timings["stage"] + timings["commit"]), timings["bytes"]))
            else:
                dc.save(state, os.path.join(work, f"persistent-{run}"))
                saves[kind].append((_gathered_max(time.perf_counter() - start),))
    last = runs + 1
    manager.close()
    dc.save(state, os.path.join(work, "recover"))
    dc.save(state, f"{url}/recover")
    dist.barrier()
    restores = {"memory": [], "local disk": [], "s3": []}
    for run in range(runs + 1):
        order = list(restores) if run % 2 == 0 else list(restores)[::-1]
        for kind in order:
            dist.barrier()
            if kind == "memory":
                if rank == 1:  # node 1 lost: its directory is gone; its pieces live on in node 0's replica
                    shutil.rmtree(node(1))
                dist.barrier()
                restored = CheckpointManager(os.path.join(work, "managed"), memory=tier)
                start = time.perf_counter()
                restored.load(request)
                seconds = time.perf_counter() - start
                assert restored.restored_from == "memory" and restored.loaded == last, (restored.restored_from, restored.loaded)
                restored.close()
            else:
                start = time.perf_counter()
                dc.load(request, os.path.join(work, "recover") if kind == "local disk" else f"{url}/recover")
                seconds = time.perf_counter() - start
            restores[kind].append(_gathered_max(seconds))
            if kind == "memory":  # node 1 comes back with its pieces (copied from node 0's replica)
                if rank == 1:
                    _copy_back(node(0), node(1), last)
                dist.barrier()
    if rank == 0:
        storage_of(url).remove_tree(f"{url}/recover")
    return saves, restores


def _copy_back(source: str, target: str, step: int) -> None:
    """Node 1's own piece file of `step` again (a node that came back), from node 0's replica."""
    from dist_checkpointing.memory_format import piece_paths

    os.makedirs(os.path.dirname(piece_paths(target, step, 1)[0]), exist_ok=True)
    for src, dst in zip(piece_paths(source, step, 1), piece_paths(target, step, 1)):
        shutil.copyfile(src, dst)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shm = f"/dev/shm/dist_ckpt_bench_{os.getpid()}"
    try:
        with moto_s3(), scratch_dir() as work:
            saves, restores = run_on_ranks(measure, TP, work, shm, "s3://bench/memory", args.runs)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    memory, persistent = saves["memory"][1:], saves["persistent"][1:]
    mb = memory[0][3] / 1e6
    rows = [
        {"measure": "memory save: training stall s", "value": round(statistics.median(m[0] for m in memory), 4)},
        {"measure": "persistent sync save (zarr, local disk) s", "value": round(statistics.median(p[0] for p in persistent), 3)},
        {"measure": "stall / persistent sync save (same run)", "value": f"{statistics.median(m[0] / p[0] for m, p in zip(memory, persistent)):.1%}"},
        {"measure": f"memory write per rank ({mb:.0f} MB): GB/s", "value": round(statistics.median(m[3] / m[2] for m in memory) / 1e9, 2)},
        {"measure": "memory save to replicated everywhere s", "value": round(statistics.median(m[1] for m in memory), 3)},
    ]
    memory_restores = restores["memory"][1:]
    for kind in ("memory", "local disk", "s3"):
        times = restores[kind][1:]
        source = "peer memory" if kind == "memory" else f"persistent, {kind}"
        row = {"measure": f"recovery from {source} s", "value": round(statistics.median(times), 3)}
        rows.append(row)
        if kind != "memory":
            ratio = statistics.median(t / m for t, m in zip(times, memory_restores))
            rows.append({"measure": f"  {kind} / peer memory (same run)", "value": f"{ratio:.2f}x"})
    report(f"memory tier, gpt ({2 * mb:.0f} MB) at TP=2 on 2 nodes of 1 rank (medians of {args.runs} alternating runs)", {}, rows, args.json)


if __name__ == "__main__":
    sys.exit(main())

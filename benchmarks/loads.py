"""Resume-style loads side by side: our engines, Megatron-Core 0.16.1's torch_dist and a raw read.

Two workloads (workload.py), each saved at TP=2 by 2 gloo ranks and loaded at TP=1 in one fresh
process per measurement, into a request whose tensors are allocated and resident (what a
training loop holds when it resumes), warm page cache:
- gpt: hidden 2048, 4 layers, vocab 32000, bf16 (534 MB);
- small: hidden 64, 400 layers with a layer norm each, vocab 32000 (2001 tensors, 40 MB).
- many: hidden 32, 4000 layers with a layer norm each, vocab 32000 (20,001 tensors, 100 MB).

Loaders: `raw` reads both ranks' files of the raw saver (each rank's bytes written to one file)
into preallocated memory; our zarr, tensorstore and torch_dist engines; `megatron` is
Megatron-Core's `dist_checkpointing.load` of a checkpoint Megatron-Core saved (its default
torch_dist strategy). Loaders alternate within each run. Per loader, medians over runs: load
seconds; the process's RSS before the load, its peak during it and what the load added; and
the import of the library (`import dist_checkpointing`, measured in a fresh interpreter
that has imported torch, as the workload has; `megatron.core.dist_checkpointing` in the
loading process) and the first load of a fresh process with that import (what a resume pays).
The load is timed as the first of its process, so whatever it imports counts.

Needs Megatron-Core 0.16.1: run in the benchmark environment (`make bench-env`):

    .venv-bench/bin/python benchmarks/loads.py [--runs 3] [--workloads gpt,small] [--json]
"""

import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from harness import in_fresh_process, parse_side_by_side, report, run_on_ranks, scratch_dir
from workload import ENGINES, gpt_state

TP = 2
WORKLOADS = {
    "gpt": dict(hidden=2048, vocab=32000, layers=4),
    "small": dict(hidden=64, vocab=32000, layers=400, norms=True),
    "many": dict(hidden=32, vocab=32000, layers=4000, norms=True),
}
LOADERS = ["raw", *ENGINES, "megatron"]


def patch_megatron_for_cpu():
    """Megatron-Core's save calls torch.cuda and a GPU memory probe; on a CPU-only machine
    these stand in (its load runs unpatched)."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._process_memory = lambda: 0


def _tp_axes(sh):
    """The axes along which a shard is split over TP (none for a replicated one)."""
    return [a for a, (n, g) in enumerate(zip(sh.local_shape, sh.global_shape)) if n != g]


def save_on_rank(rank, world, work, model):
    import dist_checkpointing as dc

    state = gpt_state(rank, TP, 0, **model)
    for engine in ENGINES:
        dc.save(state, os.path.join(work, engine), engine)
    path = os.path.join(work, "raw")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f"rank{rank}.bin"), "wb") as f:
        for sh in state.values():
            f.write(sh.data.view(torch.uint8).numpy().data)
        os.fsync(f.fileno())
    patch_megatron_for_cpu()
    from megatron.core import dist_checkpointing as mdc

    mstate = {}
    for key, sh in state.items():
        axes = _tp_axes(sh)
        split = [(axes[0], rank, TP)] if axes else []
        mstate[key] = mdc.ShardedTensor.from_rank_offsets(key, sh.data, *split, replica_id=0 if axes else rank)
    os.makedirs(os.path.join(work, "megatron"), exist_ok=True)
    dist.barrier()
    mdc.save(mstate, os.path.join(work, "megatron"))


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _our_import_seconds() -> float:
    """`import dist_checkpointing` in a fresh interpreter that has imported torch (this process
    imported the library with the workload)."""
    code = "import time, torch; t = time.perf_counter(); import dist_checkpointing; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout)


def load_once(loader, path, model, results):
    """In a fresh process: the library's import, the first load, and a second identical load."""
    request = gpt_state(0, 1, 0, with_data=False, **model)
    for sh in request.values():
        sh.data.fill_(0)  # resident, as a training process's parameters are
    requested = sum(sh.nbytes for sh in request.values())
    start = time.perf_counter()
    if loader == "megatron":
        from megatron.core import dist_checkpointing as lib

        imported = time.perf_counter() - start
        dist.init_process_group("gloo", init_method=f"file://{path}.store", rank=0, world_size=1)
        request = {
            key: lib.ShardedTensor.from_rank_offsets(key, sh.data, replica_id=0) for key, sh in request.items()
        }
    else:
        import dist_checkpointing as lib
    if loader == "raw":
        buffer = memoryview(bytearray(requested))  # preallocated and resident, like the request
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the high-water mark (VmHWM)
    baseline = _rss("VmRSS")
    times = []
    for _ in range(2):
        start = time.perf_counter()
        if loader == "raw":
            done = 0
            for name in sorted(os.listdir(path)):
                with open(os.path.join(path, name), "rb", buffering=0) as f:
                    done += f.readinto(buffer[done:])
        else:
            lib.load(request, path)
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = _rss("VmHWM")
    if loader != "megatron":
        imported = _our_import_seconds() if loader in ENGINES else 0.0
    results.put({"load_s": times[0], "second_s": times[1], "import_s": imported,
                 "baseline": baseline, "peak": peak, "requested": requested})


def main():
    args = parse_side_by_side(__doc__, WORKLOADS, "loaders", LOADERS)
    loaders = args.loaders
    rows = []
    for workload in args.workloads:
        model = WORKLOADS[workload]
        measured = {loader: [] for loader in loaders}
        with scratch_dir() as work:
            run_on_ranks(save_on_rank, TP, work, model)
            for run in range(args.runs):
                order = loaders if run % 2 == 0 else loaders[::-1]
                for loader in order:
                    measured[loader].append(in_fresh_process(load_once, loader, os.path.join(work, loader), model))
        rows.extend(_rows(workload, measured))
    report(f"TP=2 -> TP=1 loads into held tensors ({args.runs} runs, medians)", {}, rows, args.json)


def _rows(workload, measured):
    median = {loader: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for loader, runs in measured.items()}
    raw, megatron = median.get("raw"), median.get("megatron")
    rows = []
    for loader, m in median.items():
        added = m["peak"] - m["baseline"]
        rows.append({
            "workload": workload, "loader": loader, "load s": round(m["load_s"], 3),
            "x raw": raw and round(raw["load_s"] / m["load_s"], 2),
            "speedup over Megatron": megatron and round(megatron["load_s"] / m["load_s"], 2),
            "RSS before MB": round(m["baseline"] / 1e6), "peak RSS MB": round(m["peak"] / 1e6),
            "added MB": round(added / 1e6), "bound MB": round((100e6 + 0.1 * m["requested"]) / 1e6),
            "import s": round(m["import_s"], 3) if loader != "raw" else None,
            "first load with import s": round(m["import_s"] + m["load_s"], 3) if loader != "raw" else None,
            "with import, speedup over Megatron": round((megatron["import_s"] + megatron["load_s"]) / (m["import_s"] + m["load_s"]), 2)
            if megatron and loader != "raw" else None,
        })
    return rows


if __name__ == "__main__":
    sys.exit(main())

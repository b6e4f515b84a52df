"""Our engines against what users would otherwise use, and against the disk, in one run.

Workload (workload.py): a GPT-like bf16 state (optionally with fp32 Adam state), saved by 2 ranks
at TP=2 (gloo, CPU) and loaded resharded at TP=1 in one fresh process per measurement (so its
peak RSS is the load's own), with the page cache warm (the files were just written).

Savers: raw (each rank writes its bytes to one file, fsync: the physical limit of a durable
save), our zarr / tensorstore / torch_dist engines, sync and async (blocking = until `save`
returned and the request was scheduled; total = until finalized; the staging buffer is warm,
as in a training process after its first async save, whose blocking time is `first-async`), torch.save per rank (+fsync),
torch.distributed.checkpoint with DTensors and FileSystemWriter, and Megatron-Core 0.15's
torch_dist. Megatron-Core calls torch.cuda while saving, so on this CPU-only machine its save
runs with three patches (torch.cuda.current_device, torch.cuda.synchronize, its psutil memory
probe, plus numpy's removed np.product); its load runs unpatched.

Loaders (TP=1, whole tensors): raw read of both ranks' files, our engines, torch.load of both
rank files plus torch.cat (what resharding means without a library), DCP's load into full
tensors, Megatron-Core's load. Each run saves and loads everything once, then deletes its files;
medians over runs are reported.

    python benchmarks/compare.py [--mb 1024] [--runs 3] [--adam] [--json]
"""

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from harness import dir_stats, in_fresh_process, report, run_on_ranks, scratch_dir
from workload import ENGINES, gpt_state

import dist_checkpointing as dc

TP = 2
SAVERS = ["raw", *ENGINES, *(f"{e}-async" for e in ENGINES), "torch.save", "dcp", "megatron"]
LOADERS = ["raw", *ENGINES, "torch.save", "dcp", "megatron"]


def patch_megatron_for_cpu():
    import numpy as np

    np.product = np.prod
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._process_memory = lambda: 0


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def raw_save(state, path, rank):
    with open(os.path.join(path, f"rank{rank}.bin"), "wb") as f:
        for sh in state.values():
            f.write(sh.data.view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path)


def torch_save(state, path, rank):
    with open(os.path.join(path, f"rank{rank}.pt"), "wb") as f:
        torch.save({key: sh.data for key, sh in state.items()}, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path)


def dcp_save(state, path, rank, mesh):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Shard

    dtensors = {key: DTensor.from_local(sh.data, mesh, [Shard(_axis(sh))], run_check=False) for key, sh in state.items()}
    dcp.save(dtensors, storage_writer=dcp.FileSystemWriter(path))


def megatron_save(state, path, rank):
    from megatron.core import dist_checkpointing as mdc
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    mstate = {key: mdc.ShardedTensor.from_rank_offsets(key, sh.data, (_axis(sh), rank, TP)) for key, sh in state.items()}
    mdc.save(mstate, path, TorchDistSaveShardedStrategy("torch_dist", 1))


def _axis(sh):
    """The TP axis of a shard: where its local shape differs from the global one."""
    return next(a for a, (n, g) in enumerate(zip(sh.local_shape, sh.global_shape)) if n != g)


def tp_axes(state):
    return {key: _axis(sh) for key, sh in state.items()}


def save_on_rank(rank, world, work, mb, adam, savers):
    state = gpt_state(rank, TP, mb, adam=adam)
    if "megatron" in savers:
        patch_megatron_for_cpu()
    mesh = None
    if "dcp" in savers:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    queue = dc.strategies.async_utils.AsyncCallsQueue(persistent=True) if any("-async" in s for s in savers) else None
    results = {}
    if queue is not None:  # a training process's first async save allocates the staging buffer
        start = time.perf_counter()
        queue.schedule_async_request(dc.save(state, os.path.join(work, "first"), "torch_dist", async_sharded_save=True))
        results["first-async"] = {"blocking_s": time.perf_counter() - start}
        queue.maybe_finalize_async_calls(blocking=True)
    for saver in savers:
        path = os.path.join(work, saver)
        if rank == 0:
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        start = time.perf_counter()
        blocking = None
        if saver.endswith("-async"):
            request = dc.save(state, path, saver[: -len("-async")], async_sharded_save=True)
            queue.schedule_async_request(request)
            blocking = time.perf_counter() - start
            queue.maybe_finalize_async_calls(blocking=True)
        elif saver in ENGINES:
            dc.save(state, path, saver)
        elif saver == "raw":
            raw_save(state, path, rank)
        elif saver == "torch.save":
            torch_save(state, path, rank)
        elif saver == "dcp":
            dcp_save(state, path, rank, mesh)
        elif saver == "megatron":
            megatron_save(state, path, rank)
        dist.barrier()
        results[saver] = {"save_s": time.perf_counter() - start, "blocking_s": blocking}
    if queue is not None:
        queue.close()
    return results


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def load_once(loader, path, mb, adam, results):
    """In a fresh process: the TP=1 load's time and peak RSS (the high-water mark is reset
    just before the load, so imports do not count in its peak but do in its baseline)."""
    request = gpt_state(0, 1, mb, with_data=False, adam=adam)
    axes = tp_axes(gpt_state(0, TP, mb, with_data=False, adam=adam))
    if loader == "megatron":
        from megatron.core import dist_checkpointing as mdc
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

        dist.init_process_group("gloo", init_method=f"file://{path}.store", rank=0, world_size=1)
        mrequest = {
            key: mdc.ShardedTensor.from_rank_offsets(key, torch.empty(sh.local_shape, dtype=sh.dtype))
            for key, sh in request.items()
        }
    elif loader == "dcp":
        import torch.distributed.checkpoint as dcp
    elif loader in ENGINES:
        dc.strategies.engine_class(loader, "load")  # imported before timing, as the peers' libraries are
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM
    baseline = _rss_bytes("VmRSS")
    start = time.perf_counter()
    if loader == "raw":
        for name in sorted(os.listdir(path)):
            with open(os.path.join(path, name), "rb") as f:
                buffer = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(buffer)
    elif loader in ENGINES:
        dc.load(request, path)
    elif loader == "torch.save":
        parts = [torch.load(os.path.join(path, f"rank{r}.pt"), weights_only=True) for r in range(TP)]
        {key: torch.cat([p[key] for p in parts], dim=axes[key]) for key in request}
    elif loader == "dcp":
        dcp.load({key: torch.empty(sh.local_shape, dtype=sh.dtype) for key, sh in request.items()},
                 storage_reader=dcp.FileSystemReader(path))
    elif loader == "megatron":
        mdc.load(mrequest, path, TorchDistLoadShardedStrategy())
    elapsed = time.perf_counter() - start
    results.put({"load_s": elapsed, "peak_rss": _rss_bytes("VmHWM"), "baseline_rss": baseline})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="MiB of bf16 weights in total")
    parser.add_argument("--adam", action="store_true", help="add fp32 master weights and Adam moments")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--savers", default=",".join(SAVERS))
    parser.add_argument("--loaders", default=",".join(LOADERS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    savers, loaders = args.savers.split(","), args.loaders.split(",")
    state_bytes = sum(sh.nbytes for sh in gpt_state(0, 1, args.mb, with_data=False, adam=args.adam).values())
    runs = defaultdict(lambda: defaultdict(list))
    stats = {}
    for _ in range(args.runs):
        with scratch_dir() as work:
            for saver, values in run_on_ranks(save_on_rank, TP, work, args.mb, args.adam, savers).items():
                for name, value in values.items():
                    runs[saver][name].append(value)
                stats[saver] = dir_stats(os.path.join(work, saver))
            for loader in loaders:
                for name, value in in_fresh_process(load_once, loader, os.path.join(work, loader), args.mb, args.adam).items():
                    runs[loader][name].append(value)
    rows = _rows(runs, stats, savers, loaders, state_bytes)
    targets = _targets(rows, state_bytes)
    title = (f"{state_bytes / 1e6:.0f} MB state ({'bf16 weights + fp32 Adam' if args.adam else 'bf16 weights'}), "
             f"TP=2 save on 2 ranks, TP=1 load in one process; median of {args.runs} runs")
    report(title, {"state_bytes": state_bytes, "runs": args.runs, "targets": targets}, rows, args.json)
    if not args.json:
        print("\nTargets:")
        for name, (value, goal, met) in targets.items():
            print(f"- {name}: {value} (target {goal}) {'met' if met else 'MISSED'}")


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _rows(runs, stats, savers, loaders, state_bytes):
    raw_save, raw_load = _median(runs["raw"]["save_s"]), _median(runs["raw"]["load_s"])
    rows = []
    for method in dict.fromkeys(savers + loaders + (["first-async"] if "first-async" in runs else [])):
        save_s, load_s = _median(runs[method]["save_s"]), _median(runs[method]["load_s"])
        blocking = _median(runs[method]["blocking_s"])
        files, size = stats.get(method, (None, None))
        rows.append({
            "method": method,
            "save_s": _round(save_s), "save_GBps": _round(save_s and state_bytes / save_s / 1e9, 2),
            "save_x_raw": _round(save_s and raw_save / save_s, 2),
            "blocking_s": _round(blocking),
            "load_s": _round(load_s), "load_GBps": _round(load_s and state_bytes / load_s / 1e9, 2),
            "load_x_raw": _round(load_s and raw_load / load_s, 2),
            "load_peak_rss_MB": _round(_median(runs[method]["peak_rss"]) and _median(runs[method]["peak_rss"]) / 1e6, 0),
            "load_baseline_rss_MB": _round(_median(runs[method]["baseline_rss"]) and _median(runs[method]["baseline_rss"]) / 1e6, 0),
            "files": files, "bytes_on_disk": size,
        })
    return rows


def _round(value, digits=3):
    return None if value is None else round(value, digits)


def _targets(rows, state_bytes):
    """The issue's targets as (value, goal, met), from our best engine per target."""
    by = {row["method"]: row for row in rows}
    ours = [e for e in ENGINES if e in by and by[e]["save_s"]]
    targets = {}
    if not ours:
        return targets
    best_save = min(ours, key=lambda e: by[e]["save_s"])
    targets[f"durable save x raw ({best_save})"] = (by[best_save]["save_x_raw"], ">= 0.8", by[best_save]["save_x_raw"] >= 0.8)
    loading = [e for e in ours if by[e]["load_s"]]
    best_load = min(loading, key=lambda e: by[e]["load_s"]) if loading else None
    if best_load:
        targets[f"resharded load x raw ({best_load})"] = (by[best_load]["load_x_raw"], ">= 0.7", by[best_load]["load_x_raw"] >= 0.7)
        for engine in loading:
            rss_limit = (state_bytes + 300e6) / 1e6
            rss = by[engine]["load_peak_rss_MB"]
            targets[f"peak load RSS MB ({engine})"] = (rss, f"<= {rss_limit:.0f}", rss <= rss_limit)
    megatron = by.get("megatron", {})
    if megatron.get("save_s"):
        speedup = round(megatron["save_s"] / by[best_save]["save_s"], 2)
        targets[f"save speedup over Megatron-Core torch_dist ({best_save})"] = (speedup, ">= 2", speedup >= 2)
    if megatron.get("load_s") and best_load:
        ratio = round(by[best_load]["load_s"] / megatron["load_s"], 2)
        targets[f"load time / Megatron-Core's ({best_load})"] = (ratio, "<= 1", ratio <= 1)
    for engine in ours:
        row = by.get(f"{engine}-async")
        if row and row["blocking_s"] is not None:
            share = round(row["blocking_s"] / by[engine]["save_s"], 3)
            targets[f"async blocking / sync save ({engine})"] = (share, "<= 0.1", share <= 0.1)
    return targets


if __name__ == "__main__":
    main()

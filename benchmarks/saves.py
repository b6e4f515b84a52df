"""Saves side by side: our engines (sync and async), Megatron-Core 0.16.1's torch_dist and a raw write.

Two workloads (workload.py), each saved at TP=2 x DP (--dp, default 1) by the same TP x DP gloo
ranks, every saver in turn (DP replicas hold the same shards; only DP rank 0's are main):
- gpt: hidden 2048, 4 layers, vocab 32000, bf16 (534 MB);
- small: hidden 64, 400 layers with a layer norm each, vocab 32000 (2001 tensors, 40 MB).
- many: hidden 32, 4000 layers with a layer norm each, vocab 32000 (20,001 tensors, 100 MB).

Savers: `raw` is each rank writing its bytes to one file with write+fsync (the disk's limit for
these bytes); our zarr, tensorstore and torch_dist engines, checksums on (always); `megatron` is
Megatron-Core's `dist_checkpointing.save` (its default torch_dist strategy); `<engine>-async`
is an async save through a persistent AsyncCallsQueue after `prepare_async_save` (what a
training loop does once); `<engine>-async-mlm` is the way Megatron-LM calls it (a non-persistent
`AsyncCallsQueue()`, its default, and no `prepare_async_save`): `blocking s` is until `save` and `schedule_async_request` return,
`save s` until the checkpoint is committed (`maybe_finalize_async_calls(blocking=True)`).
Two floors that are not saves: `zarr-files` makes the directories and files of a zarr save of
the state (same names and sizes, each rank half of the arrays: mkdir, open/write/close, then one
sync), the file system's own cost of that layout; `copy` copies each rank's bytes to write into
a resident buffer reused between rounds, the least an async save can block on the CPU (it must
take a copy before `save` returns, as the caller may change its tensors then).

Round 0 holds every saver's first save in the process (imports, caches, staging memory; its
times are the `first` columns); rounds 1.. alternate the savers' order, and the other columns
are their medians. Each save goes to a new directory, all deleted at the end: a file system
creates files slower for a while where many were just deleted (ext4 skips recently freed
inodes), which a training job's retention does not do between saves.

Needs Megatron-Core 0.16.1: run in the benchmark environment (`make bench-env`):

    .venv-bench/bin/python benchmarks/saves.py [--runs 3] [--workloads gpt,small] [--dp 1] [--gap 0] [--json]
"""

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from harness import dir_stats, parse_side_by_side, report, run_on_ranks, scratch_dir, settle_disk
from loads import TP, WORKLOADS, _tp_axes, patch_megatron_for_cpu
from workload import ENGINES, gpt_state

SAVERS = ["raw", "zarr-files", "copy", *ENGINES, "megatron",
          *(f"{engine}-async" for engine in ENGINES), *(f"{engine}-async-mlm" for engine in ENGINES)]


def async_engine(saver):
    """(engine, Megatron-LM's calling pattern?) of an async saver's name; None for a sync one."""
    for suffix, mlm in (("-async-mlm", True), ("-async", False)):
        if saver.endswith(suffix):
            return saver[: -len(suffix)], mlm
    return None


def raw_save(state, path, rank):
    if rank >= TP:
        return  # a DP replica: its main replicas' bytes are written by DP rank 0
    with open(os.path.join(path, f"rank{rank}.bin"), "wb", buffering=0) as f:
        for sh in state.values():
            f.write(sh.data.view(torch.uint8).numpy().data)
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def zarr_layout(state, template, rank, world):
    """This rank's part of the layout of a zarr save of `state` (saved now into `template`):
    (directories, files as (path, size)) relative to the checkpoint, by array."""
    import dist_checkpointing as dc

    dc.save(state, template, "zarr")
    arrays = sorted(d for d in os.listdir(template) if os.path.isdir(os.path.join(template, d)))
    dirs, files = [], [(name, os.path.getsize(os.path.join(template, name))) for name in os.listdir(template)
                       if rank == 0 and name not in arrays]
    for array in arrays[rank::world]:
        for root, _, names in os.walk(os.path.join(template, array)):
            dirs.append(os.path.relpath(root, template))
            files.extend((os.path.join(dirs[-1], n), os.path.getsize(os.path.join(root, n))) for n in names)
    return dirs, files


def replay_layout(layout, path):
    dirs, files = layout
    for d in dirs:
        os.mkdir(os.path.join(path, d))
    zeros = bytes(max((size for _, size in files), default=0))
    for name, size in files:
        fd = os.open(os.path.join(path, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, zeros[:size])
        os.close(fd)
    os.sync()  # as a save makes them durable (the library: one syncfs of this file system)


def copy_to(buffer, state):
    from dist_checkpointing.mapping import is_main_replica

    offset = 0
    for sh in state.values():
        if is_main_replica(sh.replica_id):  # what an async save stages
            nbytes = sh.data.numel() * sh.data.element_size()
            buffer[offset : offset + nbytes].view(sh.data.dtype).view(sh.data.shape).copy_(sh.data)
            offset += nbytes


def megatron_state(state, rank):
    from megatron.core import dist_checkpointing as mdc

    mstate = {}
    for key, sh in state.items():
        axes = _tp_axes(sh)
        split = [(axes[0], rank % TP, TP)] if axes else []
        mstate[key] = mdc.ShardedTensor.from_rank_offsets(key, sh.data, *split, replica_id=sh.replica_id)
    return mstate


def replicated_state(rank, model):
    """Rank `rank`'s state at TP=2 x DP: its TP rank's shards, replica (TP replica, DP rank)."""
    state = gpt_state(rank % TP, TP, 0, **model)
    for sh in state.values():
        sh.replica_id = (sh.replica_id, rank // TP)
    return state


def save_on_rank(rank, world, work, model, savers, runs, gap):
    import dist_checkpointing as dc
    from dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    state = replicated_state(rank, model)
    mstate = None
    if "megatron" in savers:
        patch_megatron_for_cpu()
        from megatron.core import dist_checkpointing as mdc

        mstate = megatron_state(state, rank)
    layout = zarr_layout(state, os.path.join(work, "template"), rank, world) if "zarr-files" in savers else None
    buffer = torch.zeros(sum(sh.data.numel() * sh.data.element_size() for sh in state.values()), dtype=torch.uint8) if "copy" in savers else None
    queue = AsyncCallsQueue(persistent=True)
    mlm_queue = AsyncCallsQueue()  # Megatron-LM's: non-persistent, its default; never prepared
    for saver in savers:
        if async_engine(saver) and not async_engine(saver)[1]:
            dc.prepare_async_save(state, async_engine(saver)[0])
    times = {saver: [] for saver in savers}
    for run in range(runs + 1):
        if rank == 0:
            settle_disk()
        for saver in savers if run % 2 == 0 else savers[::-1]:
            path = os.path.join(work, f"{saver}-{run}")
            if rank == 0:
                os.makedirs(path)
            time.sleep(gap)  # training between saves (a non-persistent queue's next writer starts meanwhile)
            dist.barrier()
            start = time.perf_counter()
            blocking = None
            if saver == "raw":
                raw_save(state, path, rank)
            elif saver == "zarr-files":
                replay_layout(layout, path)
            elif saver == "copy":
                copy_to(buffer, state)
                blocking = time.perf_counter() - start
            elif saver == "megatron":
                mdc.save(mstate, path)
            elif async_engine(saver):
                engine, mlm = async_engine(saver)
                calls = mlm_queue if mlm else queue
                calls.schedule_async_request(dc.save(state, path, engine, async_sharded_save=True))
                blocking = time.perf_counter() - start
                calls.maybe_finalize_async_calls(blocking=True)
            else:
                dc.save(state, path, saver)
            dist.barrier()
            elapsed = time.perf_counter() - start
            files, size = dir_stats(path)
            times[saver].append({"save_s": elapsed, "blocking_s": blocking, "files": files, "bytes": size})
    queue.close()
    mlm_queue.close()
    return times


def main():
    args = parse_side_by_side(__doc__, WORKLOADS, "savers", SAVERS, dp=True, gap=True)
    rows = []
    for workload in args.workloads:
        with scratch_dir() as work:
            times = run_on_ranks(save_on_rank, TP * args.dp, work, WORKLOADS[workload], args.savers, args.runs, args.gap)
        rows.extend(_rows(workload, times))
    title = f"TP=2 x DP={args.dp} saves by {TP * args.dp} ranks (first save, then medians of {args.runs} alternating runs)"
    report(title, {}, rows, args.json)


def _rows(workload, times):
    def median(saver, field):
        values = [t[field] for t in times[saver][1:]]
        return statistics.median(values) if None not in values else None

    raw, megatron = times.get("raw") and median("raw", "save_s"), times.get("megatron") and median("megatron", "save_s")
    rows = []
    for saver, runs in times.items():
        save_s, blocking = median(saver, "save_s"), median(saver, "blocking_s")
        engine = async_engine(saver) and async_engine(saver)[0]
        sync = median(engine, "save_s") if engine in times else None
        rows.append({
            "workload": workload, "saver": saver, "save s": round(save_s, 3), "first save s": round(runs[0]["save_s"], 3),
            "x raw": raw and round(raw / save_s, 2),
            "speedup over Megatron": megatron and round(megatron / save_s, 2),
            "blocking s": blocking and round(blocking, 3),
            "first blocking s": runs[0]["blocking_s"] and round(runs[0]["blocking_s"], 3),
            "blocking / sync": blocking and sync and round(blocking / sync, 3),
            "total / sync": blocking and sync and round(save_s / sync, 2),
            "GB/s": round(runs[-1]["bytes"] / save_s / 1e9, 2), "files": runs[-1]["files"],
        })
    return rows


if __name__ == "__main__":
    sys.exit(main())

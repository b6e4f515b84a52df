"""Distributed-optimizer (flattened) state against regular shards of the same bytes.

fp32 optimizer state of a GPT-like model (see workload.py), saved by 2 ranks at DP=2 and loaded
back at the same layout, in three forms holding the same bytes per rank:

- regular: each rank holds half of every tensor as an ordinary shard (as TP=2 would);
- flat-buckets: Megatron's distributed optimizer: the tensors are laid end to end and each DP
  rank owns one contiguous half, so one tensor is cut, the others are held whole by one rank;
- flat-halves: the worst case, every tensor cut in two flat halves, one per rank (for the Zarr
  engines half of all bytes then travel to the rank that writes the shard).

Runs alternate; medians are reported, with each flat form's time as a multiple of regular's.

    python benchmarks/flattened.py [--mb 256] [--runs 3] [--json]
"""

import os
import statistics
import time

import torch
import torch.distributed as dist
from harness import dir_stats, parse_args, report, run_on_ranks, scratch_dir
from workload import ENGINES, gpt_shapes

import dist_checkpointing as dc
from dist_checkpointing import ShardedTensor

FORMS = ["regular", "flat-buckets", "flat-halves"]


def optimizer_state(form: str, rank: int, mb: int, with_data: bool = True):
    shapes = gpt_shapes(mb, itemsize=4)
    make = torch.randn if with_data else torch.empty
    if form == "regular":
        return {
            key: ShardedTensor.from_rank_offsets(key, make(shape[0] // 2, *shape[1:]), (0, rank, 2))
            for key, (shape, _) in shapes.items()
        }
    numels = {key: shape[0] * shape[1] for key, (shape, _) in shapes.items()}
    total, position, state = sum(numels.values()), 0, {}
    for key, (shape, _) in shapes.items():
        if form == "flat-halves":
            start, stop = (0, numels[key] // 2) if rank == 0 else (numels[key] // 2, numels[key])
        else:
            lo, hi = (0, total // 2) if rank == 0 else (total // 2, total)
            start, stop = max(lo - position, 0), min(hi - position, numels[key])
            position += numels[key]
        if start < stop:
            state[key] = ShardedTensor.from_rank_offsets_flat(
                key, make(stop - start), shape, flattened_range=slice(start, stop)
            )
    return state


def save_and_load_on_rank(rank, world, work, mb, runs):
    states = {form: optimizer_state(form, rank, mb) for form in FORMS}
    requests = {form: optimizer_state(form, rank, mb, with_data=False) for form in FORMS}
    times = {}
    for run in range(runs):
        for engine in ENGINES:
            for form in FORMS:
                path = os.path.join(work, f"{engine}-{form}-{run}")
                dist.barrier()
                start = time.perf_counter()
                dc.save(states[form], path, sharded_strategy=engine)
                dist.barrier()
                saved = time.perf_counter()
                dc.load(requests[form], path)
                dist.barrier()
                times.setdefault((engine, form), []).append((saved - start, time.perf_counter() - saved))
    return times


def main():
    args = parse_args(__doc__, 256, "MiB of fp32 state in total")
    with scratch_dir() as work:
        times = run_on_ranks(save_and_load_on_rank, 2, work, args.mb, args.runs)
        total = sum(shape[0] * shape[1] * 4 for shape, _ in gpt_shapes(args.mb, itemsize=4).values())
        rows = []
        for engine in ENGINES:
            base_save = statistics.median(s for s, _ in times[(engine, "regular")])
            base_load = statistics.median(load for _, load in times[(engine, "regular")])
            for form in FORMS:
                save_s = statistics.median(s for s, _ in times[(engine, form)])
                load_s = statistics.median(load for _, load in times[(engine, form)])
                files, _ = dir_stats(os.path.join(work, f"{engine}-{form}-0"))
                rows.append({
                    "engine": engine, "state": form, "save_s": round(save_s, 3),
                    "save_x_regular": round(save_s / base_save, 2), "load_s": round(load_s, 3),
                    "load_x_regular": round(load_s / base_load, 2), "files": files,
                })
    title = f"{total / 1e6:.0f} MB fp32 optimizer state, DP=2 save and load on 2 ranks; median of {args.runs} runs"
    report(title, {"state_bytes": total, "runs": args.runs}, rows, args.json)


if __name__ == "__main__":
    main()

"""What a resume-style load costs in memory and time: every engine loading into tensors the process already holds.

Workload (workload.py): the GPT-like bf16 state saved at TP=2 by 2 gloo ranks, loaded at TP=1
in a fresh process per measurement into a request whose tensors are allocated and resident
(what a training loop holds when it resumes). Reported per engine, medians over runs with the
engines alternated: load time, the process's RSS before the load, its peak during the load, and
what the load added to it, against issue 14's bound of 100 MB + 10% of the requested bytes.

    python benchmarks/load_memory.py [--mb 509] [--runs 3] [--json]
"""

import statistics
import time

import torch.multiprocessing as mp

import dist_checkpointing as dc
from harness import parse_args, report, run_on_ranks, scratch_dir
from workload import ENGINES, gpt_state

TP = 2


def _save(rank, world, work, engine, mb):
    dc.save(gpt_state(rank, TP, mb), f"{work}/{engine}", engine)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _load_once(engine, path, mb, results):
    request = gpt_state(0, 1, mb, with_data=False)
    for sh in request.values():
        sh.data.fill_(0)  # resident, as a training process's parameters are
    dc.strategies.engine_classes(engine)  # imported before measuring
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the high-water mark (VmHWM)
    baseline = _rss("VmRSS")
    start = time.perf_counter()
    dc.load(request, path)
    results.put({"load_s": time.perf_counter() - start, "baseline": baseline, "peak": _rss("VmHWM"),
                 "requested": sum(sh.nbytes for sh in request.values())})


def _measure(engine, path, mb):
    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_load_once, args=(engine, path, mb, results))
    process.start()
    result = results.get()
    process.join()
    return result


def main():
    args = parse_args(__doc__, 509, "MiB of bf16 weights in total")
    measured = {engine: [] for engine in ENGINES}
    with scratch_dir() as work:
        for engine in ENGINES:
            run_on_ranks(_save, TP, work, engine, args.mb)
        for _ in range(args.runs):
            for engine in ENGINES:
                measured[engine].append(_measure(engine, f"{work}/{engine}", args.mb))
    rows = []
    for engine, runs in measured.items():
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        added = median["peak"] - median["baseline"]
        bound = 100e6 + 0.1 * median["requested"]
        rows.append({
            "engine": engine, "load s": round(median["load_s"], 3),
            "RSS before MB": round(median["baseline"] / 1e6), "peak RSS MB": round(median["peak"] / 1e6),
            "added MB": round(added / 1e6), "bound MB": round(bound / 1e6), "met": added <= bound,
        })
    report(f"Load into held tensors ({args.mb} MiB bf16, TP=2 -> TP=1, {args.runs} runs, medians)", {}, rows, args.json)


if __name__ == "__main__":
    main()

"""Saves and loads to S3 next to the same to local disk, for every engine (gpt workload: 534 MB).

The S3 server is moto's (`moto[server]`, the test extra), started by this script on 127.0.0.1:
all of its work (HTTP parsing, signature handling, storing each object) runs in this machine's
Python, on the same 2 cores as the ranks. So this measures the library's side of object storage
(concurrent uploads, multipart, ranged reads) under a slow server, not what AWS or MinIO would
give; a faster server can only help the S3 numbers.

Each rank of TP=2 saves its shards; every saver (engine x {local, s3}) in turn, alternating
the order each run; round 0 is a warm-up, and the table gives medians of the other runs, the
ratio s3 / local for the same engine in the same run, and a load at TP=2 of what was saved.
`raw` is the server's limit for these bytes: each rank PUTs each of its tensors as one object
with obstore directly (16 at once, no library in between), then GETs them back.

    .venv/bin/python benchmarks/object_storage.py [--runs 3] [--savers zarr,torch_dist,...] [--json]
"""

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from harness import moto_s3, parse_side_by_side, report, run_on_ranks, scratch_dir
from loads import TP, WORKLOADS
from workload import ENGINES, gpt_state

SAVERS = ENGINES


def raw_put_and_get(state, url: str, rank: int):
    """Each tensor of this rank as one object, PUT and then GET 16 at a time by obstore."""
    from concurrent.futures import ThreadPoolExecutor

    import obstore

    from dist_checkpointing.storage import storage_of

    storage = storage_of(url)
    keys = {f"{storage.key(url)}/{rank}/{name}": sh.data for name, sh in state.items()}
    with ThreadPoolExecutor(16) as pool:
        start = time.perf_counter()
        def put(item):
            return obstore.put(storage.store, item[0], item[1].view(-1).view(torch.uint8).numpy(), use_multipart=False)

        list(pool.map(put, keys.items()))
        dist.barrier()
        saved = time.perf_counter() - start
        start = time.perf_counter()
        list(pool.map(lambda key: obstore.get(storage.store, key).bytes(), keys))
        dist.barrier()
    return saved, time.perf_counter() - start


def save_and_load(rank, world, work, url, model, engines, runs):
    import dist_checkpointing as dc
    from dist_checkpointing.storage import storage_of

    state = gpt_state(rank, TP, 0, **model)
    request = gpt_state(rank, TP, 0, with_data=False, **model)
    times = {(engine, where): [] for engine in ["raw", *engines] for where in ("local", "s3") if (engine, where) != ("raw", "local")}
    contenders = list(times)
    for run in range(runs + 1):
        for engine, where in contenders if run % 2 == 0 else contenders[::-1]:
            path = os.path.join(work if where == "local" else url, f"{engine}-{run}")
            dist.barrier()
            if engine == "raw":
                times[engine, where].append(raw_put_and_get(state, path, rank))
            else:
                start = time.perf_counter()
                dc.save(state, path, engine)
                dist.barrier()
                saved = time.perf_counter() - start
                start = time.perf_counter()
                dc.load(request, path)
                dist.barrier()
                times[engine, where].append((saved, time.perf_counter() - start))
            dist.barrier()
            if where == "s3" and rank == 0:  # moto keeps objects in memory
                storage_of(path).remove_tree(path)
    return times


def main():
    args = parse_side_by_side(__doc__, ["gpt"], "savers", SAVERS)
    with moto_s3(), scratch_dir() as work:
        times = run_on_ranks(save_and_load, TP, work, "s3://bench/run", WORKLOADS["gpt"], args.savers, args.runs)
    raw = times["raw", "s3"][1:]
    rows = [{"engine": "raw (obstore PUT/GET)", "s3 save s": round(statistics.median(t[0] for t in raw), 3),
             "s3 load s": round(statistics.median(t[1] for t in raw), 3)}]
    for engine in args.savers:
        local, s3 = times[engine, "local"][1:], times[engine, "s3"][1:]
        rows.append({
            "engine": engine,
            "local save s": round(statistics.median(t[0] for t in local), 3),
            "s3 save s": round(statistics.median(t[0] for t in s3), 3),
            "s3 / local save (same run)": round(statistics.median(s[0] / here[0] for s, here in zip(s3, local)), 2),
            "local load s": round(statistics.median(t[1] for t in local), 3),
            "s3 load s": round(statistics.median(t[1] for t in s3), 3),
            "s3 / local load (same run)": round(statistics.median(s[1] / here[1] for s, here in zip(s3, local)), 2),
            "s3 / raw save (same run)": round(statistics.median(s[0] / r[0] for s, r in zip(s3, raw)), 2),
            "s3 / raw load (same run)": round(statistics.median(s[1] / r[1] for s, r in zip(s3, raw)), 2),
        })
    header = list(rows[-1])
    rows = [{h: row.get(h, "") for h in header} for row in rows]
    report(f"gpt (534 MB) at TP=2: local disk vs moto S3 on 127.0.0.1 (medians of {args.runs} alternating runs)", {}, rows, args.json)


if __name__ == "__main__":
    sys.exit(main())

"""What the benchmarks share: arguments, running ranks, measuring a checkpoint directory and
printing a result table."""

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_args(doc: str, mb_default: int, mb_help: str) -> argparse.Namespace:
    """--mb, --runs and --json; the description is the first line of `doc`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--mb", type=int, default=mb_default, help=mb_help)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def parse_side_by_side(doc: str, workloads, kind: str, contenders, dp: bool = False, gap: bool = False) -> argparse.Namespace:
    """--runs, --workloads, --<kind> (the contenders, comma-separated; default all of each),
    --json, if `dp` --dp (data-parallel replicas), if `gap` --gap (seconds between two
    measurements); the lists come back split."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if dp:
        parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas: TP x DP ranks")
    if gap:
        parser.add_argument("--gap", type=float, default=0.0, help="seconds of idle 'training' before each save")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(workloads))
    parser.add_argument(f"--{kind}", default=",".join(contenders))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.workloads = args.workloads.split(",")
    setattr(args, kind, getattr(args, kind).split(","))
    return args


@contextlib.contextmanager
def scratch_dir():
    """A temporary directory for the checkpoints of one benchmark run, removed afterwards."""
    work = tempfile.mkdtemp(prefix="dist_ckpt_bench_")
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def moto_s3(bucket: str = "bench"):
    """moto's S3 server on 127.0.0.1 (the test extra) with `bucket`, reached through the
    standard AWS environment, for the duration of the block."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_REGION="us-east-1")
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=bucket)
        yield
    finally:
        server.stop()


def settle_disk(limit: float = 120.0) -> float:
    """Waits until the system has stalled on I/O for under 2 % of the last 10 s (Linux PSI;
    at most `limit` s) and returns the seconds waited. This machine's disk is mounted with
    online `discard`: after a mass deletion (a previous run's cleanup) its discards stall file
    creation for a minute or more, which would be charged to whichever saver runs then."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        try:
            with open("/proc/pressure/io") as f:
                stalled = float(f.readline().split()[1].split("=")[1])
        except (OSError, IndexError, ValueError):
            break
        if stalled < 2.0:
            break
        time.sleep(1.0)
    return time.perf_counter() - started


def run_on_ranks(fn, world: int, work: str, *args):
    """Runs `fn(rank, world, work, *args)` on `world` spawned gloo ranks; returns rank 0's result."""
    results = mp.get_context("spawn").Queue()
    mp.start_processes(_rank_entry, args=(world, fn, work, args, results), nprocs=world, join=True,
                       start_method="spawn")
    return results.get()


def _rank_entry(rank, world, fn, work, args, results):
    # the ranks share the CPUs, as under torchrun (OMP_NUM_THREADS=1 per rank by default):
    # intra-op threads beyond them only contend (a staging copy ran 2x slower, erratically)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(work, 'store')}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=300))
    result = fn(rank, world, work, *args)
    if rank == 0:
        results.put(result)
    dist.destroy_process_group()


def in_fresh_process(fn, *args, timeout: float = 600):
    """Runs `fn(*args, results)` in a new spawned process; returns what it put on `results`."""
    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=fn, args=(*args, results))
    process.start()
    result = results.get(timeout=timeout)
    process.join()
    return result


def dir_stats(path: str):
    """(number of files, bytes) below `path`."""
    files = size = 0
    for root, _, names in os.walk(path):
        files += len(names)
        size += sum(os.path.getsize(os.path.join(root, n)) for n in names)
    return files, size


def report(title: str, summary: dict, rows: list, as_json: bool) -> None:
    """Prints `rows` (dicts with the same keys) as JSON or as a Markdown table under `title`."""
    if as_json:
        print(json.dumps({**summary, "results": rows}, indent=1))
        return
    print(title)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join("" if row[h] is None else str(row[h]) for h in header) + " |")

"""Peak memory and time of `dist-ckpt convert`: it should grow with the largest tensor, not the
checkpoint.

A GPT-like bf16 state (workload.py, TP=1) is saved with the zarr engine, then converted to every
format, each conversion in a fresh process whose peak RSS (VmHWM) is reported next to the
process's RSS before converting, the largest tensor and the whole state.

    python benchmarks/convert.py [--mb 1024] [--json]
"""

import argparse
import multiprocessing as mp
import os
import time

from harness import report, scratch_dir
from workload import gpt_state

import dist_checkpointing as dc
from dist_checkpointing.convert import FORMATS


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field))
    return int(line.split()[1]) / 1024


def _convert(src, dst, to, results):
    from dist_checkpointing.convert import convert

    before = _rss_mb("VmRSS")
    start = time.perf_counter()
    convert(src, dst, to)
    results.put((time.perf_counter() - start, before, _rss_mb("VmHWM")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    state = gpt_state(0, 1, args.mb)
    sizes = [sh.data.numel() * sh.data.element_size() for sh in state.values()]
    summary = {"state_MB": round(sum(sizes) / 2**20), "largest_tensor_MB": round(max(sizes) / 2**20)}
    rows = []
    with scratch_dir() as work:
        src = os.path.join(work, "src")
        dc.save(state, src)
        del state
        ctx = mp.get_context("spawn")
        for to in FORMATS:
            results = ctx.Queue()
            dst = os.path.join(work, "out.pt" if to == "torch" else f"out-{to}")
            proc = ctx.Process(target=_convert, args=(src, dst, to, results))
            proc.start()
            seconds, before, peak = results.get()
            proc.join()
            rows.append({"to": to, "seconds": round(seconds, 2), "rss_before_MB": round(before),
                         "peak_rss_MB": round(peak), "growth_MB": round(peak - before)})
    report(f"Converting a {summary['state_MB']} MiB zarr checkpoint (largest tensor "
           f"{summary['largest_tensor_MB']} MiB), one fresh process per format", summary, rows, args.json)


if __name__ == "__main__":
    main()

"""What checksums cost: save and load of each engine with CRC-32C on and off, in one process.

"Off" is the same code with the checksum taken out (for this measurement only): Zarr arrays
without the `crc32c` codec, torch_dist items written without computing their CRC and loaded with
`verify_checksums=False`. The state is the benchmarks' GPT-like bf16 state at TP=1 (workload.py);
runs alternate on/off; medians are reported, with the CRC-32C throughput of this machine.

    python benchmarks/checksums.py [--mb 512] [--runs 3] [--json]
"""

import contextlib
import functools
import os
import shutil
import statistics
import time

import numpy as np
from harness import parse_args, report, scratch_dir
from workload import ENGINES, gpt_state

import dist_checkpointing as dc
from dist_checkpointing import integrity
from dist_checkpointing.strategies import zarr_plan
from dist_checkpointing.strategies.config import StrategyConfig


@contextlib.contextmanager
def checksums_off():
    document, write = zarr_plan.array_document, integrity.ChecksummingFile.write

    def without_crc_codec(*args):
        doc = document(*args)
        doc["codecs"] = [c for c in doc["codecs"] if c["name"] != "crc32c"]
        return doc

    zarr_plan.array_document = without_crc_codec
    integrity.ChecksummingFile.write = lambda self, data: self.f.write(data)  # items' CRC not computed
    try:
        yield
    finally:
        zarr_plan.array_document, integrity.ChecksummingFile.write = document, write


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    args = parse_args(__doc__, 512, "MiB of bf16 weights")
    state = gpt_state(0, 1, args.mb)
    request = gpt_state(0, 1, args.mb, with_data=False)
    nbytes = sum(sh.data.numel() * sh.data.element_size() for sh in state.values())
    data = np.random.bytes(nbytes)
    crc_s = statistics.median(timed(lambda: integrity.crc32c(data)) for _ in range(3))
    times = {(engine, on, step): [] for engine in ENGINES for on in (True, False) for step in ("save", "load")}
    with scratch_dir() as work:
        for _ in range(args.runs):
            for engine in ENGINES:
                for on in (True, False):
                    path = os.path.join(work, f"{engine}-{on}")
                    with contextlib.nullcontext() if on else checksums_off():
                        times[engine, on, "save"].append(timed(functools.partial(dc.save, state, path, engine)))
                    reader = StrategyConfig(backend=engine, verify_checksums=on)
                    times[engine, on, "load"].append(timed(functools.partial(dc.load, dict(request), path, reader)))
                    shutil.rmtree(path)
    rows = []
    for engine in ENGINES:
        row = {"engine": engine}
        for step in ("save", "load"):
            on, off = (statistics.median(times[engine, flag, step]) for flag in (True, False))
            row.update({f"{step}_on_s": round(on, 3), f"{step}_off_s": round(off, 3),
                        f"{step}_overhead_pct": round(100 * (on - off) / off, 1)})
        rows.append(row)
    summary = {"state_MB": round(nbytes / 1e6), "crc32c_GBps": round(nbytes / crc_s / 1e9, 1)}
    report(f"Checksums on/off: {summary['state_MB']} MB, CRC-32C at {summary['crc32c_GBps']} GB/s on one core; "
           f"median of {args.runs} runs", summary, rows, args.json)


if __name__ == "__main__":
    main()

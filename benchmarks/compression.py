"""Compression ratio and speed of the Zarr engines on realistic training state.

Tensors: bf16 weights ~ N(0, 0.02) and fp32 Adam moments (exp_avg ~ N(0, 1e-3), exp_avg_sq its
square), each split into 8 shards (8 chunks, so codecs can run in parallel). One process saves
with each engine x codec and loads back; runs alternate; medians are reported.

    python benchmarks/compression.py [--mb 64] [--runs 3] [--json]
"""

import os
import shutil
import statistics
import time

import torch
from harness import dir_stats, parse_args, report, scratch_dir

import dist_checkpointing as dc
from dist_checkpointing import ShardedTensor

SHARDS = 8
CODECS = [None, "zstd", "blosc"]
ENGINES = ["zarr", "tensorstore"]


def make_state(mb: int):
    torch.manual_seed(0)
    rows = SHARDS * 64
    state = {}
    for name, dtype, make in [
        ("weight_bf16", torch.bfloat16, lambda n: torch.randn(n) * 0.02),
        ("exp_avg_fp32", torch.float32, lambda n: torch.randn(n) * 1e-3),
        ("exp_avg_sq_fp32", torch.float32, lambda n: (torch.randn(n) * 1e-3) ** 2),
    ]:
        cols = mb * 2**20 // (rows * torch.tensor([], dtype=dtype).element_size())
        full = make(rows * cols).to(dtype).reshape(rows, cols)
        step = rows // SHARDS
        state[name] = [
            ShardedTensor.from_rank_offsets(name, full[i * step : (i + 1) * step].clone(), (0, i, SHARDS))
            for i in range(SHARDS)
        ]
    return state


def main():
    args = parse_args(__doc__, 64, "MiB per tensor")
    state = make_state(args.mb)
    request = {k: [ShardedTensor.from_rank_offsets(k, torch.empty_like(s.data), (0, i, SHARDS))
                   for i, s in enumerate(v)] for k, v in state.items()}
    raw = {k: sum(s.data.numel() * s.data.element_size() for s in v) for k, v in state.items()}
    timings, ratios = {}, {}
    with scratch_dir() as work:
        for run in range(args.runs):
            for engine in ENGINES:
                for codec in CODECS:
                    config = {"backend": engine, "compression": codec}
                    path = os.path.join(work, f"{engine}-{codec}-{run}")
                    start = time.perf_counter()
                    dc.save(state, path, sharded_strategy=config)
                    saved = time.perf_counter() - start
                    start = time.perf_counter()
                    dc.load(request, path)
                    loaded = time.perf_counter() - start
                    name = f"{engine}/{codec or 'none'}"
                    timings.setdefault(name, []).append((saved, loaded))
                    ratios[name] = {k: raw[k] / dir_stats(os.path.join(path, k))[1] for k in raw}
                    shutil.rmtree(path)
    total_mb = sum(raw.values()) / 2**20
    rows = []
    for name, runs in timings.items():
        save_s = statistics.median(r[0] for r in runs)
        load_s = statistics.median(r[1] for r in runs)
        rows.append({
            "engine/codec": name,
            "save_s": round(save_s, 3),
            "load_s": round(load_s, 3),
            "save_MBps": round(total_mb / save_s),
            "load_MBps": round(total_mb / load_s),
            **{f"ratio_{k}": round(v, 3) for k, v in ratios[name].items()},
        })
    title = f"{total_mb:.0f} MiB per checkpoint, median of {args.runs} alternating runs"
    report(title, {"MiB_total": total_mb}, rows, args.json)


if __name__ == "__main__":
    main()

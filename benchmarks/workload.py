"""Save at TP=2 on 2 ranks, load resharded at TP=1: the three engines against raw file I/O.

The state is GPT-like: per layer qkv (3h x h), proj (h x h), fc1 (4h x h), fc2 (h x 4h) and an
embedding (V x h), bf16, split over TP=2 as Megatron splits them. Each rank also writes the
same bytes as plain files with write+fsync (the physical limit for a durable save). Loads run
in one process at TP=1 with a warm page cache. Runs alternate; medians are reported.

    python benchmarks/engines.py [--mb 256] [--runs 3] [--json]
"""

import os
import statistics
import time

import torch
import torch.distributed as dist

import dist_checkpointing as dc
from dist_checkpointing import ShardedTensor
from harness import dir_stats, parse_args, report, scratch_dir, run_on_ranks

ENGINES = ["zarr", "tensorstore", "torch_dist"]
HIDDEN, VOCAB = 1024, 32768


def gpt_shapes(mb: int, itemsize: int = 2):
    """key -> (global shape, TP axis); layers are added until the state reaches `mb` MiB."""
    h = HIDDEN
    shapes = {"embedding.weight": ((VOCAB, h), 0)}
    per_layer = {"qkv": ((3 * h, h), 0), "proj": ((h, h), 1), "fc1": ((4 * h, h), 0), "fc2": ((h, 4 * h), 1)}
    layers = max(1, (mb * 2**20 // itemsize - VOCAB * h) // (12 * h * h))
    for layer in range(layers):
        shapes.update({f"layers.{layer}.{name}.weight": spec for name, spec in per_layer.items()})
    return shapes


def gpt_state(rank: int, tp: int, mb: int, with_data: bool = True):
    """The bf16 state of `rank` at TP=`tp`."""
    state = {}
    for key, (shape, axis) in gpt_shapes(mb).items():
        local = list(shape)
        local[axis] //= tp
        data = torch.randn(local, dtype=torch.bfloat16) if with_data else torch.empty(local, dtype=torch.bfloat16)
        state[key] = ShardedTensor.from_rank_offsets(key, data, (axis, rank % tp, tp))
    return state


def raw_write(tensors, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for n, tensor in enumerate(tensors):
        with open(os.path.join(directory, f"{n}.bin"), "wb") as f:
            f.write(tensor.view(torch.int16).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def save_on_rank(rank, world, work, mb, runs):
    state = gpt_state(rank, world, mb)
    tensors = [sh.data for sh in state.values()]
    times = {}
    for run in range(runs):
        for name in ["raw"] + ENGINES:
            path = os.path.join(work, f"{name}-{run}")
            dist.barrier()
            start = time.perf_counter()
            if name == "raw":
                raw_write(tensors, os.path.join(path, f"rank{rank}"))
            else:
                dc.save(state, path, sharded_strategy=name)
            dist.barrier()
            times.setdefault(name, []).append(time.perf_counter() - start)
    return times


def main():
    args = parse_args(__doc__, 256, "MiB of bf16 state in total")
    with scratch_dir() as work:
        save_times = run_on_ranks(save_on_rank, 2, work, args.mb, args.runs)
        request = gpt_state(0, 1, args.mb, with_data=False)
        total = sum(sh.data.numel() * 2 for sh in request.values())
        load_times = {}
        for run in range(args.runs):
            raw_dir = os.path.join(work, f"raw-{run}")
            start = time.perf_counter()
            for rank_dir in sorted(os.listdir(raw_dir)):
                for name in os.listdir(os.path.join(raw_dir, rank_dir)):
                    with open(os.path.join(raw_dir, rank_dir, name), "rb") as f:
                        f.read()
            load_times.setdefault("raw", []).append(time.perf_counter() - start)
            for engine in ENGINES:
                start = time.perf_counter()
                dc.load(request, os.path.join(work, f"{engine}-{run}"))
                load_times.setdefault(engine, []).append(time.perf_counter() - start)
        rows = []
        raw_save, raw_load = statistics.median(save_times["raw"]), statistics.median(load_times["raw"])
        for name in ["raw"] + ENGINES:
            save_s, load_s = statistics.median(save_times[name]), statistics.median(load_times[name])
            files, size = dir_stats(os.path.join(work, f"{name}-0"))
            rows.append({
                "engine": name, "save_s": round(save_s, 3), "save_GBps": round(total / save_s / 1e9, 2),
                "save_x_raw": round(raw_save / save_s, 2), "load_s": round(load_s, 3),
                "load_GBps": round(total / load_s / 1e9, 2), "load_x_raw": round(raw_load / load_s, 2),
                "files": files, "bytes_on_disk": size,
            })
    title = f"{total / 1e6:.0f} MB bf16 state, TP=2 save on 2 ranks, TP=1 load; median of {args.runs} runs"
    report(title, {"state_bytes": total, "runs": args.runs}, rows, args.json)


if __name__ == "__main__":
    main()

"""zarrs (a Rust codec pipeline for zarr-python) against zarr-python's own pipeline, on our arrays.

For every dtype of the table: a 64 x 32 array in our Zarr v3 layout (bytes + crc32c codecs,
2 x 2 chunks) written and read back by each pipeline with `codec_pipeline.strict` (so zarrs
raises instead of silently handing an array it cannot handle back to zarr-python), compared
byte for byte. Then a 512 MiB float32 array in 4 chunks, uncompressed and zstd: write and read
seconds, medians, pipelines alternated. No fsync: this compares codec pipelines, not disks.

Needs zarrs: run in the benchmark environment (`make bench-env`):

    .venv-bench/bin/python benchmarks/zarrs_pipeline.py [--runs 3]
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
import zarr
from zarr.storage import LocalStore, StorePath

from dist_checkpointing.dtypes import DTYPES, register_zarr_bfloat16, to_numpy
from dist_checkpointing.strategies.config import StrategyConfig
from dist_checkpointing.strategies.zarr_spec import array_document

PIPELINES = {"zarr-python": "zarr.core.codec_pipeline.BatchedCodecPipeline", "zarrs": "zarrs.ZarrsCodecPipeline"}


def roundtrip(pipeline: str, name: str, data, root: str, compression=None):
    """(values read back, write s, read s) of `data` through `pipeline`."""
    config = StrategyConfig(backend="zarr", compression=compression)
    document = array_document(data.shape, [s // 2 for s in data.shape], name, config)
    os.makedirs(f"{root}/a", exist_ok=True)
    with open(f"{root}/a/zarr.json", "w") as f:
        json.dump(document, f)
    with zarr.config.set({"codec_pipeline.path": PIPELINES[pipeline], "codec_pipeline.strict": True}):
        array = zarr.Array(zarr.AsyncArray(metadata=document, store_path=StorePath(LocalStore(root), "a"),
                                           config={"write_empty_chunks": True}))
        start = time.perf_counter()
        array[...] = data
        written = time.perf_counter() - start
        start = time.perf_counter()
        values = zarr.open_array(StorePath(LocalStore(root, read_only=True), "a"), mode="r")[...]
        return values, written, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    register_zarr_bfloat16()
    root = tempfile.mkdtemp(prefix="zarrs_")
    try:
        print("| dtype | " + " | ".join(PIPELINES) + " |\n|---|---|---|")
        for name, (dtype, _, _) in DTYPES.items():
            tensor = torch.rand(64, 32) > 0.5 if dtype == torch.bool else torch.randn(64, 32).to(dtype)
            data, cells = to_numpy(tensor), []
            for pipeline in PIPELINES:
                shutil.rmtree(root)
                try:
                    values = roundtrip(pipeline, name, data, root)[0]
                    cells.append("bit-exact" if values.tobytes() == data.tobytes() else "DIFFERENT")
                except Exception as e:
                    cells.append(f"fails: {type(e).__name__}")
            print(f"| {name} | " + " | ".join(cells) + " |")
        data = to_numpy(torch.randn(8192, 16384))
        print("\n| compression | pipeline | write s | read s |\n|---|---|---|---|")
        for compression in (None, "zstd"):
            times = {pipeline: [] for pipeline in PIPELINES}
            for _ in range(args.runs):
                for pipeline in PIPELINES:
                    shutil.rmtree(root)
                    times[pipeline].append(roundtrip(pipeline, "float32", data, root, compression)[1:])
            for pipeline, runs in times.items():
                write, read = (round(statistics.median(r[i] for r in runs), 3) for i in (0, 1))
                print(f"| {compression or 'none'} | {pipeline} | {write} | {read} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Planning at scale without processes: the planning step of N simulated ranks x T tensors each.

Layout: TP=8 x PP=8 x DP=N/64 (rank = (dp * PP + pp) * TP + tp); each rank holds T bf16 tensors
of its pipeline stage, split over TP and replicated over DP (the main replica on DP rank 0).
Times what one rank does, step by step (median of --repeats):

- serialize: this rank's `LocalPlan` and digests (what it sends);
- assemble: unpickling every rank's payload of the exchange and assembling the `GlobalPlan`;
- validate: `validate_plan`;
- zarr plan: the zarr engine's plan for rank 0, without the fully parallel wrapper;
- fully parallel: the wrapper's plan for rank 0 (distribution over all ranks, then the zarr plan);
- total = serialize + assemble + validate + fully parallel: the whole first planning step;
- cached: a re-save of an unchanged plan (serialize, digests of every rank, the cache check);
- torch_dist plan: that engine's plan for rank 0, which builds DCP's per-chunk `.metadata`.

Traffic: what a rank sends in the planning exchanges (its digests; its main bits; its
structure if it is the first rank of that structure) and what each rank receives, as the
collectives move it (`all_gather_object` pads every payload to the largest; structures are
broadcast by their first rank while few ranks send one). `before`: the previous design, every
rank's pickled data-less ShardedTensors all-gathered. `metadata.json` is written and parsed for
the plan's index. Building the simulated input is not timed.

    python benchmarks/planning.py [--ranks 64,256,1024,8192] [--tensors 2000] [--json]
"""

import argparse
import os
import pickle
import statistics
import tempfile
import time

import torch
from harness import report

from dist_checkpointing.core import FORMAT_VERSION, CheckpointingConfig, CheckpointMetadata, TensorEntry, read_metadata, write_metadata
from dist_checkpointing.global_plan import GlobalPlan, LocalPlan, PlanCache, structure_owners
from dist_checkpointing.mapping import ShardedTensor
from dist_checkpointing.strategies import save_strategy_from_config
from dist_checkpointing.strategies.config import StrategyConfig
from dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from dist_checkpointing.validation import validate_plan

TP, PP = 8, 8


def rank_shards(rank: int, tensors: int):
    """The data-less shards of `rank`."""
    tp, pp, dp = rank % TP, (rank // TP) % PP, rank // (TP * PP)
    return [
        ShardedTensor(f"decoder.layers.{pp}.block{t}.weight", None, torch.bfloat16, (64, 32), (64 * TP, 32), (64 * tp, 0), (TP, 1), dp)
        for t in range(tensors)
    ]


def payloads(ranks: int, tensors: int):
    """What every rank sends in the two exchanges: its digests, then (structure if it is the
    first rank of that structure, main bits). Ranks of one (tp, pp) differ only in main bits."""
    distinct = {}
    for rank in range(min(ranks, 2 * TP * PP)):  # DP rank 0 (main) and 1 (replicas) of each (tp, pp)
        distinct[rank] = LocalPlan.of(rank_shards(rank, tensors))
    plans = [distinct[rank if rank < TP * PP else TP * PP + rank % (TP * PP)] for rank in range(ranks)]
    digests = [p.digests(None, b"") for p in plans]
    _, owners = structure_owners([d.structure for d in digests])
    structures = {rank: plans[rank].structure for rank in owners}
    return plans, digests, [pickle.dumps(p.main) for p in plans], structures


def median_time(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(ranks: int, tensors: int, repeats: int) -> dict:
    plans, digests, mains, structures = payloads(ranks, tensors)
    mine = rank_shards(0, tensors)
    infos = [None] * ranks
    row = {"ranks": ranks, "shards": ranks * tensors}
    row["serialize_s"], _ = median_time(lambda: LocalPlan.of(mine).digests(None, b""), repeats)

    def assemble():
        main = [pickle.loads(p) for p in mains]
        rank_structure, owners = structure_owners([d.structure for d in digests])
        return GlobalPlan.assemble([structures[r] for r in owners], rank_structure, main)

    row["assemble_s"], plan = median_time(assemble, repeats)
    row["validate_s"], _ = median_time(lambda: validate_plan(plan), repeats)
    zarr = save_strategy_from_config(StrategyConfig())
    row["zarr_plan_s"], _ = median_time(lambda: zarr.plan(plan, infos, 0), repeats)
    wrapper = FullyParallelSaveStrategyWrapper(zarr)
    group = wrapper.planning_info()[0]  # one group of every rank (no process group here: rank 0's)
    row["fully_parallel_s"], _ = median_time(lambda: wrapper.plan(plan, [(group, None)] * ranks, 0), repeats)
    row["total_s"] = row["serialize_s"] + row["assemble_s"] + row["validate_s"] + row["fully_parallel_s"]

    def cached():
        reported = LocalPlan.of(mine).digests(None, b"")
        global_digest = PlanCache.global_digest([d.whole for d in digests[:-1]] + [reported.whole])
        return PlanCache.is_hit(global_digest, [global_digest] * ranks)

    row["cached_s"], hit = median_time(cached, repeats)
    assert hit
    row["torch_dist_plan_s"], _ = median_time(lambda: save_strategy_from_config(StrategyConfig(backend="torch_dist")).plan(plan, infos, 0), 1)
    first = max(len(pickle.dumps((d, None, None))) for d in digests)  # + the common state's digest
    main = max(len(m) for m in mains)
    shared = [len(s) for s in structures.values()]
    broadcast = 4 * len(shared) <= ranks  # as collectives.share_bytes decides
    row["sent_kb"] = round((first + main + max(shared)) / 1e3, 1)
    row["received_mb"] = round((ranks * (first + main) + (sum(shared) if broadcast else ranks * max(shared))) / 1e6, 2)
    row["before_sent_kb"] = round(len(pickle.dumps((mine, None, None))) / 1e3, 1)
    row["before_received_mb"] = round(ranks * row["before_sent_kb"] / 1e3, 1)
    tensors_index, objects = plan.contents
    index = CheckpointMetadata(
        CheckpointingConfig("zarr", 1, "torch", 1), FORMAT_VERSION, {k: TensorEntry(list(s), d) for k, (s, d) in tensors_index.items()}, objects
    )
    with tempfile.TemporaryDirectory() as work:
        write_metadata(work, index)
        row["metadata_json_kb"] = round(os.path.getsize(os.path.join(work, "metadata.json")) / 1e3, 1)
        row["metadata_parse_s"], _ = median_time(lambda: read_metadata(work), repeats)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="64,256,1024,8192")
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [measure(ranks, args.tensors, args.repeats) for ranks in map(int, args.ranks.split(","))]
    report(f"Planning {args.tensors} tensors per rank (TP={TP} x PP={PP} x DP), one rank's work", {}, rows, args.json)


if __name__ == "__main__":
    main()

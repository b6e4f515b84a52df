"""Planning at scale without processes: the global plan of N simulated ranks x T tensors each.

What every rank of a save does between the planning exchange and the first write, timed step by
step on the gathered metadata of all ranks: group by key, validate (dtype/shape agreement and
exact coverage by main replicas), the zarr engine's plan (chunk grids and array documents) and
the fully parallel wrapper's distribution of replicated shards. Layout: TP=8 x PP=8 x DP=N/64;
each rank holds T tensors of its pipeline stage, split over TP and replicated over DP. Building
the simulated input (the objects the exchange would deliver) is not timed.

    python benchmarks/planning.py [--ranks 64,128,256,512,1024] [--tensors 2000] [--json]
"""

import argparse
import copy
import time

import torch

from dist_checkpointing.mapping import ShardedTensor
from dist_checkpointing.strategies.config import StrategyConfig
from dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from dist_checkpointing.strategies.zarr_plan import plan_arrays
from dist_checkpointing.validation import group_by_key, validate_shards_by_key
from harness import report

TP, PP = 8, 8


def simulated_plan(ranks: int, tensors: int):
    """The metadata every rank contributes (rank = (dp * PP + pp) * TP + tp)."""
    prototypes = {}
    plan = []
    for rank in range(ranks):
        tp, pp, dp = rank % TP, (rank // TP) % PP, rank // (TP * PP)
        shards = []
        for t in range(tensors):
            proto_key = (pp, tp, t)
            if proto_key not in prototypes:
                prototypes[proto_key] = ShardedTensor(
                    f"layers.{pp}.param{t}", None, torch.bfloat16, (64, 32), (64 * TP, 32), (64 * tp, 0), (TP, 1), 0
                )
            shard = copy.copy(prototypes[proto_key])
            shard.replica_id = dp
            shards.append(shard)
        plan.append(shards)
    return plan


def time_planning(plan):
    steps = {}
    start = time.perf_counter()
    by_key = group_by_key(plan)
    steps["group_by_key_s"] = time.perf_counter() - start
    start = time.perf_counter()
    validate_shards_by_key(by_key)
    steps["validate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    plan_arrays(by_key, StrategyConfig())
    steps["zarr_plan_s"] = time.perf_counter() - start
    start = time.perf_counter()
    everyone = frozenset(range(len(plan)))
    _distribution(by_key, [everyone] * len(plan))
    steps["fully_parallel_s"] = time.perf_counter() - start
    steps["total_s"] = sum(steps.values())
    return steps


def _distribution(by_key, groups):
    """The wrapper's distribution over one group of all ranks (its plan without an engine)."""
    wrapper = FullyParallelSaveStrategyWrapper.__new__(FullyParallelSaveStrategyWrapper)
    wrapper.do_cache_distribution, wrapper.cached_distribution = False, None
    return wrapper._distribution(by_key, groups)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="64,128,256,512,1024")
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for ranks in map(int, args.ranks.split(",")):
        start = time.perf_counter()
        plan = simulated_plan(ranks, args.tensors)
        built = time.perf_counter() - start
        steps = time_planning(plan)
        shards = ranks * args.tensors
        rows.append({
            "ranks": ranks, "shards": shards, "input_build_s": round(built, 2),
            **{k: round(v, 3) for k, v in steps.items()},
            "us_per_shard": round(steps["total_s"] / shards * 1e6, 2),
        })
        del plan
    report(f"Planning {args.tensors} tensors per rank (TP={TP} x PP={PP} x DP)", {}, rows, args.json)


if __name__ == "__main__":
    main()

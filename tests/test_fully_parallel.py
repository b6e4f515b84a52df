"""Fully parallel save and load: replicated shards are written and read in balanced shares."""

import random

import numpy as np
import torch
import torch.distributed as dist
from layouts import check_loaded, sharded_state_dict
from multirank import run_ranks

import dist_checkpointing as dc
from dist_checkpointing.dict_utils import nested_values
from dist_checkpointing.exchange_utils import distribute_shards_to_ranks
from dist_checkpointing.global_plan import GlobalPlan
from dist_checkpointing.mapping import ShardedTensor, is_main_replica
from dist_checkpointing.strategies import load_strategy_from_config, save_strategy_from_config
from dist_checkpointing.strategies.config import ENGINES, StrategyConfig
from dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
    _sharded_tensor_shard_id,
    save_distribution,
)

TP, DP = 2, 2


def _greedy(shard_to_ranks, shard_to_size, num_ranks, late=frozenset()):
    """Megatron-Core's greedy, written plainly: the reference for the heap-based one."""
    load = [0] * num_ranks
    owner = {}
    for shard in sorted(shard_to_ranks, key=lambda s: (s in late, len(shard_to_ranks[s]), -shard_to_size[s], s)):
        rank = min(shard_to_ranks[shard], key=lambda r: (load[r], r))
        owner[shard] = rank
        load[rank] += shard_to_size[shard]
    return owner


def test_distribute_shards_to_ranks_is_megatrons_greedy():
    # Megatron-Core's documented example (its test_save_distribution): TP=2 x DP=4 over 8 ranks
    dp = {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]}
    shards = {("keyB", (r * 20,), None): [r] for r in range(8)}
    sizes = {s: 80 for s in shards}
    for key in ("key_TP_repl1", "key_TP_repl2"):
        for tp in (0, 1):
            shards[(key, (tp * 10,), None)], sizes[(key, (tp * 10,), None)] = dp[tp], 40
    for key, nbytes in (("keyC", 400), ("keyD", 4000), ("keyE", 400)):
        shards[(key, (0,), None)], sizes[(key, (0,), None)] = list(range(8)), nbytes
    owner = distribute_shards_to_ranks(shards, sizes, 8)
    by_key = {}
    for (key, _, _), rank in sorted(owner.items()):
        by_key.setdefault(key, []).append(rank)
    assert by_key == {"keyB": list(range(8)), "key_TP_repl1": [0, 1], "key_TP_repl2": [2, 3], "keyC": [5], "keyD": [4], "keyE": [6]}
    # random overlapping candidate sets, ties and late shards: the same as the plain greedy
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randint(1, 9)
        shards = {(f"k{i}", (rng.randint(0, 3),), None): rng.sample(range(n), rng.randint(1, n)) for i in range(rng.randint(1, 30))}
        sizes = {s: rng.choice([0, 1, 2, 8, 8, 64]) for s in shards}
        late = {s for s in shards if rng.random() < 0.2}
        assert distribute_shards_to_ranks(shards, sizes, n, late) == _greedy(shards, sizes, n, late)


def test_save_distribution_of_a_plan_is_the_same_greedy():
    """The fully parallel save on the global plan assigns what `distribute_shards_to_ranks`
    assigns for the same shards (random layouts, replicas and groups)."""
    rng = random.Random(7)
    for _ in range(30):
        world = rng.randint(2, 8)
        groups = [rng.randint(0, 1) for _ in range(world)]
        by_rank = [[] for _ in range(world)]
        for k in range(rng.randint(1, 12)):
            holders = rng.sample(range(world), rng.randint(1, world))
            pieces, length = rng.randint(1, 3), rng.choice([1, 3, 8])
            for piece in range(pieces):
                main = rng.choice(holders)
                for rank in holders:
                    by_rank[rank].append(
                        ShardedTensor.from_rank_offsets(f"t{k}", torch.zeros(length), (0, piece, pieces), replica_id=int(rank != main))
                    )
        plan = GlobalPlan.of_shards(by_rank)
        writes = save_distribution(plan, groups)
        chosen = {}
        for pair in np.flatnonzero(writes).tolist():
            chosen[_sharded_tensor_shard_id(plan.shard(plan.pair_row[pair]))] = int(plan.pair_rank[pair])
        candidates, sizes = {}, {}
        for rank, shards in enumerate(by_rank):
            for sh in shards:
                sid = _sharded_tensor_shard_id(sh)
                main_rank = next(r for r, other in enumerate(by_rank) for o in other if _sharded_tensor_shard_id(o) == sid and o.replica_id == 0)
                if groups[rank] == groups[main_rank]:
                    candidates.setdefault(sid, []).append(rank)
                sizes[sid] = sh.nbytes
        assert chosen == _greedy(candidates, sizes, world)


def _written_bytes(state, writes):
    return sum(sh.nbytes for sh in nested_values(state) if isinstance(sh, ShardedTensor) and _sharded_tensor_shard_id(sh) in writes)


def save_and_load_fully_parallel(rank, world_size, root, use_dp_groups):
    # the DP groups of a TP=2 x DP=2 layout (rank = dp_rank * TP + tp_rank)
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group = dp_groups[rank % TP] if use_dp_groups else None
    report = {}
    plans = []
    planner = FullyParallelSaveStrategyWrapper.plan
    FullyParallelSaveStrategyWrapper.plan = lambda *args: plans.append(planner(*args)) or plans[-1]
    for backend in ENGINES:
        config = StrategyConfig(backend=backend)
        saver = FullyParallelSaveStrategyWrapper(save_strategy_from_config(config), group, do_cache_distribution=True)
        state = sharded_state_dict(rank, TP, DP)
        planned = len(plans)
        dc.save(state, f"{root}/{backend}-first", saver)
        # a new but equal strategy object, an unchanged state: the plan is reused, not made again
        again = FullyParallelSaveStrategyWrapper(save_strategy_from_config(config), group)
        dc.save(sharded_state_dict(rank, TP, DP), f"{root}/{backend}-cached", again)
        assert len(plans) == planned + 1
        first = plans[-1].writes
        main_bytes = sum(sh.nbytes for sh in nested_values(state) if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id))

        base = load_strategy_from_config(config)
        read_keys = []
        plain_load = base.load
        def counting_load(request, ckpt_dir, read_keys=read_keys, plain_load=plain_load):
            read_keys.extend(sh.key for sh in nested_values(request) if isinstance(sh, ShardedTensor))
            return plain_load(request, ckpt_dir)

        base.load = counting_load
        loader = FullyParallelLoadStrategyWrapper(base, group, do_cache_distribution=True)
        for attempt in ("first", "cached"):
            request = sharded_state_dict(rank, TP, DP, with_data=False)
            loaded = dc.load(request, f"{root}/{backend}-{attempt}", loader)
            # read here or received: in the caller's tensors
            assert loaded["embedding"] is request["embedding"].data
            assert all(value is sh.data for value, sh in zip(loaded["dtypes"], request["dtypes"]))
            compared = check_loaded(loaded, rank, TP, DP)
        report[backend] = {
            "written": _written_bytes(state, first),
            "written_without_wrapper": main_bytes,
            "read_requests": len(read_keys) // 2,
            "requests": compared,
        }
    return report


def _check_balanced(reports):
    for backend in ENGINES:
        written = [r[backend]["written"] for r in reports]
        without = [r[backend]["written_without_wrapper"] for r in reports]
        assert sum(written) == sum(without), backend  # every shard written exactly once
        assert without[2] == without[3] == 0  # DP rank 1 writes nothing by itself...
        assert min(written) > 0.6 * max(written), (backend, written)  # ...and a fair share wrapped
        for r in reports:  # each rank reads about half of what it asks for and receives the rest
            assert 0 < r[backend]["read_requests"] < r[backend]["requests"], (backend, r)


def test_fully_parallel_in_dp_groups_every_engine(tmp_path):
    reports = run_ranks(save_and_load_fully_parallel, 4, str(tmp_path), True)
    _check_balanced(reports)
    for backend in ENGINES:  # an ordinary checkpoint: loads in one process at TP=1
        loaded = dc.load(sharded_state_dict(0, 1, 1, with_data=False, objects=False), f"{tmp_path}/{backend}-first")
        assert check_loaded(loaded, 0, 1, 1) > 10


def test_fully_parallel_over_all_ranks(tmp_path):
    _check_balanced(run_ranks(save_and_load_fully_parallel, 4, str(tmp_path), False))


def _exchange_algos_and_tensor_aware_state_dict(rank, world_size, root):
    """Loads with every exchange algorithm; round-trips a MCoreTensorAwareStateDict (fully
    parallel: each replicated shard kept by one rank; atomic) through pop/insert/init."""
    from dist_checkpointing import exchange_utils
    from dist_checkpointing.tensor_aware_state_dict import MCoreTensorAwareStateDict

    dc.save(sharded_state_dict(rank, TP, DP), f"{root}/ckpt", "torch_dist")
    compared = {}
    packed, fewest = exchange_utils.PACKED_BYTES, exchange_utils.PACKED_MIN_SHARDS
    # shards travel one by one (the default for this few), packed, and both, in many small messages (256)
    variants = [(algo, packed, fewest) for algo in exchange_utils.EXCHANGE_ALGOS]
    variants += [(algo, size, 0) for algo in ("broadcast", "point_to_point") for size in (packed, 256)]
    for algo, packed_bytes, min_shards in variants:
        exchange_utils.PACKED_BYTES, exchange_utils.PACKED_MIN_SHARDS = packed_bytes, min_shards
        loader = FullyParallelLoadStrategyWrapper(load_strategy_from_config(StrategyConfig(backend="torch_dist")), exchange_algo=algo)
        request = sharded_state_dict(rank, TP, DP, with_data=False)
        loaded = dc.load(request, f"{root}/ckpt", loader)
        assert loaded["embedding"] is request["embedding"].data  # received into the caller's tensor
        compared[f"{algo} {packed_bytes} {min_shards}"] = check_loaded(loaded, rank, TP, DP)
    exchange_utils.PACKED_BYTES, exchange_utils.PACKED_MIN_SHARDS = packed, fewest
    for algo in ("fully_parallel", "atomic"):
        tasd, distribution = MCoreTensorAwareStateDict.from_state_dict(sharded_state_dict(rank, TP, DP), algo)
        kept = len(list(tasd.tensors))
        tensors = tasd.pop_tensors()
        assert tasd.is_hollow and len(tensors) == kept
        tasd.init_tensors()  # as a manager reading them back would
        for target, tensor in zip(tasd.tensors, tensors):
            target.copy_(tensor)
        state = tasd.to_state_dict(sharded_state_dict(rank, TP, DP, with_data=False), algo)
        compared[algo] = (kept, check_loaded(state, rank, TP, DP))
    return compared


def test_exchange_algorithms_and_tensor_aware_state_dict(tmp_path):
    results = run_ranks(_exchange_algos_and_tensor_aware_state_dict, 4, str(tmp_path))
    for compared in results:
        loads = {algo: n for algo, n in compared.items() if algo not in ("fully_parallel", "atomic")}
        assert len(set(loads.values())) == 1 and min(loads.values()) > 10, compared
        assert compared["fully_parallel"][1] == compared["atomic"][1] == min(loads.values())
    # fully parallel: replicated shards are kept once in each DP group, atomic: all of them
    assert sum(r["fully_parallel"][0] for r in results) < sum(r["atomic"][0] for r in results)

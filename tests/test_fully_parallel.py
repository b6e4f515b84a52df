"""Fully parallel save and load: replicated shards are written and read in balanced shares."""

import torch.distributed as dist

import dist_checkpointing as dc
from dist_checkpointing.dict_utils import nested_values
from dist_checkpointing.mapping import ShardedTensor, is_main_replica
from dist_checkpointing.strategies import load_strategy_from_config, save_strategy_from_config
from dist_checkpointing.strategies.config import ENGINES, StrategyConfig
from dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
    distribute_evenly,
)
from layouts import check_loaded, sharded_state_dict
from multirank import run_ranks

TP, DP = 2, 2


def test_distribute_evenly_balances_bytes_deterministically():
    candidates = {("a", i): [0, 1, 2] for i in range(6)}
    candidates[("only0",)] = [0]
    sizes = {("a", i): 10 * (i + 1) for i in range(6)}
    sizes[("only0",)] = 60
    owners = distribute_evenly(candidates, sizes)
    load = {r: sum(sizes[s] for s, o in owners.items() if o == r) for r in range(3)}
    assert load == {0: 90, 1: 90, 2: 90}  # 270 bytes, rank 0 already holding the pinned 60
    assert owners == distribute_evenly(dict(reversed(candidates.items())), sizes)


def _written_bytes(state, writes):
    from dist_checkpointing.strategies.fully_parallel import _shard_id

    return sum(sh.nbytes for sh in nested_values(state) if isinstance(sh, ShardedTensor) and _shard_id(sh) in writes)


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
        base.load = lambda request, ckpt_dir: read_keys.extend(
            sh.key for sh in nested_values(request) if isinstance(sh, ShardedTensor)
        ) or plain_load(request, ckpt_dir)
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

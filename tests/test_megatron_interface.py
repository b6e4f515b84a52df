"""Strategies written for Megatron-Core's interface (only `save(sharded_state_dict, dir)`, or
`async_save` returning an AsyncRequest, and a load strategy made without arguments) work in
`save` and `load`, alone and wrapped for fully parallel saves, sync and async; a request's
`preload_fn` stages its state when it is scheduled."""

import os

import torch
import torch.distributed as dist
from multirank import run_ranks

import dist_checkpointing as dc
from dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
from dist_checkpointing.mapping import ShardedTensor, is_main_replica
from dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest
from dist_checkpointing.strategies.base import (
    AsyncSaveShardedStrategy,
    LoadShardedStrategy,
    StrategyAction,
    register_default_strategy,
)
from dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

BACKEND = "pt_files"


def _name(key, offset) -> str:
    return f"{key}.{'_'.join(map(str, offset))}.pt"


def write_files(checkpoint_dir, staged):
    """The async function: runs in the writer process on the staged (key, offset, tensor)."""
    for key, offset, tensor in staged:
        torch.save(tensor, os.path.join(checkpoint_dir, _name(key, offset)))
    return len(staged)


class PtFilesSaveStrategy(AsyncSaveShardedStrategy):
    """One torch.save file per main-replica shard (regular grids only)."""

    def __init__(self):
        super().__init__(BACKEND, 1)

    def async_save(self, sharded_state_dict, checkpoint_dir):
        shards = [sh for sh in nested_values(sharded_state_dict) if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id)]
        staged = lambda: [(sh.key, sh.global_offset, sh.data.detach().clone()) for sh in shards]  # noqa: E731
        return AsyncRequest(write_files, (str(checkpoint_dir), None), [], preload_fn=staged)


class PtFilesLoadStrategy(LoadShardedStrategy):
    def __init__(self):  # Megatron-Core's load strategies take no arguments
        super().__init__()

    def load(self, sharded_state_dict, checkpoint_dir):
        def read(sh):
            return torch.load(os.path.join(str(checkpoint_dir), _name(sh.key, sh.global_offset)), weights_only=True)

        return dict_list_map_outplace(read, sharded_state_dict)

    def load_tensors_metadata(self, checkpoint_dir):
        return {}

    def check_backend_compatibility(self, loaded_backend):
        assert loaded_backend == BACKEND

    def check_version_compatibility(self, loaded_version):
        assert loaded_version == 1


def _state(rank, world_size, replicated: bool):
    key = "w" if replicated else f"w{rank}"
    data = torch.arange(6.0).reshape(2, 3) + (0 if replicated else rank)
    return {"w": ShardedTensor.from_rank_offsets(key, data, replica_id=rank if replicated else 0), "step": 3}


def _save_and_load(rank, world_size, root):
    register_default_strategy(StrategyAction.LOAD_SHARDED, BACKEND, 1, PtFilesLoadStrategy())
    results = {}
    queue = AsyncCallsQueue()
    for name, strategy, asynchronous in (
        ("sync", PtFilesSaveStrategy(), False),
        ("async", PtFilesSaveStrategy(), True),
        ("fully-parallel", FullyParallelSaveStrategyWrapper(PtFilesSaveStrategy(), do_cache_distribution=True), False),
    ):
        path = os.path.join(root, name)
        replicated = name == "fully-parallel"
        request = dc.save(_state(rank, world_size, replicated), path, strategy, async_sharded_save=asynchronous)
        if asynchronous:
            queue.schedule_async_request(request)
            queue.maybe_finalize_async_calls(blocking=True)
            assert request.committed.result() is None or rank == 0
        dist.barrier()
        loaded = dc.load(_state(rank, world_size, replicated), path)
        assert loaded["step"] == 3 and torch.equal(loaded["w"], _state(rank, world_size, replicated)["w"].data)
        files = sorted(f for f in os.listdir(path) if f.endswith(".pt") and f != "common.pt")
        results[name] = files
    results["writer"] = strategy.cached_distribution.main_rank_for_shard[("w", (0, 0), None)]
    queue.close()
    return results


def test_megatron_interface_strategies_save_and_load(tmp_path):
    results = run_ranks(_save_and_load, 2, str(tmp_path))
    assert results[0]["sync"] == results[0]["async"] == ["w0.0_0.pt", "w1.0_0.pt"]
    assert results[0]["fully-parallel"] == ["w.0_0.pt"]  # written once, by the rank Megatron's greedy chose
    assert results[0]["writer"] == results[1]["writer"] == 0
    register_default_strategy(StrategyAction.LOAD_SHARDED, BACKEND, 1, PtFilesLoadStrategy())
    assert dc.load_common_state_dict(str(tmp_path / "async")) == {"step": 3}
    assert set(dc.load_tensors_metadata(str(tmp_path / "sync"))) == {"w0", "w1"}  # from index.json

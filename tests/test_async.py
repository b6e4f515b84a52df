"""Async save: staged before `save` returns, written by a writer process, committed at finalize;
a failed or dead writer on one rank raises on every rank and commits nothing."""

import os
import resource
import signal

import pytest
import torch
import torch.distributed as dist
from layouts import check_loaded, sharded_state_dict
from multirank import run_ranks

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, ShardedTensor, write_job
from dist_checkpointing.dict_utils import nested_values
from dist_checkpointing.inspection import verify
from dist_checkpointing.strategies import async_utils, save_strategy_from_config
from dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from dist_checkpointing.strategies.config import ENGINES, StrategyConfig
from dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper


def _scribble(state):
    """What training does right after `save` returns: overwrite the saved tensors."""
    for sh in nested_values(state):
        if isinstance(sh, ShardedTensor):
            sh.data.fill_(1)


def _committed(ckpt):
    return os.path.exists(os.path.join(ckpt, "metadata.json"))


def _reload(rank, ckpt, tp=2):
    request = sharded_state_dict(rank, tp, with_data=False, objects=tp == 2)  # saved at TP=2
    return check_loaded(dc.load(request, ckpt), rank, tp)


def async_saves(rank, world_size, root):
    queue = AsyncCallsQueue(persistent=True)
    strategies = {backend: backend for backend in ENGINES}
    strategies["zarr-fully-parallel"] = FullyParallelSaveStrategyWrapper(save_strategy_from_config(StrategyConfig()))
    # Megatron-Core's newest layout, with integrity.json (written by rank 0 at finalize)
    strategies["torch_dist-newest"] = StrategyConfig(backend="torch_dist", common_state_in_dcp=True)
    allocated = _count_staging_allocations()
    dc.prepare_async_save(sharded_state_dict(rank, 2), "torch_dist")  # once, before the first save
    assert allocated == [1]
    prepared_writer = async_utils._spare  # started ahead: the first save does not wait for it
    assert prepared_writer.process.is_alive()
    for name, strategy in strategies.items():
        ckpt = f"{root}/{name}"
        state = sharded_state_dict(rank, 2)
        request = dc.save(state, ckpt, strategy, async_sharded_save=True, verify_integrity=name == "torch_dist-newest")
        _scribble(state)
        queue.schedule_async_request(request)
        assert not _committed(ckpt) and not request.committed.done()  # only finalize commits
        assert queue.writer is prepared_writer and async_utils._spare is None
        assert queue.maybe_finalize_async_calls(blocking=True) == [queue.call_idx]
        assert _committed(ckpt) and queue.get_num_unfinalized_calls() == 0
        assert request.committed.result(timeout=0) == request.results
        assert _reload(rank, ckpt) > 10, name
    newest = f"{root}/torch_dist-newest"
    problems, checked = verify(newest)
    assert problems == [] and not os.path.exists(f"{newest}/common.pt")
    assert checked["integrity_files"] == len(os.listdir(newest)) - 1  # every file but integrity.json
    assert allocated == [1]  # every save staged into the prepared memory
    # the writer yields the CPU to training
    assert os.getpriority(os.PRIO_PROCESS, queue.writer.process.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    # non-blocking: nothing is final until every rank's writer is done, then it is
    request = dc.save(sharded_state_dict(rank, 2), f"{root}/polled", async_sharded_save=True)
    finalized = []
    request.add_finalize_fn(lambda: finalized.append(rank))
    index = queue.schedule_async_request(request)
    polls = 0
    while not queue.maybe_finalize_async_calls(blocking=False):
        polls += 1
    assert finalized == [rank] and _committed(f"{root}/polled")
    _overlapping_saves_with_one_strategy_object(rank, root, queue)
    queue.close()
    # Megatron-Core's default queue stops its writer after each call and starts the next one's
    # right then, which that call takes
    queue = AsyncCallsQueue()
    for step in range(2):
        request = dc.save(sharded_state_dict(rank, 2), f"{root}/nonpersistent-{step}", async_sharded_save=True)
        ready = async_utils._spare
        queue.schedule_async_request(request)
        assert queue.writer is ready or (step == 0 and ready is None)
        queue.maybe_finalize_async_calls(blocking=True)
        assert queue.writer is None and async_utils._spare.process.is_alive()
        assert _reload(rank, f"{root}/nonpersistent-{step}") > 10
    # execute_sync runs the same request in this process
    dc.save(sharded_state_dict(rank, 2), f"{root}/sync", "torch_dist", async_sharded_save=True).execute_sync()
    assert _reload(rank, f"{root}/sync") > 10
    return index


def _count_staging_allocations():
    """A list whose one element counts the shared-memory buffers allocated from now on."""
    count, allocate = [0], write_job._shared_buffer

    def counted(nbytes):
        count[0] += 1
        return allocate(nbytes)

    write_job._shared_buffer = counted
    return count


def _other_state(rank, with_data=True):
    """A state with other keys and shapes than `sharded_state_dict`."""
    values = torch.arange(12.0).reshape(4, 3)[rank * 2 : rank * 2 + 2] + 100
    return {"other": ShardedTensor.from_rank_offsets("other.weight", values if with_data else torch.zeros(2, 3), (0, rank, 2))}


def _overlapping_saves_with_one_strategy_object(rank, root, queue):
    """Two async saves in flight at once through the registry's one strategy object per
    engine, of different states: each checkpoint gets its own plan and its own content."""
    for backend in ENGINES:
        strategy = dc.get_default_save_sharded_strategy(backend)
        first, second = f"{root}/overlap-{backend}-1", f"{root}/overlap-{backend}-2"
        requests = [
            dc.save(sharded_state_dict(rank, 2), first, strategy, async_sharded_save=True),
            dc.save(_other_state(rank), second, strategy, async_sharded_save=True),
        ]
        for request in requests:
            queue.schedule_async_request(request)
        queue.maybe_finalize_async_calls(blocking=True)
        assert _reload(rank, first) > 10, backend
        loaded = dc.load(_other_state(rank, with_data=False), second)["other"]
        assert torch.equal(loaded, _other_state(rank)["other"].data), backend


def test_async_save_every_engine(tmp_path):
    run_ranks(async_saves, 2, str(tmp_path))
    assert _reload(0, f"{tmp_path}/zarr", tp=1) > 10


def async_failures(rank, world_size, root):
    previous = f"{root}/previous"
    dc.save(sharded_state_dict(rank, 2), previous)
    # a file size limit on rank 1's writer: EFBIG there, the same error on both ranks
    queue = AsyncCallsQueue()
    request = dc.save(sharded_state_dict(rank, 2), f"{root}/too-large", "torch_dist", async_sharded_save=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:  # staging is done; the writer process started by schedule inherits the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, hard))
    queue.schedule_async_request(request)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with pytest.raises(CheckpointingException, match=r"rank\(s\) 1.*File too large"):
        queue.maybe_finalize_async_calls(blocking=True)
    assert not _committed(f"{root}/too-large")
    assert isinstance(request.committed.exception(timeout=0), CheckpointingException)
    # a writer killed on rank 1: a clear error on both ranks, no hang
    queue = AsyncCallsQueue(persistent=True)
    request = dc.save(sharded_state_dict(rank, 2), f"{root}/killed", async_sharded_save=True)
    queue.schedule_async_request(request)
    if rank == 1:
        os.kill(queue.writer.process.pid, signal.SIGKILL)
    # a call scheduled after the death, before anyone noticed it, fails too (no hang)
    queue.schedule_async_request(dc.save(sharded_state_dict(rank, 2), f"{root}/after", async_sharded_save=True))
    for _ in range(2):
        with pytest.raises(CheckpointingException, match=r"rank\(s\) 1.*writer process died"):
            queue.maybe_finalize_async_calls(blocking=True)
    queue.close()
    assert not _committed(f"{root}/after")
    assert not _committed(f"{root}/killed")
    assert _reload(rank, previous) > 10  # the previous checkpoint is intact
    dist.barrier()
    dc.save(sharded_state_dict(rank, 2), f"{root}/killed")  # a retry into the same directory
    return _reload(rank, f"{root}/killed")


def test_async_writer_failures_raise_on_every_rank(tmp_path):
    counts = run_ranks(async_failures, 2, str(tmp_path))
    assert counts[0] == counts[1] > 10

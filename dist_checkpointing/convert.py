"""Converting a checkpoint to another engine or to a single-file format, one tensor at a time.

Any checkpoint `load` reads (ours in every engine, Megatron-Core's Zarr v2 and torch_dist) is read
key by key as whole tensors. The target is written the same way, so memory holds about one
tensor, never the whole state:
- our formats: a save by virtual ranks run one after another (rank 0 writes the common state and
  the ShardedObjects, rank i + 1 writes tensor i, whole), through the engines' own `plan`,
  `stage` and `save` and the same commit as `save`: the result is a regular checkpoint,
  `metadata.json` last;
- `torch` and `safetensors`: single_file.py. They hold tensors only; the common state and the
  ShardedObjects are left out (the summary says how many).
One process, no torch.distributed.
"""

from typing import Callable, Optional

from .global_plan import GlobalPlan
from .mapping import ShardedObject, ShardedTensor, whole_tensor_metadata
from .serialization import (
    commit_save,
    load_common_state_dict,
    load_sharded_metadata,
    refuse_complete_checkpoint,
    verify_checkpoint_and_load_strategy,
)
from .single_file import write_safetensors, write_torch_file
from .strategies import save_strategy_from_config
from .strategies.base import StrategyAction, get_default_strategy
from .strategies.config import ENGINES, ZARR_ENGINES, StrategyConfig
from .write_job import WriteJob

FORMATS = ENGINES + ("torch", "safetensors")
DEFAULT_MAX_FILE_BYTES = 5 * 10**9  # Hugging Face's default shard size


def convert(
    src,
    dst,
    to: str,
    zarr_format: int = 3,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Converts checkpoint `src` into `dst` in format `to` (one of FORMATS).

    `dst` is a checkpoint directory (engines), a file (`torch`) or a directory of safetensors
    files. `progress(key)` is called after each entry is written. Returns a summary.
    """
    src, dst = str(src), str(dst)
    sharded, common = verify_checkpoint_and_load_strategy(src)  # refuses an incomplete `src`
    entries = load_sharded_metadata(src, sharded)
    tensors = sorted((sh for sh in entries.values() if isinstance(sh, ShardedTensor)), key=lambda sh: sh.key)
    objects = [sh for _, sh in sorted(entries.items()) if isinstance(sh, ShardedObject)]
    requests = {sh.key: whole_tensor_metadata(sh.key, sh.dtype, sh.global_shape) for sh in tensors}  # unflattened

    def read(key: str):
        return sharded.load({key: requests[key]}, src)[key]

    summary = {"tensors": len(tensors), "tensor_bytes": sum(sh.nbytes for sh in tensors)}
    if to in ("torch", "safetensors"):
        summary.update(skipped_objects=len(objects), skipped_common_state=True)
        listed = [(sh.key, sh.dtype, sh.global_shape) for sh in tensors]
        if to == "torch":
            write_torch_file(dst, listed, read, progress)
            summary["files"] = [dst]
        else:
            summary["files"] = write_safetensors(dst, listed, read, max_file_bytes, progress)
        return summary
    if to not in ENGINES:
        raise ValueError(f"unknown format {to!r}; one of {list(FORMATS)}")
    fields = {"zarr_format": zarr_format} if to in ZARR_ENGINES else {}
    strategy = save_strategy_from_config(StrategyConfig(backend=to, **fields))
    common_strategy = get_default_strategy(StrategyAction.SAVE_COMMON, "torch", 1)
    refuse_complete_checkpoint(dst)
    objects = _load_objects(objects, sharded, common, src)
    global_metadata = [[obj.without_data() for obj in objects]] + [[sh] for sh in tensors]
    global_plan = GlobalPlan.of_shards(global_metadata)
    infos = [None] * len(global_metadata)
    plans, outcomes = [], []
    for rank, shards in enumerate(global_metadata):
        rank_plan = strategy.plan(global_plan, infos, rank)  # engines name files and choose array writers by rank
        plans.append(rank_plan)
        if rank == 0:  # the common state, and the objects (by the engine if it stores them)
            by_engine = strategy.can_handle_sharded_objects
            job = WriteJob(dst, common_strategy, strategy, rank_plan, load_common_state_dict(src),
                           [] if by_engine else objects, strategy.stage(rank_plan, objects if by_engine else []))
        else:
            (sh,) = shards
            whole = ShardedTensor.from_rank_offsets(sh.key, read(sh.key))
            job = WriteJob(dst, common_strategy, strategy, rank_plan, None, [], strategy.stage(rank_plan, [whole]))
        outcomes.append(job.run())
        if progress and rank:
            progress(shards[0].key)
    commit_save(dst, common_strategy, strategy, plans[0], global_plan, outcomes)
    summary.update(objects=len(objects), files=[dst])
    return summary


def _load_objects(objects, sharded, common, src):
    if not objects:
        return []
    request = {obj.unique_key: obj for obj in objects}
    reader = sharded if sharded.can_handle_sharded_objects else common
    values = reader.load(request, src) if reader is sharded else reader.load_sharded_objects(request, src)
    return [
        ShardedObject(obj.key, values[obj.unique_key], obj.global_shape, obj.global_offset, replica_id=0)
        for obj in objects
    ]

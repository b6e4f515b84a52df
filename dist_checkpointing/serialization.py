"""Entry points: `save` and `load` (the sharded `torch.save`/`torch.load`), and metadata helpers.

A save runs in three steps, each ending in one collective that carries every rank's outcome
(see collectives.py), so a failure anywhere raises everywhere and nothing hangs:

1. plan: split the state dict, refuse a complete checkpoint, exchange the shards' metadata;
   then every rank validates the same global plan, before anything is written;
2. write: rank 0 writes `common.pt`, main replicas write objects and tensor shards, fsync'd;
3. commit: rank 0 writes `metadata.json` atomically, only if every rank's writes succeeded.

An async save does step 1, stages the data (write_job.py) and returns an AsyncRequest; step 2
runs in a background writer process and step 3 when the request is finalized
(strategies/async_utils.py).
"""

import functools
import gc
import logging
import os
import pickle
import time
from typing import Callable, Hashable, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .collectives import broadcast_object, exchange, gather, get_rank, on_every_rank, within
from .core import (
    CONFIG_FNAME,
    FORMAT_VERSION,
    CheckpointingConfig,
    CheckpointingException,
    CheckpointMetadata,
    commit_config,
    config_bytes,
    read_metadata,
    require_complete_checkpoint,
    write_index,
    write_metadata,
)
from .dict_utils import diff, extract_matching_values, merge, nested_values
from .dtypes import torch_dtype
from .global_plan import GlobalPlan, LocalPlan, PlanCache, PlanDigests, gather_plan
from .integrity import verify_integrity as verify_integrity_json
from .integrity import write_integrity
from .layout import COMMON_STATE_KEY, COMMON_STATE_UNIQUE_KEY, INTEGRITY_FNAME, common_file
from .mapping import (
    CommonStateDict,
    ShardedObject,
    ShardedStateDict,
    ShardedTensor,
    StateDict,
    whole_tensor_metadata,
)
from .opening import open_checkpoint
from .pickling import digest_object
from .state_dict_utils import finish_load, load_preprocess, save_preprocess
from .storage import storage_of
from .strategies import load_strategy_from_config, save_strategy_from_config
from .strategies.async_utils import AsyncRequest, start_spare_writer
from .strategies.base import (
    LoadCommonStrategy,
    LoadShardedStrategy,
    SaveCommonStrategy,
    SaveShardedStrategy,
    StrategyAction,
    get_default_strategy,
    is_planned,
)
from .strategies.config import StrategyConfig
from .validation import (
    CkptShardedMetadata,
    StrictHandling,
    apply_strict_globally,
    apply_strict_locally,
    check_requests_against_checkpoint,
    parse_strict_flag,
    validate_plan,
)
from .write_job import WriteJob, reserve_staging_memory, staged_size

logger = logging.getLogger(__name__)

_CONTENT_METADATA_KEY = "content_metadata"
DEFAULT_BACKEND = "zarr"  # the engine of a save given no strategy
# a strategy object, (backend, version), a backend name, a StrategyConfig or its dict form
SaveShardedStrategyLike = Union[SaveShardedStrategy, Tuple[str, int], str, StrategyConfig, dict, None]
LoadShardedStrategyLike = Union[LoadShardedStrategy, Tuple[str, int], str, StrategyConfig, dict, None]


def _cyclic_gc_paused(entry_point):
    """Runs `entry_point` with Python's cyclic garbage collector paused (restored after). A
    save or load of many tensors allocates objects by the hundred thousand, which triggers full
    collections that each walk the caller's whole heap (the model, its state dict): 7 per
    save+load of 20,001 tensors, a third of the load's time. What they allocate is freed by
    reference counting; the few cycles wait for the next collection."""

    @functools.wraps(entry_point)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return entry_point(*args, **kwargs)
        gc.disable()
        try:
            return entry_point(*args, **kwargs)
        finally:
            gc.enable()

    return paused


@_cyclic_gc_paused
def save(
    sharded_state_dict: ShardedStateDict,
    checkpoint_dir,
    sharded_strategy: SaveShardedStrategyLike = None,
    common_strategy: Union[SaveCommonStrategy, Tuple[str, int], None] = None,
    validate_access_integrity: bool = True,
    async_sharded_save: bool = False,
    preprocess_common_before_consistancy_check: Optional[
        Callable[[CommonStateDict], StateDict]
    ] = None,
    content_metadata: Optional[dict] = None,
    verify_integrity: bool = False,
) -> Optional[AsyncRequest]:
    """Saves a sharded state dict into `checkpoint_dir` (called on every rank).

    ShardedTensors and ShardedObjects are written by their main replicas; every other value
    goes to `common.pt` (rank 0's copy). LocalNonpersistentObjects are not saved.

    Args:
        sharded_state_dict: the state dict with ShardedTensors, ShardedObjects and factories
        checkpoint_dir: created if missing; must not already hold a complete checkpoint
        sharded_strategy: a SaveShardedStrategy, a registered (backend, version), a backend
            name ("zarr", "tensorstore", "torch_dist"), or a StrategyConfig or its dict form
            (default: `DEFAULT_BACKEND`, zarr)
        common_strategy: a SaveCommonStrategy or (backend, version) (default: torch)
        validate_access_integrity: check that every element is written by exactly one main
            replica (on every rank, before anything is written), and warn if the common
            state differs between ranks (rank 0's copy is saved)
        async_sharded_save: plan, validate and stage (copy the data to be written), then
            return an AsyncRequest that writes and commits the checkpoint when scheduled on an
            AsyncCallsQueue (or run with `execute_sync()`); the caller may modify its tensors
            as soon as this returns
        preprocess_common_before_consistancy_check: maps the common state dict to what is
            compared across ranks (e.g. without keys that legitimately differ); must not
            modify its argument
        content_metadata: a dict stored with the common state (see `load_content_metadata`)
        verify_integrity: also write `integrity.json` (Megatron-Core's): the SHA-256 of every
            file, which rank 0 computes after the writes, before the commit (it reads back the
            whole checkpoint); `load(..., verify_integrity=True)` and `dist-ckpt verify` check it

    Returns:
        None, or the AsyncRequest of an async save
    """
    checkpoint_dir = str(checkpoint_dir)
    sharded_strategy = _strategy(StrategyAction.SAVE_SHARDED, sharded_strategy or DEFAULT_BACKEND)
    common_strategy = _strategy(StrategyAction.SAVE_COMMON, common_strategy or ("torch", 1))
    planned = is_planned(sharded_strategy)
    if async_sharded_save and not planned and not callable(getattr(sharded_strategy, "async_save", None)):
        raise CheckpointingException(f"Cannot save asynchronously with {sharded_strategy}: it has no async_save")
    local = {}

    kind = ("save", _configuration(sharded_strategy), validate_access_integrity)

    def plan():
        refuse_complete_checkpoint(checkpoint_dir)
        local["sharded"], local["common"] = save_preprocess(sharded_state_dict)
        if content_metadata is not None:
            local["common"][_CONTENT_METADATA_KEY] = content_metadata
        common_digest = None
        if validate_access_integrity:
            preprocess = preprocess_common_before_consistancy_check or (lambda common: common)
            local["compared"] = preprocess(local["common"])
            common_digest = digest_object(local["compared"])
        if planned and sharded_strategy.stores_common_state:
            local["sharded"][_COMMON_STATE_ENTRY] = ShardedObject(COMMON_STATE_KEY, local["common"], (1,), (0,), replica_id=get_rank())
            local["common"] = None
        info = sharded_strategy.planning_info() if planned else None
        local["plan"] = LocalPlan.of(nested_values(local["sharded"]))
        return local["plan"].digests(info, _PLANS.digest(kind)), common_digest, info

    uncommitted = f"Nothing was committed: {checkpoint_dir} has no {CONFIG_FNAME}; earlier checkpoints are untouched."
    started = time.perf_counter()
    planning = exchange(plan, "save planning", consequence=uncommitted)
    if validate_access_integrity:
        _report_common_state_differences([digest for _, digest, _ in planning], local["compared"])

    def decide(global_plan):
        if validate_access_integrity:
            validate_plan(global_plan)
        if planned:
            return sharded_strategy.plan(global_plan, [info for _, _, info in planning], get_rank())
        return None

    global_plan, save_plan = _agreed_plan(kind, local["plan"], [d for d, _, _ in planning], decide, "save planning", uncommitted)
    seconds = {"plan": time.perf_counter() - started}
    shards, objects = _split_objects(sharded_strategy, local["sharded"])
    job = functools.partial(
        WriteJob,
        checkpoint_dir,
        common_strategy,
        sharded_strategy if planned else None,
        save_plan,
        common=local["common"] if get_rank() == 0 else None,  # None where the strategy stores it
        objects=objects,
    )
    commit = functools.partial(
        commit_save, checkpoint_dir, common_strategy, sharded_strategy, save_plan, global_plan, integrity=verify_integrity
    )

    def stage(copy: bool):
        started = time.perf_counter()
        # the engine's stage is collective: it may exchange data
        write_job = job(shards=sharded_strategy.stage(save_plan, shards) if planned else [])
        write_job = write_job.stage() if copy else write_job
        seconds["stage"] = time.perf_counter() - started
        return write_job

    if not planned:  # a strategy of Megatron-Core's interface writes the shards its own way
        outcomes = exchange(lambda: stage(copy=False).run(), f"save to {checkpoint_dir}", consequence=uncommitted)
        if async_sharded_save:
            request = sharded_strategy.async_save(shards, checkpoint_dir)
            request.add_finalize_fn(lambda: commit(outcomes, seconds))
            return request
        on_every_rank(lambda: sharded_strategy.save(shards, checkpoint_dir), f"save to {checkpoint_dir}", consequence=uncommitted)
        commit(outcomes, seconds)
        return None
    if async_sharded_save:
        staged = on_every_rank(lambda: stage(copy=True), f"staging of the save to {checkpoint_dir}", consequence=uncommitted)
        request = AsyncRequest(
            WriteJob.run, (staged,), [], what=f"async save to {checkpoint_dir}", consequence=uncommitted
        )

        def finalize():
            try:
                commit(request.results, seconds)
            finally:
                staged.release()  # the writer is done with the staging buffer

        request.add_finalize_fn(finalize)
        return request
    commit(gather(lambda: stage(copy=False).run(), f"save to {checkpoint_dir}", consequence=uncommitted), seconds)
    return None


_PLANS = PlanCache()  # the last plan of each kind of save and load, in this process
_COMMON_STATE_ENTRY = object()  # where a save puts the common state that the strategy stores


def _configuration(strategy) -> Hashable:
    """What makes two strategy objects plan alike: their configuration (strategies hold no
    other state), or, for one that cannot be pickled, the object itself."""
    try:
        return type(strategy), pickle.dumps(strategy)
    except Exception:
        return type(strategy), id(strategy)


def _agreed_plan(kind, local_plan: LocalPlan, digests: Sequence[PlanDigests], decide, what: str, consequence: str):
    """(global plan, decision) of this save or load: the cached ones of `kind` if every rank
    reported an unchanged plan (one small exchange, already done: `digests`), else the global
    plan gathered anew and `decide(global_plan)` run on every rank (a failure anywhere raises
    everywhere), then cached."""
    global_digest = PlanCache.global_digest([d.whole for d in digests])
    if PlanCache.is_hit(global_digest, [d.cached for d in digests]):
        return _PLANS.get(kind)
    global_plan = gather_plan(local_plan, digests, what, consequence=consequence)
    decision = on_every_rank(lambda: decide(global_plan), what, consequence=consequence)
    _PLANS.put(kind, global_digest, (global_plan, decision))
    return global_plan, decision


def prepare_async_save(sharded_state_dict: ShardedStateDict, sharded_strategy: SaveShardedStrategyLike = None) -> None:
    """What the first async save of this state dict would otherwise do in its blocking part,
    done ahead on this rank (local, no collective): allocate and fault in the staging memory,
    load the engine `sharded_strategy` names (as `save` takes it; default zarr), and start the
    writer process (`start_spare_writer`), so that the first save's blocking part is a copy at
    memory bandwidth too, and its write does not wait for an interpreter to start.

    The memory is sized for every ShardedTensor of this rank (a main replica or not); a save
    that needs more (flattened pieces assembled into whole chunks) allocates at its staging.
    What remains of a first save beyond a later one is its planning exchange (a later save of
    the same plan reuses it)."""
    start_spare_writer()
    _strategy(StrategyAction.SAVE_SHARDED, sharded_strategy or DEFAULT_BACKEND)
    _strategy(StrategyAction.SAVE_COMMON, ("torch", 1))
    np.ma  # noqa: B018 -- numpy imports it at the first np.unique (the save's planning): 10 ms
    sharded, _ = save_preprocess(sharded_state_dict)
    tensors = [sh.data for sh in nested_values(sharded) if isinstance(sh, ShardedTensor)]
    reserve_staging_memory(sum(staged_size(t.numel() * t.element_size()) for t in tensors))


def _split_objects(sharded_strategy, sharded: ShardedStateDict):
    """(what the sharded strategy writes, the ShardedObjects the common strategy writes)."""
    if sharded_strategy.can_handle_sharded_objects:
        return sharded, []
    objects, shards = extract_matching_values(sharded, lambda v: isinstance(v, ShardedObject))
    return shards, list(nested_values(objects))


def commit_save(
    checkpoint_dir, common_strategy, sharded_strategy, save_plan, global_plan: GlobalPlan, write_outcomes, seconds=None,
    *, integrity: bool = False,
) -> None:
    """Step 3, after every rank's writes succeeded: rank 0 writes the engine's index,
    `index.json`, `integrity.json` if asked, and last `metadata.json`; then logs what the save
    wrote and how long each step took (`seconds` of the earlier steps).

    `write_outcomes`: every rank's `WriteOutcome` (a list), or the function `gather` returned
    (which raises on rank 0 if a rank's writes failed).
    """

    def commit():
        if get_rank() == 0:
            outcomes = write_outcomes() if callable(write_outcomes) else write_outcomes
            started = time.perf_counter()
            if is_planned(sharded_strategy):
                sharded_strategy.finalize(save_plan, checkpoint_dir, [outcome.result for outcome in outcomes])
            config = CheckpointingConfig(
                sharded_strategy.backend,
                sharded_strategy.version,
                common_strategy.backend,
                common_strategy.version,
            )
            tensors, objects = global_plan.contents
            index = CheckpointMetadata(config, FORMAT_VERSION, tensors, objects)
            index.checksums = {name: ranges for outcome in outcomes for name, ranges in outcome.checksums.items()}
            write_index(checkpoint_dir, index, global_plan.index_tensors_json)
            if integrity:
                write_integrity(checkpoint_dir, {CONFIG_FNAME: config_bytes(config)})
            commit_config(checkpoint_dir, config)
            _log_save(checkpoint_dir, outcomes, dict(seconds or {}, commit=time.perf_counter() - started))

    exchange(commit, f"commit of {checkpoint_dir}")


def _log_save(checkpoint_dir, write_outcomes, seconds) -> None:
    """One DEBUG line per save (rank 0): bytes and files written by all ranks, each step's
    seconds (writing: the slowest rank's, until its files were durable) and write throughput."""
    nbytes = sum(outcome.nbytes for outcome in write_outcomes)
    seconds["write"] = max((outcome.seconds for outcome in write_outcomes), default=0.0)
    steps = ", ".join(f"{step} {seconds[step]:.3f} s" for step in ("plan", "stage", "write", "commit") if step in seconds)
    logger.debug(  # DEBUG: Megatron-Core's tests expect saves to be quiet at INFO
        "Saved %s: %d bytes in %d files by %d rank(s); %s; %.3g GB/s written",
        checkpoint_dir, nbytes, sum(outcome.files for outcome in write_outcomes), len(write_outcomes),
        steps, nbytes / max(seconds["write"], 1e-9) / 1e9,
    )


def _report_common_state_differences(digests, compared) -> None:
    """Logs where the common state (as compared: after `preprocess_common_before_consistancy_check`)
    differs from rank 0's, which is the copy saved: on rank 0 which ranks differ, and on each
    of those ranks how (Megatron-Core's message). Rank 0's state travels only when some rank
    differs."""
    if all(digest == digests[0] for digest in digests):
        return
    rank = get_rank()
    if rank == 0:
        logger.warning(
            "The common (non-sharded) state differs between ranks: ranks %s differ from rank 0. "
            "Rank 0's copy is saved. Wrap per-rank values in ShardedObject or "
            "LocalNonpersistentObject, or exclude them with "
            "preprocess_common_before_consistancy_check.",
            [r for r, digest in enumerate(digests) if digest != digests[0]],
        )
    reference = broadcast_object(compared if rank == 0 else None, "comparison of the common state")
    if rank > 0 and digests[rank] != digests[0]:
        only_rank0, only_here, mismatched = diff(reference, compared)
        logger.warning(
            f"Rank {rank} common state dict differs from rank 0 common state dict. "
            f"Keys only on rank 0: {only_rank0}, Keys only on {rank}: {only_here}, Mismatched keys: {mismatched}"
        )


def refuse_complete_checkpoint(checkpoint_dir: str) -> None:
    storage = storage_of(checkpoint_dir)
    if storage.is_file(checkpoint_dir):
        raise CheckpointingException(f"Cannot save to {checkpoint_dir}: it is not a directory")
    if not storage.is_dir(checkpoint_dir):
        return
    if read_metadata(checkpoint_dir) is not None:
        raise CheckpointingException(
            f"{checkpoint_dir} already holds a complete checkpoint; refusing to overwrite it. "
            f"Save to a new directory, or delete this one first."
        )


@_cyclic_gc_paused
def load(
    sharded_state_dict: ShardedStateDict,
    checkpoint_dir,
    sharded_strategy: LoadShardedStrategyLike = None,
    common_strategy: Union[LoadCommonStrategy, Tuple[str, int], None] = None,
    validate_access_integrity: bool = True,
    strict: Union[str, StrictHandling] = StrictHandling.ASSUME_OK_UNEXPECTED,
    process_group=None,
    verify_integrity: bool = False,
) -> Union[StateDict, Tuple[StateDict, Set[str], Set[str]]]:
    """Loads the entries `sharded_state_dict` asks for (called on every rank).

    The result is the checkpoint's common state with the requested ShardedTensors and
    ShardedObjects filled in at their places, and LocalNonpersistentObjects unwrapped.
    A ShardedTensor may ask for any rectangle of the stored global tensor.

    In place: a requested ShardedTensor whose `data` has the requested dtype and shape (any
    strides, any device but meta) is filled, and that very tensor is returned; other requests
    (no data, meta data) get new tensors. A load that fails may have written part of them.

    Args:
        sharded_state_dict: the request: ShardedTensors say which part to read
        checkpoint_dir: a complete checkpoint
        sharded_strategy: like `save`'s; default: the engine recorded in metadata.json.
            Naming another engine that reads the format (tensorstore for a zarr checkpoint,
            or the reverse) reads with that engine
        common_strategy: a LoadCommonStrategy or (backend, version) (default: torch)
        validate_access_integrity: check that the requests of all ranks cover each requested
            key exactly once by main replicas (requires a metadata exchange)
        strict: how to handle keys missing on either side (see StrictHandling)
        process_group: only the ranks of this group take part (default: all ranks)
        verify_integrity: first check every file against `integrity.json` (SHA-256; rank 0
            reads the whole checkpoint); a checkpoint without one raises

    Returns:
        the state dict, or (state dict, missing keys, unexpected keys) for the RETURN_* modes
    """
    with within(process_group):
        return _load(sharded_state_dict, str(checkpoint_dir), sharded_strategy, common_strategy, validate_access_integrity, strict, verify_integrity)


def _load(sharded_state_dict, checkpoint_dir: str, sharded_strategy, common_strategy, validate_access_integrity, strict, verify_integrity):
    strict = parse_strict_flag(strict)
    exchange_requests = validate_access_integrity or StrictHandling.requires_global_app_metadata(strict)
    local = {}

    def prepare():
        """Everything that can fail on one rank only: opening the checkpoint, and checking this
        rank's request against it (so the planning exchange carries every failure)."""
        checkpoint = local["checkpoint"] = open_checkpoint(checkpoint_dir, require_complete=True)
        if verify_integrity and get_rank() == 0:
            verify_integrity_json(checkpoint_dir)
        sharded, common = verify_checkpoint_and_load_strategy(
            checkpoint_dir, sharded_strategy, common_strategy, checkpoint.metadata
        )
        local["strategies"] = sharded, common
        local["state"], local["ckpt"] = _common_state_and_entries(checkpoint, sharded, common)
        request, nonpersistent, local["factories"], local["dtensors"] = load_preprocess(sharded_state_dict)
        merge(local["state"], nonpersistent)
        request, local["unexpected"] = apply_strict_locally(request, strict, local["ckpt"])
        check_requests_against_checkpoint(request, local["ckpt"], checkpoint_dir)
        local["request"] = request
        if not exchange_requests:
            return None, local["unexpected"]
        local["plan"] = LocalPlan.of(nested_values(request))
        return local["plan"].digests(None, _PLANS.digest(kind)), local["unexpected"]

    kind = ("load", validate_access_integrity)
    planned = exchange(prepare, "load planning")
    sharded, common = local["strategies"]
    requested_keys = None
    if exchange_requests:  # the same data on every rank from here: any raise happens on every rank
        check = validate_plan if validate_access_integrity else (lambda plan: None)
        requested_keys = set(_agreed_plan(kind, local["plan"], [d for d, _ in planned], check, "load planning", "")[0].keys)
    missing_keys = apply_strict_globally(strict, local["ckpt"], requested_keys, [u for _, u in planned])

    def read():
        state, request, checkpoint = local["state"], local["request"], local["checkpoint"]
        objects = {}
        if not sharded.can_handle_sharded_objects:
            objects, request = extract_matching_values(request, lambda v: isinstance(v, ShardedObject))
        merge(state, sharded.load(request, checkpoint))  # first: it may talk to other ranks
        if objects:
            merge(state, common.load_sharded_objects(objects, checkpoint))
        return finish_load(state, local["factories"], local["dtensors"])

    state = on_every_rank(read, f"load of {checkpoint_dir}")
    if StrictHandling.requires_returning_mismatch_keys(strict):
        return state, missing_keys, local["unexpected"]
    return state


def verify_checkpoint_and_load_strategy(
    checkpoint_dir,
    sharded_strategy: LoadShardedStrategyLike = None,
    common_strategy: Union[LoadCommonStrategy, Tuple[str, int], None] = None,
    metadata: Optional[CheckpointMetadata] = None,
) -> Tuple[LoadShardedStrategy, LoadCommonStrategy]:
    """The strategies to load `checkpoint_dir` with: given ones checked, or the recorded ones."""
    if metadata is None:
        metadata = require_complete_checkpoint(checkpoint_dir)
    config = metadata.config
    if sharded_strategy is None:
        sharded_strategy = (config.sharded_backend, config.sharded_backend_version)
    sharded_strategy = _strategy(StrategyAction.LOAD_SHARDED, sharded_strategy)
    if common_strategy is None:
        common_strategy = (config.common_backend, config.common_backend_version)
    if isinstance(common_strategy, tuple):
        common_strategy = get_default_strategy(StrategyAction.LOAD_COMMON, *common_strategy)
    sharded_strategy.check_backend_compatibility(config.sharded_backend)
    sharded_strategy.check_version_compatibility(config.sharded_backend_version)
    common_strategy.check_backend_compatibility(config.common_backend)
    common_strategy.check_version_compatibility(config.common_backend_version)
    return sharded_strategy, common_strategy


def _strategy(action: StrategyAction, strategy):
    """A strategy object from any accepted form: object, (backend, version), name, config."""
    if isinstance(strategy, tuple):
        return get_default_strategy(action, *strategy)
    if isinstance(strategy, str):
        strategy = StrategyConfig(backend=strategy)
    elif isinstance(strategy, dict):
        strategy = StrategyConfig.from_dict(strategy)
    if isinstance(strategy, StrategyConfig):
        if action == StrategyAction.SAVE_SHARDED:
            return save_strategy_from_config(strategy)
        return load_strategy_from_config(strategy)
    return strategy


def _tensors_metadata(checkpoint_dir, metadata, sharded_strategy) -> CkptShardedMetadata:
    if metadata.is_legacy:
        return sharded_strategy.load_tensors_metadata(checkpoint_dir)
    flattened = sharded_strategy.flattened_keys(checkpoint_dir)
    return {
        key: whole_tensor_metadata(key, torch_dtype(entry.dtype), entry.shape, key in flattened)
        for key, entry in metadata.tensors.items()
    }


def _sharded_metadata(checkpoint_dir, metadata, sharded_strategy, common_strategy):
    """Every stored entry: tensors by key, objects by unique key (with the ShardedObject that
    holds the common state, where there is one)."""
    if metadata.foreign:  # tensors only (a DCP's non-tensor entries are not ShardedObjects)
        return _tensors_metadata(checkpoint_dir, metadata, sharded_strategy)
    if metadata.is_legacy:
        result = dict(sharded_strategy.load_sharded_metadata(checkpoint_dir))
        if not sharded_strategy.can_handle_sharded_objects:
            result.update(common_strategy.load_sharded_metadata(checkpoint_dir))
        return result
    result = _tensors_metadata(checkpoint_dir, metadata, sharded_strategy)
    result.update({u: ShardedObject.empty_from_unique_key(u) for u in metadata.objects})
    return result


COMMON_STATE_IN_FILE, COMMON_STATE_IN_OBJECT = "common.pt", "the ShardedObject common_state"


def _entries_and_common_state(checkpoint, sharded, common) -> Tuple[CkptShardedMetadata, Optional[str]]:
    """The stored entries of the state dict (`_sharded_metadata` but the one holding the common
    state), and where the common state is: `common.pt`; in Megatron-Core >= 0.19's layout (and
    ours with `common_state_in_dcp`) the ShardedObject `common_state`, which a `common.pt`
    overrides where both exist (as in Megatron-Core); None for a foreign checkpoint (it has none)."""
    entries = _sharded_metadata(checkpoint, checkpoint.metadata, sharded, common)
    held = entries.pop(COMMON_STATE_UNIQUE_KEY, None) is not None
    if checkpoint.metadata.foreign:
        return entries, None
    if held and not checkpoint.storage.exists(common_file(checkpoint)):
        return entries, COMMON_STATE_IN_OBJECT
    return entries, COMMON_STATE_IN_FILE


def common_state_place(checkpoint_dir) -> Optional[str]:
    """Where the common state of a complete checkpoint is (`_entries_and_common_state`)."""
    checkpoint = open_checkpoint(checkpoint_dir, require_complete=True)
    sharded, common = verify_checkpoint_and_load_strategy(checkpoint.path, None, None, checkpoint.metadata)
    return _entries_and_common_state(checkpoint, sharded, common)[1]


def _common_state_and_entries(checkpoint, sharded, common) -> Tuple[StateDict, CkptShardedMetadata]:
    """The checkpoint's common state ({} for a foreign checkpoint), and its stored entries
    (`_entries_and_common_state`)."""
    entries, place = _entries_and_common_state(checkpoint, sharded, common)
    if place is None:
        return {}, entries
    if place == COMMON_STATE_IN_FILE:
        return common.load_common(checkpoint), entries
    request = {"common": ShardedObject.empty_from_unique_key(COMMON_STATE_UNIQUE_KEY)}
    if sharded.can_handle_sharded_objects:
        state = sharded.load(request, checkpoint)["common"]
    else:
        state = common.load_sharded_objects(request, checkpoint)["common"]
    if not isinstance(state, dict):
        raise CheckpointingException(
            f"The ShardedObject '{COMMON_STATE_KEY}' of {checkpoint.path} holds a {type(state).__name__}, "
            f"not the common state dict; the checkpoint is damaged"
        )
    return state, entries


def load_common_state_dict(checkpoint_dir) -> StateDict:
    """The common (non-sharded) state of a checkpoint."""
    checkpoint = open_checkpoint(checkpoint_dir, require_complete=True)
    sharded, common = verify_checkpoint_and_load_strategy(checkpoint.path, None, None, checkpoint.metadata)
    return _common_state_and_entries(checkpoint, sharded, common)[0]


def load_tensors_metadata(checkpoint_dir, sharded_strategy: LoadShardedStrategyLike = None):
    """key -> data-less ShardedTensor (global shape and dtype) for every stored tensor.

    Keys are ShardedTensor keys, not state dict keys. The entries are unsharded, so they can be
    passed to `load` to read whole tensors.
    """
    checkpoint = open_checkpoint(checkpoint_dir, require_complete=True)
    sharded, _ = verify_checkpoint_and_load_strategy(checkpoint.path, sharded_strategy, None, checkpoint.metadata)
    return _tensors_metadata(checkpoint, checkpoint.metadata, sharded)


def load_sharded_metadata(checkpoint_dir, sharded_strategy: LoadShardedStrategyLike = None):
    """Like `load_tensors_metadata`, plus the ShardedObjects (keyed by unique key)."""
    checkpoint = open_checkpoint(checkpoint_dir, require_complete=True)
    sharded, common = verify_checkpoint_and_load_strategy(
        checkpoint.path, sharded_strategy, None, checkpoint.metadata
    )
    return _entries_and_common_state(checkpoint, sharded, common)[0]


def load_plain_tensors(checkpoint_dir) -> StateDict:
    """Every stored tensor, whole (in its global shape, also a key stored flattened), keyed by
    its key (common state not included)."""
    checkpoint = open_checkpoint(checkpoint_dir, require_complete=True)
    sharded, _ = verify_checkpoint_and_load_strategy(checkpoint.path, None, None, checkpoint.metadata)
    stored = _tensors_metadata(checkpoint, checkpoint.metadata, sharded)
    whole = {key: whole_tensor_metadata(key, sh.dtype, sh.global_shape) for key, sh in stored.items()}
    return sharded.load(whole, checkpoint)  # n-d, also a key stored flattened


def load_content_metadata(checkpoint_dir=None, *, preloaded_state_dict: Optional[StateDict] = None):
    """The `content_metadata` given to `save`, or None."""
    if preloaded_state_dict is None:
        if checkpoint_dir is None:
            raise ValueError("Either checkpoint_dir or preloaded_state_dict must be given")
        preloaded_state_dict = load_common_state_dict(checkpoint_dir)
    return preloaded_state_dict.get(_CONTENT_METADATA_KEY)


def remove_sharded_tensors(checkpoint_dir, key_prefix: str) -> None:
    """Deletes the tensors whose key starts with `key_prefix` (call on one rank).

    The index (`index.json`) is rewritten first, so the checkpoint never lists a tensor
    whose files are gone.
    """
    metadata = require_complete_checkpoint(checkpoint_dir)
    if metadata.foreign:
        raise CheckpointingException(
            f"{checkpoint_dir} is a {metadata.foreign} checkpoint; this library reads such "
            f"checkpoints but never writes into them. Convert it first (`dist-ckpt convert`)."
        )
    sharded, _ = verify_checkpoint_and_load_strategy(checkpoint_dir, None, None, metadata)
    if not metadata.is_legacy:
        metadata.tensors = {k: v for k, v in metadata.tensors.items() if not k.startswith(key_prefix)}
        write_metadata(checkpoint_dir, metadata)
    sharded.remove_sharded_tensors(str(checkpoint_dir), key_prefix)
    if metadata.checksums:  # the engine may have deleted checksummed files
        storage = storage_of(checkpoint_dir)
        kept = {name: ranges for name, ranges in metadata.checksums.items() if storage.exists(os.path.join(str(checkpoint_dir), name))}
        if kept != metadata.checksums:
            metadata.checksums = kept
            write_index(checkpoint_dir, metadata)
    integrity = os.path.join(str(checkpoint_dir), INTEGRITY_FNAME)
    if storage_of(integrity).exists(integrity):  # it listed what changed
        write_integrity(checkpoint_dir, {})


def get_default_save_sharded_strategy(backend: str = "torch_dist", version: int = 1) -> SaveShardedStrategy:
    """The registered save strategy of (backend, version), with Megatron-Core's defaults
    (`save` without a strategy uses `DEFAULT_BACKEND`, this library's default engine)."""
    return get_default_strategy(StrategyAction.SAVE_SHARDED, backend, version)


def get_default_save_common_strategy(backend: str = "torch", version: int = 1) -> SaveCommonStrategy:
    return get_default_strategy(StrategyAction.SAVE_COMMON, backend, version)


def get_default_load_sharded_strategy(checkpoint_dir) -> LoadShardedStrategy:
    """The load strategy recorded in the checkpoint's `metadata.json`."""
    return verify_checkpoint_and_load_strategy(checkpoint_dir)[0]

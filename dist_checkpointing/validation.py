"""Who writes and reads what: checks of the global sharding, and load strictness.

Every rank receives the same global metadata (the shards of all ranks, without data) and runs
the same checks, so an invalid sharding raises the same `CheckpointingException` on every rank
before anything is written. (Megatron-Core checks on rank 0 only; the other ranks then hang.)
"""

import logging
from collections import defaultdict
from enum import Enum
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .collectives import exchange
from .core import CheckpointingException
from .dict_utils import extract_matching_values, nested_values
from .dtypes import DTYPE_NAMES, name_of_torch, torch_dtype
from .geometry import contains, cover_fault, flat_tiling_fault, inside
from .global_plan import FLAT, OBJECT, TENSOR, GlobalPlan, sorted_groups
from .mapping import (
    ShardedBase,
    ShardedObject,
    ShardedStateDict,
    ShardedTensor,
)

logger = logging.getLogger(__name__)

LocalMetadata = List[ShardedBase]  # the shards of one rank, without data
GlobalMetadata = List[LocalMetadata]  # indexed by rank
CkptShardedMetadata = Dict[str, ShardedBase]  # checkpoint content: key (or unique key) -> entry


class StrictHandling(Enum):
    """How `load` handles a mismatch between the request and the checkpoint.

    "Unexpected" keys are requested but not in the checkpoint; "missing" keys are in the
    checkpoint but requested by no rank. Unexpected keys are known locally; missing keys need
    the requests of all ranks (one metadata exchange, which `validate_access_integrity=True`
    performs anyway). All modes but ASSUME_OK_UNEXPECTED read the checkpoint's key list first.
    """

    # The strategy raises when it meets an unexpected key; no extra check.
    ASSUME_OK_UNEXPECTED = "assume_ok_unexpected"
    # Log unexpected keys (WARNING) and skip them; ignore missing keys.
    LOG_UNEXPECTED = "log_unexpected"
    # Log unexpected and missing keys (WARNING); skip the unexpected ones.
    LOG_ALL = "log_all"
    # Raise on unexpected keys before loading anything.
    RAISE_UNEXPECTED = "raise_unexpected"
    # Raise on unexpected or missing keys before loading anything.
    RAISE_ALL = "raise_all"
    # Skip unexpected keys and return them: load returns (state_dict, missing, unexpected),
    # with `missing` always empty.
    RETURN_UNEXPECTED = "return_unexpected"
    # Skip unexpected keys and return both sets: load returns (state_dict, missing, unexpected).
    RETURN_ALL = "return_all"
    # Skip unexpected keys silently.
    IGNORE_ALL = "ignore_all"

    @staticmethod
    def requires_explicit_ckpt_mismatch_check(val: "StrictHandling") -> bool:
        """Whether the checkpoint's key list must be read before loading."""
        return val != StrictHandling.ASSUME_OK_UNEXPECTED

    @staticmethod
    def requires_global_app_metadata(val: "StrictHandling") -> bool:
        """Whether the requests of all ranks are needed (to find missing keys)."""
        return val in (
            StrictHandling.IGNORE_ALL,
            StrictHandling.RAISE_ALL,
            StrictHandling.RETURN_ALL,
            StrictHandling.LOG_ALL,
        )

    @staticmethod
    def requires_returning_mismatch_keys(val: "StrictHandling") -> bool:
        """Whether `load` returns (state_dict, missing_keys, unexpected_keys)."""
        return val in (StrictHandling.RETURN_UNEXPECTED, StrictHandling.RETURN_ALL)


def parse_strict_flag(strict: Union[str, bool, StrictHandling]) -> StrictHandling:
    """Accepts a StrictHandling, its value string, or a bool (True: ASSUME_OK_UNEXPECTED,
    False: LOG_UNEXPECTED, as Megatron-Core documents)."""
    if isinstance(strict, StrictHandling):
        return strict
    if isinstance(strict, bool):
        return StrictHandling.ASSUME_OK_UNEXPECTED if strict else StrictHandling.LOG_UNEXPECTED
    try:
        return StrictHandling(strict)
    except (ValueError, TypeError) as e:
        raise ValueError(f"Invalid strict flag: {e}") from e


def determine_global_metadata(
    sharded_state_dict: ShardedStateDict, group=None
) -> Tuple[LocalMetadata, GlobalMetadata]:
    """Exchanges the shards (without data) of all ranks."""
    local_metadata = [sh.without_data() for sh in nested_values(sharded_state_dict)]
    return local_metadata, exchange(lambda: local_metadata, "metadata exchange", group)


def validate_sharding_integrity(global_metadata: GlobalMetadata) -> None:
    """Checks that the shards of all ranks describe consistent, exactly covered global entries
    (see `validate_plan`). Raises `CheckpointingException` naming the key."""
    validate_plan(GlobalPlan.of_shards(global_metadata))


def validate_plan(plan: GlobalPlan) -> None:
    """Checks a global plan, vectorised over its shards; Python per key only for the keys
    that need a closer look (an irregular grid, or a fault, to name it).

    Per key: one kind (tensor or object), one dtype and global shape; every element (or grid
    position, for objects) is held by exactly one main replica; flattened main replicas of one
    shard tile it exactly. The first fault found (checks in that order, then by key in order
    of first appearance) raises `CheckpointingException` naming the key, the same on every
    rank.
    """
    _check_agreement(plan)
    rows, ranks, keys = plan.main_shards(TENSOR)
    _check_bounds(plan, rows, ranks, keys)
    flat = (plan.flags[rows] & FLAT) != 0
    _check_flat_tiling(plan, rows[flat], ranks[flat], keys[flat])
    _check_coverage(plan, rows, ranks, keys)
    _check_objects(plan, *plan.main_shards(OBJECT))


def _check_agreement(plan: GlobalPlan) -> None:
    ref = plan.key_entry[plan.entry_key]  # each entry's reference: its key's first entry
    kind_differs = plan.entry_kind != plan.entry_kind[ref]
    differs = kind_differs | (plan.entry_dtype != plan.entry_dtype[ref]) | (plan.entry_ndim != plan.entry_ndim[ref])
    differs |= (plan.entry_shape != plan.entry_shape[ref]).any(axis=1)
    if not differs.any():
        return
    bad = np.flatnonzero(differs)
    entry = bad[np.lexsort((plan.entry_rank[bad], plan.entry_key[bad]))[0]]
    first = ref[entry]
    key = plan.keys[plan.entry_key[entry]]
    if kind_differs[entry]:
        kinds = sorted({_KIND_NAMES[plan.entry_kind[e]] for e in np.flatnonzero(plan.entry_key == plan.entry_key[entry])})
        raise CheckpointingException(
            f"Key '{key}' is used by different kinds of entries: {kinds}. Give each entry its own key."
        )
    shape, other = (_entry_shape(plan, e) for e in (first, entry))
    rank, other_rank = plan.entry_rank[first], plan.entry_rank[entry]
    if plan.entry_kind[entry] == OBJECT:
        raise CheckpointingException(
            f"Inconsistent ShardedObjects of key '{key}': global shapes {shape} and {other} (rank {other_rank})"
        )
    dtype, other_dtype = (torch_dtype(DTYPE_NAMES[plan.entry_dtype[e]]) for e in (first, entry))
    raise CheckpointingException(
        f"Inconsistent shards of key '{key}': rank {rank} has dtype {dtype} and global shape {shape}, "
        f"rank {other_rank} has {other_dtype} and {other}. All shards of a key must agree."
    )


_KIND_NAMES = {TENSOR: "ShardedTensor", OBJECT: "ShardedObject"}


def _entry_shape(plan: GlobalPlan, entry: int) -> Tuple[int, ...]:
    return tuple(plan.entry_shape[entry, : plan.entry_ndim[entry]].tolist())


def _first(keys: np.ndarray, ranks: np.ndarray, bad: np.ndarray) -> int:
    """The position of the first bad pair: lowest key id, then lowest rank."""
    candidates = np.flatnonzero(bad)
    return candidates[np.lexsort((ranks[candidates], keys[candidates]))[0]]


def _check_bounds(plan: GlobalPlan, rows, ranks, keys) -> None:
    outside = (plan.offset[rows] + plan.extent[rows] > plan.key_shape[keys]).any(axis=1)
    if outside.any():
        i = _first(keys, ranks, outside)
        sh = plan.shard(rows[i])
        raise CheckpointingException(
            f"Shard of key '{sh.key}' on rank {ranks[i]} (offset {sh.global_offset}, local shape "
            f"{sh.local_shape}) exceeds the global shape {sh.global_shape}"
        )


def _check_flat_tiling(plan: GlobalPlan, rows, ranks, keys) -> None:
    """The flat pieces of each shard (key, offset) tile its elements: a vectorised filter
    flags every group that may not, and `validate_flat_tiling` decides and names the fault."""
    if not len(rows):
        return
    order, first = sorted_groups([keys, *plan.offset[rows].T], [plan.flat[rows, 0], plan.flat[rows, 1]])
    start, stop = plan.flat[rows[order]].T
    extent = plan.extent[rows[order]]
    previous_stop = np.concatenate([[0], stop[:-1]])
    same_shape = np.ones(len(order), dtype=bool)
    same_shape[1:] = (extent[1:] == extent[:-1]).all(axis=1)
    bad = np.where(first, start != 0, (start != previous_stop) | ~same_shape)
    bad |= np.append(first[1:], True) & (stop != np.prod(extent, axis=1))  # a group's last piece
    group = np.cumsum(first) - 1
    for g in np.unique(group[bad]).tolist():
        members = order[group == g]
        held = sorted(((int(ranks[m]), plan.shard(rows[m])) for m in members.tolist()), key=lambda pair: pair[0])
        validate_flat_tiling(held[0][1].key, held[0][1].global_offset, held)


def validate_flat_tiling(key: str, offset, flat: List[Tuple[int, ShardedTensor]]) -> None:
    numel = int(np.prod(flat[0][1].local_shape))
    ranges = sorted((sh.flattened_range.start, sh.flattened_range.stop, rank) for rank, sh in flat)
    fault = flat_tiling_fault([(start, stop) for start, stop, _ in ranges], numel)
    if fault is None:
        return
    i, position = fault
    if i is not None:
        start, _, rank = ranges[i]
        problem = "a gap" if start > position else "an overlap"
        raise CheckpointingException(
            f"Flattened shards of key '{key}' at offset {offset} leave {problem} at flat "
            f"element {min(start, position)} (rank {rank}'s range starts at {start}). The "
            f"main replicas' flattened_range must tile the {numel} elements exactly once."
        )
    raise CheckpointingException(
        f"Flattened shards of key '{key}' at offset {offset} cover {position} of {numel} "
        f"elements. The main replicas' flattened_range must tile the local shard exactly."
    )


def _check_coverage(plan: GlobalPlan, rows, ranks, keys) -> None:
    """Every element of each tensor key lies in exactly one main box (the flat pieces of one
    box count once). Vectorised: a key whose boxes are equal, aligned to their shape, distinct
    and as large in total as the tensor tiles it exactly; any other key (an irregular grid,
    or a fault) gets `cover_fault`, which decides and names the region."""
    flat = (plan.flags[rows] & FLAT) != 0
    order, first = sorted_groups([keys, *plan.offset[rows].T, *plan.extent[rows].T, flat], [ranks])
    counted = order[first | ~flat[order]]  # one flat piece per box; every other box
    order, key_start = sorted_groups([keys[counted]], [*plan.offset[rows[counted]].T])
    boxes = counted[order]
    box_keys, offset, extent = keys[boxes], plan.offset[rows[boxes]], plan.extent[rows[boxes]]
    starts = np.flatnonzero(key_start)
    key_extent = extent[starts][np.cumsum(key_start) - 1]  # each box's key's first extent
    volume = np.add.reduceat(np.prod(extent, axis=1), starts) if len(starts) else np.zeros(0, np.int64)
    irregular = (extent != key_extent).any(axis=1) | (offset % np.maximum(extent, 1) != 0).any(axis=1)
    repeated = np.zeros(len(boxes), dtype=bool)
    repeated[1:] = ~key_start[1:] & (offset[1:] == offset[:-1]).all(axis=1)
    suspect = np.zeros(len(plan.keys), dtype=bool)
    suspect[box_keys[irregular | repeated]] = True
    tensor_keys = plan.key_kind == TENSOR
    total = np.prod(plan.key_shape, axis=1)
    covered = np.zeros(len(plan.keys), dtype=np.int64)
    covered[box_keys[starts]] = volume
    suspect |= covered != total
    suspect &= tensor_keys & (total > 0)
    for key in np.flatnonzero(suspect).tolist():
        mine = boxes[box_keys == key]
        held = defaultdict(list)  # box -> ranks holding it
        for i in mine.tolist():
            held[_box(plan, rows[i])].append(int(ranks[i]))
        _validate_coverage(plan.keys[key], plan.global_shape(key), list(held.items()))


def _box(plan: GlobalPlan, row: int):
    ndim = plan.entry_ndim[plan.row_entry[row]]
    return tuple(plan.offset[row, :ndim].tolist()), tuple(plan.extent[row, :ndim].tolist())


def _validate_coverage(key: str, global_shape: Tuple[int, ...], boxes) -> None:
    """Each element of `global_shape` must lie in exactly one box (count repeated boxes too)."""
    fault = cover_fault(global_shape, [(box, len(ranks)) for box, ranks in boxes])
    if fault is None:
        return
    region, n = fault
    holders = [r for box, ranks in boxes for r in ranks if contains(box, region)]
    raise CheckpointingException(
        f"Invalid sharding of key '{key}' (global shape {tuple(global_shape)}): elements "
        f"[{', '.join(f'{a}:{b}' for a, b in region)}] are held by {n} main replicas"
        + (f" (ranks {sorted(holders)})" if holders else "")
        + ", expected exactly 1. Every element must belong to exactly one main replica "
        "(replica_id 0) across all ranks; check the rank offsets and replica_id of this "
        "key's shards (a load that reads only part of a tensor on purpose passes "
        "validate_access_integrity=False)."
    )


def _check_objects(plan: GlobalPlan, rows, ranks, keys) -> None:
    """Each grid position of each ShardedObject key has exactly one main replica."""
    order, first = sorted_groups([keys, *plan.offset[rows].T], [ranks])
    repeated = np.flatnonzero(~first)
    if len(repeated):
        i = order[repeated[0]]
        same = (keys == keys[i]) & (plan.offset[rows] == plan.offset[rows[i]]).all(axis=1)
        key, offset = plan.keys[keys[i]], _box(plan, rows[i])[0]
        holders = sorted(ranks[same].tolist())
        raise CheckpointingException(
            f"ShardedObject '{key}' at offset {offset} has {len(holders)} main replicas "
            f"(ranks {holders}), expected exactly 1"
        )
    present = np.bincount(keys, minlength=len(plan.keys))
    expected = np.prod(plan.key_shape, axis=1)
    incomplete = np.flatnonzero((plan.key_kind == OBJECT) & (present != expected))
    if len(incomplete):
        key = int(incomplete[0])
        shape = plan.global_shape(key)
        held = {_box(plan, row)[0] for row in rows[keys == key].tolist()}
        missing = next(o for o in np.ndindex(*shape) if tuple(o) not in held)
        raise CheckpointingException(
            f"ShardedObject '{plan.keys[key]}' is incomplete: {int(present[key])} of "
            f"{int(expected[key])} pieces have a main replica; e.g. offset {tuple(missing)} has none"
        )


def validate_integrity_and_strict_load(
    sharded_state_dict: ShardedStateDict,
    strict: StrictHandling,
    validate_access_integrity: bool,
    local_metadata: Optional[LocalMetadata] = None,
    global_metadata: Optional[GlobalMetadata] = None,
    ckpt_sharded_metadata: Optional[CkptShardedMetadata] = None,
) -> Tuple[ShardedStateDict, Set[str], Set[str]]:
    """Applies `strict` and the sharding check to a load request (Megatron-Core's signature):
    `apply_strict_locally`, then `apply_strict_globally` and the sharding check.

    Returns the request without unexpected keys, and the missing and unexpected keys
    (missing keys are equal on all ranks; unexpected keys are per rank).
    """
    sharded_state_dict, unexpected_keys = apply_strict_locally(
        sharded_state_dict, strict, ckpt_sharded_metadata, local_metadata
    )
    requested = None if global_metadata is None else {sh.key for shards in global_metadata for sh in shards}
    missing_keys = apply_strict_globally(strict, ckpt_sharded_metadata, requested, [unexpected_keys])
    if validate_access_integrity:
        if global_metadata is None:
            raise CheckpointingException("Cannot check the sharding without global metadata")
        validate_sharding_integrity(global_metadata)
    if strict == StrictHandling.IGNORE_ALL:
        return sharded_state_dict, set(), set()
    return sharded_state_dict, missing_keys, unexpected_keys


def apply_strict_locally(
    sharded_state_dict: ShardedStateDict,
    strict: StrictHandling,
    ckpt_sharded_metadata: Optional[CkptShardedMetadata],
    local_metadata: Optional[LocalMetadata] = None,
) -> Tuple[ShardedStateDict, Set[str]]:
    """The part of `strict` that needs only this rank's request: the request without the keys
    the checkpoint does not have, and those keys (which travel in the planning exchange)."""
    if not StrictHandling.requires_explicit_ckpt_mismatch_check(strict):
        return sharded_state_dict, set()
    if ckpt_sharded_metadata is None:
        raise CheckpointingException("Cannot check the checkpoint keys without its metadata")
    requested = local_metadata if local_metadata is not None else nested_values(sharded_state_dict)
    ckpt_keys = {sh.key for sh in ckpt_sharded_metadata.values()}
    unexpected_keys = {sh.key for sh in requested} - ckpt_keys
    return adjust_non_strict_load(sharded_state_dict, unexpected_keys), unexpected_keys


def apply_strict_globally(
    strict: StrictHandling,
    ckpt_sharded_metadata: Optional[CkptShardedMetadata],
    requested_keys: Optional[Set[str]],
    unexpected_by_rank: Sequence[Set[str]],
) -> Set[str]:
    """The rest of `strict`, from what every rank knows after the planning exchange (every
    rank's request and unexpected keys), so that a raise happens on every rank alike: raises
    or logs as the mode says; returns the missing keys."""
    if not StrictHandling.requires_explicit_ckpt_mismatch_check(strict):
        return set()
    missing_keys = set()
    if StrictHandling.requires_global_app_metadata(strict):
        if requested_keys is None:
            raise CheckpointingException("Cannot find missing keys without every rank's request")
        missing_keys = {sh.key for sh in ckpt_sharded_metadata.values()} - requested_keys
    unexpected_keys = set().union(*unexpected_by_rank)
    if strict == StrictHandling.RAISE_UNEXPECTED:
        maybe_report_missing_and_unexpected_keys(set(), unexpected_keys, True)
    elif strict == StrictHandling.RAISE_ALL:
        maybe_report_missing_and_unexpected_keys(missing_keys, unexpected_keys, True)
    elif strict in (StrictHandling.LOG_UNEXPECTED, StrictHandling.LOG_ALL):
        maybe_report_missing_and_unexpected_keys(missing_keys, unexpected_keys, False)
    return missing_keys


def adjust_non_strict_load(
    sharded_state_dict: ShardedStateDict, sharded_keys_to_remove: Set[str]
) -> ShardedStateDict:
    """The request without the entries whose key is in `sharded_keys_to_remove`."""
    _, kept = extract_matching_values(sharded_state_dict, lambda x: x.key in sharded_keys_to_remove)
    return kept


def maybe_report_missing_and_unexpected_keys(
    missing_keys: Set[str], unexpected_keys: Set[str], raise_error: bool = True
) -> None:
    """Raises (or logs at WARNING) when there are missing or unexpected keys."""
    if not missing_keys and not unexpected_keys:
        return
    parts = []
    if missing_keys:
        parts.append(
            "Some keys found in the checkpoint are missing in the provided sharded state dict. "
            f"Missing keys (for all ranks): {sorted(missing_keys)}."
        )
    if unexpected_keys:
        parts.append(
            "Unexpected keys (not found in the checkpoint) encountered in the provided sharded "
            f"state dict. Unexpected keys (of all ranks): {sorted(unexpected_keys)}."
        )
    message = " ".join(parts)
    if raise_error:
        raise CheckpointingException(message)
    logger.warning(message)


def validate_sharded_objects_handling(sharded_strategy, common_strategy) -> None:
    """Checks that some strategy can store ShardedObjects."""
    if not sharded_strategy.can_handle_sharded_objects and (
        common_strategy is None or not common_strategy.can_handle_sharded_objects
    ):
        raise CheckpointingException(
            f"Either the sharded strategy {sharded_strategy} or the common strategy "
            f"{common_strategy} must handle ShardedObjects"
        )


def shards_of(sharded_state_dict: ShardedStateDict, cls) -> Sequence:
    """The leaves of `sharded_state_dict` that are instances of `cls`."""
    return [x for x in nested_values(sharded_state_dict) if isinstance(x, cls)]


def check_request_against_stored(sh: ShardedTensor, stored_shape, where: str) -> None:
    """Refuses a load request that does not fit the stored tensor: another global shape, or a
    box outside the stored tensor (any request, main replica or not). Another dtype fits: it is
    converted (`ShardedTensor.fill`).

    `where` names the file or directory for the message. With `allow_shape_mismatch` the
    stored shape may differ (same number of axes); the request's box must then lie inside its
    own global shape, and the engine zero-pads what the stored tensor does not have.
    """
    name_of_torch(sh.dtype, sh.key)  # a dtype the library knows
    stored_shape = tuple(stored_shape)
    if len(stored_shape) != len(sh.global_shape) or (stored_shape != sh.global_shape and not sh.allow_shape_mismatch):
        raise CheckpointingException(
            f"Key '{sh.key}' has global shape {stored_shape} in {where}, requested "
            f"{sh.global_shape}. Set allow_shape_mismatch=True to read the overlap, zero-padded."
        )
    if not inside(sh.global_box(), sh.global_shape):
        raise CheckpointingException(
            f"Key '{sh.key}': the request (global offset {sh.global_offset}, local shape "
            f"{sh.local_shape}) reaches outside the global shape {sh.global_shape} (stored in "
            f"{where}). Every request must lie inside the tensor; check its offsets."
        )


def request_fits_stored(sh: ShardedTensor, box, stored_shape: Tuple[int, ...], where: Callable[[], str]) -> bool:
    """Whether request `sh`, reading `box` (its covering box), lies inside the stored tensor of
    `stored_shape`. A request of the stored shape whose box lies inside it fits as it is (the
    common case, told apart cheaply: a load checked it against the index already); any other
    is `check_request_against_stored` (`where()`: the file or directory for its message), and
    returns False where `allow_shape_mismatch` lets it through, to be zero-padded."""
    fits = inside(box, stored_shape)
    if not fits or stored_shape != sh.global_shape:
        check_request_against_stored(sh, stored_shape, where())
    return fits


def check_requests_against_checkpoint(request: ShardedStateDict, stored: CkptShardedMetadata, where: str) -> None:
    """`check_request_against_stored` for every entry of `request` against the checkpoint's
    entries (key or unique key -> data-less entry); an entry it does not have is refused."""
    for sh in nested_values(request):
        if not isinstance(sh, (ShardedTensor, ShardedObject)):
            continue
        name = sh.key if isinstance(sh, ShardedTensor) else sh.unique_key
        entry = stored.get(name)
        if not isinstance(entry, type(sh)):
            raise CheckpointingException(
                f"{type(sh).__name__} '{name}' is not in the checkpoint {where}. Check the key, or "
                f"load with strict='log_unexpected' to skip keys the checkpoint does not have."
            )
        if isinstance(sh, ShardedTensor):
            check_request_against_stored(sh, entry.global_shape, where)

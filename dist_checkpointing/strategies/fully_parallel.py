"""Fully parallel save and load: the ranks of a group share the work on replicated shards.

Without these wrappers a replicated shard (e.g. a weight held by every data-parallel rank) is
written by its main replica and read by every rank that asks for it. With them, each replicated
shard is written by one rank of the group, and on load read by one rank of the group and sent
to the other ranks that asked for it. Who does what is Megatron-Core's greedy distribution
(exchange_utils.py), so the same ranks write and read the same shards as with Megatron-Core.

Megatron-Core's names, arguments and results, for every engine. Differences:
- saving with an engine of this library, the distribution is computed from the global plan
  `serialization.save` has already exchanged, identically on every rank (no extra
  communication), and cached with that plan; the caller's ShardedTensors are not modified;
- loading, a shard travels only to the ranks that asked for it, into their result tensors
  (exchange_utils.py); every rank reads its own ShardedObjects;
- a cached distribution is reused only while every rank's shards are unchanged (one small
  exchange of digests checks it), so `do_cache_distribution` is always safe to set.
"""

import copy
import hashlib
from dataclasses import dataclass, replace
from typing import Any, Dict, FrozenSet, Optional, Sequence, Tuple

import numpy as np
import torch

from ..collectives import exchange, get_rank, group_ranks, on_every_rank, within
from ..core import CheckpointingException
from ..dict_utils import dict_list_map_inplace, nested_values
from ..exchange_utils import (
    EXCHANGE_ALGOS,
    ShardDistribution,
    assign_greedily,
    determine_main_replica_uniform_distribution,
    exchange_by_distribution,
    load_shard_id,
)
from ..global_plan import TENSOR, GlobalPlan, PlanCache, sorted_groups
from ..mapping import ShardedTensor, is_main_replica
from ..utils import _sharded_tensor_shard_id
from .base import LoadShardedStrategy, PlannedSaveStrategy, ShardedSavePlan

__all__ = [
    "FullyParallelLoadStrategyWrapper",
    "FullyParallelSaveStrategyWrapper",
    "_sharded_tensor_shard_id",
    "distribute_main_replicas_with_precomputed_distribution",
    "save_distribution",
]


def save_distribution(plan: GlobalPlan, group_of_rank: Sequence[int]) -> np.ndarray:
    """Which pairs of `plan` write (one bool per pair): each tensor shard (key, offset, flat
    range) with a main replica is written by one of the ranks holding it in its main replica's
    group (`group_of_rank`: a group id per rank), by `exchange_utils.assign_greedily` in
    Megatron-Core's order (fewest candidates, largest, shard id); objects keep their main
    replicas. The same result on every rank.

    Shards are grouped by their set of candidate ranks (e.g. one DP group), found by a 128-bit
    fingerprint of the set. The result is checked: every shard is written by a rank that
    holds it.
    """
    groups = np.asarray(group_of_rank, dtype=np.int64)
    tensor_row = plan.key_kind[plan.row_key] == TENSOR
    tensor_pair = tensor_row[plan.pair_row]
    order, first = sorted_groups([plan.row_key, *plan.offset.T, plan.flat[:, 0], plan.flat[:, 1]])
    row_shard = np.empty(len(order), dtype=np.int32)
    row_shard[order] = np.cumsum(first) - 1
    shard_row = order[first]  # a row of each shard
    n_shards = len(shard_row)
    size = np.zeros(n_shards, dtype=np.int64)
    size[row_shard] = plan.row_nbytes
    pair_shard, pair_rank = row_shard[plan.pair_row], plan.pair_rank
    main_rank = np.full(n_shards, -1)
    main = plan.main & tensor_pair
    np.maximum.at(main_rank, pair_shard[main], pair_rank[main])  # any main replica's group
    writer_group = np.where(main_rank >= 0, groups[np.maximum(main_rank, 0)], -1)  # per shard
    rank_group = np.repeat(groups, plan.rank_rows[:, 1] - plan.rank_rows[:, 0])  # per pair
    candidate = tensor_pair & (rank_group == writer_group[pair_shard])
    shards, ranks = pair_shard[candidate], pair_rank[candidate]
    fingerprint = np.zeros((n_shards, 3), dtype=np.uint64)
    fingerprint[:, 0] = np.bincount(shards, minlength=n_shards)
    random_of_rank = np.random.default_rng(20261122).integers(0, 2**63, size=(plan.world_size, 2), dtype=np.uint64)
    for i in (1, 2):
        np.add.at(fingerprint[:, i], shards, random_of_rank[ranks, i - 1])  # wraps around: a sum mod 2**64
    written = np.flatnonzero(fingerprint[:, 0] > 0)
    by_set, starts = sorted_groups(list(fingerprint[written].T), [written])
    shard_set = np.zeros(n_shards, dtype=np.int64)
    shard_set[written[by_set]] = np.cumsum(starts) - 1
    representative = written[by_set[starts]]  # each set's first shard
    members = [np.unique(ranks[shards == shard]) for shard in representative.tolist()]
    key_position = np.argsort(np.argsort(np.array(plan.keys, dtype=str), kind="stable"))
    rows = shard_row[written]
    greedy = np.lexsort(
        (plan.flat[rows, 1], plan.flat[rows, 0], *plan.offset[rows].T[::-1], key_position[plan.row_key[rows]], -size[written],
         fingerprint[written, 0])
    )
    writer = np.full(n_shards, -1)
    writer[written] = assign_greedily(greedy, shard_set[written], members, size[written], plan.world_size)
    writes = writer[pair_shard] == pair_rank
    held = np.zeros(n_shards, dtype=bool)
    held[pair_shard[writes & candidate]] = True
    if not held[written].all():  # a fingerprint collision: never expected, never silent
        raise CheckpointingException("The fully parallel distribution assigned a shard to a rank that does not hold it")
    return np.where(tensor_pair, writes, plan.main)


def distribute_main_replicas_with_precomputed_distribution(
    sharded_state_dict, parallelization_group, precomputed_distribution: Optional[ShardDistribution]
) -> None:
    """Applies a save distribution (`determine_main_replica_uniform_distribution`) in place:
    the ShardedTensors this rank writes get replica id 0, all others 1 (Megatron-Core's)."""
    with within(parallelization_group):
        if len(group_ranks()) <= 1:
            return
        rank = get_rank()
    if precomputed_distribution is None:
        raise CheckpointingException("A distribution is needed for a group of more than one rank")
    for sh in nested_values(sharded_state_dict):
        if isinstance(sh, ShardedTensor):
            shard = _sharded_tensor_shard_id(sh)
            writes = shard in precomputed_distribution.shards_in_this_group and precomputed_distribution.main_rank_for_shard[shard] == rank
            sh.replica_id = 0 if writes else 1


@dataclass(frozen=True)
class FullyParallelSavePlan(ShardedSavePlan):
    """The wrapped engine's plan, and the shards this rank writes (its main replicas after
    the distribution)."""

    writes: FrozenSet[Tuple]  # shard ids (`_sharded_tensor_shard_id`)
    base: ShardedSavePlan


def _as_planned(writes: FrozenSet[Tuple], sh):
    """`sh` with the replica id that makes it a main replica exactly if this rank writes it."""
    if not isinstance(sh, ShardedTensor):
        return sh
    planned = _sharded_tensor_shard_id(sh) in writes
    if planned == is_main_replica(sh.replica_id):
        return sh
    return replace(sh, replica_id=0 if planned else 1)


# The last distribution of each group (its ranks) and kind, in this process: the wrappers hold
# configuration only, and an equal wrapper made for the next save finds the same cache.
_DISTRIBUTIONS = PlanCache()


def _cached(kind) -> Optional[ShardDistribution]:
    return _DISTRIBUTIONS.get(kind) if _DISTRIBUTIONS.digest(kind) else None


def _cached_distribution(kind, sharded_state_dict, group, compute, use_cache: bool) -> Optional[ShardDistribution]:
    """`compute()`, or the distribution cached for `kind` if every rank of `group` reports
    the shards it was computed for (one small exchange)."""
    tensors = [sh for sh in nested_values(sharded_state_dict) if isinstance(sh, ShardedTensor)]
    shards = sorted(repr((load_shard_id(sh), sh.nbytes, sh.replica_id)) for sh in tensors)
    digest = hashlib.sha256("\n".join(shards).encode()).digest()
    if use_cache:
        cached = _DISTRIBUTIONS.digest(kind)
        reported = exchange(lambda: (digest, cached), "fully parallel planning", group)
        global_digest = PlanCache.global_digest([d for d, _ in reported])
        if PlanCache.is_hit(global_digest, [c for _, c in reported]):
            return _DISTRIBUTIONS.get(kind)
    distribution = compute()
    if use_cache:
        _DISTRIBUTIONS.put(kind, global_digest, distribution)
    return distribution


class FullyParallelSaveStrategyWrapper(PlannedSaveStrategy):
    """Wraps a save strategy so that the ranks of `parallelization_group` (default: all) each
    write a share of the shards replicated among them, balanced by bytes.

    A shard takes part if its main replica is in the group; it is then written by one of the
    group's ranks that hold it. With an engine of this library the distribution is part of the
    save's plan, which every later save of an unchanged state reuses. A strategy written for
    Megatron-Core's interface gets Megatron-Core's `apply_saving_parallelization`: the
    distribution set as replica ids on the state dict, then its `save`.
    """

    def __init__(self, strategy, parallelization_group=None, do_cache_distribution: bool = False):
        super().__init__(strategy.backend, strategy.version)
        self.base_strategy = strategy
        self.parallelization_group = parallelization_group
        self.do_cache_distribution = do_cache_distribution

    @property
    def can_handle_sharded_objects(self) -> bool:
        return self.base_strategy.can_handle_sharded_objects

    @property
    def plans_with_library(self) -> bool:
        return isinstance(self.base_strategy, PlannedSaveStrategy) and self.base_strategy.plans_with_library

    @property
    def stores_common_state(self) -> bool:
        return self.base_strategy.stores_common_state

    @property
    def cached_distribution(self) -> Optional[ShardDistribution]:
        """The distribution `apply_saving_parallelization` last computed for this group, if
        cached (`do_cache_distribution`)."""
        return _cached(("save", tuple(group_ranks(self.parallelization_group))))

    def planning_info(self) -> Any:
        # the group in 16 bytes: ranks only compare groups, and a group of thousands of ranks
        # need not travel from each of them
        group = hashlib.sha256(repr(group_ranks(self.parallelization_group)).encode()).digest()[:16]
        return group, self.base_strategy.planning_info()

    def plan(self, global_plan: GlobalPlan, planning_infos: Sequence[Any], rank: int) -> FullyParallelSavePlan:
        group_ids = {}
        groups = [group_ids.setdefault(group, len(group_ids)) for group, _ in planning_infos]
        distributed = global_plan.with_main(save_distribution(global_plan, groups))
        rows = distributed.rows_of_rank(rank)[distributed.main_of_rank(rank)]
        rows = rows[distributed.key_kind[distributed.row_key[rows]] == TENSOR]
        writes = frozenset(_sharded_tensor_shard_id(distributed.shard(row)) for row in rows.tolist())
        base = self.base_strategy.plan(distributed, [base for _, base in planning_infos], rank)
        return FullyParallelSavePlan(rank, writes, base)

    def stage(self, plan: FullyParallelSavePlan, sharded_state_dict):
        dict_list_map_inplace(lambda sh: _as_planned(plan.writes, sh), sharded_state_dict)
        return self.base_strategy.stage(plan.base, sharded_state_dict)

    def write(self, plan: FullyParallelSavePlan, sharded_state_dict, checkpoint_dir):
        return self.base_strategy.write(plan.base, sharded_state_dict, checkpoint_dir)

    def finalize(self, plan: FullyParallelSavePlan, checkpoint_dir, write_results) -> None:
        self.base_strategy.finalize(plan.base, checkpoint_dir, write_results)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        if self.plans_with_library:
            return super().save(sharded_state_dict, checkpoint_dir)
        self.apply_saving_parallelization(sharded_state_dict)
        return self.base_strategy.save(sharded_state_dict, checkpoint_dir)

    def async_save(self, sharded_state_dict, checkpoint_dir):
        """Megatron-Core's async save, for a wrapped strategy that has one."""
        if not callable(getattr(self.base_strategy, "async_save", None)):
            raise CheckpointingException(f"Cannot save asynchronously with {self.base_strategy}: it has no async_save")
        self.apply_saving_parallelization(sharded_state_dict)
        return self.base_strategy.async_save(sharded_state_dict, checkpoint_dir)

    def apply_saving_parallelization(self, sharded_state_dict) -> None:
        """Sets the replica ids of the ShardedTensors in `sharded_state_dict` (in place) so that
        this rank's main replicas are exactly the shards it writes (collective)."""
        group = self.parallelization_group
        kind = ("save", tuple(group_ranks(group)))
        distribution = _cached_distribution(
            kind, sharded_state_dict, group,
            lambda: determine_main_replica_uniform_distribution(sharded_state_dict, group), self.do_cache_distribution,
        )
        distribute_main_replicas_with_precomputed_distribution(sharded_state_dict, group, distribution)

    def __getstate__(self):
        # an async save pickles the strategy into its writer process, where only `write` runs;
        # a process group cannot leave its process. (Pickled, it is also what makes two saves
        # plan alike: `do_cache_distribution` does not change a planned save.)
        return dict(self.__dict__, parallelization_group=None, do_cache_distribution=None)


class FullyParallelLoadStrategyWrapper(LoadShardedStrategy):
    """Wraps a load strategy so that a shard requested by several ranks of
    `parallelization_group` (default: all) is read once, by one of them (balanced by bytes),
    and sent to the others by `exchange_algo` (exchange_utils.py; Megatron-Core's names,
    "broadcast" by default, and "point_to_point").

    `do_cache_distribution` reuses the previous distribution of the group while every rank's
    requests are unchanged (checked with one small exchange of digests); it is kept in this
    module, not on the wrapper, which holds configuration only.
    """

    def __init__(self, strategy: LoadShardedStrategy, parallelization_group=None, do_cache_distribution: bool = False,
                 exchange_algo: str = "broadcast"):
        super().__init__(getattr(strategy, "backend", None), getattr(strategy, "version", 1))
        if exchange_algo not in EXCHANGE_ALGOS:
            raise CheckpointingException(f"exchange_algo must be one of {list(EXCHANGE_ALGOS)}, got {exchange_algo!r}")
        self.base_strategy = strategy
        self.parallelization_group = parallelization_group
        self.do_cache_distribution = do_cache_distribution
        self.exchange_algo = exchange_algo

    @property
    def can_handle_sharded_objects(self) -> bool:
        return self.base_strategy.can_handle_sharded_objects

    @property
    def cached_distribution(self) -> Optional[ShardDistribution]:
        """The distribution of this group's last load, if cached (`do_cache_distribution`)."""
        return _cached(("load", tuple(group_ranks(self.parallelization_group))))

    def check_backend_compatibility(self, loaded_backend: str) -> None:
        self.base_strategy.check_backend_compatibility(loaded_backend)

    def check_version_compatibility(self, loaded_version: int) -> None:
        self.base_strategy.check_version_compatibility(loaded_version)

    def load_tensors_metadata(self, checkpoint_dir):
        return self.base_strategy.load_tensors_metadata(checkpoint_dir)

    def load_sharded_metadata(self, checkpoint_dir):
        return self.base_strategy.load_sharded_metadata(checkpoint_dir)

    def flattened_keys(self, checkpoint_dir):
        return self.base_strategy.flattened_keys(checkpoint_dir)

    def remove_sharded_tensors(self, checkpoint_dir, key_prefix: str) -> None:
        self.base_strategy.remove_sharded_tensors(checkpoint_dir, key_prefix)

    def load(self, sharded_state_dict, checkpoint_dir):
        group = self.parallelization_group
        with within(group):
            ranks, rank = group_ranks(), get_rank()
        if len(ranks) == 1:
            return self.base_strategy.load(sharded_state_dict, checkpoint_dir)
        kind = ("load", tuple(ranks))
        distribution = _cached_distribution(
            kind, sharded_state_dict, group,
            lambda: determine_main_replica_uniform_distribution(sharded_state_dict, group, ignore_groups=True), self.do_cache_distribution,
        )
        leaves = list(nested_values(sharded_state_dict))
        requests = {}  # shard id -> this rank's request (a repeated request is read once)
        for sh in leaves:
            if isinstance(sh, ShardedTensor):
                requests.setdefault(load_shard_id(sh), sh)
        reads = {sid for sid, sh in requests.items() if distribution.main_rank_for_shard[sid] == rank}
        mine = {}  # what this rank reads: its shards (as main replicas) and every other leaf
        for i, sh in enumerate(leaves):
            if not isinstance(sh, ShardedTensor):
                mine[i] = sh
            elif load_shard_id(sh) in reads and requests[load_shard_id(sh)] is sh:
                mine[i] = _as_main(sh)
        loaded = on_every_rank(lambda: self.base_strategy.load(mine, checkpoint_dir), f"fully parallel load of {checkpoint_dir}", group)
        read_here = {load_shard_id(leaves[i]): value for i, value in loaded.items() if isinstance(leaves[i], ShardedTensor)}
        unread = {sid: sh for sid, sh in requests.items() if sid not in reads}
        shards: Dict[Tuple, torch.Tensor] = exchange_by_distribution(read_here, unread, distribution, group, self.exchange_algo)
        position, handed_out = iter(range(len(leaves))), set()

        def result(sh):
            i = next(position)
            if not isinstance(sh, ShardedTensor):
                return loaded[i]
            shard = load_shard_id(sh)
            value = shards[shard]
            if shard in handed_out and sh.load_destination() is None:
                value = value.clone()  # no aliasing between two results
            handed_out.add(shard)
            return sh.fill(value)  # into the caller's tensor, unless it was received there

        return dict_list_map_inplace(result, sharded_state_dict)


def _as_main(sh: ShardedTensor) -> ShardedTensor:
    """`sh` as a main replica (what the wrapped strategy reads), data shared."""
    if is_main_replica(sh.replica_id):
        return sh
    main = copy.copy(sh)
    main.replica_id = 0
    return main

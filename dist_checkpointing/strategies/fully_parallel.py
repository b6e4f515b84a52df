"""Fully parallel save and load: the ranks of a group share the work on replicated shards.

Without these wrappers a replicated shard (e.g. a weight held by every data-parallel rank) is
written by its main replica and read by every rank that asks for it. With them, each replicated
shard is written by one rank of the group, chosen so that every rank writes a balanced share of
bytes; on load each rank reads a balanced share and sends it to the other ranks that asked.

Megatron-Core's names and semantics, for every engine. Two differences:
- the save distribution is computed from the global plan `serialization.save` has already
  exchanged, identically on every rank: no extra communication;
- on load the shards travel point to point from their reader into the result tensors of the
  ranks that asked for them, so no rank holds a shard it did not ask for (whatever
  `exchange_algo` says; Megatron's algorithm names are accepted).
"""

import hashlib
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Dict, FrozenSet, Hashable, List, Sequence, Tuple

import numpy as np

import torch

from ..collectives import exchange, get_rank, group_ranks, on_every_rank, send_and_receive
from ..core import CheckpointingException
from ..dict_utils import dict_list_map_inplace, nested_values
from ..global_plan import TENSOR, GlobalPlan, PlanCache, sorted_groups
from ..mapping import ShardedTensor, is_main_replica
from .base import LoadShardedStrategy, SaveShardedStrategy, ShardedSavePlan

EXCHANGE_ALGOS = ("broadcast", "gather_rounds", "gather_object")


def distribute_evenly(candidates: Dict[Hashable, Sequence[int]], sizes: Dict[Hashable, int]) -> Dict[Hashable, int]:
    """Assigns each shard to one of its candidate ranks so that ranks get similar byte totals.

    Deterministic: shards with the fewest candidates go first (they leave no choice), then the
    largest; each goes to its least loaded candidate, the lowest rank on ties.
    """
    load: Dict[int, int] = defaultdict(int)
    owner = {}
    for shard in sorted(candidates, key=lambda s: (len(candidates[s]), -sizes[s], s)):
        rank = min(candidates[shard], key=lambda r: (load[r], r))
        owner[shard] = rank
        load[rank] += sizes[shard]
    return owner


def _shard_id(sh: ShardedTensor) -> Tuple:
    """What makes two shards replicas of each other on save."""
    r = sh.flattened_range
    return (sh.key, sh.global_offset, () if r is None else (r.start, r.stop))


def _request_id(sh: ShardedTensor) -> Tuple:
    """What makes two load requests ask for the same values (any rectangle may be requested)."""
    return _shard_id(sh) + (sh.local_shape,)


def save_distribution(plan: GlobalPlan, group_of_rank: Sequence[int]) -> np.ndarray:
    """Which pairs of `plan` write (one bool per pair): each tensor shard (key, offset, flat
    range) with a main replica is written by one of the ranks holding it in its main replica's
    group (`group_of_rank`: a group id per rank), balanced by bytes; objects keep their main
    replicas. The same result on every rank.

    Vectorised: shards are grouped by their set of candidate ranks (e.g. one DP group), found
    by a 128-bit fingerprint of the set; each set's shards are dealt largest first, in snake
    order over its ranks sorted by the bytes they already write (near the balance of
    `distribute_evenly`'s greedy, without a Python step per shard). The result is checked:
    every shard is written by a rank that holds it.
    """
    groups = np.asarray(group_of_rank, dtype=np.int64)
    tensor_row = plan.key_kind[plan.row_key] == TENSOR
    tensor_pair = tensor_row[plan.pair_row]
    order, first = sorted_groups([plan.row_key, *plan.offset.T, plan.flat[:, 0], plan.flat[:, 1]])
    row_shard = np.empty(len(order), dtype=np.int32)
    row_shard[order] = np.cumsum(first) - 1
    n_shards = int(first.sum())
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
    set_of = np.empty(len(written), dtype=np.int64)
    set_of[by_set] = np.cumsum(starts) - 1
    sets = fingerprint[written[by_set[starts]]]  # in fingerprint order, fewest candidates first
    representative = written[by_set[starts]]  # each set's first shard
    is_representative = np.zeros(n_shards, dtype=bool)
    is_representative[representative] = True
    shown = is_representative[shards]
    members_of = {}
    for shard, rank in sorted(zip(shards[shown].tolist(), ranks[shown].tolist())):
        members_of.setdefault(shard, []).append(rank)
    writer = np.full(n_shards, -1)
    load = np.zeros(plan.world_size, dtype=np.int64)
    bounds = np.append(np.flatnonzero(starts), len(written))
    for s in range(len(sets)):
        members = np.array(sorted(set(members_of[representative[s]])), dtype=np.int64)
        dealt = written[by_set[bounds[s] : bounds[s + 1]]]
        dealt = dealt[np.lexsort((dealt, -size[dealt]))]
        by_load = members[np.lexsort((members, load[members]))]
        c, position = len(members), np.arange(len(dealt))
        snake = np.where((position // c) % 2 == 0, position % c, c - 1 - position % c)
        writer[dealt] = by_load[snake]
        np.add.at(load, by_load[snake], size[dealt])
    writes = writer[pair_shard] == pair_rank
    held = np.zeros(n_shards, dtype=bool)
    held[pair_shard[writes & candidate]] = True
    if not held[written].all():  # a fingerprint collision: never expected, never silent
        raise CheckpointingException("The fully parallel distribution assigned a shard to a rank that does not hold it")
    return np.where(tensor_pair, writes, plan.main)


@dataclass(frozen=True)
class FullyParallelSavePlan(ShardedSavePlan):
    """The wrapped engine's plan, and the shards this rank writes (its main replicas after
    the distribution)."""

    writes: FrozenSet[Tuple]  # shard ids (`_shard_id`)
    base: ShardedSavePlan


def _as_planned(writes: FrozenSet[Tuple], sh):
    """`sh` with the replica id that makes it a main replica exactly if this rank writes it."""
    if not isinstance(sh, ShardedTensor):
        return sh
    planned = _shard_id(sh) in writes
    if planned == is_main_replica(sh.replica_id):
        return sh
    return replace(sh, replica_id=0 if planned else 1)


class FullyParallelSaveStrategyWrapper(SaveShardedStrategy):
    """Wraps a save strategy so that the ranks of `parallelization_group` (default: all) each
    write a balanced share of the shards replicated among them.

    A shard takes part if its main replica is in the group; it is then written by one of the
    group's ranks that hold it. `do_cache_distribution` is accepted for Megatron-Core's
    signature and needs no setting: every save reuses its previous plan, distribution
    included, while the global plan is unchanged (see `serialization.save`).
    """

    def __init__(self, strategy: SaveShardedStrategy, parallelization_group=None, do_cache_distribution: bool = False):
        super().__init__(strategy.backend, strategy.version)
        self.base_strategy = strategy
        self.parallelization_group = parallelization_group

    @property
    def can_handle_sharded_objects(self) -> bool:
        return self.base_strategy.can_handle_sharded_objects

    @property
    def stores_common_state(self) -> bool:
        return self.base_strategy.stores_common_state

    def planning_info(self) -> Any:
        # the group in 16 bytes: ranks only compare groups, and a group of thousands of ranks
        # need not travel from each of them
        group = hashlib.sha256(repr(group_ranks(self.parallelization_group)).encode()).digest()[:16]
        return group, self.base_strategy.planning_info()

    def plan(self, global_plan: GlobalPlan, planning_infos: Sequence[Any], rank: int) -> FullyParallelSavePlan:
        group_ids: Dict[bytes, int] = {}
        groups = [group_ids.setdefault(group, len(group_ids)) for group, _ in planning_infos]
        distributed = global_plan.with_main(save_distribution(global_plan, groups))
        rows = distributed.rows_of_rank(rank)[distributed.main_of_rank(rank)]
        rows = rows[distributed.key_kind[distributed.row_key[rows]] == TENSOR]
        writes = frozenset(_shard_id(distributed.shard(row)) for row in rows.tolist())
        base = self.base_strategy.plan(distributed, [base for _, base in planning_infos], rank)
        return FullyParallelSavePlan(rank, writes, base)

    def stage(self, plan: FullyParallelSavePlan, sharded_state_dict):
        dict_list_map_inplace(lambda sh: _as_planned(plan.writes, sh), sharded_state_dict)
        return self.base_strategy.stage(plan.base, sharded_state_dict)

    def save(self, plan: FullyParallelSavePlan, sharded_state_dict, checkpoint_dir):
        return self.base_strategy.save(plan.base, sharded_state_dict, checkpoint_dir)

    def finalize(self, plan: FullyParallelSavePlan, checkpoint_dir, write_results) -> None:
        self.base_strategy.finalize(plan.base, checkpoint_dir, write_results)

    def __getstate__(self):
        # an async save pickles the strategy into its writer process, where only `save` runs;
        # a process group cannot leave its process
        return dict(self.__dict__, parallelization_group=None)


_LOAD_DISTRIBUTIONS = PlanCache()  # the last load distribution of each group (its ranks), in this process


class FullyParallelLoadStrategyWrapper(LoadShardedStrategy):
    """Wraps a load strategy so that a shard requested by several ranks of
    `parallelization_group` (default: all) is read once, by one of them (balanced by bytes),
    and sent to the others.

    `do_cache_distribution` reuses the previous distribution of the group while every rank's
    requests are unchanged (checked with one small exchange of digests instead of the
    requests); it is kept in this module, not on the wrapper, which holds configuration only.
    """

    def __init__(
        self,
        strategy: LoadShardedStrategy,
        parallelization_group=None,
        do_cache_distribution: bool = False,
        exchange_algo: str = "broadcast",
    ):
        super().__init__(strategy.backend, strategy.version)
        if exchange_algo not in EXCHANGE_ALGOS:
            raise CheckpointingException(f"exchange_algo must be one of {list(EXCHANGE_ALGOS)}, got {exchange_algo!r}")
        self.base_strategy = strategy
        self.parallelization_group = parallelization_group
        self.do_cache_distribution = do_cache_distribution
        self.exchange_algo = exchange_algo

    @property
    def can_handle_sharded_objects(self) -> bool:
        return self.base_strategy.can_handle_sharded_objects

    def readable_backends(self):
        return self.base_strategy.readable_backends()

    def check_version_compatibility(self, loaded_version: int) -> None:
        self.base_strategy.check_version_compatibility(loaded_version)

    def load_tensors_metadata(self, checkpoint_dir):
        return self.base_strategy.load_tensors_metadata(checkpoint_dir)

    def load_sharded_metadata(self, checkpoint_dir):
        return self.base_strategy.load_sharded_metadata(checkpoint_dir)

    def remove_sharded_tensors(self, checkpoint_dir, key_prefix: str) -> None:
        self.base_strategy.remove_sharded_tensors(checkpoint_dir, key_prefix)

    def load(self, sharded_state_dict, checkpoint_dir):
        group = self.parallelization_group
        ranks = group_ranks(group)
        if len(ranks) == 1:
            return self.base_strategy.load(sharded_state_dict, checkpoint_dir)
        leaves = list(nested_values(sharded_state_dict))
        requests = {}  # shard id -> this rank's request (a repeated request is read once)
        for sh in leaves:
            if isinstance(sh, ShardedTensor):
                requests.setdefault(_request_id(sh), sh)
        readers = self._distribution(requests, ranks)
        rank = get_rank()
        mine = {
            i: sh
            for i, sh in enumerate(leaves)
            if not isinstance(sh, ShardedTensor) or (readers[_request_id(sh)][0] == rank and requests[_request_id(sh)] is sh)
        }
        loaded = on_every_rank(
            lambda: self.base_strategy.load(mine, checkpoint_dir), f"fully parallel load of {checkpoint_dir}", group
        )
        read_here = {_request_id(leaves[i]): value for i, value in loaded.items() if isinstance(leaves[i], ShardedTensor)}
        shards = self._exchange_shards(requests, readers, read_here, rank)
        position, handed_out = iter(range(len(leaves))), set()

        def result(sh):
            i = next(position)
            if not isinstance(sh, ShardedTensor):
                return loaded[i]
            shard = _request_id(sh)
            value = shards[shard]
            if shard in handed_out and sh.load_destination() is None:
                value = value.clone()  # no aliasing between two results
            handed_out.add(shard)
            return sh.fill(value)  # into the caller's tensor, unless it was received there

        return dict_list_map_inplace(result, sharded_state_dict)

    def _distribution(self, requests: Dict[Tuple, ShardedTensor], ranks: List[int]) -> Dict[Tuple, Tuple[int, List[int]]]:
        """shard id -> (reader, every rank that asked for it)."""
        group = self.parallelization_group
        asked = sorted((shard, sh.nbytes) for shard, sh in requests.items())  # same order everywhere
        digest = hashlib.sha256(repr(asked).encode()).digest()
        kind = tuple(ranks)
        cached = _LOAD_DISTRIBUTIONS.digest(kind) if self.do_cache_distribution else b""
        if cached:
            reported = exchange(lambda: (digest, cached), "fully parallel load planning", group)
            if PlanCache.is_hit(PlanCache.global_digest([d for d, _ in reported]), [c for _, c in reported]):
                return _LOAD_DISTRIBUTIONS.get(kind)
        gathered = exchange(lambda: (digest, asked), "fully parallel load planning", group)
        askers, sizes = defaultdict(list), {}
        for rank, (_, shards) in zip(ranks, gathered):
            for shard, nbytes in shards:
                askers[shard].append(rank)
                sizes[shard] = nbytes
        readers = distribute_evenly(askers, sizes)
        distribution = {shard: (readers[shard], askers[shard]) for shard in askers}
        if self.do_cache_distribution:
            _LOAD_DISTRIBUTIONS.put(kind, PlanCache.global_digest([d for d, _ in gathered]), distribution)
        return distribution

    def _exchange_shards(self, requests, readers, read_here, rank) -> Dict[Tuple, torch.Tensor]:
        """Every shard this rank asked for: read here, or received from its reader straight
        into the result tensor (the caller's, when it can hold it)."""
        group = self.parallelization_group
        shards, sends, receives = {}, [], []
        for tag, shard in enumerate(sorted(readers)):
            reader, askers = readers[shard]
            if reader == rank:
                local = shards[shard] = read_here[shard]
                if local.numel():
                    sends += [(local.detach(), peer, tag) for peer in askers if peer != rank]
            elif rank in askers:
                sh = requests[shard]
                target = sh.load_destination()
                if target is None or not target.is_contiguous():  # receives need contiguous targets
                    has_device = sh.data is not None and sh.data.device.type != "meta"
                    device = sh.data.device if has_device else torch.device("cpu")
                    target = torch.empty(sh.data_shape, dtype=sh.dtype, device=device)
                shards[shard] = target
                if target.numel():
                    receives.append((target.detach(), reader, tag))
        send_and_receive(sends, receives, group)
        return shards

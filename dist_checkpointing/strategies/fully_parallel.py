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
from typing import Any, Dict, Hashable, List, Sequence, Tuple

import torch

from ..collectives import exchange, get_rank, group_ranks, on_every_rank, send_and_receive
from ..core import CheckpointingException
from ..dict_utils import dict_list_map_inplace, nested_values
from ..mapping import ShardedTensor, is_main_replica
from ..validation import ShardsByKey
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


@dataclass(frozen=True)
class FullyParallelSavePlan(ShardedSavePlan):
    """The wrapped engine's plan, and which rank writes each replicated shard."""

    writers: Dict[Tuple, int]  # shard id -> its writer
    base: ShardedSavePlan


def _as_planned(writers: Dict[Tuple, int], sh, rank: int):
    """`sh` of `rank` with the replica id that makes its planned writer the main replica."""
    if not isinstance(sh, ShardedTensor):
        return sh
    writes = writers[_shard_id(sh)] == rank
    if writes == is_main_replica(sh.replica_id):
        return sh
    return replace(sh, replica_id=0 if writes else 1)


class FullyParallelSaveStrategyWrapper(SaveShardedStrategy):
    """Wraps a save strategy so that the ranks of `parallelization_group` (default: all) each
    write a balanced share of the shards replicated among them.

    A shard takes part if its main replica is in the group; it is then written by one of the
    group's ranks that hold it. `do_cache_distribution` reuses the previous distribution while
    the global plan is unchanged.
    """

    def __init__(self, strategy: SaveShardedStrategy, parallelization_group=None, do_cache_distribution: bool = False):
        super().__init__(strategy.backend, strategy.version)
        self.base_strategy = strategy
        self.parallelization_group = parallelization_group
        self.do_cache_distribution = do_cache_distribution
        self.cached_distribution = None  # (shard ids of the plan, shard id -> writer rank)

    @property
    def can_handle_sharded_objects(self) -> bool:
        return self.base_strategy.can_handle_sharded_objects

    def planning_info(self) -> Any:
        return tuple(group_ranks(self.parallelization_group)), self.base_strategy.planning_info()

    def plan(self, shards_by_key: ShardsByKey, planning_infos: Sequence[Any]) -> FullyParallelSavePlan:
        groups = [frozenset(ranks) for ranks, _ in planning_infos]
        writers = self._distribution(shards_by_key, groups)
        rewritten = {
            key: [(rank, _as_planned(writers, sh, rank)) for rank, sh in ranked] for key, ranked in shards_by_key.items()
        }
        base = self.base_strategy.plan(rewritten, [base for _, base in planning_infos])
        return FullyParallelSavePlan(get_rank(), writers, base)

    def _distribution(self, shards_by_key: ShardsByKey, groups: List[frozenset]) -> Dict[Tuple, int]:
        holders, sizes, main = defaultdict(list), {}, {}
        for ranked in shards_by_key.values():
            for rank, sh in ranked:
                if isinstance(sh, ShardedTensor):
                    shard = _shard_id(sh)
                    holders[shard].append(rank)
                    sizes[shard] = sh.nbytes
                    if is_main_replica(sh.replica_id):
                        main[shard] = rank
        plan_ids = sorted((shard, tuple(ranks)) for shard, ranks in holders.items())
        if self.do_cache_distribution and self.cached_distribution and self.cached_distribution[0] == plan_ids:
            return self.cached_distribution[1]
        candidates = {}
        for shard, ranks in holders.items():
            group = groups[main[shard]]  # the group of the main replica writes it
            candidates[shard] = [r for r in ranks if r in group and groups[r] == group]
        writers = distribute_evenly(candidates, sizes)
        if self.do_cache_distribution:
            self.cached_distribution = (plan_ids, writers)
        return writers

    def stage(self, plan: FullyParallelSavePlan, sharded_state_dict):
        dict_list_map_inplace(lambda sh: _as_planned(plan.writers, sh, plan.rank), sharded_state_dict)
        return self.base_strategy.stage(plan.base, sharded_state_dict)

    def save(self, plan: FullyParallelSavePlan, sharded_state_dict, checkpoint_dir):
        return self.base_strategy.save(plan.base, sharded_state_dict, checkpoint_dir)

    def finalize(self, plan: FullyParallelSavePlan, checkpoint_dir, write_results) -> None:
        self.base_strategy.finalize(plan.base, checkpoint_dir, write_results)

    def __getstate__(self):
        # an async save pickles the strategy into its writer process, where only `save` runs;
        # a process group cannot leave its process
        return dict(self.__dict__, parallelization_group=None, cached_distribution=None)


class FullyParallelLoadStrategyWrapper(LoadShardedStrategy):
    """Wraps a load strategy so that a shard requested by several ranks of
    `parallelization_group` (default: all) is read once, by one of them (balanced by bytes),
    and sent to the others.

    `do_cache_distribution` reuses the previous distribution while every rank's requests are
    unchanged (checked with one small exchange of digests instead of the requests).
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
        self.cached_distribution = None  # (digests of every rank's requests, shard -> reader)

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
        digest = hashlib.sha256(repr(asked).encode()).hexdigest()
        if self.do_cache_distribution and self.cached_distribution is not None:
            digests = exchange(lambda: digest, "fully parallel load planning", group)
            if digests == self.cached_distribution[0]:
                return self.cached_distribution[1]
        gathered = exchange(lambda: (digest, asked), "fully parallel load planning", group)
        askers, sizes = defaultdict(list), {}
        for rank, (_, shards) in zip(ranks, gathered):
            for shard, nbytes in shards:
                askers[shard].append(rank)
                sizes[shard] = nbytes
        readers = distribute_evenly(askers, sizes)
        distribution = {shard: (readers[shard], askers[shard]) for shard in askers}
        if self.do_cache_distribution:
            self.cached_distribution = ([d for d, _ in gathered], distribution)
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

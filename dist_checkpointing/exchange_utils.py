"""Which rank of a group does the work on a replicated shard, and how loaded shards travel to
the other ranks that asked for them (Megatron-Core's `exchange_utils`, same names and results).

The distribution is Megatron-Core's greedy, computed identically on every rank from what every
rank holds or asks for: shards go, in order of (main replica outside the group last, fewest
candidate ranks, largest, shard id), each to its least loaded candidate rank (the lowest rank
on ties). `assign_greedily` is that algorithm on arrays, used by both the fully parallel save
(on the global plan) and the load; it keeps one lazy heap per set of candidate ranks, so it
costs O(log n) per shard however large the group.

The exchange after a fully parallel load (`exchange_by_distribution`) sends each shard from the
rank that read it to the ranks that asked for it, received straight into their result tensors:
- "broadcast" (the default, Megatron-Core's): a shard every rank of the group asked for is
  broadcast; one that only some ranks asked for goes point to point to those ranks;
- "point_to_point": always point to point, to the ranks that asked;
- "gather_rounds": every shard more than one rank asked for, per dtype, in rounds of one
  all-gather (one shard per rank and round);
- "gather_object": one `all_gather_object` of every loaded shard (for debugging).
A shard that only its reader asked for never travels.
"""

import heapq
from collections import defaultdict
from itertools import zip_longest
from typing import Dict, Hashable, List, NamedTuple, Optional, Sequence, Set, Tuple, TypeVar

import numpy as np
import torch

from .collectives import (
    all_gather_padded,
    broadcast_tensor,
    exchange,
    get_rank,
    get_world_size,
    group_ranks,
    host_wire,
    send_and_receive,
    within,
)
from .core import CheckpointingException
from .dict_utils import nested_values
from .global_plan import FLAT, GlobalPlan, LocalPlan
from .mapping import ShardedStateDict, ShardedTensor, is_main_replica
from .utils import _sharded_tensor_shard_id

EXCHANGE_ALGOS = ("broadcast", "point_to_point", "gather_rounds", "gather_object")


class ShardDistribution(NamedTuple):
    """Who does the work on each shard, within one group (ranks are group ranks).

    main_rank_for_shard: the rank that writes (or reads) each shard
    shards_in_this_group: the shards with a main replica in the group (on load: every shard
        the group asked for)
    shard_to_metadata: each shard's ShardedTensor (without data)
    all_ranks_for_shard: the ranks that hold (or asked for) each shard
    """

    main_rank_for_shard: Dict[Hashable, int]
    shards_in_this_group: Set[Hashable]
    shard_to_metadata: Dict[Hashable, ShardedTensor]
    all_ranks_for_shard: Dict[Hashable, List[int]]


def assign_greedily(order: np.ndarray, shard_set: np.ndarray, set_members: Sequence[np.ndarray], sizes: np.ndarray, num_ranks: int) -> np.ndarray:
    """The rank of each shard: shards in `order`, each to the least loaded rank (bytes so far;
    the lowest rank on ties) among the members of its candidate set `shard_set[shard]`."""
    load = [0] * num_ranks
    heaps = [[(0, rank) for rank in sorted(members.tolist())] for members in set_members]  # sorted: a heap
    owner = np.empty(len(shard_set), dtype=np.int64)
    sets, sizes = shard_set.tolist(), sizes.tolist()
    for shard in order.tolist():
        heap = heaps[sets[shard]]
        while heap[0][0] != load[heap[0][1]]:  # stale: that rank got shards of another set since
            heapq.heapreplace(heap, (load[heap[0][1]], heap[0][1]))
        rank = heap[0][1]
        load[rank] += sizes[shard]
        heapq.heapreplace(heap, (load[rank], rank))
        owner[shard] = rank
    return owner


T = TypeVar("T")


def distribute_shards_to_ranks(
    shard_to_ranks: Dict[T, List[int]],
    shard_to_size: Dict[T, int],
    num_ranks: int,
    cross_parallelization_group_loads: Set[T] = frozenset(),
) -> Dict[T, int]:
    """shard -> the rank (of `num_ranks`) that does its work, by the greedy of the module
    docstring; `cross_parallelization_group_loads`: shards whose main replica is outside the
    group, assigned last (a load then reads what the group also saved where it saved it)."""
    shards = list(shard_to_ranks)
    order = sorted(
        range(len(shards)),
        key=lambda i: (shards[i] in cross_parallelization_group_loads, len(shard_to_ranks[shards[i]]), -shard_to_size[shards[i]], shards[i]),
    )
    set_ids: Dict[Tuple[int, ...], int] = {}
    shard_set = np.array([set_ids.setdefault(tuple(sorted(set(shard_to_ranks[s]))), len(set_ids)) for s in shards], dtype=np.int64)
    members = [np.array(ranks, dtype=np.int64) for ranks in set_ids]
    sizes = np.array([shard_to_size[s] for s in shards], dtype=np.int64)
    owner = assign_greedily(np.array(order, dtype=np.int64), shard_set, members, sizes, num_ranks)
    return dict(zip(shards, owner.tolist()))


def load_shard_id(sh: ShardedTensor) -> Tuple:
    """What makes two load requests ask for the same values: a request may be any box, so
    its shape counts too (`_sharded_tensor_shard_id` is a saved shard's)."""
    return _sharded_tensor_shard_id(sh) + (sh.local_shape,)


def determine_main_replica_uniform_distribution(
    sharded_state_dict: ShardedStateDict, parallelization_group=None, ignore_groups: bool = False
) -> Optional[ShardDistribution]:
    """The distribution of the ShardedTensors of every rank of the group (one exchange of
    their metadata); None for a group of one rank.

    Saving (`ignore_groups` False): the shards with a main replica in the group, each to one
    rank holding it. Loading (`ignore_groups` True): every shard some rank asked for, by its
    `load_shard_id`, those without a main replica in the group assigned last; the requests
    travel as columns (global_plan.LocalPlan), not as pickled ShardedTensors."""
    with within(parallelization_group):
        if get_world_size() <= 1:
            return None
        shard_id = load_shard_id if ignore_groups else _sharded_tensor_shard_id
        local = {}
        for sh in nested_values(sharded_state_dict):
            if isinstance(sh, ShardedTensor):
                local.setdefault(shard_id(sh), sh.without_data())
        if ignore_groups:
            return _load_distribution(local)
        gathered = exchange(lambda: local, "fully parallel planning")
    shard_to_ranks, shard_to_metadata, with_main = defaultdict(list), {}, set()
    for rank, shards in enumerate(gathered):
        for sid, sh in shards.items():
            shard_to_ranks[sid].append(rank)
            shard_to_metadata.setdefault(sid, sh)
            if is_main_replica(sh.replica_id):
                with_main.add(sid)
    shard_to_ranks = {sid: ranks for sid, ranks in shard_to_ranks.items() if sid in with_main}
    sizes = {sid: shard_to_metadata[sid].nbytes for sid in shard_to_ranks}
    main_rank = distribute_shards_to_ranks(shard_to_ranks, sizes, len(gathered))
    return ShardDistribution(main_rank, with_main, shard_to_metadata, shard_to_ranks)


def _load_distribution(local: Dict[Hashable, ShardedTensor]) -> ShardDistribution:
    """The load's distribution from every rank's requests (`local`: this rank's, by load
    shard id), exchanged as columns. A shard's metadata is this rank's request where it made
    one of the first asking rank's size, else the first asking rank's (from the plan): every
    rank must agree on the sizes of what travels."""
    plan = GlobalPlan.of_local_plans(exchange(lambda: LocalPlan.of(list(local.values())), "fully parallel planning"))
    ids = _load_shard_ids(plan)
    shard_to_ranks: Dict[Hashable, List[int]] = {}
    first_row: Dict[Hashable, int] = {}
    with_main = set()
    for rank, row, main in zip(plan.pair_rank.tolist(), plan.pair_row.tolist(), plan.main.tolist()):
        sid = ids[row]
        if sid in shard_to_ranks:
            shard_to_ranks[sid].append(rank)
        else:
            shard_to_ranks[sid], first_row[sid] = [rank], row
        if main:
            with_main.add(sid)
    nbytes = plan.row_nbytes.tolist()
    sizes = {sid: nbytes[row] for sid, row in first_row.items()}
    metadata = {sid: local[sid] if sid in local and local[sid].nbytes == sizes[sid] else plan.shard(row) for sid, row in first_row.items()}
    main_rank = distribute_shards_to_ranks(shard_to_ranks, sizes, plan.world_size, set(shard_to_ranks) - with_main)
    return ShardDistribution(main_rank, set(shard_to_ranks), metadata, shard_to_ranks)


def _load_shard_ids(plan: GlobalPlan) -> List[Tuple]:
    """`load_shard_id` of each row of a plan of ShardedTensors."""
    ndims = plan.entry_ndim[plan.row_entry].tolist()
    keys = [plan.keys[k] for k in plan.row_key.tolist()]
    flats = plan.flat.tolist() or [None] * len(keys)  # (no column where no row is flat)
    rows = zip(keys, ndims, plan.offset.tolist(), plan.extent.tolist(), plan.prepend.tolist(), plan.flags.tolist(), flats)
    return [
        (key, tuple(offset[:ndim]), tuple(flat) if flags & FLAT else None, tuple(extent[prepend:ndim]))
        for key, ndim, offset, extent, prepend, flags, flat in rows
    ]


def _get_empty_tensor_for_exchange(
    shard_id: Hashable,
    needed_shards: Dict[Hashable, ShardedTensor],
    unneeded_shards: Dict[Hashable, ShardedTensor],
    loaded_tensors: Dict[Hashable, torch.Tensor],
) -> Tuple[torch.Tensor, Optional[torch.device]]:
    """The tensor that receives shard `shard_id` in an exchange, and the device of the
    caller's tensor (None for a scratch tensor). For a shard this rank asked for
    (`needed_shards`): the request's destination when it can receive (`load_destination`,
    contiguous), else a new tensor on its device, recorded in `loaded_tensors`; for a shard
    it did not ask for (`unneeded_shards`: metadata only) a scratch tensor, dropped after."""
    needed = needed_shards.get(shard_id)
    if needed is None:
        sh = unneeded_shards[shard_id]
        return torch.empty(sh.data_shape, dtype=sh.dtype), None
    target = needed.load_destination()
    if target is None or not target.is_contiguous():
        has_device = needed.data is not None and needed.data.device.type != "meta"
        target = torch.empty(needed.data_shape, dtype=needed.dtype, device=needed.data.device if has_device else "cpu")
    loaded_tensors[shard_id] = target
    return target, target.device


def exchange_by_distribution(
    loaded_tensors: Dict[Hashable, torch.Tensor],
    unloaded_shards: Dict[Hashable, ShardedTensor],
    shard_distribution: ShardDistribution,
    parallelization_group=None,
    exchange_algo: str = "broadcast",
) -> Dict[Hashable, torch.Tensor]:
    """Every shard this rank needs: `loaded_tensors` (read here) and `unloaded_shards` (the
    requests it did not read), exchanged by `exchange_algo` (module docstring) among the ranks
    of the group; returns shard id -> tensor for both."""
    if exchange_algo not in EXCHANGE_ALGOS:
        raise CheckpointingException(f"exchange_algo must be one of {list(EXCHANGE_ALGOS)}, got {exchange_algo!r}")
    with within(parallelization_group):
        if exchange_algo == "gather_object":
            return _exchange_gather_object(loaded_tensors, unloaded_shards)
        if exchange_algo == "gather_rounds":
            return _exchange_gather_rounds(loaded_tensors, unloaded_shards, shard_distribution)
        return _exchange_directly(loaded_tensors, unloaded_shards, shard_distribution, broadcast=exchange_algo == "broadcast")


def _travelling(distribution: ShardDistribution) -> List[Hashable]:
    """The shards that leave their reader (some other rank asked for them), in one order
    on every rank."""
    return sorted(sid for sid, ranks in distribution.all_ranks_for_shard.items() if len(ranks) > 1)


PACKED_BYTES = 16 * 2**20  # on a CPU wire, smaller shards travel packed in messages of up to this size...
PACKED_MIN_SHARDS = 64  # ...where more shards than this travel (fewer: one message each, as Megatron-Core)


def _exchange_directly(loaded, unloaded, distribution: ShardDistribution, broadcast: bool) -> Dict[Hashable, torch.Tensor]:
    """Each travelling shard from its reader to the ranks that asked for it: broadcast where
    all did (with `broadcast`), else point to point. On a CPU wire (gloo), where every message
    costs ~0.3 ms whatever its size, shards under PACKED_BYTES travel packed: one message per
    reader and destination carries many (20,001 shards took 7 s one by one), where more than
    PACKED_MIN_SHARDS travel (below, the messages are few, and each shard is its own, as in
    Megatron-Core, whose tests count the broadcasts)."""
    rank, size, ranks = get_rank(), get_world_size(), group_ranks()
    result = dict(loaded)
    sends, receives = [], []
    packs: Dict[Tuple[int, Tuple[int, ...]], List[Hashable]] = defaultdict(list)  # (reader, receivers) -> shards

    def target(sid) -> torch.Tensor:
        return _get_empty_tensor_for_exchange(sid, unloaded, distribution.shard_to_metadata, result)[0]

    travelling = _travelling(distribution)
    packing = host_wire() and len(travelling) > PACKED_MIN_SHARDS
    for tag, sid in enumerate(travelling):
        reader, askers = distribution.main_rank_for_shard[sid], distribution.all_ranks_for_shard[sid]
        everyone = broadcast and len(askers) == size
        if packing and distribution.shard_to_metadata[sid].nbytes < PACKED_BYTES:
            for receivers in [tuple(range(size))] if everyone else [(peer,) for peer in askers if peer != reader]:
                if rank == reader or rank in receivers:
                    packs[reader, receivers].append(sid)
        elif everyone:
            broadcast_tensor(result[sid] if reader == rank else target(sid), ranks[reader])
        elif reader == rank:
            sends += [(result[sid].detach(), ranks[peer], tag) for peer in askers if peer != rank and result[sid].numel()]
        elif rank in askers:
            tensor = target(sid)
            if tensor.numel():
                receives.append((tensor.detach(), ranks[reader], tag))
    unpack = []  # (received message, its shards)
    position = {sid: n for n, sid in enumerate(travelling)}
    for (reader, receivers), shards in sorted(packs.items()):
        for message in _messages(shards, distribution):
            tag = len(position) + position[message[0]]  # past the shards' own tags; one per message of a route
            if reader == rank:
                wire = torch.cat([result[sid].detach().reshape(-1).view(torch.uint8).cpu() for sid in message])
                if len(receivers) == size:
                    broadcast_tensor(wire, ranks[reader])
                else:
                    sends.append((wire, ranks[receivers[0]], tag))
                continue
            wire = torch.empty(sum(distribution.shard_to_metadata[sid].nbytes for sid in message), dtype=torch.uint8)
            if len(receivers) == size:
                broadcast_tensor(wire, ranks[reader])
            elif wire.numel():
                receives.append((wire, ranks[reader], tag))
            unpack.append((wire, message))
    send_and_receive(sends, receives)
    for wire, message in unpack:
        at = 0
        for sid in message:
            tensor = target(sid)
            n = tensor.numel() * tensor.element_size()
            tensor.detach().reshape(-1).view(torch.uint8).copy_(wire[at : at + n])
            at += n
    return result


def _messages(shards: List[Hashable], distribution: ShardDistribution) -> List[List[Hashable]]:
    """`shards` (in their order) in runs of up to PACKED_BYTES."""
    messages, size = [], PACKED_BYTES
    for sid in shards:
        n = distribution.shard_to_metadata[sid].nbytes
        if size + n > PACKED_BYTES:
            messages.append([])
            size = 0
        messages[-1].append(sid)
        size += n
    return messages


def _exchange_gather_rounds(loaded, unloaded, distribution: ShardDistribution) -> Dict[Hashable, torch.Tensor]:
    """Per dtype, round r all-gathers the r-th travelling shard of every rank (as bytes, padded
    to the round's largest)."""
    rank, size = get_rank(), get_world_size()
    result = dict(loaded)
    travelling = _travelling(distribution)
    for dtype in sorted({distribution.shard_to_metadata[sid].dtype for sid in travelling}, key=str):
        by_reader: List[List[Hashable]] = [[] for _ in range(size)]
        for sid in travelling:
            if distribution.shard_to_metadata[sid].dtype == dtype:
                by_reader[distribution.main_rank_for_shard[sid]].append(sid)
        for round_shards in zip_longest(*by_reader):
            tensors = []
            for reader, sid in enumerate(round_shards):
                if sid is None:
                    tensors.append(None)
                elif reader == rank:
                    tensors.append(result[sid])
                else:
                    tensors.append(_get_empty_tensor_for_exchange(sid, unloaded, distribution.shard_to_metadata, result)[0])
            nbytes = [0 if t is None else t.numel() * t.element_size() for t in tensors]
            mine = tensors[rank]
            wire = mine.detach().reshape(-1).view(torch.uint8) if mine is not None else torch.empty(0, dtype=torch.uint8)
            for reader, (sid, tensor, data) in enumerate(zip(round_shards, tensors, all_gather_padded(wire, nbytes))):
                if sid is not None and reader != rank and nbytes[reader]:
                    tensor.reshape(-1).view(torch.uint8).copy_(data)
    return result


def _exchange_gather_object(loaded, unloaded) -> Dict[Hashable, torch.Tensor]:
    """Every rank's loaded shards to every rank, pickled (simple, slow: for debugging)."""
    gathered = exchange(lambda: {sid: t.cpu() for sid, t in loaded.items()}, "fully parallel load exchange")
    everything = {}
    for shards in gathered:
        duplicates = everything.keys() & shards.keys()
        if duplicates:
            raise CheckpointingException(f"Shards loaded by more than one rank: {sorted(map(str, duplicates))[:5]}")
        everything.update(shards)
    result = dict(loaded)
    for sid in unloaded:
        target = _get_empty_tensor_for_exchange(sid, unloaded, {}, result)[0]
        target.copy_(everything[sid])
    return result

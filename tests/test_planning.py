"""The global plan and its vectorised validation, against a simple reference (no processes)."""

import math
import random

import numpy as np
import pytest
import torch

from dist_checkpointing.core import CheckpointingException
from dist_checkpointing.global_plan import GlobalPlan, LocalPlan
from dist_checkpointing.mapping import ShardedObject, ShardedTensor, is_main_replica
from dist_checkpointing.validation import validate_plan

DTYPES = (torch.float32, torch.bfloat16, torch.int64)


def reference_faults(shards_by_rank):
    """The keys whose shards do not describe one consistently and exactly covered entry,
    found by counting every element (the rules of docs/format.md, the simplest way)."""
    by_key = {}
    for rank, shards in enumerate(shards_by_rank):
        for sh in shards:
            by_key.setdefault(sh.key, []).append((rank, sh))
    faults = set()
    for key, held in by_key.items():
        first = held[0][1]
        if any(type(sh) is not type(first) or sh.global_shape != first.global_shape for _, sh in held):
            faults.add(key)
            continue
        main = [sh for _, sh in held if is_main_replica(sh.replica_id)]
        if isinstance(first, ShardedObject):
            offsets = [sh.global_offset for sh in main]
            if len(set(offsets)) != len(offsets) or len(offsets) != math.prod(first.global_shape):
                faults.add(key)
            continue
        if any(sh.dtype != first.dtype for _, sh in held):
            faults.add(key)
            continue
        counts = np.zeros(first.global_shape, dtype=np.int64)
        flat_elements = {}
        for sh in main:
            offset, extent = sh.global_box()
            if any(o + e > g for o, e, g in zip(offset, extent, sh.global_shape)):
                faults.add(key)
                break
            if sh.flattened_range is None:
                counts[tuple(slice(o, o + e) for o, e in zip(offset, extent))] += 1
                continue
            elements = flat_elements.setdefault((offset, extent), np.zeros(math.prod(extent), dtype=np.int64))
            elements[sh.flattened_range] += 1
        if key in faults:
            continue
        for (offset, extent), elements in flat_elements.items():
            if not (elements == 1).all():
                faults.add(key)
            counts[tuple(slice(o, o + e) for o, e in zip(offset, extent))] += 1
        if not (counts == 1).all():
            faults.add(key)
    return faults


def _splits(size: int, rng: random.Random):
    """Cut points of one axis: regular or irregular."""
    if size <= 1 or rng.random() < 0.3:
        return [0, size]
    if rng.random() < 0.5:
        parts = rng.choice([d for d in range(1, size + 1) if size % d == 0])
        return list(range(0, size + 1, size // parts))
    return [0] + sorted(rng.sample(range(1, size), rng.randint(1, min(3, size - 1)))) + [size]


def random_layout(rng: random.Random):
    """Shards of 1-4 ranks for 1-3 keys (tensors, flattened tensors, objects), valid."""
    world = rng.randint(1, 4)
    shards = [[] for _ in range(world)]
    for k in range(rng.randint(1, 3)):
        key = f"k{k}"
        kind = rng.choice(["tensor", "tensor", "flat", "object"])
        if kind == "object":
            shape = (rng.randint(1, 3),) * rng.randint(1, 2)
            for offset in np.ndindex(*shape):
                holders = rng.sample(range(world), rng.randint(1, world))
                for replica, rank in enumerate(holders):
                    shards[rank].append(ShardedObject(key, None, shape, offset, replica))
            continue
        dtype = rng.choice(DTYPES)
        shape = tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 3)))
        cuts = [_splits(s, rng) for s in shape]
        for cell in np.ndindex(*[len(c) - 1 for c in cuts]):
            offset = tuple(c[i] for c, i in zip(cuts, cell))
            local = tuple(c[i + 1] - c[i] for c, i in zip(cuts, cell))
            holders = rng.sample(range(world), rng.randint(1, world))
            if kind == "flat" and len(holders) > 1:
                numel = math.prod(local)
                bounds = [0] + sorted(rng.choices(range(numel + 1), k=len(holders) - 1)) + [numel]
                for rank, start, stop in zip(holders, bounds, bounds[1:]):
                    shards[rank].append(
                        ShardedTensor(key, None, dtype, local, shape, offset, None, 0, 0, False, slice(start, stop))
                    )
                continue
            for replica, rank in enumerate(holders):
                shards[rank].append(ShardedTensor(key, None, dtype, local, shape, offset, None, replica))
    return shards


def break_layout(shards, rng: random.Random):
    """One random fault: a hole, an overlap, a moved box, a dtype or shape disagreement, a
    flat gap or overlap, a box outside the tensor, a repeated or missing object."""
    rank = rng.choice([r for r, s in enumerate(shards) if s])
    i = rng.randrange(len(shards[rank]))
    sh = shards[rank][i]
    fault = rng.choice(["drop", "main", "move", "dtype", "shape", "flat", "outside"])
    if fault == "drop":
        del shards[rank][i]
    elif fault == "main":
        shards[rank][i] = _copy(sh, replica_id=0)
        shards[rng.randrange(len(shards))].append(_copy(sh, replica_id=0))
    elif fault == "move" and isinstance(sh, ShardedTensor):
        axis = rng.randrange(len(sh.global_shape))
        offset = list(sh.global_offset)
        offset[axis] = max(0, offset[axis] + rng.choice([-1, 1]))
        shards[rank][i] = _copy(sh, global_offset=tuple(offset))
    elif fault == "dtype" and isinstance(sh, ShardedTensor):
        shards[rank][i] = _copy(sh, dtype=torch.float16)
    elif fault == "shape":
        shards[rank][i] = _copy(sh, global_shape=tuple(s + 1 for s in sh.global_shape), global_offset=sh.global_offset)
    elif fault == "flat" and isinstance(sh, ShardedTensor) and sh.flattened_range is not None:
        r = sh.flattened_range
        shards[rank][i] = _copy(sh, flattened_range=slice(r.start, max(r.start, r.stop - 1)))
    elif fault == "outside" and isinstance(sh, ShardedTensor):
        shards[rank][i] = _copy(sh, global_offset=tuple(o + s for o, s in zip(sh.global_offset, sh.global_shape)))
    return shards


def _copy(sh, **changes):
    clone = sh.without_data()
    for name, value in changes.items():
        setattr(clone, name, value)
    return clone


def test_vectorised_validation_refuses_what_the_reference_refuses():
    rng = random.Random(1234)
    refused = 0
    for trial in range(1500):
        shards = random_layout(rng)
        if trial % 3:
            shards = break_layout(shards, rng)
        faults = reference_faults(shards)
        try:
            validate_plan(GlobalPlan.of_shards(shards))
            message = None
        except CheckpointingException as e:
            message = str(e)
        assert (message is not None) == bool(faults), (trial, faults, message, shards)
        if faults:
            refused += 1
            assert any(f"'{key}'" in message for key in faults), (trial, faults, message)
            # every rank assembles the same plan from the same bytes, hence the same message
            again = GlobalPlan.of_local_plans([LocalPlan.of(s) for s in shards])
            with pytest.raises(CheckpointingException) as raised:
                validate_plan(again)
            assert str(raised.value) == message
    assert refused > 400  # the faults were not all harmless


def _state(rank, world, extra_dtype=None, rows=4):
    """A row-split tensor, a replicated one, and with `extra_dtype` a key held by this rank only."""
    state = {
        "split": ShardedTensor.from_rank_offsets("split", torch.full((rows, 3), float(rank)), (0, rank, world)),
        "replicated": ShardedTensor.from_rank_offsets("replicated", torch.arange(5.0), replica_id=rank),
    }
    if extra_dtype is not None:
        state["own"] = ShardedTensor.from_rank_offsets(f"own{rank}", torch.ones(2, dtype=extra_dtype))
    return state


def cached_plans_and_overlapping_saves(rank, world, root):
    import dist_checkpointing as dc
    from dist_checkpointing import serialization
    from dist_checkpointing.strategies import save_strategy_from_config
    from dist_checkpointing.strategies.async_utils import AsyncCallsQueue
    from dist_checkpointing.strategies.config import StrategyConfig

    strategy = save_strategy_from_config(StrategyConfig())  # one object for every save below
    plans, validations = [], []
    planner = type(strategy).plan
    type(strategy).plan = lambda *args: plans.append(planner(*args)) or plans[-1]
    validate = serialization.validate_plan
    serialization.validate_plan = lambda plan: validations.append(plan) or validate(plan)

    def save(name, **changes):
        dc.save(_state(rank, world, **changes), f"{root}/{name}", strategy)
        return len(plans)

    assert save("a") == 1
    assert save("b") == 1  # unchanged on every rank: the plan is reused
    # a change on one rank only (rank 1's own key, then its dtype) makes every rank plan again
    assert save("c", extra_dtype=torch.float32 if rank == 1 else None) == 2
    assert save("d", extra_dtype=torch.float32 if rank == 1 else None) == 2
    assert save("e", extra_dtype=torch.bfloat16 if rank == 1 else None) == 3
    assert dc.load_tensors_metadata(f"{root}/e")["own1"].dtype == torch.bfloat16
    assert save("f", rows=6) == 4  # every rank's shape changed
    # loads: the request's validation is cached the same way
    request = {"split": ShardedTensor.from_rank_offsets("split", torch.empty(6, 3), (0, rank, world))}
    for _ in range(2):
        assert torch.equal(dc.load(request, f"{root}/f")["split"], torch.full((6, 3), float(rank)))
    load_validations = [plan for plan in validations if "replicated" not in plan.keys]
    assert len(load_validations) == 1

    # two async saves of different layouts in flight at once, through the one strategy object
    queue = AsyncCallsQueue()
    first = dc.save(_state(rank, world, rows=2), f"{root}/g", strategy, async_sharded_save=True)
    second = dc.save(_state(rank, world, extra_dtype=torch.int64), f"{root}/h", strategy, async_sharded_save=True)
    queue.schedule_async_request(first)
    queue.schedule_async_request(second)
    queue.maybe_finalize_async_calls(blocking=True)
    queue.close()
    g, h = dc.load_plain_tensors(f"{root}/g"), dc.load_plain_tensors(f"{root}/h")
    assert sorted(g) == ["replicated", "split"] and g["split"].shape == (2 * world, 3)
    assert sorted(h) == ["own0", "own1", "replicated", "split"] and h["split"].shape == (4 * world, 3)
    assert h["own1"].dtype == torch.int64
    assert torch.equal(h["split"], torch.arange(world, dtype=torch.float32).repeat_interleave(4)[:, None].expand(-1, 3))
    return len(plans)


def test_plans_are_cached_until_any_rank_changes_and_overlapping_saves_keep_their_own(tmp_path):
    from multirank import run_ranks

    assert run_ranks(cached_plans_and_overlapping_saves, 2, str(tmp_path)) == [6, 6]


def shared_structures(rank, world, root):
    import dist_checkpointing as dc
    from dist_checkpointing.collectives import share_bytes

    # one sender of 4 ranks: broadcast; three: one all-gather
    payloads = [b"abc", b"", b"", b""]
    assert share_bytes(payloads[rank] or None, [len(p) for p in payloads], "test") == [b"abc", None, None, None]
    payloads = [b"abc", b"de", b"", b"fghij"]
    expected = [p or None for p in payloads]
    assert share_bytes(payloads[rank] or None, [len(p) for p in payloads], "test") == expected
    # four data-parallel replicas: one distinct structure, sent by rank 0 alone
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(6.0), replica_id=rank)}
    dc.save(state, f"{root}/replicas")
    return torch.equal(dc.load_plain_tensors(f"{root}/replicas")["w"], torch.arange(6.0))


def test_structures_travel_once_by_broadcast_or_all_gather(tmp_path):
    from multirank import run_ranks

    assert all(run_ranks(shared_structures, 4, str(tmp_path)))


def test_zarr_documents_are_written_once_spread_over_the_ranks_holding_each_key():
    """3 ranks: 30 keys split over all, 9 held by rank 0 alone, 3 split over ranks 1 and 2. Each
    array document has one writer, a holder of a main shard of its key, the same in every rank's
    plan; and the busiest rank writes at most one file (chunks and documents) more than an even
    share (49 of 147; the lowest rank would write 78)."""
    from dist_checkpointing.strategies.config import StrategyConfig
    from dist_checkpointing.strategies.zarr_plan import plan_arrays

    shards = [[] for _ in range(3)]
    for k in range(30):
        for r in range(3):
            shards[r].append(ShardedTensor.from_rank_offsets(f"split{k}", torch.zeros(2, 4), (0, r, 3)))
    for k in range(9):
        for r in range(3):
            shards[r].append(ShardedTensor.from_rank_offsets(f"own{k}", torch.zeros(4), replica_id=r))
    for k in range(3):
        for r in (1, 2):
            shards[r].append(ShardedTensor.from_rank_offsets(f"pair{k}", torch.zeros(2, 4), (0, r - 1, 2)))
    plan = GlobalPlan.of_shards(shards)
    plans = [plan_arrays(plan, StrategyConfig(), r) for r in range(3)]
    writers = {}
    for arrays in plans:
        for key, array in arrays.items():
            assert writers.setdefault(key, array.metadata_writer) == array.metadata_writer
    holders = {sh.key: {r for r in range(3) for s in shards[r] if s.key == sh.key and is_main_replica(s.replica_id)}
               for sh in shards[0] + shards[1]}
    assert all(writers[key] in holders[key] for key in holders) and len(writers) == 42
    files = [sum(1 for sh in shards[r] if is_main_replica(sh.replica_id)) + list(writers.values()).count(r) for r in range(3)]
    assert max(files) <= -(-sum(files) // 3) + 1, files  # the busiest rank: at most one above an even share

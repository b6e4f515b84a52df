"""Planning a save in the Zarr layout: every key's array and chunk grid, and who writes each
chunk, the same on every rank.

One Zarr array per ShardedTensor key at `<dir>/<key>`. The chunk grid is chosen from the global
plan so that every main shard is a whole number of chunks (`chunk_grid`): each rank writes only
its own chunk files, so no two ranks touch one file (no locks, no read-modify-write), and any
rectangle can be read back. Flattened pieces (a distributed optimizer's) are assembled into whole
chunks on the rank that writes them.
"""

import functools
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..collectives import get_rank, send_and_receive
from ..core import CheckpointingException
from ..dict_utils import nested_values
from ..dtypes import DTYPE_NAMES, torch_dtype
from ..geometry import Box
from ..global_plan import FLAT, TENSOR, GlobalPlan, sorted_groups
from ..layout import check_key
from ..mapping import ShardedTensor, is_main_replica
from ..validation import validate_flat_tiling
from .base import ShardedSavePlan
from .config import StrategyConfig
from .zarr_spec import array_document, chunk_shape, consolidated_documents

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArrayPlan:
    """How one key is stored: its array document and which rank writes it."""

    document: dict  # the content of zarr.json (v3) or .zarray (v2)
    metadata_writer: int

    @property
    def zarr_format(self) -> int:
        return self.document["zarr_format"]

    @property
    def chunks(self) -> Tuple[int, ...]:
        return chunk_shape(self.document)


def chunk_grid(global_shape: Sequence[int], boxes: Sequence[Box]) -> Tuple[int, ...]:
    """The largest regular chunk shape whose chunks never straddle a shard boundary.

    Along each axis the chunk extent is the gcd of all interior shard boundaries (the global
    end may cut the last chunk short). A regular grid from `from_rank_offsets` gives the local
    shard shape; an irregular split such as 7/5/6/6 gives gcd(7, 12, 18) = 1.
    """
    chunks = []
    for axis, size in enumerate(global_shape):
        cuts = {p for offset, shape in boxes for p in (offset[axis], offset[axis] + shape[axis])}
        cuts -= {0, size}
        chunks.append(math.gcd(*cuts) if cuts else max(size, 1))
    return tuple(chunks)


def plan_arrays(plan: GlobalPlan, config: StrategyConfig, rank: int, every_key: bool = False) -> Dict[str, ArrayPlan]:
    """The arrays `rank` writes to: those of its main shards and those whose document it writes
    (the same result on every rank that plans a key); with `every_key`, every tensor key's (for
    the rank that writes the root group's consolidated metadata). Every tensor key is checked.

    A key whose main boxes are equal and aligned to their shape (any regular grid) is chunked by
    that shape without looking at its boxes one by one; other keys get `chunk_grid`."""
    tensor_keys = np.flatnonzero(plan.key_kind == TENSOR)
    for key in tensor_keys.tolist():
        check_key(plan.keys[key])
    rows, ranks, keys = plan.main_shards(TENSOR)
    writer = _document_writers(plan, keys, ranks)
    if (writer[tensor_keys] < 0).any():  # keys without a main replica: their first holder
        writer = np.where(writer < 0, _lowest_rank(plan, plan.row_key[plan.pair_row], plan.pair_rank), writer)
    wanted = np.zeros(len(plan.keys), dtype=bool)
    wanted[keys[ranks == rank]] = True
    wanted[tensor_keys[writer[tensor_keys] == rank] if not every_key else tensor_keys] = True
    mine = np.flatnonzero(wanted[keys])
    order = mine[np.argsort(keys[mine], kind="stable")]  # the main shards of the wanted keys, by key
    sorted_keys = keys[order]
    wanted_keys = np.flatnonzero(wanted)
    starts, stops = np.searchsorted(sorted_keys, wanted_keys), np.searchsorted(sorted_keys, wanted_keys, "right")
    # a key is regular where all its boxes have the first one's extent, all positive, and lie
    # on its grid (checked for all keys at once; the padding of the columns passes the checks)
    offset, extent, flags = plan.offset[rows[order]], plan.extent[rows[order]], plan.flags[rows[order]]
    first = extent[np.searchsorted(sorted_keys, sorted_keys)]
    regular_box = (extent == first).all(axis=1) & (first > 0).all(axis=1) & (offset % np.maximum(first, 1) == 0).all(axis=1)
    irregular, flat = (np.concatenate([[0], np.cumsum(counted)]) for counted in (~regular_box, (flags & FLAT) != 0))
    regular = ((stops > starts) & (irregular[stops] == irregular[starts])).tolist()
    has_flat = (flat[stops] > flat[starts]).tolist()
    shapes = plan.key_shape[wanted_keys]
    head = extent[np.minimum(starts, len(order) - 1)] if len(order) else shapes
    grids = np.where(head < shapes, head, np.maximum(shapes, 1))  # a regular key's chunk shape
    entries = plan.key_entry[wanted_keys]
    ndims, dtypes = plan.entry_ndim[entries].tolist(), [DTYPE_NAMES[d] for d in plan.entry_dtype[entries].tolist()]
    starts, stops, writers = starts.tolist(), stops.tolist(), writer[wanted_keys].tolist()
    documents = {}  # equal arrays share one document
    plans = {}
    for i, (key, shape, chunks) in enumerate(zip(wanted_keys.tolist(), shapes.tolist(), grids.tolist())):
        name, ndim = plan.keys[key], ndims[i]
        shape, chunks = tuple(shape[:ndim]), tuple(chunks[:ndim])
        boxed = rows[order[starts[i] : stops[i]]] if not regular[i] or has_flat[i] else None
        if not regular[i]:
            boxes = sorted({(tuple(o[:ndim]), tuple(e[:ndim])) for o, e in zip(plan.offset[boxed].tolist(), plan.extent[boxed].tolist())})
            chunks = chunk_grid(shape, boxes)
            _warn_if_many_chunks(name, shape, chunks, len(boxes))
        if has_flat[i]:
            prepend = int(plan.prepend[boxed[(plan.flags[boxed] & FLAT) != 0][0]])
            if ndim > prepend:  # flat pieces of a shard with axes
                chunks = _split_rows(chunks, prepend, torch_dtype(dtypes[i]).itemsize)
        spec = (shape, chunks, dtypes[i])
        if spec not in documents:
            documents[spec] = array_document(*spec, config)
        plans[name] = ArrayPlan(documents[spec], writers[i])
    return plans


def _document_writers(plan: GlobalPlan, keys: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Per key id, the rank that writes its array document, one of `ranks` paired with it in
    `keys` (the main shards' holders); -1 where none. Where several hold a key, the one with
    the fewest file system entries so far (a file per main shard, then a directory and a file
    per document given to it; the lowest rank on ties), keys in order: a save of many small
    tensors takes as long as its busiest rank's entries, and the lowest rank would write every
    document."""
    world = plan.world_size
    pairs = np.unique(keys * world + ranks)  # distinct (key, rank), by key then rank
    pair_key, pair_rank = pairs // world, pairs % world
    counts = np.bincount(pair_key, minlength=len(plan.keys))
    starts = np.searchsorted(pair_key, np.arange(len(plan.keys)))
    writer = np.full(len(plan.keys), -1)
    held = counts > 0
    writer[held] = pair_rank[starts[held]]
    single = counts == 1
    entries = (np.bincount(ranks, minlength=world) + 2 * np.bincount(writer[single], minlength=world)).tolist()
    shared = np.flatnonzero(counts > 1)
    holders = pair_rank.tolist()
    for key, start, count in zip(shared.tolist(), starts[shared].tolist(), counts[shared].tolist()):
        chosen = min(holders[start : start + count], key=entries.__getitem__)
        writer[key] = chosen
        entries[chosen] += 2
    return writer


def _lowest_rank(plan: GlobalPlan, keys: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Per key id, the lowest of `ranks` paired with it in `keys`; -1 where none."""
    lowest = np.full(len(plan.keys), np.iinfo(np.int64).max)
    np.minimum.at(lowest, keys, ranks)
    return np.where(lowest == np.iinfo(np.int64).max, -1, lowest)


FLAT_CHUNK_BYTES = 16 * 2**20


def _split_rows(chunks: Tuple[int, ...], axis: int, itemsize: int) -> Tuple[int, ...]:
    """Chunks of a key with flattened shards: along the shards' first local axis, the largest
    divisor of the extent whose chunks stay within FLAT_CHUNK_BYTES (at least one row), so that
    each DP rank can write the chunks inside its own flat range (plan_flat_chunks)."""
    row_bytes = math.prod(chunks[axis + 1 :]) * itemsize
    extent = chunks[axis]
    limit = max(1, FLAT_CHUNK_BYTES // max(row_bytes, 1))
    divisors = {d for i in range(1, math.isqrt(extent) + 1) if extent % i == 0 for d in (i, extent // i)}
    return chunks[:axis] + (max(d for d in divisors if d <= limit),) + chunks[axis + 1 :]


@dataclass(frozen=True)
class FlatChunk:
    """A chunk of a flattened shard (a row block of it), assembled and written by `writer`,
    the rank holding most of it; `parts` are the (start, stop, holder) flat ranges of the shard
    that make it up."""

    writer: int
    rows: Tuple[int, int]  # [first, last) along the shard's first local axis
    parts: Tuple[Tuple[int, int, int], ...]


FlatShardId = Tuple[str, Tuple[int, ...]]  # (key, global offset of the shard)


def plan_flat_chunks(plan: GlobalPlan, arrays: Dict[str, ArrayPlan], rank: int) -> Dict[FlatShardId, List[FlatChunk]]:
    """Who writes each chunk of each flattened shard that `rank` holds a piece of (the same
    result on every rank that holds one).

    Each DP rank writes the chunks it holds most of; only chunks cut by a flat range boundary
    need pieces from other ranks.
    """
    rows, ranks, keys = plan.main_shards(TENSOR)
    flat = (plan.flags[rows] & FLAT) != 0
    rows, ranks, keys = rows[flat], ranks[flat], keys[flat]
    order, first = sorted_groups([keys, *plan.offset[rows].T], [ranks])  # one group per shard
    group = np.cumsum(first) - 1
    bounds = np.append(np.flatnonzero(first), len(order))
    plans = {}
    for g in np.unique(group[ranks[order] == rank]).tolist():
        held = [(int(ranks[m]), plan.shard(rows[m])) for m in order[bounds[g] : bounds[g + 1]].tolist()]
        key, offset = held[0][1].key, held[0][1].global_offset
        validate_flat_tiling(key, offset, held)  # also when the save skips validation
        template = held[0][1]
        ranges = sorted((sh.flattened_range.start, sh.flattened_range.stop, holder) for holder, sh in held)
        n_rows = template.local_shape[0] if template.local_shape else 1
        row = math.prod(template.local_shape[1:])
        step = arrays[key].chunks[template.prepend_axis_num] if template.local_shape else 1
        chunks = []
        for first in range(0, n_rows, step):
            last = min(first + step, n_rows)
            lo, hi = first * row, last * row
            parts = tuple((max(a, lo), min(b, hi), r) for a, b, r in ranges if max(a, lo) < min(b, hi))
            if not parts:
                continue
            share = defaultdict(int)
            for a, b, r in parts:
                share[r] += b - a
            writer = min(share, key=lambda r: (-share[r], r))
            chunks.append(FlatChunk(writer, (first, last), parts))
        plans[(key, offset)] = chunks
    return plans


def assemble_flat_chunks(sharded_state_dict, plans: Dict[FlatShardId, List[FlatChunk]]) -> list:
    """The shards this rank writes: its flattened pieces replaced by the chunks it writes,
    assembled from the pieces of all ranks (collective: every rank calls it with its
    `plan_flat_chunks`; two ranks see the shards they both hold in the same order, so the
    transfers between them are numbered alike)."""
    rank = get_rank()
    mine, kept = defaultdict(list), []
    for sh in nested_values(sharded_state_dict):
        if not isinstance(sh, ShardedTensor) or sh.flattened_range is None:
            kept.append(sh)
        elif is_main_replica(sh.replica_id) and sh.flattened_range.stop > sh.flattened_range.start:
            mine[(sh.key, sh.global_offset)].append(sh)
    sends, receives = [], []
    tags = defaultdict(int)  # (sender, receiver) -> transfers so far
    for shard_id, chunks in sorted(plans.items()):
        local = mine.pop(shard_id, [])

        def my_values(start, stop, local=local):
            piece = next(p for p in local if p.flattened_range.start <= start and stop <= p.flattened_range.stop)
            return piece.data.detach()[start - piece.flattened_range.start : stop - piece.flattened_range.start]

        for chunk in chunks:
            base = chunk.parts[0][0]
            if chunk.parts == ((base, chunk.parts[-1][1], rank),):  # all mine: no copy
                kept.append(_chunk_shard(local[0], chunk.rows, my_values(base, chunk.parts[-1][1])))
                continue
            if chunk.writer == rank:
                # on the shards' device, so that NCCL receives into it directly
                values = torch.empty(chunk.parts[-1][1] - base, dtype=local[0].dtype, device=local[0].data.device)
            for start, stop, holder in chunk.parts:
                if chunk.writer == rank and holder == rank:
                    values[start - base : stop - base].copy_(my_values(start, stop))
                    continue
                tags[(holder, chunk.writer)] += 1
                if chunk.writer == rank:
                    receives.append((values[start - base : stop - base], holder, tags[(holder, chunk.writer)]))
                elif holder == rank:
                    sends.append((my_values(start, stop), chunk.writer, tags[(holder, chunk.writer)]))
            if chunk.writer == rank:
                kept.append(_chunk_shard(local[0], chunk.rows, values))
    send_and_receive(sends, receives)
    if mine:
        raise CheckpointingException(f"Flattened shards {sorted(mine)} were not in the planned layout")
    return kept


def _chunk_shard(piece: ShardedTensor, rows: Tuple[int, int], values: torch.Tensor) -> ShardedTensor:
    """Rows [first, last) of the local shard of flat `piece`, as an ordinary (irregular) shard."""
    if not piece.local_shape:
        return replace(piece, data=values.reshape(()), flattened_range=None)
    axis = piece.prepend_axis_num
    shape = (rows[1] - rows[0],) + piece.local_shape[1:]
    offset = list(piece.global_offset)
    offset[axis] += rows[0]
    return replace(
        piece, data=values.view(shape), local_shape=shape, global_offset=tuple(offset),
        axis_fragmentations=None, flattened_range=None,
    )


def _warn_if_many_chunks(key: str, global_shape, chunks, n_shards: int) -> None:
    n_chunks = math.prod(math.ceil(g / c) for g, c in zip(global_shape, chunks))
    if n_chunks > 16 * max(n_shards, 1):
        logger.warning(
            "Key '%s': its shards (%d) do not form a regular grid, so it is stored in %d chunks "
            "of shape %s. Shard sizes with a large common divisor (or the torch_dist engine) "
            "avoid the many small files.",
            key, n_shards, n_chunks, chunks,
        )


@dataclass(frozen=True)
class ZarrSavePlan(ShardedSavePlan):
    """One save's Zarr layout on one rank: the arrays it writes to (rank 0: every array), and
    who writes each flattened chunk."""

    arrays: Dict[str, ArrayPlan]
    flat_chunks: Dict[FlatShardId, List[FlatChunk]]
    zarr_format: int

    @functools.cached_property
    def root_documents(self) -> Dict[str, bytes]:
        """The root group's files holding every array's document (rank 0's plan), encoded once
        per plan: a save that reuses a cached plan does not encode 10^4-10^5 documents again."""
        return consolidated_documents({key: array.document for key, array in self.arrays.items()}, self.zarr_format)

    def __getstate__(self):  # an async writer does not write the root: its encoding stays here
        return {name: value for name, value in self.__dict__.items() if name != "root_documents"}

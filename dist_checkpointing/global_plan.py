"""The global plan: the shards (without data) of every rank, as columns.

Before a save writes (and before a load that checks its requests reads), every rank must know
every rank's shards. Each rank encodes its own as a `LocalPlan`: flat integer arrays serialized
as bytes, in two parts:
- the *structure*: keys (with kind, dtype and global shape) and every shard's box, flat range,
  prepended axes and grid; the data-parallel replicas of a rank have equal structures;
- the *main bits*: one bit per shard, set for main replicas.

After the exchange every rank assembles the same `GlobalPlan`. Its columns hold each distinct
structure once (for TP x PP x DP, the TP x PP ranks of one replica) plus one bit per shard of
every rank, so the work grows with distinct shards, not with shards x ranks. Validation
(validation.py), the engines' plans and the fully parallel distribution read it vectorised.

The exchange (`gather_plan`) sends each distinct structure once, and a plan that is unchanged on
every rank is not exchanged again: ranks first exchange 16-byte `PlanDigests`, and reuse the
plan a `PlanCache` holds when every rank's digests match it.

Terms: a *row* is one shard of one distinct structure; a *pair* is one shard of one rank (a rank
and a row of its structure), in rank-major order; *main* pairs are the main replicas' pairs.
"""

import functools
import hashlib
import itertools
import math
import pickle
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .collectives import exchange, get_rank, share_bytes
from .core import TensorEntry, index_tensors_json
from .dtypes import DTYPE_NAMES, dtype_code, torch_dtype
from .mapping import ShardedBase, ShardedObject, ShardedTensor, is_main_replica

TENSOR, OBJECT = 0, 1
# row flags
FLAT, SHAPE_MISMATCH, GRID = 1, 2, 4

_UINTS = (np.uint8, np.uint16, np.uint32, np.uint64)


def _narrow(values, shape=None) -> np.ndarray:
    """Non-negative integers (of `shape`) in the smallest unsigned dtype that holds them (what
    travels)."""
    values = np.asarray(values, dtype=np.int64)
    if shape is not None:
        values = values.reshape(shape)
    top = int(values.max()) if values.size else 0
    return values.astype(next(t for t in _UINTS if top <= np.iinfo(t).max))


def _padded(rows: Sequence[Sequence[int]], ndim: int, fill: int) -> np.ndarray:
    """Integer tuples of up to `ndim` values as the rows of an (n, ndim) array, each padded
    with `fill` after its values (one pass in numpy: 10^4-10^5 rows per plan)."""
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
    values = np.fromiter(itertools.chain.from_iterable(rows), np.int64, int(lengths.sum()))
    table = np.full((len(rows), ndim), fill, np.int64)
    table[np.arange(ndim) < lengths[:, None]] = values  # row by row, each row's first values
    return table


def _pack(arrays: Sequence[np.ndarray]) -> bytes:
    """Arrays as bytes: per array its dtype (3 characters), number of axes, shape and data."""
    parts = [struct.pack("<I", len(arrays))]
    for a in arrays:
        parts.append(a.dtype.str.encode() + struct.pack(f"<B{a.ndim}Q", a.ndim, *a.shape))
        parts.append(np.ascontiguousarray(a).tobytes())
    return b"".join(parts)


def _unpack(data: bytes) -> List[np.ndarray]:
    (count,), position = struct.unpack_from("<I", data), 4
    arrays = []
    for _ in range(count):
        dtype, ndim = np.dtype(data[position : position + 3].decode()), data[position + 3]
        shape = struct.unpack_from(f"<{ndim}Q", data, position + 4)
        position += 4 + 8 * ndim
        n = math.prod(shape)
        arrays.append(np.frombuffer(data, dtype, n, position).reshape(shape))
        position += n * dtype.itemsize
    return arrays


def _digest(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.digest()[:16]


@dataclass(frozen=True)
class LocalPlan:
    """One rank's shards as they travel (see the module docstring)."""

    structure: bytes
    main: bytes  # np.packbits of one bool per shard

    @classmethod
    def of(cls, shards: Sequence[ShardedBase]) -> "LocalPlan":
        """Encodes the ShardedTensors and ShardedObjects among `shards` (other entries are not
        planned). Refuses a dtype the format cannot store, naming the key."""
        entries: Dict[Tuple, int] = {}  # (key, kind, dtype, global shape) -> entry
        rows, main = [], []
        for sh in shards:  # (kept lean: 10^4-10^5 shards per rank)
            if isinstance(sh, ShardedTensor):
                r, grid, prepended = sh.flattened_range, sh.axis_fragmentations, sh.prepend_axis_num
                flags = (FLAT if r is not None else 0) | (SHAPE_MISMATCH if sh.allow_shape_mismatch else 0) | (GRID if grid is not None else 0)
                rows.append((
                    entries.setdefault((sh.key, TENSOR, sh.dtype, sh.global_shape), len(entries)),
                    sh.global_offset,
                    (1,) * prepended + sh.local_shape if prepended else sh.local_shape,
                    prepended,
                    flags,
                    (r.start, r.stop) if r is not None else (0, 0),
                    grid,
                ))
            elif isinstance(sh, ShardedObject):
                entry = entries.setdefault((sh.key, OBJECT, None, sh.global_shape), len(entries))
                rows.append((entry, sh.global_offset, (1,) * len(sh.global_shape), 0, 0, (0, 0), None))
            else:
                continue
            main.append(is_main_replica(sh.replica_id))
        keys, kinds, dtypes, shapes = zip(*entries) if entries else ((),) * 4
        named_by = {dtype: key for key, dtype in zip(reversed(keys), reversed(dtypes))}  # each dtype's first key
        codes = {dtype: dtype_code(dtype, key) if dtype is not None else 0 for dtype, key in named_by.items()}
        names = [key.encode() for key in keys]
        ndims = np.fromiter(map(len, shapes), np.int64, len(shapes))
        ndim = int(ndims.max()) if len(ndims) else 0
        table = [
            zlib.compress(b"".join(names), 1),
            _narrow(np.fromiter(map(len, names), np.int64, len(names))),
            _narrow(np.stack([np.array(kinds, np.int64), np.fromiter(map(codes.__getitem__, dtypes), np.int64, len(dtypes))], axis=1)),
            _narrow(ndims),
            _narrow(_padded(shapes, ndim, 1)),
        ]
        entry, offset, extent, prepended, flags, flat, grid = zip(*rows) if rows else ((),) * 7
        has_flat = any(f & FLAT for f in flags)
        has_grid = any(g is not None for g in grid)
        n = len(rows)
        columns = [
            _narrow(entry),
            _narrow(_padded(offset, ndim, 0)),
            _narrow(_padded(extent, ndim, 1)),
            _narrow(prepended),
            _narrow(flags),
            _narrow(flat if has_flat else [], (n if has_flat else 0, 2)),
            _narrow(_padded([g or () for g in grid], ndim, 1) if has_grid else [], (n if has_grid else 0, ndim)),
        ]
        names_blob = np.frombuffer(table[0], np.uint8)
        return cls(_pack([names_blob] + table[1:] + columns), np.packbits(np.array(main, dtype=bool)).tobytes())

    def digests(self, planning_info: Any, cached: bytes) -> "PlanDigests":
        """What this rank reports in the first planning exchange; `cached`: the global digest
        of the plan this rank has cached for this kind of save or load (b"" if none)."""
        structure = _digest(self.structure)
        whole = _digest(structure, self.main, pickle.dumps(planning_info))
        return PlanDigests(structure, len(self.structure), whole, cached)


@dataclass(frozen=True)
class _Structure:
    """A decoded structure: its entry table and rows, as int64 arrays."""

    keys: List[str]
    entry_kind: np.ndarray
    entry_dtype: np.ndarray
    entry_ndim: np.ndarray
    entry_shape: np.ndarray  # (entries, ndim), padded with 1
    row_entry: np.ndarray
    offset: np.ndarray  # (rows, ndim), padded with 0
    extent: np.ndarray  # (rows, ndim), padded with 1; the global box's shape
    prepend: np.ndarray
    flags: np.ndarray
    flat: np.ndarray  # (rows, 2); zeros unless FLAT
    grid: np.ndarray  # (rows, ndim); ones unless GRID

    @classmethod
    def decode(cls, data: bytes) -> "_Structure":
        names, *columns = _unpack(data)
        lengths, kind_dtype, ndims, shapes, entry, offset, extent, prepend, flags, flat, grid = (c.astype(np.int64) for c in columns)
        blob = zlib.decompress(names.tobytes())
        ends = np.cumsum(lengths)
        keys = [blob[e - n : e].decode() for e, n in zip(ends.tolist(), lengths.tolist())]
        rows = len(entry)
        if not len(flat):
            flat = np.zeros((rows, 2), dtype=np.int64)
        if not len(grid):
            grid = np.ones_like(offset)
        return cls(keys, kind_dtype[:, 0], kind_dtype[:, 1], ndims, shapes, entry, offset, extent, prepend, flags, flat, grid)


def _pad(values: np.ndarray, ndim: int, fill: int) -> np.ndarray:
    if values.shape[1] == ndim:
        return values
    out = np.full((len(values), ndim), fill, dtype=np.int64)
    out[:, : values.shape[1]] = values
    return out


@dataclass(frozen=True)
class GlobalPlan:
    """Every rank's shards (see the module docstring). Immutable; the same on every rank."""

    keys: Tuple[str, ...]  # key id -> key, in order of first appearance (rank by rank)
    # entries: one per (distinct structure, key), with what that structure says of the key
    entry_key: np.ndarray
    entry_kind: np.ndarray
    entry_dtype: np.ndarray
    entry_ndim: np.ndarray
    entry_shape: np.ndarray
    entry_rank: np.ndarray  # the first rank whose structure has the entry
    # rows: the shards of every distinct structure
    row_entry: np.ndarray
    offset: np.ndarray
    extent: np.ndarray
    prepend: np.ndarray
    flags: np.ndarray
    flat: np.ndarray
    grid: np.ndarray
    # ranks
    rank_rows: np.ndarray  # (world, 2): each rank's rows are rows[start:stop] of its structure
    main: np.ndarray  # one bool per pair

    @classmethod
    def assemble(cls, structures: Sequence[bytes], rank_structure: Sequence[int], main_bits: Sequence[bytes]) -> "GlobalPlan":
        """The plan of every rank: `structures` are the distinct structure blobs, rank r's is
        `structures[rank_structure[r]]`, and `main_bits[r]` its main bits."""
        decoded = [_Structure.decode(s) for s in structures]
        ndim = max((d.offset.shape[1] for d in decoded), default=0)
        key_ids: Dict[str, int] = {}
        first_rank = {}
        for rank, s in enumerate(rank_structure):
            first_rank.setdefault(s, rank)
        entry_key, row_base, entry_base, rows_so_far, entries_so_far = [], [], [], 0, 0
        for d in decoded:
            entry_key.append(np.array([key_ids.setdefault(k, len(key_ids)) for k in d.keys], dtype=np.int64))
            row_base.append(rows_so_far)
            entry_base.append(entries_so_far)
            rows_so_far += len(d.row_entry)
            entries_so_far += len(d.keys)
        counts = np.array([len(decoded[s].row_entry) for s in rank_structure], dtype=np.int64)
        starts = np.array(row_base, dtype=np.int64)[np.asarray(rank_structure, dtype=np.int64)] if len(rank_structure) else np.zeros(0, np.int64)
        main = [np.unpackbits(np.frombuffer(bits, np.uint8), count=int(n)).astype(bool) for bits, n in zip(main_bits, counts)]

        def joined(parts, width=None, fill=0):
            if width is not None:
                parts = [_pad(p, width, fill) for p in parts]
            if not parts:
                return np.zeros((0,) if width is None else (0, width), dtype=np.int64)
            return np.concatenate(parts)

        return cls(
            keys=tuple(key_ids),
            entry_key=joined(entry_key),
            entry_kind=joined([d.entry_kind for d in decoded]),
            entry_dtype=joined([d.entry_dtype for d in decoded]),
            entry_ndim=joined([d.entry_ndim for d in decoded]),
            entry_shape=joined([d.entry_shape for d in decoded], ndim, 1),
            entry_rank=joined([np.full(len(d.keys), first_rank[s], dtype=np.int64) for s, d in enumerate(decoded)]),
            row_entry=joined([d.row_entry + base for d, base in zip(decoded, entry_base)]),
            offset=joined([d.offset for d in decoded], ndim, 0),
            extent=joined([d.extent for d in decoded], ndim, 1),
            prepend=joined([d.prepend for d in decoded]),
            flags=joined([d.flags for d in decoded]),
            flat=joined([d.flat for d in decoded], 2),
            grid=joined([d.grid for d in decoded], ndim, 1),
            rank_rows=np.stack([starts, starts + counts], axis=1) if len(counts) else np.zeros((0, 2), np.int64),
            main=joined(main).astype(bool) if main else np.zeros(0, dtype=bool),
        )

    @classmethod
    def of_shards(cls, shards_by_rank: Sequence[Sequence[ShardedBase]]) -> "GlobalPlan":
        """The plan of shards given per rank (without an exchange)."""
        return cls.of_local_plans([LocalPlan.of(shards) for shards in shards_by_rank])

    @classmethod
    def of_local_plans(cls, local_plans: Sequence[LocalPlan]) -> "GlobalPlan":
        index: Dict[bytes, int] = {}
        rank_structure = [index.setdefault(p.structure, len(index)) for p in local_plans]
        return cls.assemble(list(index), rank_structure, [p.main for p in local_plans])

    def with_main(self, main: np.ndarray) -> "GlobalPlan":
        """The same plan with other main replicas (one bool per pair); what it derived from
        the rest is not derived again."""
        other = replace(self, main=np.asarray(main, dtype=bool))
        for name in ("row_key", "key_entry", "key_kind", "key_shape", "row_nbytes", "pair_rank", "pair_row"):
            if name in self.__dict__:
                other.__dict__[name] = self.__dict__[name]
        return other

    @property
    def world_size(self) -> int:
        return len(self.rank_rows)

    # per row and per key, derived
    @functools.cached_property
    def row_key(self) -> np.ndarray:
        return self.entry_key[self.row_entry]

    @functools.cached_property
    def key_entry(self) -> np.ndarray:
        """Each key's first entry (its first rank's view: the reference for agreement)."""
        _, first = np.unique(self.entry_key, return_index=True)
        return first

    @functools.cached_property
    def key_kind(self) -> np.ndarray:
        return self.entry_kind[self.key_entry]

    @functools.cached_property
    def key_shape(self) -> np.ndarray:
        return self.entry_shape[self.key_entry]

    def global_shape(self, key_id: int) -> Tuple[int, ...]:
        entry = self.key_entry[key_id]
        return tuple(self.entry_shape[entry, : self.entry_ndim[entry]].tolist())

    def dtype_name(self, key_id: int) -> str:
        return DTYPE_NAMES[self.entry_dtype[self.key_entry[key_id]]]

    @functools.cached_property
    def row_nbytes(self) -> np.ndarray:
        """Bytes of each tensor row's data: its box, or its flat range."""
        flat = (self.flags & FLAT) != 0
        numel = np.where(flat, self.flat[:, 1] - self.flat[:, 0], np.prod(self.extent, axis=1))
        itemsize = np.array([torch_dtype(name).itemsize for name in DTYPE_NAMES])
        return numel * itemsize[self.entry_dtype[self.row_entry]]

    # pairs
    @functools.cached_property
    def pair_rank(self) -> np.ndarray:
        counts = self.rank_rows[:, 1] - self.rank_rows[:, 0]
        return np.repeat(np.arange(self.world_size, dtype=np.int32), counts)

    @functools.cached_property
    def pair_row(self) -> np.ndarray:
        counts = self.rank_rows[:, 1] - self.rank_rows[:, 0]
        pair_starts = np.cumsum(counts) - counts
        rows = np.repeat((self.rank_rows[:, 0] - pair_starts).astype(np.int32), counts)
        rows += np.arange(int(counts.sum()), dtype=np.int32)
        return rows

    @functools.cached_property
    def main_pairs(self) -> np.ndarray:
        return np.flatnonzero(self.main)

    @functools.cached_property
    def main_rows(self) -> np.ndarray:
        """The rows that are a main replica on some rank, ascending (a shard that is main on
        two ranks counts once)."""
        return np.unique(self.pair_row[self.main_pairs])

    def main_shards(self, kind: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, ranks, key ids) of the main replicas of `kind` (TENSOR or OBJECT), in pair
        order: the one view of who writes what that validation and the engines read."""
        return self._main_shards[kind]

    @functools.cached_property
    def _main_shards(self) -> Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        rows, ranks = self.pair_row[self.main_pairs], self.pair_rank[self.main_pairs]
        keys = self.row_key[rows]
        tensor = self.key_kind[keys] == TENSOR
        return {TENSOR: (rows[tensor], ranks[tensor], keys[tensor]), OBJECT: (rows[~tensor], ranks[~tensor], keys[~tensor])}

    def rows_of_rank(self, rank: int) -> np.ndarray:
        return np.arange(*self.rank_rows[rank])

    def main_of_rank(self, rank: int) -> np.ndarray:
        """Which of `rank`'s rows are main replicas."""
        counts = self.rank_rows[:, 1] - self.rank_rows[:, 0]
        start = int(counts[:rank].sum())
        return self.main[start : start + int(counts[rank])]

    # back to objects, for the few places that need them (irregular keys, messages)
    def shard(self, row: int) -> ShardedBase:
        """The data-less ShardedTensor or ShardedObject of `row`, as a main replica."""
        entry = self.row_entry[row]
        key, ndim = self.keys[self.entry_key[entry]], int(self.entry_ndim[entry])
        shape = tuple(self.entry_shape[entry, :ndim].tolist())
        offset = tuple(self.offset[row, :ndim].tolist())
        if self.entry_kind[entry] == OBJECT:
            return ShardedObject(key, None, shape, offset)
        flags, prepend = int(self.flags[row]), int(self.prepend[row])
        local_shape = tuple(self.extent[row, prepend:ndim].tolist())
        grid = tuple(self.grid[row, :ndim].tolist()) if flags & GRID else None
        flat = slice(*self.flat[row].tolist()) if flags & FLAT else None
        return ShardedTensor(
            key, None, torch_dtype(DTYPE_NAMES[self.entry_dtype[entry]]), local_shape, shape, offset, grid,
            0, prepend, bool(flags & SHAPE_MISMATCH), flat,
        )

    @functools.cached_property
    def contents(self) -> Tuple[Dict[str, TensorEntry], List[str]]:
        """What a checkpoint of this plan holds, as its index records it: {tensor key: entry}
        and the ShardedObjects' unique keys, of every key with a main replica."""
        rows = self.main_rows
        keys = np.unique(self.row_key[rows])
        tensors = {
            self.keys[k]: TensorEntry(list(self.global_shape(k)), self.dtype_name(k)) for k in keys.tolist() if self.key_kind[k] == TENSOR
        }
        objects = sorted({self.shard(row).unique_key for row in rows.tolist() if self.entry_kind[self.row_entry[row]] == OBJECT})
        return tensors, objects

    @functools.cached_property
    def index_tensors_json(self) -> str:
        """The tensors of `contents` as `index.json` writes them, encoded once per plan: a save
        that reuses its plan does not encode 10^4-10^5 entries again."""
        return index_tensors_json(self.contents[0])


def sorted_groups(groups: Sequence[np.ndarray], within: Sequence[np.ndarray] = ()) -> Tuple[np.ndarray, np.ndarray]:
    """The order that sorts rows by the `groups` columns, then by `within`; and, per sorted
    row, whether it starts a new group (a new value of the `groups` columns)."""
    order = np.lexsort(tuple(reversed([*groups, *within])))
    head = np.column_stack([c[order] for c in groups])
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (head[1:] != head[:-1]).any(axis=1)
    return order, starts


class PlanCache:
    """The last plan of each kind of save or load (e.g. per engine configuration), reused when
    every rank's plan is unchanged. Ranks decide together (see `is_hit`), so a rank that lost
    its entry makes every rank plan anew."""

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: "OrderedDict[Any, Tuple[bytes, Any]]" = OrderedDict()

    def digest(self, kind) -> bytes:
        """The global digest of the cached plan of `kind` (b"" if none): what this rank
        reports in the planning exchange."""
        entry = self._entries.get(kind)
        return entry[0] if entry else b""

    @staticmethod
    def global_digest(local_digests: Sequence[bytes]) -> bytes:
        return _digest(*local_digests)

    @staticmethod
    def is_hit(global_digest: bytes, reported: Sequence[bytes]) -> bool:
        """Whether every rank reported a cached plan of exactly this global digest."""
        return all(d == global_digest for d in reported)

    def get(self, kind) -> Any:
        self._entries.move_to_end(kind)
        return self._entries[kind][1]

    def put(self, kind, global_digest: bytes, value) -> None:
        self._entries[kind] = (global_digest, value)
        self._entries.move_to_end(kind)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


@dataclass(frozen=True)
class PlanDigests:
    """A rank's plan in 16-byte digests: enough to find the ranks of equal structure and to
    tell whether every rank's plan is the cached one."""

    structure: bytes
    structure_size: int
    whole: bytes  # structure, main bits and the strategy's planning info
    cached: bytes


def gather_plan(local: LocalPlan, digests: Sequence[PlanDigests], what: str, group=None, consequence: str = "") -> GlobalPlan:
    """The global plan, exchanged: the main bits of every rank, and each distinct structure
    once, from the first rank that has it (`share_bytes`). `digests`: every rank's
    `PlanDigests`."""
    rank_structure, owners = structure_owners([d.structure for d in digests])
    main = exchange(lambda: local.main, what, group, consequence)
    sizes = [0] * len(digests)
    for rank in owners:
        sizes[rank] = digests[rank].structure_size
    structures = share_bytes(local.structure if sizes[get_rank(group)] else None, sizes, what, group)
    return GlobalPlan.assemble([structures[rank] for rank in owners], rank_structure, main)


def structure_owners(structure_digests: Sequence[bytes]) -> Tuple[List[int], List[int]]:
    """(distinct structure of each rank, the first rank of each distinct structure)."""
    index: Dict[bytes, int] = {}
    owners = []
    rank_structure = []
    for rank, d in enumerate(structure_digests):
        if d not in index:
            index[d] = len(index)
            owners.append(rank)
        rank_structure.append(index[d])
    return rank_structure, owners




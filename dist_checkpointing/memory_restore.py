"""Restoring from the memory tier, at any layout and world size.

Every rank lists its node's directory (one exchange); a step can be restored when every piece
file of its save is held by some live node. For the newest such step, every rank reads the
indexes (each from one holder), plans its requests against the stored boxes, reads what its
own node holds and asks holders on other nodes for the rest (one exchange of requests, then
point-to-point transfers), and checks every piece's CRC-32C before anything is filled in. A
piece that fails its check excludes that copy and the step is tried again with the others;
a step that cannot be restored is logged and the next one is tried: never a wrong value.
"""

import functools
import io
import logging
import math
import mmap
import os
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch

from .collectives import exchange, on_every_rank, send_and_receive
from .core import CheckpointingException
from .dict_utils import dict_list_map_inplace, merge, nested_values
from .dtypes import torch_dtype
from .geometry import flat_tiling_fault, intersection, volume
from .integrity import crc32c
from .mapping import ShardedObject, ShardedTensor
from .memory_format import PieceIndex, TensorPiece, aligned, decode_index, list_node, piece_paths, read_index
from .memory_tier import NodeMemory
from .pickling import load_object
from .state_dict_utils import finish_load, load_preprocess
from .strategies.reading import piece_of
from .validation import check_request_against_stored

logger = logging.getLogger(__name__)

Node = Tuple[str, str]  # (the node's token, its memory directory, for messages)
Candidate = Tuple[int, str]  # (step, save_id)
PieceId = Tuple[int, str, int]  # (saving rank, "t" tensor / "o" object / "c" common, index)


@dataclass
class Holdings:
    """Who holds what: every rank's node, and per candidate the nodes holding each piece file."""

    node_of: List[Node]
    world_sizes: Dict[Candidate, Set[int]] = field(default_factory=lambda: defaultdict(set))
    copies: Dict[Candidate, Dict[int, List[Node]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))

    def ranks_on(self, node: Node) -> List[int]:
        return self._ranks_of_node[node]

    @functools.cached_property
    def _ranks_of_node(self) -> Dict[Node, List[int]]:
        ranks = defaultdict(list)
        for rank, node in enumerate(self.node_of):
            ranks[node].append(rank)
        return ranks

    def restorable(self, excluded: Set[Tuple[Node, Candidate, int]] = frozenset()) -> List[Candidate]:
        """Candidates whose every piece file has a copy not excluded, newest first."""
        found = []
        for candidate, copies in self.copies.items():
            sizes = self.world_sizes[candidate]
            if len(sizes) == 1:
                (world,) = sizes
                if all(any((n, candidate, r) not in excluded for n in copies.get(r, ())) for r in range(world)):
                    found.append(candidate)
        return sorted(found, reverse=True)


def holdings(memory: NodeMemory) -> Holdings:
    """What every node holds (collective on the memory tier's group)."""
    node = (memory.node, memory.directory)
    gathered = exchange(lambda: (node, list_node(memory.directory)), "listing the memory tier", group=memory.group)
    result = Holdings([n for n, _ in gathered])
    seen = set()
    for n, held in gathered:
        if n in seen:
            continue  # ranks of one node list the same directory
        seen.add(n)
        for h in held:
            candidate = (h.step, h.save_id)
            result.world_sizes[candidate].add(h.world_size)
            result.copies[candidate][h.rank].append(n)
    return result


def restore(memory: NodeMemory, sharded_state_dict, not_older_than: Optional[int]):
    """(step, state dict) from the newest memory step at least `not_older_than` that can be
    restored, or None (collective). Every failed candidate is logged."""
    memory.wait()
    held = holdings(memory)
    excluded: Set[Tuple[Node, Candidate, int]] = set()
    failed: Set[Candidate] = set()
    while True:
        candidates = [c for c in held.restorable(excluded) if c not in failed and (not_older_than is None or c[0] >= not_older_than)]
        if not candidates:
            return None
        candidate = candidates[0]
        started = time.perf_counter()
        outcome = _Attempt(memory, held, candidate, excluded).run(sharded_state_dict)
        if not isinstance(outcome, _Failure):
            state, moved = outcome
            logger.info("Restored step %d from the memory tier in %.2f s (%d bytes from other nodes to this rank)",
                        candidate[0], time.perf_counter() - started, moved)
            memory.restored(candidate[0])
            return candidate[0], state
        if outcome.bad:
            excluded |= outcome.bad
        else:
            failed.add(candidate)
        logger.warning("Memory tier: step %d cannot be restored as tried: %s; trying the next candidate", candidate[0], outcome.reason)


@dataclass(frozen=True)
class _Failure:
    """Why an attempt failed (the same on every rank), and the copies it found damaged."""

    bad: Set[Tuple[Node, Candidate, int]]
    reason: str


class _Attempt:
    """One try at restoring one candidate step, excluding the copies in `excluded`."""

    def __init__(self, memory: NodeMemory, held: Holdings, candidate: Candidate, excluded):
        self.memory, self.held, self.candidate = memory, held, candidate
        self.rank = memory.layout.rank
        self.node = held.node_of[self.rank]
        step = candidate[0]
        copies = held.copies[candidate]
        (world,) = held.world_sizes[candidate]
        self.copies = {r: [n for n in copies[r] if (n, candidate, r) not in excluded] for r in range(world)}
        self.sources: Dict[int, Tuple[Node, int]] = {}  # saving rank -> `_source`
        self.step = step

    def run(self, sharded_state_dict):
        """(state, bytes received), or a _Failure."""
        indexes = self._indexes()
        if isinstance(indexes, _Failure):
            return indexes
        request, nonpersistent, factories, dtensors = load_preprocess(sharded_state_dict)
        plan, problem, needs = _Plan(indexes), None, set()
        try:
            targets = plan.targets(request, self.where())
            needs = {plan.common_piece()} | {p for t in targets for _, pieces in t.boxes for p, _ in pieces}
            needs |= {plan.objects[sh.unique_key] for sh in nested_values(request) if isinstance(sh, ShardedObject)}
        except CheckpointingException as e:
            problem, targets = str(e), []
        direct = _direct_landings(targets)
        asks = self._asks(needs, direct)
        gathered = exchange(lambda: (asks, problem), f"planning the restore of memory step {self.step}", group=self.memory.group)
        problems = [p for _, p in gathered if p]
        if problems:
            return _Failure(set(), problems[0])
        with _PieceFiles(self.memory.directory, self.step, plan) as files:
            values, bad, moved = self._transfer([a for a, _ in gathered], needs, direct, plan, files)
            bad_everywhere = set().union(*exchange(lambda: bad, f"checking memory step {self.step}", group=self.memory.group))
            if bad_everywhere:
                return _Failure(bad_everywhere, f"{len(bad_everywhere)} copies of piece files fail their CRC-32C or cannot be read")

            def fill():  # what fails here (a pickled class not allowed) fails on every rank
                state = plan.common(values)
                merge(state, nonpersistent)
                loaded = plan.fill(request, targets, values, direct, self.where())
                merge(state, dict_list_map_inplace(lambda sh: loaded.get(id(sh), sh), request))
                return finish_load(state, factories, dtensors)

            return on_every_rank(fill, f"restore of memory step {self.step}", group=self.memory.group), moved

    def where(self) -> str:
        return f"memory step {self.step} ({self.memory.directory} and its peers)"

    def _server_of_index(self, rank: int) -> int:
        return self.held.ranks_on(self.copies[rank][0])[0]

    def _indexes(self):
        """Every piece file's index (each read by one rank of a node holding it), or the
        copies to exclude and why."""

        def read():
            mine = {}
            for r in self.copies:
                if self._server_of_index(r) == self.rank:
                    try:
                        mine[r] = read_index(self.memory.directory, self.step, r)
                    except OSError as e:
                        mine[r] = e.strerror or str(e)
            return mine

        raw = {}
        for part in exchange(read, f"reading the indexes of memory step {self.step}", group=self.memory.group):
            raw.update(part)
        indexes, bad, reasons = {}, set(), []
        for r, data in sorted(raw.items()):
            try:
                if isinstance(data, str):
                    raise CheckpointingException(f"cannot read rank {r}'s index: {data}")
                index = decode_index(data, piece_paths(self.memory.directory, self.step, r)[1])
                if (index.step, index.save_id, index.rank) != (self.step, self.candidate[1], r):
                    raise CheckpointingException(f"rank {r}'s index describes rank {index.rank}'s step {index.step}")
                indexes[r] = index
            except CheckpointingException as e:
                bad.add((self.copies[r][0], self.candidate, r))
                reasons.append(str(e))
        return _Failure(bad, "; ".join(reasons)) if bad else indexes

    def _source(self, rank: int) -> Tuple[Node, int]:
        """(node, serving rank) for pieces of saving rank `rank`: this node if it holds them."""
        if rank not in self.sources:
            nodes = self.copies[rank]
            node = self.node if self.node in nodes else nodes[self.rank % len(nodes)]
            ranks = self.held.ranks_on(node)
            self.sources[rank] = node, (self.rank if node == self.node else ranks[self.rank % len(ranks)])
        return self.sources[rank]

    def _asks(self, needs: Set[PieceId], direct: Dict[PieceId, torch.Tensor]) -> Dict[int, Tuple[List[PieceId], List[PieceId]]]:
        """Per serving rank of another node: (pieces it sends one by one, straight into their
        destination; pieces it sends packed in one buffer)."""
        asks = defaultdict(lambda: ([], []))
        for piece in sorted(needs):
            _, server = self._source(piece[0])
            if server != self.rank:
                asks[server][0 if piece in direct else 1].append(piece)
        return dict(asks)

    def _transfer(self, asks_of, needs: Set[PieceId], direct: Dict[PieceId, torch.Tensor], plan: "_Plan", files: "_PieceFiles"):
        """Each needed piece's bytes (None for those landed in their destination): from this
        node's files, or received from the rank that serves them; the copies whose bytes fail
        their check; the bytes received."""
        sends = []
        for requester, asks in enumerate(asks_of):
            singles, packed = asks.get(self.rank, ([], []))
            if requester == self.rank:
                continue
            sends += [(files.bytes_of(p), requester, tag) for tag, p in enumerate(singles, start=1)]
            if packed:
                sends.append((files.packed(packed), requester, 0))
        mine = self._asks(needs, direct)
        receives, carried, values = [], [], {}  # carried[i]: the pieces receive i brings
        for server, (singles, packed) in mine.items():
            receives += [(direct[p], server, tag) for tag, p in enumerate(singles, start=1)]
            carried += [[p] for p in singles]
            if packed:
                buffer = torch.empty(_packed(packed, plan)[1], dtype=torch.uint8)
                receives.append((buffer, server, 0))
                carried.append(packed)
                values.update(_unpacked(packed, plan, buffer))
        local = sorted(needs - {p for pieces in carried for p in pieces})
        bad = set()

        def check(p: PieceId) -> None:
            data = direct[p] if p in direct else values[p]
            if crc32c(data.numpy()) != plan.piece(p).crc:
                node, _ = self._source(p[0])
                bad.add((node, self.candidate, p[0]))
                logger.error("Memory tier: a piece of rank %d's step %d held by %s fails its CRC-32C", p[0], self.step, node[1])

        def read_local():  # this node's pieces, read and checked while the transfers run
            for p in local:
                if p in direct:
                    direct[p].copy_(files.bytes_of(p))
                else:
                    values[p] = files.bytes_of(p)
                check(p)

        send_and_receive(sends, receives, group=self.memory.group, meanwhile=read_local,
                         arrived=lambda i: [check(p) for p in carried[i]])
        return values, bad, sum(t.numel() for t, _, _ in receives)


class _PieceFiles:
    """This node's piece files of a step, mapped read-only while a restore reads them: the bytes
    of a piece are a view, sent or copied without a read copy (a shared mapping of tmpfs pages
    costs a third of reading them into new memory here). A file shorter than its index says
    reads as zeros (its CRC check refuses it) instead of faulting beyond its end."""

    def __init__(self, directory: str, step: int, plan: "_Plan"):
        self.directory, self.step, self.plan = directory, step, plan
        self.maps: Dict[int, Optional[mmap.mmap]] = {}
        self.files: Dict[int, torch.Tensor] = {}

    def __enter__(self) -> "_PieceFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.files.clear()
        maps = [m for m in self.maps.values() if m is not None]
        # unmapping hundreds of MB takes tens of ms: not on the restore's path
        threading.Thread(target=lambda: [m.close() for m in maps], name="dist-ckpt-unmap", daemon=True).start()

    def _file(self, rank: int) -> torch.Tensor:
        if rank not in self.files:
            size, data = self.plan.indexes[rank].nbytes, None
            try:
                with open(piece_paths(self.directory, self.step, rank)[0], "rb") as f:
                    if size and os.fstat(f.fileno()).st_size >= size:
                        self.maps[rank] = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                        with warnings.catch_warnings():  # read-only, and only ever read
                            warnings.simplefilter("ignore", UserWarning)
                            data = torch.frombuffer(self.maps[rank], dtype=torch.uint8)
            except OSError as e:
                logger.error("Memory tier: cannot read rank %d's step %d in %s: %s", rank, self.step, self.directory, e)
            self.files[rank] = data if data is not None else torch.zeros(size, dtype=torch.uint8)
        return self.files[rank]

    def bytes_of(self, p: PieceId) -> torch.Tensor:
        piece = self.plan.piece(p)
        return self._file(p[0])[piece.at : piece.at + piece.nbytes]

    def packed(self, pieces: List[PieceId]) -> torch.Tensor:
        starts, size = _packed(pieces, self.plan)
        buffer = torch.empty(size, dtype=torch.uint8)
        for p, at in zip(pieces, starts):
            buffer[at : at + self.plan.piece(p).nbytes] = self.bytes_of(p)
        return buffer


class _Plan:
    """The stored pieces of a candidate step, and which of them each request needs."""

    def __init__(self, indexes: Dict[int, PieceIndex]):
        self.indexes = indexes
        self.tensors: Dict[str, List[Tuple[PieceId, TensorPiece]]] = defaultdict(list)
        self.objects: Dict[str, PieceId] = {}
        self._stored: Dict[str, _StoredKey] = {}
        for r, index in indexes.items():
            for i, p in enumerate(index.tensors):
                self.tensors[p.key].append(((r, "t", i), p))
            for i, p in enumerate(index.objects):
                self.objects[p.key] = (r, "o", i)

    def piece(self, p: PieceId):
        index = self.indexes[p[0]]
        return index.common if p[1] == "c" else (index.tensors if p[1] == "t" else index.objects)[p[2]]

    def common_piece(self) -> PieceId:
        if 0 not in self.indexes or self.indexes[0].common is None:
            raise CheckpointingException("rank 0's piece file has no common state")
        return (0, "c", 0)

    def stored(self, key: str, where: str) -> "_StoredKey":
        """`key` as stored (checked once per key): its global shape and dtype, on which its
        pieces agree, and its boxes, each given whole by one piece or by flat pieces that tile it."""
        if key not in self._stored:
            stored = self.tensors.get(key)
            if not stored:
                raise CheckpointingException(f"Key '{key}' is not in {where}")
            shapes = {piece.global_shape for _, piece in stored}
            dtypes = {piece.dtype for _, piece in stored}
            if len(shapes) > 1 or len(dtypes) > 1:
                raise CheckpointingException(f"Key '{key}': its pieces in {where} disagree on the global shape or dtype")
            boxes = defaultdict(list)
            for p, piece in stored:
                boxes[(piece.offset, piece.shape)].append((p, piece))
            for box, pieces in boxes.items():
                _check_flat_cover(key, box[1], pieces, where)
            self._stored[key] = _StoredKey(shapes.pop(), torch_dtype(dtypes.pop()), dict(boxes))
        return self._stored[key]

    def targets(self, request, where: str) -> List["_Target"]:
        """Where each requested ShardedTensor's values go, and the stored boxes that give them;
        raises if some requested element is stored nowhere (or ShardedObject is missing)."""
        targets = []
        for sh in nested_values(request):
            if isinstance(sh, ShardedObject) and sh.unique_key not in self.objects:
                raise CheckpointingException(f"ShardedObject '{sh.unique_key}' is not in {where}")
            if not isinstance(sh, ShardedTensor):
                continue
            stored = self.stored(sh.key, where)
            check_request_against_stored(sh, stored.shape, where)
            offset, shape = sh.covering_box()
            inside = (offset, tuple(max(0, min(o + s, g) - o) for o, s, g in zip(offset, shape, stored.shape)))
            used, covered = [], 0
            for box, pieces in stored.boxes.items():
                region = intersection(inside, box)
                if region is not None:
                    used.append((box, pieces))
                    covered += volume(region)
            if covered != volume(tuple((o, o + s) for o, s in zip(*inside))):
                raise CheckpointingException(
                    f"Key '{sh.key}': the request {offset} + {shape} is not covered exactly once by the pieces in {where}"
                )
            target = sh.box_target(stored.dtype)
            if inside[1] != tuple(shape):
                target.zero_()  # the allow_shape_mismatch pad beyond the stored shape
            targets.append(_Target(sh, target, stored.dtype, (offset, tuple(shape)), used))
        return targets

    def common(self, values: Dict[PieceId, torch.Tensor]) -> dict:
        state = load_object(io.BytesIO(values[self.common_piece()].numpy().tobytes()), "the common state", "the memory tier")
        if not isinstance(state, dict):
            raise CheckpointingException(f"The memory tier's common state is a {type(state).__name__}, not a dict")
        return state

    def fill(self, request, targets: List["_Target"], values, direct, where: str) -> Dict[int, object]:
        """Each request's value: ShardedObjects unpickled, tensors copied from their boxes
        (those landed in place already skipped)."""
        loaded = {}
        for sh in nested_values(request):
            if isinstance(sh, ShardedObject):
                data = values[self.objects[sh.unique_key]].numpy().tobytes()
                loaded[id(sh)] = load_object(io.BytesIO(data), f"ShardedObject '{sh.unique_key}'", where)
        for t in targets:
            for box, pieces in t.boxes:
                if len(pieces) == 1 and pieces[0][0] in direct:
                    continue
                region = intersection(t.box, box)
                piece = piece_of(box[0], (tuple(a for a, _ in region), tuple(b - a for a, b in region)), t.target, t.box[0])
                piece.into.copy_(_box_values(pieces, box[1], t.dtype, values)[piece.region])
            loaded[id(t.request)] = t.request.deliver(t.target)
        return loaded


@dataclass(frozen=True)
class _Target:
    """Where a requested ShardedTensor's covering box is assembled, and the stored boxes
    (with the pieces that give each) it overlaps."""

    request: ShardedTensor
    target: torch.Tensor
    dtype: torch.dtype
    box: Tuple[Tuple[int, ...], Tuple[int, ...]]
    boxes: List[Tuple[Tuple[Tuple[int, ...], Tuple[int, ...]], List[Tuple[PieceId, TensorPiece]]]]


def _direct_landings(targets: List[_Target]) -> Dict[PieceId, torch.Tensor]:
    """The pieces whose bytes can land straight in their destination: a whole stored box that
    is exactly a request's box (the same layout's common case), held contiguously on the CPU,
    and needed by no other request of this rank."""
    uses = defaultdict(int)
    for t in targets:
        for _, pieces in t.boxes:
            for p, _ in pieces:
                uses[p] += 1
    direct = {}
    for t in targets:
        if len(t.boxes) == 1:
            box, pieces = t.boxes[0]
            (p, piece), = pieces if len(pieces) == 1 else ((None, None),)
            if p is not None and piece.flat is None and box == t.box and uses[p] == 1 and t.target.device.type == "cpu" and t.target.is_contiguous():
                direct[p] = t.target.view(-1).view(torch.uint8)
    return direct


def _packed(pieces: List[PieceId], plan: _Plan) -> Tuple[List[int], int]:
    """Where each piece starts in a buffer that carries them one after the other (aligned, so
    that each can be viewed as its dtype), and the buffer's size."""
    starts, at = [], 0
    for p in pieces:
        starts.append(at)
        at += aligned(plan.piece(p).nbytes)
    return starts, at


def _unpacked(pieces: List[PieceId], plan: _Plan, buffer: torch.Tensor) -> Dict[PieceId, torch.Tensor]:
    starts, _ = _packed(pieces, plan)
    return {p: buffer[at : at + plan.piece(p).nbytes] for p, at in zip(pieces, starts)}


@dataclass(frozen=True)
class _StoredKey:
    shape: Tuple[int, ...]
    dtype: torch.dtype
    boxes: Dict[Tuple[Tuple[int, ...], Tuple[int, ...]], List[Tuple[PieceId, TensorPiece]]]  # (offset, shape) -> pieces


def _check_flat_cover(key: str, box_shape, pieces, where: str) -> None:
    """The pieces of one box are the whole box, or flat ranges that tile it exactly."""
    if len(pieces) == 1 and pieces[0][1].flat is None:
        return
    ranges = sorted(piece.flat or (0, -1) for _, piece in pieces)
    if any(piece.flat is None for _, piece in pieces) or flat_tiling_fault(ranges, math.prod(box_shape)) is not None:
        raise CheckpointingException(f"Key '{key}': the pieces of box {box_shape} in {where} do not tile it (flat ranges {ranges})")


def _box_values(pieces, box_shape, dtype: torch.dtype, values: Dict[PieceId, torch.Tensor]) -> torch.Tensor:
    """The values of a stored box: its one piece, or its flat pieces laid end to end."""
    if len(pieces) == 1 and pieces[0][1].flat is None:
        return values[pieces[0][0]].view(dtype).view(box_shape)
    box = torch.empty(box_shape, dtype=dtype)
    flat = box.view(-1)
    for p, piece in pieces:
        flat[piece.flat[0] : piece.flat[1]] = values[p].view(dtype)
    return box

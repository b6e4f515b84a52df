"""Restoring from the memory tier, at any layout and world size.

Every rank lists its node's directory (one exchange); a step can be restored when every piece
file of its save is held by some live node. For the newest such step, every rank reads the
indexes (each from one holder), plans its requests against the stored boxes, reads what its
own node holds and asks holders on other nodes for the rest (one exchange of requests, then
point-to-point transfers), and checks every piece's CRC-32C before anything is filled in. A
piece that fails its check excludes that copy and the step is tried again with the others;
a step that cannot be restored is logged and the next one is tried: never a wrong value.
"""

import io
import logging
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch

from .collectives import exchange, send_and_receive
from .core import CheckpointingException
from .dict_utils import dict_list_map_inplace, merge, nested_values
from .dtypes import torch_dtype
from .geometry import intersection
from .integrity import crc32c
from .mapping import ShardedObject, ShardedTensor
from .memory_format import PieceIndex, TensorPiece, aligned, decode_index, list_node, piece_paths, read_index
from .memory_tier import NodeMemory
from .pickling import load_object
from .state_dict_utils import finish_load, load_preprocess
from .strategies.reading import piece_of
from .validation import check_request_against_stored

logger = logging.getLogger(__name__)

Node = Tuple[str, str]  # (host name, real path of its memory directory)
Candidate = Tuple[int, str]  # (step, save_id)
PieceId = Tuple[int, str, int]  # (saving rank, "t" tensor / "o" object / "c" common, index)


@dataclass
class Holdings:
    """Who holds what: every rank's node, and per candidate the nodes holding each piece file."""

    node_of: List[Node]
    world_sizes: Dict[Candidate, Set[int]] = field(default_factory=lambda: defaultdict(set))
    copies: Dict[Candidate, Dict[int, List[Node]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))

    def ranks_on(self, node: Node) -> List[int]:
        return [rank for rank, n in enumerate(self.node_of) if n == node]

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
    node = (socket.gethostname(), os.path.realpath(memory.directory))
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
        self.step = step

    def run(self, sharded_state_dict):
        """(state, bytes received), or a _Failure."""
        indexes = self._indexes()
        if isinstance(indexes, _Failure):
            return indexes
        request, nonpersistent, factories, dtensors = load_preprocess(sharded_state_dict)
        plan = _Plan(indexes)
        problem = None
        try:
            needs = plan.needs(request, self.where())
        except CheckpointingException as e:
            problem, needs = str(e), set()
        asks = self._asks(needs)
        gathered = exchange(lambda: (asks, problem), f"planning the restore of memory step {self.step}", group=self.memory.group)
        problems = [p for _, p in gathered if p]
        if problems:
            return _Failure(set(), problems[0])
        values, bad, moved = self._transfer([a for a, _ in gathered], needs, plan)
        bad_everywhere = set().union(*exchange(lambda: bad, f"checking memory step {self.step}", group=self.memory.group))
        if bad_everywhere:
            return _Failure(bad_everywhere, f"{len(bad_everywhere)} copies of piece files fail their CRC-32C or cannot be read")
        state = plan.common(values)
        merge(state, nonpersistent)
        loaded = plan.fill(request, values, self.where())
        merge(state, dict_list_map_inplace(lambda sh: loaded.get(id(sh), sh), request))
        return finish_load(state, factories, dtensors), moved

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
        nodes = self.copies[rank]
        node = self.node if self.node in nodes else nodes[self.rank % len(nodes)]
        ranks = self.held.ranks_on(node)
        return node, (self.rank if node == self.node else ranks[self.rank % len(ranks)])

    def _asks(self, needs: Set[PieceId]) -> Dict[int, List[PieceId]]:
        asks = defaultdict(list)
        for piece in sorted(needs):
            _, server = self._source(piece[0])
            if server != self.rank:
                asks[server].append(piece)
        return dict(asks)

    def _transfer(self, asks_of: List[Dict[int, List[PieceId]]], needs: Set[PieceId], plan: "_Plan"):
        """Each needed piece's bytes: read here, or received from the rank that serves it; the
        copies whose bytes fail their check; the bytes received."""
        sends = []
        for requester, asks in enumerate(asks_of):
            wanted = asks.get(self.rank, [])
            if wanted and requester != self.rank:
                sends.append((self._read(wanted, plan), requester, 0))
        mine = self._asks(needs)
        receives = {server: torch.empty(_packed(wanted, plan)[1], dtype=torch.uint8) for server, wanted in mine.items()}
        send_and_receive(sends, [(buffer, server, 0) for server, buffer in receives.items()], group=self.memory.group)
        values: Dict[PieceId, torch.Tensor] = {}
        for server, wanted in mine.items():
            values.update(_unpacked(wanted, plan, receives[server]))
        local = [p for p in sorted(needs) if p not in values]
        values.update(_unpacked(local, plan, self._read(local, plan)))
        bad = set()
        for p, data in values.items():
            if crc32c(data.numpy()) != plan.piece(p).crc:
                node, _ = self._source(p[0])
                bad.add((node, self.candidate, p[0]))
                logger.error("Memory tier: a piece of rank %d's step %d held by %s fails its CRC-32C", p[0], self.step, node[1])
        return values, bad, sum(b.numel() for b in receives.values())

    def _read(self, pieces: List[PieceId], plan: "_Plan") -> torch.Tensor:
        """The bytes of `pieces`, one after the other, read from this node's piece files (a
        piece that cannot be read stays zeros: its CRC check refuses it where it arrives)."""
        starts, size = _packed(pieces, plan)
        buffer = torch.zeros(size, dtype=torch.uint8)
        view, files = buffer.numpy(), {}
        try:
            for p, at in zip(pieces, starts):
                piece = plan.piece(p)
                try:
                    if p[0] not in files:
                        files[p[0]] = os.open(piece_paths(self.memory.directory, self.step, p[0])[0], os.O_RDONLY)
                    os.preadv(files[p[0]], [view[at : at + piece.nbytes]], piece.at)
                except OSError as e:
                    logger.error("Memory tier: cannot read rank %d's step %d on rank %d: %s", p[0], self.step, self.rank, e)
        finally:
            for fd in files.values():
                os.close(fd)
        return buffer


class _Plan:
    """The stored pieces of a candidate step, and which of them each request needs."""

    def __init__(self, indexes: Dict[int, PieceIndex]):
        self.indexes = indexes
        self.tensors: Dict[str, List[Tuple[PieceId, TensorPiece]]] = defaultdict(list)
        self.objects: Dict[str, PieceId] = {}
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

    def boxes(self, key: str, where: str):
        """The stored boxes of `key`: (offset, shape, dtype, pieces that give its values)."""
        stored = self.tensors.get(key)
        if not stored:
            raise CheckpointingException(f"Key '{key}' is not in {where}")
        boxes = defaultdict(list)
        for p, piece in stored:
            boxes[(piece.offset, piece.shape, piece.dtype)].append((p, piece))
        return boxes

    def stored_shape(self, key: str, where: str):
        shapes = {piece.global_shape for _, piece in self.tensors[key]}
        dtypes = {piece.dtype for _, piece in self.tensors[key]}
        if len(shapes) > 1 or len(dtypes) > 1:
            raise CheckpointingException(f"Key '{key}': its pieces in {where} disagree on the global shape or dtype")
        return shapes.pop(), torch_dtype(dtypes.pop())

    def needs(self, request, where: str) -> Set[PieceId]:
        """The pieces that `request` needs; raises if some requested element is stored nowhere."""
        needs = {self.common_piece()}
        for sh in nested_values(request):
            if isinstance(sh, ShardedObject):
                if sh.unique_key not in self.objects:
                    raise CheckpointingException(f"ShardedObject '{sh.unique_key}' is not in {where}")
                needs.add(self.objects[sh.unique_key])
            elif isinstance(sh, ShardedTensor):
                boxes = self.boxes(sh.key, where)
                stored_shape, _ = self.stored_shape(sh.key, where)
                check_request_against_stored(sh, stored_shape, where)
                offset, shape = sh.covering_box()
                inside = (offset, tuple(max(0, min(o + s, g) - o) for o, s, g in zip(offset, shape, stored_shape)))
                covered = 0
                for (box_offset, box_shape, _), pieces in boxes.items():
                    region = intersection(inside, (box_offset, box_shape))
                    if region is None:
                        continue
                    _check_flat_cover(sh.key, box_shape, pieces, where)
                    needs.update(p for p, _ in pieces)
                    covered += _volume(region)
                if covered != _volume(tuple((o, o + s) for o, s in zip(*inside))):
                    raise CheckpointingException(
                        f"Key '{sh.key}': the request {offset} + {shape} is not covered exactly once by the pieces in {where}"
                    )
        return needs

    def common(self, values: Dict[PieceId, torch.Tensor]) -> dict:
        state = load_object(io.BytesIO(values[self.common_piece()].numpy().tobytes()), "the common state", "the memory tier")
        if not isinstance(state, dict):
            raise CheckpointingException(f"The memory tier's common state is a {type(state).__name__}, not a dict")
        return state

    def fill(self, request, values: Dict[PieceId, torch.Tensor], where: str) -> Dict[int, object]:
        loaded = {}
        for sh in nested_values(request):
            if isinstance(sh, ShardedObject):
                data = values[self.objects[sh.unique_key]].numpy().tobytes()
                loaded[id(sh)] = load_object(io.BytesIO(data), f"ShardedObject '{sh.unique_key}'", where)
            elif isinstance(sh, ShardedTensor):
                stored_shape, dtype = self.stored_shape(sh.key, where)
                offset, shape = sh.covering_box()
                target = sh.box_target(dtype)
                if any(o + s > g for o, s, g in zip(offset, shape, stored_shape)):
                    target.zero_()  # the allow_shape_mismatch pad beyond the stored shape
                for (box_offset, box_shape, _), pieces in self.boxes(sh.key, where).items():
                    region = intersection((offset, shape), (box_offset, box_shape))
                    if region is None:
                        continue
                    box = _box_values(pieces, box_shape, dtype, values)
                    piece = piece_of(box_offset, (tuple(a for a, _ in region), tuple(b - a for a, b in region)), target, offset)
                    piece.into.copy_(box[piece.region])
                loaded[id(sh)] = sh.deliver(target)
        return loaded


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


def _volume(region) -> int:
    n = 1
    for start, stop in region:
        n *= max(0, stop - start)
    return n


def _check_flat_cover(key: str, box_shape, pieces, where: str) -> None:
    """The pieces of one box are the whole box, or flat ranges that tile it exactly."""
    if len(pieces) == 1 and pieces[0][1].flat is None:
        return
    ranges = sorted(piece.flat or (0, -1) for _, piece in pieces)
    end = 0
    for start, stop in ranges:
        if start != end:
            break
        end = stop
    else:
        if end == _volume(tuple((0, s) for s in box_shape)):
            return
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

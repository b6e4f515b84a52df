"""The memory tier: frequent checkpoints in node-local memory, replicated to other nodes
(memory_format.py gives the files; memory_restore.py reads them back at any layout).

A memory save blocks training only to copy each rank's main-replica pieces into its piece
file, a file of node-local memory (tmpfs) that stays mapped and is reused from save to save, so
the copy runs at memory speed and touches no new page. A background thread then checksums the
pieces, commits the file (its index), sends it to the same local rank of the next `replicas`
nodes (point-to-point on a process group of its own, so it never interleaves with training's
collectives), checks and commits the replicas it receives, and once every rank has succeeded
(one all-reduce), retires older steps.
"""

import io
import logging
import mmap
import os
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .collectives import broadcast_object, get_rank, get_world_size, is_distributed, send_and_receive
from .core import CheckpointingException, is_count
from .dict_utils import nested_values
from .dtypes import name_of_torch, torch_dtype
from .fs import atomic_write
from .integrity import crc32c
from .mapping import ShardedObject, ShardedTensor, is_main_replica
from .memory_format import (
    NODE_FNAME,
    SPARE_DIR,
    BytesPiece,
    PieceIndex,
    TensorPiece,
    aligned,
    decode_index,
    encode_index,
    piece_paths,
    step_dir,
    step_dirs,
    write_index,
)
from .pickling import dump_object, load_object
from .state_dict_utils import save_preprocess

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class MemoryTier:
    """Configuration of the memory tier of a `CheckpointManager`.

    Args:
        directory: this node's directory in node-local memory (e.g. `/dev/shm/ckpt`); every
            node passes its own. It survives the training process, not the node.
        every: save to memory at the steps that are multiples of it
        replicas: how many other nodes keep a copy of each node's pieces (0: none)
        keep: how many of the newest complete memory steps each node keeps (1 or 2)
        ranks_per_node: ranks per node (default: LOCAL_WORLD_SIZE, as torchrun sets it);
            rank r is on node r // ranks_per_node
        timeout_s: how long the replication waits for a peer before it gives up on a save
    """

    directory: str
    every: int = 10
    replicas: int = 1
    keep: int = 1
    ranks_per_node: Optional[int] = None
    timeout_s: float = 300.0

    def __post_init__(self):
        if not isinstance(self.directory, (str, os.PathLike)) or not str(self.directory):
            raise CheckpointingException(f"MemoryTier: directory must be a path, got {self.directory!r}")
        for name, least in (("every", 1), ("replicas", 0), ("keep", 1)):
            if not is_count(getattr(self, name), least):
                raise CheckpointingException(f"MemoryTier: {name} must be an integer >= {least}, got {getattr(self, name)!r}")
        if self.ranks_per_node is not None and not is_count(self.ranks_per_node, 1):
            raise CheckpointingException(f"MemoryTier: ranks_per_node must be an integer >= 1, got {self.ranks_per_node!r}")


@dataclass(frozen=True)
class NodeLayout:
    """Which node each rank is on, and which ranks hold replicas of whose pieces."""

    rank: int
    world_size: int
    ranks_per_node: int

    @property
    def nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def peer(self, rank: int, distance: int) -> int:
        """The same local rank `distance` nodes further (around the ring of nodes)."""
        node, local = divmod(rank, self.ranks_per_node)
        return (node + distance) % self.nodes * self.ranks_per_node + local

    @staticmethod
    def of(tier: MemoryTier) -> "NodeLayout":
        world_size = get_world_size()
        per_node = tier.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if world_size % per_node:
            raise CheckpointingException(
                f"MemoryTier: {world_size} ranks do not split into nodes of ranks_per_node={per_node}; "
                f"pass ranks_per_node (every node must have as many ranks)"
            )
        layout = NodeLayout(get_rank(), world_size, per_node)
        if tier.replicas >= layout.nodes:
            raise CheckpointingException(
                f"MemoryTier: replicas={tier.replicas} needs more than {tier.replicas} nodes; this job has "
                f"{layout.nodes} (ranks_per_node={per_node}). A replica on the node itself would die with it."
            )
        return layout


def node_token(directory: str, create: bool = False) -> str:
    """The node's identity: a random token kept in its directory (host names and paths may
    repeat across nodes, e.g. containers; a replaced node starts with a new directory)."""
    path = os.path.join(directory, NODE_FNAME)
    if create and not os.path.exists(path):
        atomic_write(path, uuid.uuid4().hex.encode())
    with open(path, "rb") as f:
        return f.read().decode("ascii", "replace")


class Slot:
    """A piece file kept mapped from save to save: after its step retires it waits in
    `spare/` and becomes the next step's file, so a save copies into pages that exist. The
    file only grows (with some headroom): a save whose pieces pickle a few bytes longer than
    the last one's does not remap it."""

    def __init__(self, path: str, size: int):
        self.path, self.capacity, self.size = path, 0, 0
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.map: Optional[mmap.mmap] = None
        self.step: Optional[int] = None
        self.mapped = torch.empty(0, dtype=torch.uint8)
        self.reserve(size)

    @property
    def bytes(self) -> torch.Tensor:
        """The bytes in use (the pieces of its step)."""
        return self.mapped[: self.size]

    def reserve(self, size: int) -> None:
        """Makes the file hold `size` bytes in use."""
        if size > self.capacity:
            capacity = aligned(size + size // 16)
            self._unmap()
            os.ftruncate(self.fd, capacity)
            # Reserved up front: a tmpfs that is full fails here, not later with a SIGBUS
            # on a store into the mapping.
            os.posix_fallocate(self.fd, 0, capacity)
            self.map = mmap.mmap(self.fd, capacity, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            self.mapped = torch.frombuffer(self.map, dtype=torch.uint8)
            self.capacity = capacity
        self.size = size

    def move(self, path: str) -> None:
        os.replace(self.path, path)
        self.path = path

    def _unmap(self) -> None:
        self.mapped = torch.empty(0, dtype=torch.uint8)
        if self.map is not None:
            self.map.close()
            self.map = None

    def close(self) -> None:
        self._unmap()
        os.close(self.fd)


class NodeMemory:
    """A rank's side of the memory tier (collective to create: it makes a process group)."""

    def __init__(self, tier: MemoryTier):
        self.tier = tier
        self.directory = os.path.abspath(os.fspath(tier.directory))
        self.layout = NodeLayout.of(tier)
        self.group = None
        if is_distributed():
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=tier.timeout_s))
        # one id per run of the manager: a step's files from another run never mix with its
        self.save_id = broadcast_object(uuid.uuid4().hex if get_rank() == 0 else None, "the memory tier's start")
        self.slots: Dict[Tuple[str, int], List[Slot]] = {}  # (role, source rank) -> its files
        self.spare: List[Slot] = []
        self.complete: List[int] = []  # memory steps complete on every node, ascending
        self.last_step: Optional[int] = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist-ckpt-memory")
        self.pending: Optional[Future] = None
        self.last_error: Optional[str] = None
        self.timings: Dict[str, float] = {}  # of the last save: seconds per phase, and its bytes
        os.makedirs(os.path.join(self.directory, SPARE_DIR), exist_ok=True)
        if self.is_node_leader:
            self._remove_stale()
            node_token(self.directory, create=True)
        self.barrier()
        self.node = node_token(self.directory)  # what the ranks sharing this directory share

    @property
    def is_node_leader(self) -> bool:
        return self.layout.rank % self.layout.ranks_per_node == 0

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def _remove_stale(self) -> None:
        """At start: what no complete piece file is (spare files of earlier processes, data
        files without an index, temporary files). Committed steps stay: a restore may need them."""
        shutil.rmtree(os.path.join(self.directory, SPARE_DIR), ignore_errors=True)
        os.makedirs(os.path.join(self.directory, SPARE_DIR), exist_ok=True)
        for path in step_dirs(self.directory).values():
            for name in os.listdir(path):
                stem, ext = os.path.splitext(name)
                if ext != ".json" and not (ext == ".bin" and os.path.exists(os.path.join(path, stem + ".json"))):
                    os.remove(os.path.join(path, name))
                    logger.info("Memory tier: removed %s (left by an earlier process)", os.path.join(path, name))

    # --- saving --------------------------------------------------------------------------
    def save(self, step: int, sharded_state_dict) -> None:
        """Copies this rank's pieces into node memory and returns; the background thread
        commits, replicates and retires (a failure there is logged, and training goes on)."""
        self.wait()
        started = time.perf_counter()
        if self.last_step is not None and step <= self.last_step:
            raise CheckpointingException(f"Memory tier: step {step} is not newer than step {self.last_step}, already saved")
        self.last_step = step
        try:
            slot, pieces = self._stage(step, sharded_state_dict)
        except Exception as e:  # e.g. a full tmpfs: the others learn it in the background, as for a failure there
            self._failed(step, e)
            slot, pieces = None, []
        self.timings = {"bytes": slot.size if slot else 0, "stage": time.perf_counter() - started}
        self.pending = self.executor.submit(self._finish, step, slot, pieces)

    def _stage(self, step: int, sharded_state_dict) -> Tuple[Slot, list]:
        """This rank's piece file of `step`, its pieces copied in; the pieces' index entries
        (their CRC-32C still to compute)."""
        sharded, common = save_preprocess(sharded_state_dict)
        tensors = [sh for sh in nested_values(sharded) if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id)]
        objects = [sh for sh in nested_values(sharded) if isinstance(sh, ShardedObject) and is_main_replica(sh.replica_id)]
        blobs = [(sh.unique_key, dump_object(sh.data).getbuffer()) for sh in objects]
        if self.layout.rank == 0:
            blobs.append((None, dump_object(common).getbuffer()))
        pieces, at = [], 0
        for sh in tensors:
            offset, shape = sh.global_box()
            flat = None if sh.flattened_range is None else (sh.flattened_range.start, sh.flattened_range.stop)
            pieces.append(TensorPiece(sh.key, name_of_torch(sh.dtype, sh.key), sh.global_shape, offset, shape, flat,
                                      sh.prepend_axis_num, sh.axis_fragmentations, at, sh.nbytes, 0))
            at += aligned(sh.nbytes)
        for key, blob in blobs:
            pieces.append(BytesPiece(key, at, blob.nbytes, 0))
            at += aligned(blob.nbytes)
        os.makedirs(step_dir(self.directory, step), exist_ok=True)
        slot = self._take(("own", self.layout.rank), step, self.layout.rank, at)
        for sh, piece in zip(tensors, pieces):
            if sh.nbytes:
                slot.bytes[piece.at : piece.at + sh.nbytes].view(sh.dtype).view(sh.data_shape).copy_(sh.data.detach())
        for (_, blob), piece in zip(blobs, pieces[len(tensors) :]):
            slot.bytes[piece.at : piece.at + piece.nbytes].numpy()[:] = blob
        return slot, pieces

    def wait(self) -> None:
        """Waits for the memory save in flight (its failure was logged where it happened)."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def _finish(self, step: int, slot: Optional[Slot], pieces: list) -> None:
        """Commits this rank's file (none if staging failed), replicates, agrees, retires.
        Every rank runs every collective here whatever failed before it: the ranks stay in
        step for the next save."""
        ok, index, started = slot is not None, None, time.perf_counter()
        try:
            if ok:
                index = self._commit_own(step, slot, pieces)
        except Exception as e:  # the tier is best effort: the persistent tier still has its steps
            ok = self._failed(step, e)
        self.timings["commit"] = time.perf_counter() - started
        try:
            ok = self._replicate(step, slot, index) and ok
            self.timings["replicate"] = time.perf_counter() - started - self.timings["commit"]
            if self._everywhere(ok):
                self.complete.append(step)
                self._retire(step)
            else:
                logger.warning("Memory tier: step %d is not complete on every node (a rank failed); older steps are kept", step)
            self.timings["background"] = time.perf_counter() - started
            logger.debug("Memory tier: step %d on rank %d: %s", step, self.layout.rank, self.timings)
        except Exception as e:  # a peer that died: nothing to agree with
            self._failed(step, e)

    def _failed(self, step: int, error: Exception) -> bool:
        self.last_error = f"{type(error).__name__}: {error}"
        logger.error("Memory tier: the save of step %d failed on rank %d: %s", step, self.layout.rank, self.last_error)
        return False

    def _commit_own(self, step: int, slot: Slot, pieces: list) -> PieceIndex:
        data = slot.bytes.numpy()
        pieces = [replace(p, crc=crc32c(data[p.at : p.at + p.nbytes])) for p in pieces]
        tensors = tuple(p for p in pieces if isinstance(p, TensorPiece))
        blobs = [p for p in pieces if isinstance(p, BytesPiece)]
        common = blobs.pop() if self.layout.rank == 0 else None
        index = PieceIndex(step, self.save_id, self.layout.rank, self.layout.world_size, slot.size, tensors, tuple(blobs), common)
        write_index(piece_paths(self.directory, step, self.layout.rank)[1], index)
        return index

    def _replicate(self, step: int, slot: Optional[Slot], index: Optional[PieceIndex]) -> bool:
        """Sends this rank's piece file (if it was committed) to its peers and receives
        theirs; True if every replica this rank received checked out and was committed."""
        distances = range(1, self.tier.replicas + 1)
        if not distances or self.group is None:
            return True
        header = torch.frombuffer(bytearray(encode_index(index)), dtype=torch.uint8) if index else torch.empty(0, dtype=torch.uint8)
        targets = [self.layout.peer(self.layout.rank, d) for d in distances]
        sources = [self.layout.peer(self.layout.rank, -d) for d in distances]
        sizes = {s: torch.zeros(2, dtype=torch.int64) for s in sources}
        mine = torch.tensor([header.numel(), slot.size if index else 0], dtype=torch.int64)
        send_and_receive([(mine, t, 0) for t in targets], [(sizes[s], s, 0) for s in sources], group=self.group)
        received, ok = {}, True
        for s in sources:
            header_bytes, data_bytes = (int(x) for x in sizes[s])
            if not header_bytes:
                ok = False  # its rank failed to commit its own file, and said so
                continue
            try:
                replica = self._take(("replica", s), step, s, data_bytes)
            except OSError as e:  # no room for it here: receive it all the same, then drop it
                ok = self._failed(step, e)
                replica = None
            data = replica.bytes if replica is not None else torch.empty(data_bytes, dtype=torch.uint8)
            received[s] = (torch.empty(header_bytes, dtype=torch.uint8), replica, data)
        send_and_receive(
            [(t, peer, tag) for peer in (targets if index else []) for t, tag in ((header, 1), (slot.bytes, 2))],
            [(t, s, tag) for s, (h, _, data) in received.items() for t, tag in ((h, 1), (data, 2))],
            group=self.group,
        )
        for s, (header_of, replica, _) in received.items():
            if replica is None:
                continue
            _, index_path = piece_paths(self.directory, step, s)
            problem = _replica_problem(header_of.numpy().tobytes(), index_path, replica, step, self.save_id, s)
            if problem:
                ok = False
                logger.error("Memory tier: the replica of rank %d's step %d received by rank %d is refused: %s", s, step, self.layout.rank, problem)
                continue
            atomic_write(index_path, header_of.numpy().tobytes())
        return ok

    def _everywhere(self, ok: bool) -> bool:
        if self.group is None:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    # --- files -----------------------------------------------------------------------------
    def _take(self, role: Tuple[str, int], step: int, rank: int, size: int) -> Slot:
        """The file for `rank`'s pieces of `step`: a spare one (mapped already) or a new one."""
        data, index = piece_paths(self.directory, step, rank)
        os.makedirs(os.path.dirname(data), exist_ok=True)
        if os.path.exists(index):
            os.remove(index)  # a file of an abandoned run at this step: no longer committed
        if self.spare:
            # the smallest that holds `size` (no remapping), else the largest (grown)
            fitting = [slot for slot in self.spare if slot.capacity >= size]
            slot = min(fitting, key=lambda x: x.capacity) if fitting else max(self.spare, key=lambda x: x.capacity)
            self.spare.remove(slot)
            slot.move(data)
            slot.reserve(size)
        else:
            slot = Slot(data, size)
        slot.step = step
        self.slots.setdefault(role, []).append(slot)
        return slot

    def _retire(self, step: int) -> None:
        """After a step completed everywhere: the files of steps no longer kept go to `spare/`
        (their index first: a crash part-way leaves no committed file with other data), then
        the node's leader removes whatever else is left of those steps (earlier processes')."""
        kept = set(self.complete[-self.tier.keep :])
        for slots in self.slots.values():
            for slot in [s for s in slots if s.step not in kept]:
                slots.remove(slot)
                index = os.path.splitext(slot.path)[0] + ".json"
                if os.path.exists(index):
                    os.remove(index)
                slot.move(os.path.join(self.directory, SPARE_DIR, f"{self.layout.rank}-{len(self.spare)}-{uuid.uuid4().hex[:8]}.bin"))
                self.spare.append(slot)
        self.barrier()
        if self.is_node_leader:
            for old, path in step_dirs(self.directory).items():
                if old < step and old not in kept:  # newer ones may be being written already
                    shutil.rmtree(path, ignore_errors=True)
        del self.complete[: -self.tier.keep]
        self.barrier()  # a rank whose save is done sees its node's directory settled

    def own_pieces(self, step: int):
        """This rank's pieces of memory step `step` as a sharded state dict (its ShardedTensors
        and ShardedObjects as they were saved, under one key) and, on rank 0, the common state;
        None if this node has no committed file of this rank's for that step of this job's
        layout. What `CheckpointManager.promote` saves to the persistent tier."""
        data_path, index_path = piece_paths(self.directory, step, self.layout.rank)
        try:
            with open(index_path, "rb") as f:
                index = decode_index(f.read(), index_path)
            with open(data_path, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except (OSError, CheckpointingException) as e:
            logger.warning("Memory tier: rank %d's pieces of step %d cannot be read: %s", self.layout.rank, step, e)
            return None
        if index.world_size != self.layout.world_size or data.numel() < index.nbytes:
            return None
        damaged = index.damaged(data.numpy())
        if damaged:
            logger.warning("Memory tier: rank %d's pieces of step %d: %s", self.layout.rank, step, "; ".join(damaged))
            return None
        pieces = {}
        for i, p in enumerate(index.tensors):
            values = data[p.at : p.at + p.nbytes].view(torch_dtype(p.dtype))
            pieces[f"t{i}"] = ShardedTensor(
                p.key, values if p.flat else values.view(p.shape[p.prepend :]), values.dtype, p.shape[p.prepend :], p.global_shape,
                p.offset, p.fragments, 0, p.prepend, flattened_range=slice(*p.flat) if p.flat else None,
            )
        for i, p in enumerate(index.objects):
            obj = ShardedObject.empty_from_unique_key(p.key)
            obj.data = load_object(io.BytesIO(data[p.at : p.at + p.nbytes].numpy().tobytes()), f"ShardedObject '{p.key}'", data_path)
            pieces[f"o{i}"] = obj
        common = None
        if index.common is not None:
            c = index.common
            common = load_object(io.BytesIO(data[c.at : c.at + c.nbytes].numpy().tobytes()), "the common state", data_path)
        return pieces, common

    def restored(self, step: int) -> None:
        """Step `step` was restored: retention keeps it until newer steps are complete."""
        self.complete = sorted(set(self.complete) | {step})
        self.last_step = max(self.last_step or step, step)

    def close(self) -> None:
        """Waits for the save in flight; unmaps this process's files (they stay on the node)."""
        try:
            self.wait()
        finally:
            self.executor.shutdown(wait=True)
            for slot in [s for slots in self.slots.values() for s in slots] + self.spare:
                slot.close()
            for slot in self.spare:
                os.remove(slot.path)
            self.slots, self.spare = {}, []
            if self.group is not None:
                dist.destroy_process_group(self.group)
                self.group = None


def _replica_problem(header: bytes, path: str, replica: Slot, step: int, save_id: str, rank: int) -> Optional[str]:
    """Why a received replica cannot be committed (its index does not describe it, or a piece
    fails its CRC-32C), or None."""
    try:
        index = decode_index(header, path)
    except CheckpointingException as e:
        return str(e)
    if (index.step, index.save_id, index.rank, index.nbytes) != (step, save_id, rank, replica.size):
        return f"its index describes rank {index.rank}'s step {index.step} of {index.nbytes} bytes"
    damaged = index.damaged(replica.bytes.numpy())
    return f"{damaged[0]} (damaged in transit)" if damaged else None

"""The few collectives a save or load needs, and how failures travel between ranks.

Rule: any work that can fail on one rank runs *before* the next collective, and its outcome
(payload or error) travels in that collective. So a failure on one rank is raised on every rank
at the same point, and no rank is left waiting for a peer that already gave up.

Without an initialized process group everything runs as a single rank.
"""

import contextlib
import contextvars
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .core import CheckpointingException


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


_GROUP = contextvars.ContextVar("dist_checkpointing_group", default=None)


@contextlib.contextmanager
def within(group):
    """Only the ranks of `group` take part in what runs inside (e.g. `load(..., process_group=)`):
    every collective here whose group is not given uses `group`, and ranks are its ranks."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def _group(group):
    return _GROUP.get() if group is None else group


def get_rank(group=None) -> int:
    return dist.get_rank(_group(group)) if is_distributed() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(_group(group)) if is_distributed() else 1


def group_ranks(group=None) -> List[int]:
    """The global ranks of `group` (default: all ranks), in group rank order."""
    if not is_distributed():
        return [0]
    return dist.get_process_group_ranks(_group(group) or dist.group.WORLD)


def exchange(local_fn: Callable[[], Any], what: str, group=None, consequence: str = "") -> List[Any]:
    """Runs `local_fn` on every rank and all-gathers the results.

    If `local_fn` raised on any rank, every rank raises a `CheckpointingException` naming the
    failing ranks and their errors (the local exception is chained where it happened); so does
    a collective that fails because a peer died or stopped answering. `consequence` (e.g.
    "nothing was committed") is appended to those messages.
    """
    try:
        payload, error = local_fn(), None
    except Exception as e:  # travels to the other ranks, re-raised below
        payload, error = None, e
    if not is_distributed():
        if error is not None:
            message = str(error) if isinstance(error, CheckpointingException) else f"{what} failed: {describe_error(error)}"
            raise CheckpointingException(_with(message, consequence)) from error
        return [payload]
    group = _group(group)
    gathered: List[Any] = [None] * get_world_size(group)
    with peers_lost_raise(what, consequence):
        dist.all_gather_object(gathered, (payload, describe_error(error), isinstance(error, _GatheredFailure)), group=group)
    failures = [(rank, msg) for rank, (_, msg, _) in enumerate(gathered) if msg is not None]
    relayed = [msg for _, msg, gathered_failure in gathered if gathered_failure]
    if relayed:  # the failure of an earlier `gather`, already summarized where it arrived
        raise CheckpointingException(relayed[0]) from error
    if failures:
        raise CheckpointingException(_with(_summarize(what, failures), consequence)) from error
    return [p for p, _, _ in gathered]


def gather(local_fn: Callable[[], Any], what: str, dst: int = 0, group=None, consequence: str = "") -> Callable[[], Optional[List[Any]]]:
    """Runs `local_fn` on every rank and gathers the results to rank `dst` only (what only one
    rank needs need not travel to all). Returns a function that, on `dst`, returns every rank's
    result or raises like `exchange` if any rank failed, and elsewhere returns None: call it
    inside the local function of the next `exchange`, which then carries a failure to every
    rank."""
    try:
        payload, error = local_fn(), None
    except Exception as e:  # travels to `dst`
        payload, error = None, e
    if not is_distributed():
        return lambda: exchange(lambda: _reraise(error) if error else payload, what, consequence=consequence)
    group = _group(group)
    rank = get_rank(group)
    gathered: Optional[List[Any]] = [None] * get_world_size(group) if rank == dst else None
    with peers_lost_raise(what, consequence):
        dist.gather_object((payload, describe_error(error)), gathered, dst=dist.get_global_rank(group or dist.group.WORLD, dst), group=group)

    def results() -> Optional[List[Any]]:
        if gathered is None:
            return None
        failures = [(r, msg) for r, (_, msg) in enumerate(gathered) if msg is not None]
        if failures:
            raise _GatheredFailure(_with(_summarize(what, failures), consequence)) from error
        return [p for p, _ in gathered]

    return results


class _GatheredFailure(CheckpointingException):
    """A failure `gather` delivered to one rank; the next `exchange` relays it to every rank
    as it is (it already names the failing ranks)."""


def _reraise(error: BaseException):
    raise error


def on_every_rank(local_fn: Callable[[], Any], what: str, group=None, consequence: str = "") -> Any:
    """Runs `local_fn` on every rank and returns its local result once it succeeded on every
    rank (only the outcome travels, not the result); else raises everywhere, like `exchange`."""
    result = []
    exchange(lambda: result.append(local_fn()), what, group, consequence)
    return result[0]


@contextlib.contextmanager
def peers_lost_raise(what: str, consequence: str = ""):
    """A collective or point-to-point transfer that fails (a peer process died, its connection
    closed, or it stopped answering within the process group's timeout) raises a
    `CheckpointingException` saying so, instead of the backend's raw error."""
    try:
        yield
    except (RuntimeError, ConnectionError) as e:  # gloo and NCCL raise RuntimeError subclasses
        raise CheckpointingException(
            _with(
                f"{what} failed: a rank was lost (a peer process died, closed its connection or "
                f"did not answer in time). Backend error: {type(e).__name__}: {e}",
                consequence,
            )
        ) from e


def _with(message: str, consequence: str) -> str:
    if not consequence:
        return message
    return f"{message.rstrip('. ')}. {consequence}"


def describe_error(error: Optional[BaseException]) -> Optional[str]:
    if error is None:
        return None
    if isinstance(error, CheckpointingException):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _summarize(what: str, failures) -> str:
    messages = {msg for _, msg in failures}
    ranks = ", ".join(str(rank) for rank, _ in failures)
    if len(messages) == 1:
        return f"{what} failed on rank(s) {ranks}: {messages.pop()}"
    details = "\n".join(f"  rank {rank}: {msg}" for rank, msg in failures)
    return f"{what} failed on rank(s) {ranks}:\n{details}"


def broadcast_object(obj: Any, what: str, src: int = 0, group=None) -> Any:
    """Group rank `src`'s picklable `obj` on every rank of the group (what only one rank has
    and all need, e.g. rank 0's state to compare with). Only valid input may reach this point."""
    if not is_distributed():
        return obj
    group = _group(group)
    box = [obj]
    with peers_lost_raise(what):
        dist.broadcast_object_list(box, src=group_ranks(group)[src], group=group)
    return box[0]


def share_bytes(payload: Optional[bytes], sizes: Sequence[int], what: str, group=None) -> List[Optional[bytes]]:
    """Every rank's `payload` on every rank (None for a rank whose size is 0). `sizes`: every
    rank's payload size, known to all ranks (from an earlier exchange). With few senders each
    broadcasts its payload, so a rank receives only the payloads' sum; with many, one
    all-gather (each padded to the largest). Both sides must have passed every check before
    (no failure can travel here)."""
    if not is_distributed():
        return [payload]
    group = _group(group)
    senders = [rank for rank, size in enumerate(sizes) if size]
    received: List[Optional[bytes]] = [None] * len(sizes)
    with peers_lost_raise(what):
        if 4 * len(senders) <= len(sizes):
            ranks = group_ranks(group)
            for rank in senders:
                box = [payload if rank == get_rank(group) else None]
                dist.broadcast_object_list(box, src=ranks[rank], group=group)
                received[rank] = box[0]
        elif senders:
            dist.all_gather_object(received, payload, group=group)
    return received


def host_wire(group=None) -> bool:
    """Whether tensors travel between ranks through host memory: gloo (also the CPU half of a
    'cpu:gloo,cuda:nccl' group), not an NCCL-only group."""
    return str(dist.get_backend(_group(group))) != "nccl"


def wire_device(tensor: torch.Tensor, group=None) -> torch.device:
    """Where `tensor` must be to travel between ranks: CPU on a `host_wire`; its own (CUDA)
    device for an NCCL-only group."""
    return torch.device("cpu") if host_wire(group) else tensor.device


Transfer = Tuple[torch.Tensor, int, int]  # (tensor, peer rank, tag)


def send_and_receive(sends: Sequence[Transfer], receives: Sequence[Transfer], group=None,
                     meanwhile: Optional[Callable[[], None]] = None,
                     arrived: Optional[Callable[[int], None]] = None) -> None:
    """Posts every send and receive of this rank at once, runs `meanwhile` (local work that
    overlaps the transfers), then waits for all of them: the receives in order, calling
    `arrived(i)` as receive `i` completes (work on it that overlaps the later ones).

    Tensors may live on any device: each travels on its `wire_device` (copied there, and for a
    receive copied back, only where the devices differ). Receive targets must be contiguous.
    Both sides must list the transfers between a pair of ranks in the same order (NCCL matches
    by order, gloo by tag). Only valid input may reach this point: a rank that raised before
    posting its sends would leave its peers waiting (until the process group's timeout).
    """
    def on_wire(tensor: torch.Tensor, receive: bool) -> torch.Tensor:
        """`tensor` on its wire device, as bytes (so that every dtype travels: gloo has no
        bool or bfloat16 send): itself, a copy there to send, or a buffer there to receive
        into and copy back from."""
        device = wire_device(tensor, group)
        if tensor.device == device:
            wire = tensor.reshape(-1)
        elif receive:
            wire = torch.empty(tensor.numel(), dtype=tensor.dtype, device=device)
        else:
            wire = tensor.to(device).reshape(-1)
        return wire.view(torch.uint8)

    def copy_back(tensor: torch.Tensor, wire: torch.Tensor) -> None:
        if wire.data_ptr() != tensor.data_ptr():
            tensor.copy_(wire.view(tensor.dtype).view(tensor.shape))

    # empty tensors do not travel (both sides know they are empty)
    send_ops = [dist.P2POp(dist.isend, on_wire(t, False), peer, group, tag) for t, peer, tag in sends if t.numel()]
    wires = [on_wire(t, True) if t.numel() else None for t, _, _ in receives]
    receive_ops = [dist.P2POp(dist.irecv, w, peer, group, tag) for w, (_, peer, tag) in zip(wires, receives) if w is not None]
    with peers_lost_raise("the exchange of shards between ranks"):
        posted = dist.batch_isend_irecv(send_ops + receive_ops) if send_ops or receive_ops else []
        try:
            if meanwhile is not None:
                meanwhile()
        except BaseException:
            for work in posted:
                work.wait()
            raise
        received = iter(posted[len(send_ops) :])
        for i, ((tensor, _, _), wire) in enumerate(zip(receives, wires)):
            if wire is not None:
                next(received).wait()
                copy_back(tensor, wire)
            if arrived is not None:
                arrived(i)
        for work in posted[: len(send_ops)]:
            work.wait()


def broadcast_tensor(tensor: torch.Tensor, src: int, group=None) -> None:
    """Broadcasts `tensor` from global rank `src` into the same-shaped `tensor` of every other
    rank of the group (any device, any dtype: it travels as bytes on its `wire_device`).
    Only valid input may reach this point, as for `send_and_receive`."""
    group = _group(group)
    device = wire_device(tensor, group)
    wire = tensor.detach().reshape(-1) if tensor.device == device else tensor.detach().reshape(-1).to(device)
    with peers_lost_raise("the broadcast of a shard"):
        dist.broadcast(wire.view(torch.uint8), src=src, group=group)
    if wire.data_ptr() != tensor.data_ptr():
        tensor.copy_(wire.view(tensor.shape))


def all_gather_padded(mine: torch.Tensor, sizes: Sequence[int], group=None) -> List[torch.Tensor]:
    """Every rank's 1-D uint8 tensor `mine` (rank r's of `sizes[r]` bytes, known to all) on
    every rank, in one all-gather of tensors padded to the largest."""
    group = _group(group)
    width = max(sizes, default=0)
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[: mine.numel()] = mine.cpu()
    received = [torch.empty(width, dtype=torch.uint8) for _ in sizes]
    with peers_lost_raise("the exchange of shards between ranks"):
        dist.all_gather(received, padded, group=group)
    return [r[:n] for r, n in zip(received, sizes)]

"""The few collectives a save or load needs, and how failures travel between ranks.

Rule: any work that can fail on one rank runs *before* the next collective, and its outcome
(payload or error) travels in that collective. So a failure on one rank is raised on every rank
at the same point, and no rank is left waiting for a peer that already gave up.

Without an initialized process group everything runs as a single rank.
"""

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .core import CheckpointingException


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def group_ranks(group=None) -> List[int]:
    """The global ranks of `group` (default: all ranks), in group rank order."""
    if not is_distributed():
        return [0]
    return dist.get_process_group_ranks(group or dist.group.WORLD)


def exchange(local_fn: Callable[[], Any], what: str, group=None) -> List[Any]:
    """Runs `local_fn` on every rank and all-gathers the results.

    If `local_fn` raised on any rank, every rank raises a `CheckpointingException` naming the
    failing ranks and their errors (the local exception is chained where it happened).
    """
    try:
        payload, error = local_fn(), None
    except Exception as e:  # travels to the other ranks, re-raised below
        payload, error = None, e
    if not is_distributed():
        if error is not None:
            if isinstance(error, CheckpointingException):
                raise error
            raise CheckpointingException(f"{what} failed: {describe_error(error)}") from error
        return [payload]
    gathered: List[Any] = [None] * get_world_size(group)
    dist.all_gather_object(gathered, (payload, describe_error(error)), group=group)
    failures = [(rank, msg) for rank, (_, msg) in enumerate(gathered) if msg is not None]
    if failures:
        raise CheckpointingException(_summarize(what, failures)) from error
    return [p for p, _ in gathered]


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


def wire_device(tensor: torch.Tensor, group=None) -> torch.device:
    """Where `tensor` must be to travel between ranks: CPU for gloo (also the CPU half of a
    'cpu:gloo,cuda:nccl' group); its own (CUDA) device for an NCCL-only group."""
    if str(dist.get_backend(group)) == "nccl":
        return tensor.device
    return torch.device("cpu")


Transfer = Tuple[torch.Tensor, int, int]  # (tensor, peer rank, tag)


def send_and_receive(sends: Sequence[Transfer], receives: Sequence[Transfer], group=None) -> None:
    """Posts every send and receive of this rank at once, then waits for all of them.

    Tensors may live on any device: each travels on its `wire_device` (copied there, and for a
    receive copied back, only where the devices differ). Receive targets must be contiguous.
    Both sides must list the transfers between a pair of ranks in the same order (NCCL matches
    by order, gloo by tag). Only valid input may reach this point: a rank that raised before
    posting its sends would leave its peers waiting (until the process group's timeout).
    """
    copies_back = []

    def on_wire(tensor: torch.Tensor, receive: bool) -> torch.Tensor:
        device = wire_device(tensor, group)
        if tensor.device == device:
            return tensor.reshape(-1)
        if not receive:
            return tensor.to(device).reshape(-1)
        buffer = torch.empty(tensor.numel(), dtype=tensor.dtype, device=device)
        copies_back.append((tensor, buffer))
        return buffer

    # as bytes, so that every dtype travels (gloo has no bool or bfloat16 send)
    ops = [dist.P2POp(dist.isend, on_wire(t, False).view(torch.uint8), peer, group, tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, on_wire(t, True).view(torch.uint8), peer, group, tag) for t, peer, tag in receives]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for target, buffer in copies_back:
        target.copy_(buffer.view(target.shape))

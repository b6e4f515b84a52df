"""Reading stored chunks straight into the tensors a load fills.

Both formats store a chunk (a Zarr chunk file, the storage record of a DCP item) as the
C-ordered bytes of one box of one dtype, and a load needs parts of it in destination tensors.
Where one destination view is the whole chunk, contiguous and in host memory, the bytes are
read into it: one read, no copy. Otherwise they pass through a bounded scratch buffer, a block
of leading-axis rows at a time (pinned when a destination is on a GPU, so the copy to it is a
DMA and the state is never held twice in host memory). Checksums are computed on the bytes as
they land.
"""

import math
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..core import CheckpointingException
from ..integrity import crc32c
from ..storage_interface import Reader

SCRATCH_BYTES = 16 * 2**20  # per reading thread


@dataclass(frozen=True)
class Piece:
    """Part `region` of a chunk (slices relative to the chunk's origin, inside it) is copied
    into `into`, a view of the same shape in a destination tensor."""

    region: Tuple[slice, ...]
    into: torch.Tensor


def piece_of(chunk_offset: Sequence[int], box: Tuple[Sequence[int], Sequence[int]], target: torch.Tensor,
             target_offset: Sequence[int]) -> Piece:
    """The Piece of a chunk (at `chunk_offset`) that fills global box `box` (offset, shape) of
    `target`, a tensor holding the box at `target_offset`."""
    offset, shape = box
    if tuple(offset) == tuple(target_offset) and tuple(shape) == tuple(target.shape):
        into = target  # the whole target (the common case): no view to build (~3 µs each)
    else:
        into = target[tuple(slice(o - t, o - t + s) for o, t, s in zip(offset, target_offset, shape))]
    return Piece(tuple(slice(o - c, o - c + s) for o, c, s in zip(offset, chunk_offset, shape)), into)


def host_bytes(tensor: torch.Tensor):
    """The bytes of a contiguous CPU tensor, writable in place."""
    flat = tensor.detach().reshape(-1)
    if flat.stride(0) != 1:  # one element (a contiguous tensor's length-1 axes may have any stride)
        flat = flat.as_strided(flat.shape, (1,))
    return flat.view(torch.uint8).numpy()


_scratch = threading.local()


def _scratch_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """This thread's reusable scratch buffer of at least `nbytes` (at most SCRATCH_BYTES are
    asked for). It grows only as needed: every page of it is a page fault, 10 ms per 16 MiB
    here, paid again by each load (its reading threads are new)."""
    name = "pinned" if pinned else "pageable"
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        setattr(_scratch, name, buffer)
    return buffer[:nbytes]


def read_chunk(file: Reader, offset: int, shape: Sequence[int], dtype: torch.dtype, pieces: List[Piece],
               crc: Optional[int]) -> Optional[int]:
    """Reads the chunk of `shape` and `dtype` stored at byte `offset` of `file` into its pieces.

    With `crc` (a running CRC-32C), every byte of the chunk is read and the CRC continued over
    them is returned; without it, only the rows the pieces need are read. The caller checked
    that the file holds the chunk; a shorter read means it changed meanwhile, and raises."""
    shape = tuple(shape)
    itemsize = dtype.itemsize
    nbytes = math.prod(shape) * itemsize
    if nbytes == 0:
        return crc
    if len(pieces) == 1 and _whole_and_direct(pieces[0], shape):
        into = host_bytes(pieces[0].into)
        _read_all(file, offset, into)
        return None if crc is None else crc32c(into, crc)
    rows = shape[0] if shape else 1
    row_bytes = nbytes // rows
    first, stop = 0, rows
    if crc is None and shape:
        first = min(p.region[0].start for p in pieces)
        stop = max(p.region[0].stop for p in pieces)
    block = max(1, SCRATCH_BYTES // row_bytes)
    pinned = any(p.into.device.type != "cpu" for p in pieces)
    for start in range(first, stop, block):
        n = min(block, stop - start)
        scratch = _scratch_buffer(n * row_bytes, pinned)
        _read_all(file, offset + start * row_bytes, scratch.numpy())
        if crc is not None:
            crc = crc32c(scratch.numpy(), crc)
        values = scratch.view(dtype).reshape((n,) + shape[1:])
        for piece in pieces:
            _copy_rows(piece, values, start, n)
    return crc


def _whole_and_direct(piece: Piece, shape: Tuple[int, ...]) -> bool:
    into = piece.into
    whole = all(s.start == 0 and s.stop == n for s, n in zip(piece.region, shape))
    return whole and into.device.type == "cpu" and into.is_contiguous()


def _copy_rows(piece: Piece, values: torch.Tensor, start: int, n: int) -> None:
    """Copies what rows [start, start + n) of the chunk (`values`) hold of `piece`."""
    if not piece.region:  # a 0-d chunk
        piece.into.detach().copy_(values)
        return
    rows = piece.region[0]
    lo, hi = max(rows.start, start), min(rows.stop, start + n)
    if lo >= hi:
        return
    source = values[(slice(lo - start, hi - start),) + piece.region[1:]]
    piece.into.detach()[lo - rows.start : hi - rows.start].copy_(source)


def _read_all(file: Reader, offset: int, buffer) -> None:
    wanted = memoryview(buffer).nbytes
    got = file.readinto(offset, buffer)
    if got != wanted:
        raise CheckpointingException(
            f"{file.path}: only {got} of {wanted} bytes could be read at byte {offset} (the file is "
            f"truncated or changed while loading); the checkpoint is damaged"
        )

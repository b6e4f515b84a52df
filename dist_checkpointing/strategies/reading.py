"""Reading stored chunks straight into the tensors a load fills.

Both formats store a chunk (a Zarr chunk file, the storage record of a DCP item) as the
C-ordered bytes of one box of one dtype, and a load needs parts of it in destination tensors.
Where one destination view is the whole chunk, contiguous and in host memory, the bytes are
read into it: one read, no copy. Otherwise they pass through a bounded scratch buffer, a block
of leading-axis rows at a time (pinned when a destination is on a GPU, so the copy to it is a
DMA and the state is never held twice in host memory). Checksums are computed on the bytes as
they land.
"""

import ctypes
import math
import threading
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..core import CheckpointingException
from ..dtypes import NUMPY_NATIVE
from ..integrity import crc32c
from ..storage_interface import Reader

SCRATCH_BYTES = 16 * 2**20  # per reading thread


class Piece(NamedTuple):
    """Part `region` of a chunk (slices relative to the chunk's origin, inside it) is copied
    into `into`, a view of the same shape in a destination (`destination`): the bytes of host
    memory, or a tensor on a device."""

    region: Tuple[slice, ...]
    into: Union[np.ndarray, torch.Tensor]


def destination(target: torch.Tensor) -> Union[np.ndarray, torch.Tensor]:
    """What pieces of `target` are views of: in host memory, its bytes as a numpy array of
    shape `target.shape + (itemsize,)` (any strides; numpy slices and copies them in a
    fraction of torch's per-call cost, which dominates for thousands of small chunks);
    elsewhere (a GPU, or a last axis that is not contiguous) the tensor itself."""
    if not target.is_cpu:
        return target.detach()
    values = target.detach() if target.requires_grad else target
    if values.dtype in NUMPY_NATIVE and values.dim() and values.is_contiguous():  # the common case, faster
        return values.numpy().view(np.uint8).reshape(values.shape + (values.element_size(),))
    if values.dim() and values.shape[-1] > 1 and values.stride(-1) != 1:
        return values
    if not values.dim():
        values = values.reshape(1)
    elif values.stride(-1) != 1:  # a length-1 last axis may have any stride
        values = values.as_strided(values.shape, values.stride()[:-1] + (1,))
    return values.view(torch.uint8).numpy().reshape(tuple(target.shape) + (target.element_size(),))


def _shape(into) -> Tuple[int, ...]:
    """The shape in elements of a piece's destination view."""
    return tuple(into.shape[:-1]) if isinstance(into, np.ndarray) else tuple(into.shape)


def piece_of(chunk_offset: Sequence[int], box: Tuple[Sequence[int], Sequence[int]], target,
             target_offset: Sequence[int]) -> Piece:
    """The Piece of a chunk (at `chunk_offset`) that fills global box `box` (offset, shape) of
    `target` (a `destination`, or a tensor), which holds the box at `target_offset`."""
    offset, shape = box
    if tuple(offset) == tuple(target_offset) and tuple(shape) == _shape(target):
        into = target  # the whole target (the common case): no view to build
    else:
        into = target[tuple(slice(o - t, o - t + s) for o, t, s in zip(offset, target_offset, shape))]
    return Piece(tuple(slice(o - c, o - c + s) for o, c, s in zip(offset, chunk_offset, shape)), into)


def host_tensor(tensor: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """`tensor`'s values in host memory (itself where they are there), without autograd, in
    `shape` (a stored chunk's: a flattened shard's, or one with prepended axes, differs)."""
    if tensor.requires_grad or not tensor.is_cpu:
        tensor = tensor.detach().to("cpu")
    return tensor if tensor.shape == shape else tensor.reshape(shape)


def host_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor, flat, writable in place."""
    if tensor.is_cpu and tensor.is_contiguous() and tensor.numel():  # the common case: no torch view
        memory = (ctypes.c_ubyte * tensor.nbytes).from_address(tensor.data_ptr())
        memory.tensor = tensor  # which owns the memory: it lives as long as the bytes
        return np.frombuffer(memory, np.uint8)
    return destination(tensor).reshape(-1)


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


def scratch_bytes(nbytes: int) -> np.ndarray:
    """This thread's scratch buffer (`_scratch_buffer`, host memory) as numpy bytes."""
    return _scratch_buffer(nbytes, False).numpy()


def whole_destination(pieces: List[Piece], shape: Sequence[int]) -> Optional[np.ndarray]:
    """The flat bytes of host memory a chunk of `shape` can be read into directly: where one
    piece is all of it and its destination is contiguous; else None."""
    if len(pieces) != 1:
        return None
    region, into = pieces[0]
    if not isinstance(into, np.ndarray) or not into.flags.c_contiguous:
        return None
    for axis, n in zip(region, shape):
        if axis.start != 0 or axis.stop != n:
            return None
    return into.reshape(-1)


def fill_pieces(pieces: List[Piece], chunk: np.ndarray, shape: Sequence[int], dtype: torch.dtype) -> None:
    """Copies the pieces out of a chunk of `shape` and `dtype` held in memory (`chunk`: its
    bytes, flat)."""
    into = whole_destination(pieces, shape)
    if into is not None:
        into[:] = chunk
        return
    _copy_block(pieces, chunk, tuple(shape), dtype, 0, shape[0] if shape else 1)


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
    into = whole_destination(pieces, shape)
    if into is not None:
        _read_all(file, offset, into)
        return None if crc is None else crc32c(into, crc)
    rows = shape[0] if shape else 1
    row_bytes = nbytes // rows
    first, stop = 0, rows
    if crc is None and shape:
        first = min(p.region[0].start for p in pieces)
        stop = max(p.region[0].stop for p in pieces)
    block = max(1, SCRATCH_BYTES // row_bytes)
    pinned = any(not isinstance(p.into, np.ndarray) and p.into.device.type != "cpu" for p in pieces)
    for start in range(first, stop, block):
        n = min(block, stop - start)
        scratch = _scratch_buffer(n * row_bytes, pinned)
        _read_all(file, offset + start * row_bytes, scratch.numpy())
        if crc is not None:
            crc = crc32c(scratch.numpy(), crc)
        _copy_block(pieces, scratch, shape, dtype, start, n)
    return crc


def _copy_block(pieces: List[Piece], block, shape: Tuple[int, ...], dtype: torch.dtype, start: int, n: int) -> None:
    """Copies what rows [start, start + n) of a chunk of `shape` (`block`: their bytes, flat,
    a numpy array or a uint8 tensor) hold of each piece."""
    rows_shape = (n,) + shape[1:]
    host = values = None
    for piece in pieces:
        if isinstance(piece.into, np.ndarray):
            if host is None:
                host = (block if isinstance(block, np.ndarray) else block.numpy()).reshape(rows_shape + (dtype.itemsize,))
            _copy_rows(piece, host, start, n, np.copyto)
        else:
            if values is None:
                values = (block if isinstance(block, torch.Tensor) else torch.from_numpy(block)).view(dtype).reshape(rows_shape)
            _copy_rows(piece, values, start, n, lambda into, source: into.detach().copy_(source))


def _copy_rows(piece: Piece, values, start: int, n: int, copy) -> None:
    """Copies what rows [start, start + n) of the chunk (`values`) hold of `piece`."""
    if not piece.region:  # a 0-d chunk
        copy(piece.into, values[0])
        return
    rows = piece.region[0]
    if start == 0 and rows.stop <= n:  # all of the piece's rows are in this block (a small chunk's one block)
        copy(piece.into, values[piece.region])
        return
    lo, hi = max(rows.start, start), min(rows.stop, start + n)
    if lo >= hi:
        return
    source = values[(slice(lo - start, hi - start),) + piece.region[1:]]
    copy(piece.into[lo - rows.start : hi - rows.start], source)


def _read_all(file: Reader, offset: int, buffer) -> None:
    wanted = memoryview(buffer).nbytes
    got = file.readinto(offset, buffer)
    if got != wanted:
        raise CheckpointingException(
            f"{file.path}: only {got} of {wanted} bytes could be read at byte {offset} (the file is "
            f"truncated or changed while loading); the checkpoint is damaged"
        )

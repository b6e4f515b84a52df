"""Boxes in a global tensor: (offset, shape) rectangles, their intersections, and exact cover.

The one place for this arithmetic: save validation (every element held by exactly one main
replica), load requests (inside the stored tensor), and the chunks a checkpoint lists (they
must tile the stored tensor) all use it.
"""

import functools
import itertools
from typing import Optional, Sequence, Tuple

import numpy as np

Box = Tuple[Tuple[int, ...], Tuple[int, ...]]  # (global offset, shape)
Region = Tuple[Tuple[int, int], ...]  # (start, stop) along each axis


def inside(box: Box, shape: Sequence[int]) -> bool:
    """Whether `box` lies within a tensor of `shape` (same number of axes)."""
    offset, extent = box
    if len(offset) != len(shape):
        return False
    for o, s, g in zip(offset, extent, shape):  # (a loop: a generator costs more than these few axes)
        if o < 0 or o + s > g:
            return False
    return True


def intersection(a: Box, b: Box) -> Optional[Region]:
    """The region `a` and `b` share, or None if they share no element."""
    region = tuple(
        (max(ao, bo), min(ao + asz, bo + bsz)) for ao, asz, bo, bsz in zip(a[0], a[1], b[0], b[1])
    )
    return None if any(stop <= start for start, stop in region) else region


# (which chunk, the overlap as slices of the chunk, as slices of the target or None for all of it)
Overlap = Tuple[object, Tuple[slice, ...], Optional[Tuple[slice, ...]]]


@functools.lru_cache(maxsize=2**12)
def grid_overlaps(offset: Tuple[int, ...], shape: Tuple[int, ...], stored_shape: Tuple[int, ...],
                  chunks: Tuple[int, ...]) -> Tuple[Overlap, ...]:
    """Where a target holding box (offset, shape) of a tensor of `stored_shape`, stored in a
    regular grid of `chunks`, overlaps each chunk (named by its grid position); the part of
    the box beyond the stored shape overlaps none. Cached: the requests of a model's many
    tensors share a few geometries."""
    stop = tuple(min(o + n, g) for o, n, g in zip(offset, shape, stored_shape))
    positions = itertools.product(*(range(o // c, -(-e // c)) for o, e, c in zip(offset, stop, chunks)))
    boxes = [(tuple(i * c for i, c in zip(index, chunks)), chunks, index) for index in positions]
    return _overlaps((offset, shape), stop, boxes)


@functools.lru_cache(maxsize=2**12)
def box_overlaps(offset: Tuple[int, ...], shape: Tuple[int, ...], boxes: Tuple[Box, ...]) -> Tuple[Overlap, ...]:
    """`grid_overlaps` for chunks listed as boxes (named by their number in `boxes`), which lie
    inside the stored tensor."""
    stop = tuple(o + n for o, n in zip(offset, shape))
    return _overlaps((offset, shape), stop, [(o, n, i) for i, (o, n) in enumerate(boxes)])


def _overlaps(target: Box, stop: Tuple[int, ...], boxes) -> Tuple[Overlap, ...]:
    offset, shape = target
    found = []
    for origin, extent, name in boxes:
        lo = tuple(max(o, c) for o, c in zip(offset, origin))
        hi = tuple(min(e, c + n) for e, c, n in zip(stop, origin, extent))
        if any(h <= low for low, h in zip(lo, hi)):
            continue
        in_chunk = tuple(slice(low - c, h - c) for low, h, c in zip(lo, hi, origin))
        whole = lo == tuple(offset) and tuple(h - low for low, h in zip(lo, hi)) == tuple(shape)
        in_target = None if whole else tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, offset))
        found.append((name, in_chunk, in_target))
    return tuple(found)


def volume(region: Region) -> int:
    """The elements of `region` (0 if it is empty along an axis)."""
    n = 1
    for start, stop in region:
        n *= max(0, stop - start)
    return n


def flat_tiling_fault(ranges: Sequence[Tuple[int, int]], numel: int) -> Optional[Tuple[Optional[int], int]]:
    """Where flat ranges [start, stop), sorted, fail to tile [0, numel) exactly once: None if
    they do; (i, position) if range i does not start at `position`, where the ranges before
    it end (a gap if it starts later, an overlap if earlier); (None, position) if they all
    follow each other but end at `position`, not at `numel`."""
    position = 0
    for i, (start, stop) in enumerate(ranges):
        if start != position:
            return i, position
        position = stop
    return None if position == numel else (None, position)


def contains(box: Box, region: Region) -> bool:
    return all(o <= start and stop <= o + s for o, s, (start, stop) in zip(box[0], box[1], region))


def _slabs_tile(shape: Sequence[int], boxes: Sequence[Tuple[Box, int]]) -> bool:
    """Whether `boxes`, each counted once and all spanning the whole tensor except along one
    axis, follow each other along it from 0 to its end without gap or overlap."""
    if any(n != 1 for _, n in boxes):
        return False
    split = {axis for (offset, extent), _ in boxes for axis, (o, e, g) in enumerate(zip(offset, extent, shape)) if (o, e) != (0, g)}
    if not split:
        return len(boxes) == 1
    if len(split) > 1:
        return False
    (axis,) = split
    end = 0
    for offset, extent in sorted((box for box, _ in boxes), key=lambda box: box[0][axis]):
        if offset[axis] != end:
            return False
        end += extent[axis]
    return end == shape[axis]


def cover_fault(shape: Sequence[int], boxes: Sequence[Tuple[Box, int]]) -> Optional[Tuple[Region, int]]:
    """The first region of a tensor of `shape` that `boxes` (each counted the given number of
    times; all inside `shape`) do not cover exactly once, with how often it is covered; None if
    they tile the tensor exactly.

    The boundaries of all boxes along each axis cut the tensor into cells (one per box for a
    regular grid); counting boxes per cell checks any layout in O(cells + boxes).
    """
    if any(s == 0 for s in shape):
        return None
    if _slabs_tile(shape, boxes):
        return None  # the common cases, a key stored whole or split along one axis: no grid needed
    cuts = []
    for axis, size in enumerate(shape):
        points = {0, size}
        for (offset, extent), _ in boxes:
            points.update((offset[axis], offset[axis] + extent[axis]))
        cuts.append(np.array(sorted(points)))
    counts = np.zeros([len(c) - 1 for c in cuts], dtype=np.int64)
    for (offset, extent), n in boxes:
        if any(s == 0 for s in extent):
            continue
        index = tuple(
            slice(np.searchsorted(c, o), np.searchsorted(c, o + s)) for c, o, s in zip(cuts, offset, extent)
        )
        counts[index] += n
    bad = np.argwhere(counts != 1)
    if not len(bad):
        return None
    cell = bad[0]
    region = tuple((int(c[i]), int(c[i + 1])) for c, i in zip(cuts, cell))
    return region, int(counts[tuple(cell)])


@functools.lru_cache(maxsize=2**12)
def tiling_fault(shape: Tuple[int, ...], boxes: Tuple[Box, ...]) -> Optional[Tuple[Region, int]]:
    """`cover_fault` of `boxes` counted once each (the chunks a checkpoint lists for a tensor).
    Cached: a model's many tensors are stored in few distinct layouts."""
    return cover_fault(shape, [(box, 1) for box in boxes])

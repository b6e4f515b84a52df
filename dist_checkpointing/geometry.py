"""Boxes in a global tensor: (offset, shape) rectangles, their intersections, and exact cover.

The one place for this arithmetic: save validation (every element held by exactly one main
replica), load requests (inside the stored tensor), and the chunks a checkpoint lists (they
must tile the stored tensor) all use it.
"""

from typing import Optional, Sequence, Tuple

import numpy as np

Box = Tuple[Tuple[int, ...], Tuple[int, ...]]  # (global offset, shape)
Region = Tuple[Tuple[int, int], ...]  # (start, stop) along each axis


def inside(box: Box, shape: Sequence[int]) -> bool:
    """Whether `box` lies within a tensor of `shape` (same number of axes)."""
    offset, extent = box
    return len(offset) == len(shape) and all(0 <= o and o + s <= g for o, s, g in zip(offset, extent, shape))


def intersection(a: Box, b: Box) -> Optional[Region]:
    """The region `a` and `b` share, or None if they share no element."""
    region = tuple(
        (max(ao, bo), min(ao + asz, bo + bsz)) for ao, asz, bo, bsz in zip(a[0], a[1], b[0], b[1])
    )
    return None if any(stop <= start for start, stop in region) else region


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

"""Randomized resharding: random global shapes (with length-1 axes), saved as one random grid of
boxes and loaded as another (single-row and single-element boxes included), with every dtype
and engine, flattened pieces on either side, and destinations of every kind the caller may
pass (fresh tensors, `zeros_like` of chunked views, strided views, meta tensors). Every loaded
value must equal the global tensor's. One process holds every box, so each case is quick.

This class of bug once failed every engine: a (1, 16) tensor requested as two (1, 8) halves,
read into `zeros_like` of a chunked view, whose length-1 axis has a non-dense stride.
"""

import itertools
import math
import random

import pytest
import torch

import dist_checkpointing as dc
from dist_checkpointing.dtypes import DTYPES
from dist_checkpointing.mapping import ShardedTensor

ENGINES = [("zarr", {}), ("zarr", {"zarr_format": 2}), ("tensorstore", {}), ("torch_dist", {})]
CASES_PER_ENGINE = 24


def _global_tensor(shape, dtype, rng):
    values = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) * rng.choice([1, -1]) + rng.randint(0, 50)
    if dtype == torch.bool:
        return values.remainder(3) == 0
    if dtype == torch.uint8:
        return values.abs().remainder(256).to(dtype)
    if dtype == torch.int8:
        return values.remainder(256).sub(128).to(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        return (values / 8).to(dtype)
    return values.to(dtype)


def _grid(shape, rng):
    """Fragments per axis: a divisor of each axis length (single rows likely)."""
    return [rng.choice([d for d in range(1, n + 1) if n % d == 0]) for n in shape]


def _boxes(shape, grid):
    sizes = [n // f for n, f in zip(shape, grid)]
    for cell in itertools.product(*(range(f) for f in grid)):
        yield tuple(c * s for c, s in zip(cell, sizes)), tuple(sizes)


def _flat_ranges(numel, rng):
    """A random tiling of range(numel) into 1..3 pieces (a distributed optimizer's DP ranks)."""
    cuts = sorted(rng.sample(range(1, numel), min(rng.randint(0, 2), numel - 1))) if numel > 1 else []
    bounds = [0, *cuts, numel]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _sharded(key, values, offset, size, grid, prepend):
    """The ShardedTensor of box (offset, size) of `values` (the global tensor); the first
    `prepend` axes, of length 1 in the box, become prepended axes."""
    local = values[tuple(slice(o, o + s) for o, s in zip(offset, size))]
    local = local.reshape(size[prepend:])
    return ShardedTensor(key, local, local.dtype, tuple(local.shape), tuple(values.shape), offset, tuple(grid), 0, prepend)


def _destination(size, dtype, kind, rng):
    """An empty-looking destination of shape `size` of one of the kinds callers pass."""
    if kind == "fresh":
        return torch.zeros(size, dtype=dtype)
    if kind == "zeros_like_of_view":  # a length-1 axis keeps the parent's stride
        wider = list(size)
        wider[-1] *= 2
        return torch.zeros_like(torch.zeros(wider, dtype=dtype)[..., : size[-1]])
    if kind == "strided_view":
        wider = list(size)
        wider[0] *= 2
        return torch.zeros(wider, dtype=dtype)[: size[0]] if rng.random() < 0.5 else torch.zeros(wider, dtype=dtype)[::2]
    return torch.empty(size, dtype=dtype, device="meta")


def _one_case(tmp_path, engine, options, seed):
    rng = random.Random(seed)
    dtype = rng.choice([t for t, _, _ in DTYPES.values()])
    ndim = rng.randint(1, 3)
    shape = tuple(rng.choice([1, 1, 2, 3, 4, 6, 8]) for _ in range(ndim))
    values = _global_tensor(shape, dtype, rng)
    save_grid, load_grid = _grid(shape, rng), _grid(shape, rng)
    flat_save = rng.random() < 0.3
    box_size = [n // f for n, f in zip(shape, save_grid)]
    leading_ones = next((axis for axis, size in enumerate(box_size) if size != 1), ndim)
    prepend = rng.randint(0, min(leading_ones, ndim - 1))  # leading axes of length 1 may be prepended

    saved = []
    for offset, size in _boxes(shape, save_grid):
        sh = _sharded("t", values, offset, size, save_grid, prepend)
        if flat_save and sh.data.numel():
            whole = sh.data.reshape(-1)
            for r in _flat_ranges(whole.numel(), rng):
                saved.append(ShardedTensor.from_rank_offsets_flat(
                    "t", whole[r].clone(), sh.local_shape,
                    *[(axis, o // s, f) for axis, (o, s, f)
                      in enumerate(zip(sh.global_offset, (1,) * sh.prepend_axis_num + sh.local_shape, save_grid))],
                    prepend_axis_num=sh.prepend_axis_num, flattened_range=r,
                ))
        else:
            saved.append(sh)
    ckpt = str(tmp_path / f"{engine}-{seed}")
    dc.save({"t": saved}, ckpt, sharded_strategy={"backend": engine, **options})

    requests, expected = [], []
    flat_load = rng.random() < 0.3
    for offset, size in _boxes(shape, load_grid):
        box = values[tuple(slice(o, o + s) for o, s in zip(offset, size))]
        kind = rng.choice(["fresh", "zeros_like_of_view", "strided_view", "meta"])
        if flat_load and box.numel():
            for r in _flat_ranges(box.numel(), rng):
                flat = torch.zeros(r.stop - r.start, dtype=dtype)
                grid_offsets = [(axis, o // s, f) for axis, (o, s, f) in enumerate(zip(offset, size, load_grid))]
                requests.append(ShardedTensor.from_rank_offsets_flat("t", flat, size, *grid_offsets, flattened_range=r))
                expected.append(box.reshape(-1)[r])
        else:
            destination = _destination(size, dtype, kind, rng)
            requests.append(ShardedTensor("t", destination, dtype, size, shape, offset, tuple(load_grid)))
            expected.append(box)
    loaded = dc.load({"t": requests}, ckpt, validate_access_integrity=False)["t"]
    for got, want, request in zip(loaded, expected, requests):
        assert got.dtype == dtype and tuple(got.shape) == tuple(want.shape), (seed, request)
        assert torch.equal(got, want), (engine, options, seed, shape, save_grid, load_grid, request)
        if request.load_destination() is not None:
            assert got is request.data  # filled in place
    return shape, save_grid, load_grid


@pytest.mark.parametrize("engine,options", ENGINES, ids=["zarr", "zarr-v2", "tensorstore", "torch_dist"])
def test_random_resharding(tmp_path, engine, options):
    seen = [_one_case(tmp_path, engine, options, seed) for seed in range(CASES_PER_ENGINE)]
    # the cases cover what broke: a length-1 axis split on another axis, single-row boxes
    assert any(1 in shape and max(load) > 1 for shape, _, load in seen)
    assert any(any(n // f == 1 for n, f in zip(shape, load)) for shape, _, load in seen)


@pytest.mark.parametrize("engine", ["zarr", "tensorstore", "torch_dist"])
def test_issue_examples(tmp_path, engine):
    """The three reported cases, each into `zeros_like` of a chunked view."""
    for name, shape, save_rows, load_grid in (
        ("position_ids", (1, 16), 1, (1, 2)),
        ("square", (12, 12), 12, (12, 3)),
        ("small", (2, 4), 1, (2, 2)),
    ):
        values = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
        saved = [_sharded(name, values, o, s, (save_rows, 1), 0) for o, s in _boxes(shape, (save_rows, 1))]
        ckpt = str(tmp_path / f"{engine}-{name}")
        dc.save({name: saved}, ckpt, sharded_strategy=engine)
        requests = []
        for offset, size in _boxes(shape, load_grid):
            destination = _destination(size, torch.float32, "zeros_like_of_view", random.Random(0))
            requests.append(ShardedTensor(name, destination, torch.float32, size, shape, offset, load_grid))
        loaded = dc.load({name: requests}, ckpt, validate_access_integrity=False)[name]
        for (offset, size), got in zip(_boxes(shape, load_grid), loaded):
            assert torch.equal(got, values[tuple(slice(o, o + s) for o, s in zip(offset, size))]), (engine, name, offset)

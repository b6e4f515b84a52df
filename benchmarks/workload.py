"""The benchmarks' GPT-like state: per layer qkv (3h x h), proj (h x h), fc1 (4h x h) and fc2
(h x 4h), plus an embedding (V x h), split over TP as Megatron splits them."""

import torch

from dist_checkpointing import ShardedTensor

ENGINES = ["zarr", "tensorstore", "torch_dist"]
HIDDEN, VOCAB = 1024, 32768


def gpt_shapes(mb: int, itemsize: int = 2):
    """key -> (global shape, TP axis); layers are added until the state reaches `mb` MiB."""
    h = HIDDEN
    shapes = {"embedding.weight": ((VOCAB, h), 0)}
    per_layer = {"qkv": ((3 * h, h), 0), "proj": ((h, h), 1), "fc1": ((4 * h, h), 0), "fc2": ((h, 4 * h), 1)}
    layers = max(1, (mb * 2**20 // itemsize - VOCAB * h) // (12 * h * h))
    for layer in range(layers):
        shapes.update({f"layers.{layer}.{name}.weight": spec for name, spec in per_layer.items()})
    return shapes


def local_shape(shape, axis: int, tp: int):
    local = list(shape)
    local[axis] //= tp
    return local


def gpt_state(rank: int, tp: int, mb: int, with_data: bool = True, adam: bool = False):
    """The bf16 state of `rank` at TP=`tp`; with `adam`, also fp32 master weights and Adam
    moments (the optimizer's state, 6x the weights' bytes)."""
    state = {}
    for key, (shape, axis) in gpt_shapes(mb).items():
        names = [(key, torch.bfloat16)]
        if adam:
            names += [(f"optimizer.{kind}.{key}", torch.float32) for kind in ("fp32_param", "exp_avg", "exp_avg_sq")]
        for name, dtype in names:
            make = torch.randn if with_data else torch.empty
            data = make(local_shape(shape, axis, tp), dtype=dtype)
            state[name] = ShardedTensor.from_rank_offsets(name, data, (axis, rank % tp, tp))
    return state

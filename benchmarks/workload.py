"""The benchmarks' GPT-like state: per layer qkv (3h x h), proj (h x h), fc1 (4h x h) and fc2
(h x 4h), plus an embedding (V x h), split over TP as Megatron splits them."""

import torch

from dist_checkpointing import ShardedTensor

ENGINES = ["zarr", "tensorstore", "torch_dist"]
HIDDEN, VOCAB = 1024, 32768


def gpt_shapes(mb: int, itemsize: int = 2, hidden: int = HIDDEN, vocab: int = VOCAB, layers: int = None,
               norms: bool = False):
    """key -> (global shape, TP axis or None for a TP-replicated tensor); layers are added until
    the state reaches `mb` MiB unless `layers` says how many; `norms` adds a layer norm each."""
    h = hidden
    shapes = {"embedding.weight": ((vocab, h), 0)}
    per_layer = {"qkv": ((3 * h, h), 0), "proj": ((h, h), 1), "fc1": ((4 * h, h), 0), "fc2": ((h, 4 * h), 1)}
    if norms:
        per_layer["norm"] = ((h,), None)
    if layers is None:
        layers = max(1, (mb * 2**20 // itemsize - vocab * h) // (12 * h * h))
    for layer in range(layers):
        shapes.update({f"layers.{layer}.{name}.weight": spec for name, spec in per_layer.items()})
    return shapes


def local_shape(shape, axis, tp: int):
    local = list(shape)
    if axis is not None:
        local[axis] //= tp
    return local


def gpt_state(rank: int, tp: int, mb: int, with_data: bool = True, adam: bool = False, **model):
    """The bf16 state of `rank` at TP=`tp` (`model`: gpt_shapes' keywords); with `adam`, also
    fp32 master weights and Adam moments (the optimizer's state, 6x the weights' bytes)."""
    state = {}
    for key, (shape, axis) in gpt_shapes(mb, **model).items():
        names = [(key, torch.bfloat16)]
        if adam:
            names += [(f"optimizer.{kind}.{key}", torch.float32) for kind in ("fp32_param", "exp_avg", "exp_avg_sq")]
        for name, dtype in names:
            make = torch.randn if with_data else torch.empty
            data = make(local_shape(shape, axis, tp), dtype=dtype)
            if axis is None:
                state[name] = ShardedTensor.from_rank_offsets(name, data, replica_id=rank % tp)
            else:
                state[name] = ShardedTensor.from_rank_offsets(name, data, (axis, rank % tp, tp))
    return state

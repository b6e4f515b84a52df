"""A Megatron-like sharded state dict whose values follow a rule, for any TP x DP layout.

rule: full = (arange(numel).reshape(global_shape) % 251 + crc32(key) % 13).to(dtype), the rule
of the Megatron-written fixtures, so every loaded value can be checked bit-exactly.
"""

import zlib

import torch

import dist_checkpointing as dc
from dist_checkpointing import ShardedObject, ShardedTensor
from dist_checkpointing.strategies.config import StrategyConfig

DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]
LAYERS = 2


def full(key, shape, dtype):
    numel = 1
    for s in shape:
        numel *= s
    values = torch.arange(numel, dtype=torch.int64).reshape(shape) % 251 + zlib.crc32(key.encode()) % 13
    if dtype == torch.bool:
        return (values % 2).bool()
    return values.to(dtype)


def dtype_key(dtype):
    return f"dtypes.{str(dtype).split('.')[-1]}"


def sharded_state_dict(rank, tp, dp=1, with_data=True, objects=True):
    """The state of `rank` in a TP x DP layout (rank = dp_rank * tp + tp_rank)."""
    tp_rank, dp_rank = rank % tp, rank // tp

    def piece(key, gshape, dtype, axis):
        """Shard `axis` of the global tensor over TP; replicated over DP."""
        size = gshape[axis] // tp
        data = full(key, gshape, dtype).narrow(axis, tp_rank * size, size).clone()
        if not with_data:
            data = torch.empty_like(data)
        return ShardedTensor.from_rank_offsets(key, data, (axis, tp_rank, tp), replica_id=dp_rank)

    def stacked(key, gshape, dtype, axis):
        """One ShardedTensor per layer, like Megatron's stacked layers (prepend_axis_num=1)."""
        result = []
        for layer in range(gshape[0]):
            size = gshape[axis] // tp
            data = full(key, gshape, dtype)[layer].narrow(axis - 1, tp_rank * size, size).clone()
            if not with_data:
                data = torch.empty_like(data)
            result.append(
                ShardedTensor.from_rank_offsets(
                    key,
                    data,
                    (0, layer, gshape[0]),
                    (axis, tp_rank, tp),
                    replica_id=dp_rank,
                    prepend_axis_num=1,
                )
            )
        return result

    norm = full("final_norm", (16,), torch.float32)
    state = {
        "embedding": piece("embedding.weight", (64, 16), torch.bfloat16, 0),
        "layers": {
            "qkv": stacked("layers.qkv.weight", (LAYERS, 48, 16), torch.float32, 1),
            "fc2": stacked("layers.fc2.weight", (LAYERS, 16, 64), torch.float16, 2),
        },
        "final_norm": ShardedTensor.from_rank_offsets(
            "final_norm", norm if with_data else torch.empty_like(norm), replica_id=rank
        ),
        "dtypes": [piece(dtype_key(dt), (8, 12), dt, 1) for dt in DTYPES],
        "iteration": 7,
    }
    if objects:
        state["rng"] = ShardedObject(
            "rng_state", {"seed": 1000 + tp_rank} if with_data else None, (tp,), (tp_rank,), replica_id=dp_rank
        )
    return state


def load_tp1(ckpt, **kwargs):
    """Loads the whole state (without objects) in one process, as TP=1 asks for it."""
    return dc.load(sharded_state_dict(0, 1, with_data=False, objects=False), ckpt, **kwargs)


def check_loaded(loaded, rank, tp, dp=1):
    """Asserts every tensor in `loaded` equals the rule for this rank's layout."""
    expected = sharded_state_dict(rank, tp, dp, objects=False)
    compared = 0

    def compare(exp, got, where):
        nonlocal compared
        if isinstance(exp, dict):
            for k in exp:
                compare(exp[k], got[k], f"{where}.{k}")
        elif isinstance(exp, list):
            assert len(exp) == len(got), where
            for i, (e, g) in enumerate(zip(exp, got)):
                compare(e, g, f"{where}[{i}]")
        elif isinstance(exp, ShardedTensor):
            assert isinstance(got, torch.Tensor), f"{where}: {type(got)}"
            assert got.dtype == exp.dtype and got.shape == exp.data.shape, where
            assert torch.equal(got, exp.data), f"{where} differs"
            compared += 1
        else:
            assert exp == got, where

    compare(expected, loaded, "state")
    return compared


# Distributed-optimizer state: name -> (global shape, TP axis or None, dtype). Stacked layers use
# a prepended axis, as Megatron's do.
FLAT_KEYS = {
    "optimizer.state.exp_avg.embedding.weight": ((64, 16), 0, torch.float32),
    "optimizer.state.exp_avg.layers.qkv.weight": ((LAYERS, 48, 16), 1, torch.float32),
    "optimizer.state.exp_avg.final_norm": ((16,), None, torch.float32),
    "optimizer.state.fp32_param.layers.fc2.weight": ((LAYERS, 16, 64), 2, torch.bfloat16),
    "optimizer.state.step_counts": ((6, 5), None, torch.int64),
}


def flat_key_shards(tp_rank, tp):
    """The TP shards of FLAT_KEYS held by `tp_rank`: (key, local values, rank offsets,
    prepend_axis_num, replica_id), one per stacked layer."""
    shards = []
    for key, (gshape, axis, dtype) in FLAT_KEYS.items():
        values = full(key, gshape, dtype)
        prepend = 1 if len(gshape) == 3 else 0
        for layer in range(gshape[0]) if prepend else [None]:
            local = values if layer is None else values[layer]
            offsets = [] if layer is None else [(0, layer, gshape[0])]
            if axis is not None:
                size = gshape[axis] // tp
                local = local.narrow(axis - prepend, tp_rank * size, size)
                offsets.append((axis, tp_rank, tp))
            shards.append((key, local, offsets, prepend, tp_rank if axis is None else 0))  # TP-replicated
    return shards


def flat_state_dict(rank, tp, dp, with_data=True):
    """A distributed optimizer's view (rank = dp_rank * tp + tp_rank): the TP shards of all keys
    are laid end to end in one buffer, and DP rank d holds the d-th of `dp` contiguous ranges
    of that buffer. So most shards are split at arbitrary elements, some held whole by one rank,
    and each rank gets the flat ShardedTensors of the parts it holds."""
    tp_rank, dp_rank = rank % tp, rank // tp
    shards = flat_key_shards(tp_rank, tp)
    total = sum(local.numel() for _, local, _, _, _ in shards)
    lo, hi = total * dp_rank // dp, total * (dp_rank + 1) // dp
    result, position = [], 0
    for key, local, offsets, prepend, replica_id in shards:
        start, stop = max(lo - position, 0), min(hi - position, local.numel())
        position += local.numel()
        if start >= stop:
            continue
        data = local.reshape(-1)[start:stop].clone()
        if not with_data:
            data = torch.zeros_like(data)
        result.append(
            ShardedTensor.from_rank_offsets_flat(
                key, data, tuple(local.shape), *offsets,
                flattened_range=slice(start, stop), prepend_axis_num=prepend, replica_id=replica_id,
            )
        )
    return result


def expected_flat(sh):
    """What a flat request `sh` must load: the rule's values of its range."""
    gshape = FLAT_KEYS[sh.key][0]
    values = full(sh.key, gshape, sh.dtype)[sh.global_slice()]
    return values.reshape(-1)[sh.flattened_range]


# The checkpoints of the `tp2_checkpoints` fixture (conftest.py), by name: what each is saved with
TP2_SAVES = {"zarr": "zarr", "tensorstore": "tensorstore", "torch_dist": "torch_dist",
             "zarr_v2": StrategyConfig(zarr_format=2), "zstd": StrategyConfig(compression="zstd")}


def save_tp2_checkpoints(rank, world_size, root):
    for name, strategy in TP2_SAVES.items():
        dc.save(sharded_state_dict(rank, 2), f"{root}/{name}", strategy)

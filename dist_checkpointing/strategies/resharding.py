"""Megatron-Core's n-d reformulation of flattened tensors, as a transformation of a request.

Megatron-Core stores a key with flattened shards (a distributed optimizer's state) in the
torch_dist format as its "n-d formulation": global shape [X, Y, Z] split into local shards
[x, y, z] becomes [X/x, Y/y, Z/z, x*y*z], each flat range a range of the last axis. The
torch_dist engine reads any request from that layout directly (strategies/torch.py); these
functions, Megatron-Core's, turn a load request whose sharding differs from the stored one
into requests for whole stored shards (`apply_nd_flattened_tensors_reformulation`), which any
load reads, and merge what was loaded back into the requested flat ranges
(`restore_nd_flattened_tensors_formulation`).
"""

import itertools
import math
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch

from ..core import CheckpointingException
from ..dict_utils import dict_list_map_inplace, extract_matching_values
from ..geometry import intersection
from ..mapping import ShardedStateDict, ShardedTensor, ShardedTensorFactory, StateDict, apply_factories, apply_factory_merges


@dataclass(frozen=True)
class TensorReformulationMetadata:
    """A key's global shape as the application saved it, and as stored (n-d formulation)."""

    ckpt_orig_global_shape: Tuple[int, ...]
    ckpt_reform_global_shape: Tuple[int, ...]

    def __post_init__(self):
        if not self.ckpt_orig_global_shape:
            raise CheckpointingException("A reformulated tensor needs its original global shape")


def is_nd_flattened_tensor(sh_ten: Any) -> bool:
    """Whether `sh_ten` is a flattened ShardedTensor (stored in the n-d formulation)."""
    return isinstance(sh_ten, ShardedTensor) and sh_ten.flattened_range is not None


def nd_flattened_tensor_reformulated_global_shape(sh_ten: ShardedTensor) -> Tuple[int, ...]:
    """The n-d formulation of a flattened shard's global shape: its grid, then the elements of
    one local shard."""
    if not is_nd_flattened_tensor(sh_ten) or sh_ten.axis_fragmentations is None:
        raise CheckpointingException(f"'{sh_ten.key}' is not a flattened shard on a regular grid: {sh_ten}")
    return sh_ten.axis_fragmentations + (math.prod(sh_ten.local_shape),)


def apply_nd_flattened_tensors_reformulation(
    sharded_state_dict: ShardedStateDict, reformulation_metadata: Dict[str, TensorReformulationMetadata]
) -> Tuple[ShardedStateDict, ShardedStateDict]:
    """Each flattened request of a key whose stored shards differ from its own becomes a dict
    `{(global offset, stored local shape): ShardedTensor of that whole stored shard}` of the
    stored shards its local shard overlaps, in place. Returns the request and what
    `restore_nd_flattened_tensors_formulation` needs to merge the loaded values back.

    `reformulation_metadata`: per key, from `torch.get_reformulation_metadata`; a 1-D key
    without an entry (saved before the n-d formulation existed) is left as it is."""

    def reformulate(sh):
        if not is_nd_flattened_tensor(sh):
            return sh
        metadata = reformulation_metadata.get(sh.key)
        if metadata is None:
            if len(sh.global_shape) == 1:
                return sh
            raise CheckpointingException(
                f"Missing reformulation metadata for the flattened tensor '{sh.key}' (known keys: "
                f"{sorted(reformulation_metadata)})"
            )
        if tuple(metadata.ckpt_reform_global_shape) == nd_flattened_tensor_reformulated_global_shape(sh):
            return sh
        return _reformulated(sh.without_data(), metadata)

    dict_list_map_inplace(reformulate, sharded_state_dict)
    factories, _ = extract_matching_values(sharded_state_dict, lambda x: isinstance(x, ShardedTensorFactory), return_lists_as_dicts=True)
    apply_factories(sharded_state_dict)
    dict_list_map_inplace(ShardedTensorFactory.without_data, factories)
    return sharded_state_dict, factories


def restore_nd_flattened_tensors_formulation(state_dict: StateDict, formulation_restore_metadata: ShardedStateDict) -> StateDict:
    """The loaded state dict with each reformulated request's values back in its flat range."""
    return apply_factory_merges(state_dict, formulation_restore_metadata)


def _reformulated(sh: ShardedTensor, metadata: TensorReformulationMetadata) -> ShardedTensorFactory:
    """A factory building the requests of the stored shards `sh` overlaps, and merging them."""
    grid = tuple(metadata.ckpt_reform_global_shape[:-1])
    original = tuple(metadata.ckpt_orig_global_shape)
    if len(grid) != len(original) or any(g % n for g, n in zip(original, grid)):
        raise CheckpointingException(
            f"'{sh.key}': stored shape {tuple(metadata.ckpt_reform_global_shape)} is no n-d "
            f"formulation of {original}"
        )
    stored_box = tuple(g // n for g, n in zip(original, grid))  # a stored shard, prepended axes included
    n = sh.prepend_axis_num
    stored_local = stored_box[n:]
    box = sh.global_box()
    cells = [range(o // s, -(-(o + e) // s)) for o, e, s in zip(box[0], box[1], stored_box)]
    requests = {}
    for cell in itertools.product(*cells):
        offset = tuple(c * s for c, s in zip(cell, stored_box))
        requests[(offset, stored_local)] = ShardedTensor(
            sh.key, None, sh.dtype, stored_local, original, offset, grid, sh.replica_id, n,
            sh.allow_shape_mismatch, flattened_range=slice(0, math.prod(stored_local)),
        )

    def merge(loaded: Dict[Tuple, torch.Tensor]) -> torch.Tensor:
        values = torch.empty(box[1], dtype=sh.dtype)  # the local shard, prepended axes included
        for (offset, local_shape), flat in loaded.items():
            region = intersection(box, (offset, (1,) * n + local_shape))
            if region is None:
                continue
            source = flat.reshape((1,) * n + local_shape)[tuple(slice(a - o, b - o) for (a, b), o in zip(region, offset))]
            values[tuple(slice(a - o, b - o) for (a, b), o in zip(region, box[0]))] = source
        return values.reshape(-1)[sh.flattened_range]

    return ShardedTensorFactory(sh.key, None, lambda *_: requests, merge, sh.replica_id, sh.flattened_range)

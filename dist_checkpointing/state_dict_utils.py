"""Splitting a sharded state dict into what each part of a save or load handles."""

import sys
from typing import Dict, Tuple, Union

from .dict_utils import dict_list_map_inplace, extract_matching_values
from .mapping import (
    CommonStateDict,
    LocalNonpersistentObject,
    ShardedBase,
    ShardedStateDict,
    ShardedTensorFactory,
    StateDict,
    apply_factories,
    apply_factory_merges,
)
from .utils import extract_nonpersistent, extract_sharded_base


def _copy_structure(x: Union[dict, list]) -> Union[dict, list]:
    """New dicts and lists, same leaves: so that applying factories leaves the caller's dict as is."""
    if isinstance(x, dict):
        return {k: _copy_structure(v) if isinstance(v, (dict, list)) else v for k, v in x.items()}
    return [_copy_structure(v) if isinstance(v, (dict, list)) else v for v in x]


def _replace_dtensors(state_dict: ShardedStateDict) -> Dict:
    """DTensor leaves replaced by ShardedTensors (dtensors.py); where they were. A program
    that has not imported `torch.distributed.tensor` has no DTensors (and does not pay its import)."""
    if "torch.distributed.tensor" not in sys.modules:
        return {}
    from .dtensors import replace_dtensors

    return replace_dtensors(state_dict)


def save_preprocess(sharded_state_dict: ShardedStateDict) -> Tuple[ShardedStateDict, CommonStateDict]:
    """(the shards to write, the common state dict for `common.pt`), in new containers: the
    caller's dict is left as it is.

    DTensors become ShardedTensors, factories are built, LocalNonpersistentObjects dropped;
    an empty dict or list stays in the common state, as in Megatron-Core's saves. One pass (a
    model's state dict holds 10^4-10^5 leaves).
    """
    # a program that has not imported `torch.distributed.tensor` has no DTensors
    dtensors = None
    if "torch.distributed.tensor" in sys.modules:
        from . import dtensors
    return _saved_parts(sharded_state_dict, (), dtensors)


def _saved_parts(x: Union[dict, list], path: tuple, dtensors) -> Tuple[Union[dict, list], Union[dict, list]]:
    """`save_preprocess` of container `x` at `path` (`dtensors`: the module, or None)."""
    sharded, common = [], []  # (key, value) pairs, made into the containers at the end
    for k, v in x.items() if isinstance(x, dict) else enumerate(x):
        if isinstance(v, ShardedTensorFactory):
            v = v.build()
        if isinstance(v, (dict, list)):
            if not v:
                common.append((k, {} if isinstance(v, dict) else []))
                continue
            in_sharded, in_common = _saved_parts(v, path + (k,), dtensors)
            if in_sharded:
                sharded.append((k, in_sharded))
            if in_common:
                common.append((k, in_common))
        elif isinstance(v, ShardedBase):
            sharded.append((k, v))
        elif dtensors is not None and isinstance(v, dtensors.DTensor):
            sharded.append((k, dtensors.sharded_tensor_of(path + (k,), v)))
        elif not isinstance(v, LocalNonpersistentObject):
            common.append((k, v))
    if isinstance(x, dict):
        return dict(sharded), dict(common)
    return [v for _, v in sharded], [v for _, v in common]


def load_preprocess(
    sharded_state_dict: ShardedStateDict,
) -> Tuple[ShardedStateDict, StateDict, ShardedStateDict, Dict]:
    """(the shards to read, the caller's nonpersistent values, the factories to merge back,
    the DTensors to put back: `dtensors.restore_dtensors`).

    Plain values in the request are dropped: the checkpoint's common state provides them.
    """
    sharded_state_dict = _copy_structure(sharded_state_dict)
    dtensors = _replace_dtensors(sharded_state_dict)
    factories, _ = extract_matching_values(
        sharded_state_dict, lambda v: isinstance(v, ShardedTensorFactory), return_lists_as_dicts=True
    )
    apply_factories(sharded_state_dict)
    dict_list_map_inplace(ShardedTensorFactory.without_data, factories)  # free their tensors
    nonpersistent, sharded_state_dict = extract_nonpersistent(sharded_state_dict)
    dict_list_map_inplace(LocalNonpersistentObject.unwrap, nonpersistent)
    sharded_state_dict, _ = extract_sharded_base(sharded_state_dict)
    return sharded_state_dict, nonpersistent, factories, dtensors


def finish_load(state: StateDict, factories: ShardedStateDict, dtensors: Dict) -> StateDict:
    """The loaded state as the caller's request had it: factories merged back, DTensors put
    back at their places (the last steps of every load, from any tier)."""
    apply_factory_merges(state, factories)
    if dtensors:
        from .dtensors import restore_dtensors

        restore_dtensors(state, dtensors)
    return state

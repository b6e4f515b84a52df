"""Splitting a sharded state dict into what each part of a save or load handles."""

import sys
from typing import Dict, Tuple

from .dict_utils import dict_list_map_inplace, extract_matching_values
from .mapping import (
    CommonStateDict,
    LocalNonpersistentObject,
    ShardedStateDict,
    ShardedTensorFactory,
    StateDict,
    apply_factories,
    apply_factory_merges,
)
from .utils import extract_nonpersistent, extract_sharded_base


def _copy_structure(state_dict: ShardedStateDict) -> ShardedStateDict:
    """New dicts and lists, same leaves: so that applying factories leaves the caller's dict as is."""
    return extract_matching_values(state_dict, lambda _: True)[0]


def _replace_dtensors(state_dict: ShardedStateDict) -> Dict:
    """DTensor leaves replaced by ShardedTensors (dtensors.py); where they were. A program
    that has not imported `torch.distributed.tensor` has no DTensors (and does not pay its import)."""
    if "torch.distributed.tensor" not in sys.modules:
        return {}
    from .dtensors import replace_dtensors

    return replace_dtensors(state_dict)


def save_preprocess(sharded_state_dict: ShardedStateDict) -> Tuple[ShardedStateDict, CommonStateDict]:
    """(the shards to write, the common state dict for `common.pt`).

    Factories are built, LocalNonpersistentObjects dropped.
    """
    sharded_state_dict = _copy_structure(sharded_state_dict)
    _replace_dtensors(sharded_state_dict)
    apply_factories(sharded_state_dict)
    _, sharded_state_dict = extract_nonpersistent(sharded_state_dict)
    return extract_sharded_base(sharded_state_dict)


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

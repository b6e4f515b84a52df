"""Helpers over sharded state dicts that model code uses (Megatron-Core's `utils` module):
splitting a state dict by kind of leaf, renaming sharded keys, the identity of a shard, and
the scoped debug logging Megatron's code calls."""

import logging
import time
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

from .dict_utils import dict_list_map_inplace, extract_matching_values, nested_values
from .mapping import (
    LocalNonpersistentObject,
    ShardedBase,
    ShardedObject,
    ShardedStateDict,
    ShardedTensor,
    ShardedTensorFactory,
    StateDict,
)

ShardId = Tuple[str, tuple, Optional[tuple]]  # (key, global offset, flat range or None)


def zip_strict(*iterables):
    """`zip` of iterables that must have equal lengths; the message gives the lengths."""
    lists = [list(it) for it in iterables]
    lengths = [len(items) for items in lists]
    if len(set(lengths)) > 1:
        raise ValueError(f"Tried to zip iterables of unequal lengths: {lengths}")
    return zip(*lists)


def _sharded_tensor_shard_id(sharded_tensor: ShardedTensor) -> ShardId:
    """What replicas of one piece of data share on every rank: key, global offset and flat
    range (a distributed optimizer's ranks hold different ranges of one shard)."""
    r = sharded_tensor.flattened_range
    return sharded_tensor.key, sharded_tensor.global_offset, None if r is None else (r.start, r.stop)


def _sharded_object_id(sharded_object: ShardedObject) -> ShardId:
    """What replicas of one ShardedObject piece share: key, offset and grid shape."""
    return sharded_object.key, sharded_object.global_offset, sharded_object.global_shape


def _extract(sharded_state_dict: ShardedStateDict, *classes) -> Tuple[ShardedStateDict, StateDict]:
    return extract_matching_values(sharded_state_dict, lambda v: isinstance(v, classes))


def extract_sharded_tensors(sharded_state_dict: ShardedStateDict) -> Tuple[ShardedStateDict, StateDict]:
    """(the ShardedTensor leaves, everything else), each keeping the nesting."""
    return _extract(sharded_state_dict, ShardedTensor)


def extract_sharded_tensors_and_factories(sharded_state_dict: ShardedStateDict) -> Tuple[ShardedStateDict, StateDict]:
    """(the ShardedTensor and ShardedTensorFactory leaves, everything else)."""
    return _extract(sharded_state_dict, ShardedTensor, ShardedTensorFactory)


def extract_sharded_tensors_or_nonpersistent(sharded_state_dict: ShardedStateDict) -> Tuple[ShardedStateDict, StateDict]:
    """(the ShardedTensor, ShardedTensorFactory and LocalNonpersistentObject leaves, the rest)."""
    return _extract(sharded_state_dict, ShardedTensor, LocalNonpersistentObject, ShardedTensorFactory)


def extract_sharded_base(sharded_state_dict: ShardedStateDict) -> Tuple[ShardedStateDict, StateDict]:
    """(every sharded leaf: tensors, objects, factories; everything else)."""
    return _extract(sharded_state_dict, ShardedBase)


def extract_nonpersistent(sharded_state_dict: ShardedStateDict) -> Tuple[ShardedStateDict, StateDict]:
    """(the LocalNonpersistentObject leaves, everything else)."""
    return _extract(sharded_state_dict, LocalNonpersistentObject)


def _rename_keys(sharded_state_dict: ShardedStateDict, rename, classes=(ShardedTensor, ShardedTensorFactory, ShardedObject)) -> None:
    def apply(x):
        if isinstance(x, classes):
            x.key = rename(x.key)
        return x

    dict_list_map_inplace(apply, sharded_state_dict)


def add_prefix_for_sharding(sharded_state_dict: ShardedStateDict, prefix: str) -> None:
    """Prepends `prefix` to the key of every sharded leaf, in place."""
    _rename_keys(sharded_state_dict, lambda key: prefix + key, ShardedBase)


def replace_prefix_for_sharding(sharded_state_dict: ShardedStateDict, old_prefix: str, new_prefix: str) -> None:
    """Replaces `old_prefix` with `new_prefix` in every sharded key, in place; a key without
    `old_prefix` raises ValueError."""

    def rename(key: str) -> str:
        if not key.startswith(old_prefix):
            raise ValueError(f"Expected {key} to begin with prefix {old_prefix}")
        return new_prefix + key[len(old_prefix) :]

    _rename_keys(sharded_state_dict, rename)


def apply_prefix_mapping(sharded_state_dict: ShardedStateDict, prefix_map: Dict[str, str]) -> None:
    """Replaces the first prefix of `prefix_map` (old -> new) that a sharded key starts with,
    in place; keys matching none stay."""

    def rename(key: str) -> str:
        for old_prefix, new_prefix in prefix_map.items():
            if key.startswith(old_prefix):
                return new_prefix + key[len(old_prefix) :]
        return key

    _rename_keys(sharded_state_dict, rename)


def force_all_tensors_to_non_fp8(sharded_state_dict: ShardedStateDict) -> None:
    """Replaces FP8 data (Transformer Engine's `Float8Tensor`, which dequantizes itself) of
    every sharded leaf by its higher-precision values, in place."""
    for sh in nested_values(sharded_state_dict):
        data = getattr(sh, "data", None)
        if is_float8tensor(data):
            sh.data = data.dequantize()
            if isinstance(sh, ShardedTensor):
                sh.dtype = sh.data.dtype


def is_float8tensor(tensor) -> bool:
    """Whether `tensor` is a Transformer Engine FP8 tensor (checked by class name: this
    library does not import Transformer Engine)."""
    return any(cls.__name__ in ("Float8Tensor", "QuantizedTensor") for cls in type(tensor).__mro__) and hasattr(tensor, "dequantize")


def _clean_metadata_for_serialization(metadata: Optional[dict]) -> Optional[dict]:
    """A copy of Megatron's sharded-state-dict metadata without what cannot be pickled (its
    `dp_cp_group`, a process group), as saved in the common state."""
    if metadata is None:
        return None
    return {k: v for k, v in metadata.items() if k != "dp_cp_group"}


# Scoped debug logging, as Megatron-Core's code calls it: `logger_stack` pushes a name (and a
# logger) for the block; `debug_time` and `debug_msg` log under the joined names.
_fallback_logger = logging.getLogger(__name__)
_name_stack = []
_logger_stack = []


@contextmanager
def logger_stack(name: Optional[str] = None, current_logger: Optional[logging.Logger] = None):
    """Pushes `name` and `current_logger` for the block; yields (the joined names, the logger
    to use: the innermost given one, or this module's)."""
    if name:
        _name_stack.append(name)
    if current_logger:
        _logger_stack.append(current_logger)
    try:
        yield ".".join(_name_stack), (_logger_stack[-1] if _logger_stack else _fallback_logger)
    finally:
        if name and _name_stack:
            _name_stack.pop()
        if current_logger and _logger_stack:
            _logger_stack.pop()


@contextmanager
def debug_time(name: str, logger: Optional[logging.Logger] = None, threshold: float = float("-inf"), level=None):
    """Logs how long the block took: at DEBUG, or with a `threshold` (seconds) at WARNING and
    only when it took at least that long."""
    with logger_stack(name, logger) as (names, block_logger):
        started = time.time()
        try:
            yield
        finally:
            took = time.time() - started
            if took >= threshold:
                if level is None:
                    level = logging.DEBUG if threshold == float("-inf") else logging.WARNING
                block_logger.log(level, f"{names} took {took:.4f}s")


def debug_msg(msg: str) -> None:
    """Logs `msg` at DEBUG, after the names of the enclosing `logger_stack` blocks."""
    with logger_stack() as (names, block_logger):
        block_logger.debug(f"{names} {msg}")

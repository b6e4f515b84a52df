"""Helpers over nested dicts and lists (state dicts).

Only dicts and lists are traversed; everything else, tuples included, is a leaf.
"""

from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Tuple, Union

import numpy as np
import torch

Nested = Union[dict, list]


def extract_matching_values(
    x: Nested, predicate: Callable[[Any], bool], return_lists_as_dicts: bool = False
) -> Tuple[Nested, Nested]:
    """Splits `x` into (matching, nonmatching) leaves, keeping the hierarchy.

    Empty containers stay on the nonmatching side. With `return_lists_as_dicts`, lists become
    dicts keyed by index, so that the two halves can be merged back into the original layout.
    """
    if isinstance(x, dict):
        items, as_dict = x.items(), True
    elif isinstance(x, list):
        items, as_dict = enumerate(x), return_lists_as_dicts
    else:
        raise ValueError(f"Unexpected top-level object type: {type(x)}")
    matching, nonmatching = [], []  # (key, value) pairs, made into the containers at the end
    for k, v in items:
        if isinstance(v, (dict, list)):
            if not v:
                nonmatching.append((k, v))
                continue
            match, nonmatch = extract_matching_values(v, predicate, return_lists_as_dicts)
            if match:
                matching.append((k, match))
            if nonmatch:
                nonmatching.append((k, nonmatch))
        elif predicate(v):
            matching.append((k, v))
        else:
            nonmatching.append((k, v))
    if as_dict:
        return dict(matching), dict(nonmatching)
    return [v for _, v in matching], [v for _, v in nonmatching]


def diff(x1: Any, x2: Any, prefix: Tuple = ()) -> Tuple[list, list, list]:
    """Recursive diff: (prefixes only in x1, prefixes only in x2, mismatching values).

    Each mismatch is a tuple (prefix, type of left value, type of right value).
    Tensors are equal when they have the same shape and equal values (of any dtypes: an int64
    tensor equals the float32 tensor it was converted to, as with Megatron-Core).
    """
    only_left, only_right, mismatch = [], [], []
    if isinstance(x1, dict) and isinstance(x2, dict):
        only_left = [prefix + (k,) for k in x1.keys() - x2.keys()]
        only_right = [prefix + (k,) for k in x2.keys() - x1.keys()]
        pairs = [(k, x1[k], x2[k]) for k in x1.keys() & x2.keys()]
    elif isinstance(x1, (list, tuple, np.ndarray)) and type(x1) is type(x2):
        only_left = [prefix + (i,) for i in range(len(x2), len(x1))]
        only_right = [prefix + (i,) for i in range(len(x1), len(x2))]
        pairs = [(i, v1, v2) for i, (v1, v2) in enumerate(zip(x1, x2))]
    else:
        if not _leaves_equal(x1, x2):
            mismatch.append((prefix, type(x1), type(x2)))
        return only_left, only_right, mismatch
    for k, v1, v2 in pairs:
        left, right, mis = diff(v1, v2, prefix + (k,))
        only_left.extend(left)
        only_right.extend(right)
        mismatch.extend(mis)
    return only_left, only_right, mismatch


def _leaves_equal(x1: Any, x2: Any) -> bool:
    if isinstance(x1, torch.Tensor) or isinstance(x2, torch.Tensor):
        if not (isinstance(x1, torch.Tensor) and isinstance(x2, torch.Tensor)):
            return False
        if x1.shape != x2.shape:
            return False
        return bool((x1.cpu() == x2.cpu()).all())  # values, as Megatron-Core compares them: any dtypes
    if hasattr(x1, "replica_id") and hasattr(x2, "replica_id"):  # sharded objects: compare data
        return type(x1) is type(x2) and not any(diff(x1.data, x2.data))
    try:
        return bool(x1 == x2)
    except (RuntimeError, TypeError, ValueError):
        return False


def inspect_types(x: Any, prefix: Tuple = (), indent: int = 4) -> None:
    """Prints the types of (nested) values, for debugging."""
    pad = " " * indent * len(prefix)
    if isinstance(x, (dict, list)):
        print()
        for k, v in x.items() if isinstance(x, dict) else enumerate(x):
            print(f"{pad}{'>' if isinstance(x, dict) else '-'} {k}: ", end="")
            inspect_types(v, prefix + (k,), indent)
    elif isinstance(x, torch.Tensor):
        print(f"Tensor of shape {tuple(x.shape)}")
    else:
        text = str(x)
        print(f"[{type(x)}]: {text[:30] + '... (truncated)' if len(text) > 30 else text}")


def nested_values(x: Nested) -> Iterator[Any]:
    """All leaves of a nested dict/list."""
    for v in x.values() if isinstance(x, dict) else x:
        if isinstance(v, (dict, list)):
            yield from nested_values(v)
        else:
            yield v


def nested_items_iter(x: Nested) -> Iterator[Tuple[Nested, Any, Any]]:
    """All leaves as (container, key, value)."""
    for k, v in x.items() if isinstance(x, dict) else enumerate(x):
        if isinstance(v, (dict, list)):
            yield from nested_items_iter(v)
        else:
            yield x, k, v


def dict_map(f: Callable, d: Nested) -> None:
    """Replaces every leaf `v` with `f(v)` in place."""
    for container, k, v in nested_items_iter(d):
        container[k] = f(v)


def dict_map_with_key(f: Callable, d: Nested) -> None:
    """Replaces every leaf `v` under key `k` with `f(k, v)` in place."""
    for container, k, v in nested_items_iter(d):
        container[k] = f(k, v)


def dict_list_map_inplace(f: Callable, x: Any) -> Any:
    """Maps leaves in place; returns `x` (or `f(x)` for a leaf)."""
    if isinstance(x, dict):
        for k, v in x.items():
            x[k] = dict_list_map_inplace(f, v)
    elif isinstance(x, list):
        x[:] = (dict_list_map_inplace(f, v) for v in x)
    else:
        return f(x)
    return x


def dict_list_map_outplace(f: Callable, x: Any) -> Any:
    """Maps leaves into a new structure."""
    if isinstance(x, dict):
        return {k: dict_list_map_outplace(f, v) for k, v in x.items()}
    if isinstance(x, list):
        return [dict_list_map_outplace(f, v) for v in x]
    return f(x)


def merge(x1: Nested, x2: Nested, key: Tuple = ()) -> Nested:
    """Merges `x2` into `x1` recursively, in place. Two leaves at one place are an error."""
    if isinstance(x1, dict) and isinstance(x2, dict):
        for k, v2 in x2.items():
            x1[k] = merge(x1[k], v2, key + (k,)) if k in x1 else v2
    elif isinstance(x1, list) and isinstance(x2, list):
        if len(x1) != len(x2):
            raise ValueError(
                f"Cannot merge two lists with different lengths ({len(x1)} and {len(x2)}, "
                f"encountered at level {key})"
            )
        for i, v2 in enumerate(x2):
            x1[i] = merge(x1[i], v2, key + (i,))
    else:
        raise ValueError(
            f"Duplicate non-dict and non-list values encountered: `{x1}` and `{x2}` "
            f"(at level {key})"
        )
    return x1


def map_reduce(
    xs: Iterable,
    key_fn: Callable = lambda x: x,
    value_fn: Callable = lambda x: x,
    reduce_fn: Callable = lambda x: x,
) -> dict:
    """Groups `value_fn(x)` by `key_fn(x)` and reduces each group (`more_itertools.map_reduce`)."""
    groups = defaultdict(list)
    for x in xs:
        groups[key_fn(x)].append(value_fn(x))
    return {k: reduce_fn(v) for k, v in groups.items()}

"""Optimizer state as sharded state: each state tensor is sharded like its parameter.

The first four functions are Megatron-Core's (same names and semantics). The rest is what
Megatron keeps inside its optimizer classes, for plain `torch.optim` optimizers (Adam, AdamW,
SGD with momentum): creating the state before a load, and storing the step counter once.

    model_sd = model.sharded_state_dict()          # ShardedTensors wrapping the parameters
    optim_sd = optimizer_sharded_state_dict(optimizer, model_sd)
    save({"model": model_sd, "optimizer": optim_sd}, path)
    ...
    loaded = load({"optimizer": optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)}, path)
    load_optimizer_state_dict(optimizer, loaded["optimizer"])

State tensors get the keys `optimizer.state.<state name>.<parameter key>`; `param_groups` go
to the common state with their `params` lists replaced by the loading optimizer's own.
"""

import copy
import itertools
import logging
from dataclasses import replace
from typing import Dict, Iterable, Optional, Tuple, Union

import torch

from .core import CheckpointingException
from .dict_utils import nested_values
from .mapping import (
    LocalNonpersistentObject,
    ReplicaId,
    ShardedStateDict,
    ShardedTensor,
    ShardedTensorFactory,
    StateDict,
)

logger = logging.getLogger(__name__)

ShardedParam = Union[ShardedTensor, ShardedTensorFactory]

# appended to messages about parameters that no ShardedTensor wraps (Megatron-Core's words)
KEEP_VARS_HINT = (
    " Make sure state dict contains original torch.nn.Parameters (not pure torch.Tensors)"
    " by passing `keep_vars=True` to `.state_dict()`. If any transformation of the original"
    " parameter is needed, use a ShardedTensorFactory."
)


def get_optim_param_to_id_map(optim_params_iter: Iterable[torch.nn.Parameter]) -> Dict[int, int]:
    """id(parameter) -> its index in the optimizer's state dict."""
    param_mappings = {}
    for i, param in enumerate(optim_params_iter):
        param_mappings.setdefault(id(param), i)
    return param_mappings


def get_param_id_to_sharded_param_map(
    model_sharded_state_dict: ShardedStateDict, optim_params_iter: Iterable[torch.nn.Parameter]
) -> Dict[int, ShardedParam]:
    """Optimizer state index -> the model's ShardedTensor (or factory) wrapping that parameter.

    The model's sharded state dict must wrap the parameters themselves (not copies), and
    `optim_params_iter` must iterate them in the optimizer's order.
    """
    param_to_id = get_optim_param_to_id_map(optim_params_iter)
    result = {}
    for sh in nested_values(model_sharded_state_dict):
        if isinstance(sh, (ShardedTensor, ShardedTensorFactory)) and id(sh.data) in param_to_id:
            result[param_to_id[id(sh.data)]] = sh
    if not result:
        logger.warning("No model ShardedTensor wraps a parameter of the optimizer." + KEEP_VARS_HINT)
    return result


def make_sharded_optimizer_tensor(
    model_param: ShardedParam,
    optim_param: torch.Tensor,
    prefix: str,
    *,
    flattened_range: Optional[slice] = None,
    replica_id: Optional[ReplicaId] = None,
) -> ShardedParam:
    """The optimizer tensor `optim_param`, sharded like `model_param`, under `<prefix>.<key>`.

    With `flattened_range` (a distributed optimizer), `optim_param` is that range of the
    flattened local parameter; as each DP rank then holds its own range, pass a `replica_id`
    whose DP part is 0 (default: the parameter's).
    """
    key = f"{prefix}.{model_param.key}"
    if replica_id is None:
        replica_id = model_param.replica_id
    if isinstance(model_param, ShardedTensorFactory):
        return replace(model_param, key=key, data=optim_param, flattened_range=flattened_range, replica_id=replica_id)
    if flattened_range is None and tuple(optim_param.shape) != model_param.local_shape:
        raise CheckpointingException(
            f"Optimizer tensor for '{model_param.key}' has shape {tuple(optim_param.shape)}, the "
            f"parameter's local shape is {model_param.local_shape}. Pass flattened_range for a "
            f"flat range of it."
        )
    return replace(
        model_param,
        key=key,
        data=optim_param,
        dtype=optim_param.dtype,
        flattened_range=flattened_range,
        replica_id=replica_id,
    )


def optim_state_to_sharding_state(
    optim_state_dict: StateDict,
    id_to_sharded_param_map: Dict[int, ShardedParam],
    exclude_keys: Tuple[str, ...] = (),
) -> None:
    """Turns `optimizer.state_dict()` into a sharded state dict, in place.

    Every tensor in `state` becomes a ShardedTensor keyed `optimizer.state.<name>.<param key>`
    (names in `exclude_keys` are dropped); `param_groups` are copied and their `params` lists
    become LocalNonpersistentObjects, so a load keeps the loading optimizer's own.
    """
    sharded_state = {}
    for param_id, param_state in optim_state_dict["state"].items():
        if param_id not in id_to_sharded_param_map:
            raise CheckpointingException(
                f"Optimizer parameter {param_id} is not wrapped by any ShardedTensor of the model's "
                f"sharded state dict"
            )
        model_param = id_to_sharded_param_map[param_id]
        sharded_state[param_id] = {
            name: make_sharded_optimizer_tensor(model_param, value, prefix=f"optimizer.state.{name}")
            for name, value in param_state.items()
            if name not in exclude_keys
        }
    optim_state_dict["param_groups"] = copy.deepcopy(optim_state_dict["param_groups"])
    for group in optim_state_dict["param_groups"]:
        group["params"] = LocalNonpersistentObject(group["params"])
    optim_state_dict["state"] = sharded_state


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates the (zero) state of every parameter that has none yet, so that a load knows
    which tensors to request. Adam and AdamW (with amsgrad), SGD with momentum."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if state:
                continue
            if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            elif isinstance(optimizer, torch.optim.SGD):
                if group.get("momentum", 0):
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            else:
                raise CheckpointingException(
                    f"Cannot create the state of a {type(optimizer).__name__} before loading; "
                    f"take one step first, or create its state yourself."
                )


def optimizer_sharded_state_dict(
    optimizer: torch.optim.Optimizer, model_sharded_state_dict: ShardedStateDict, is_loading: bool = False
) -> ShardedStateDict:
    """The sharded state dict of a torch.optim optimizer whose parameters the model's sharded
    state dict wraps. The per-parameter step counters, which must be equal, are stored once
    in `param_groups[0]["step"]`, as Megatron-Core stores them."""
    if is_loading:
        init_optimizer_state(optimizer)
    state_dict = optimizer.state_dict()
    params = itertools.chain.from_iterable(group["params"] for group in optimizer.param_groups)
    id_to_sharded_param_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, params)
    step = _common_step(state_dict)
    optim_state_to_sharding_state(state_dict, id_to_sharded_param_map, exclude_keys=("step",))
    if step is not None:
        state_dict["param_groups"][0]["step"] = step
    return state_dict


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, state_dict: StateDict) -> None:
    """Loads what `load` returned for `optimizer_sharded_state_dict(..., is_loading=True)`."""
    state_dict = dict(state_dict, param_groups=copy.deepcopy(state_dict["param_groups"]))
    step = state_dict["param_groups"][0].pop("step", None)
    if step is not None:
        for param_state in state_dict["state"].values():
            param_state["step"] = copy.deepcopy(step)
    optimizer.load_state_dict(state_dict)


def _common_step(optim_state_dict: StateDict):
    step = None
    for param_id, param_state in optim_state_dict["state"].items():
        param_step = param_state.get("step")
        if param_step is None:
            continue
        if step is None:
            step = param_step
        elif not torch.equal(torch.as_tensor(step), torch.as_tensor(param_step)):
            raise CheckpointingException(
                f"The optimizer step differs between parameters ({step} and {param_step} for "
                f"parameter {param_id}); only a step shared by all parameters can be saved"
            )
    return step

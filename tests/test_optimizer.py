"""dist_checkpointing.optimizer: torch.optim state saved sharded like the parameters, and
loaded at another tensor-parallel size.

The loss is elementwise in the parameters, so the optimizer state of a shard equals the same
slice of an unsharded run's state: a TP=2 save loaded at TP=1 must equal the TP=1 run exactly.
"""

import pytest
import torch
from multirank import run_ranks

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, ShardedTensor
from dist_checkpointing.optimizer import (
    load_optimizer_state_dict,
    make_sharded_optimizer_tensor,
    optimizer_sharded_state_dict,
)

OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=0.1),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, amsgrad=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
}
SHAPES = {"w1": (8, 4), "w2": (4, 8)}  # w1 split over TP on axis 0, w2 on axis 1
STEPS = 3


def _full(name):
    g = torch.Generator().manual_seed(len(name) + SHAPES[name][0])
    return torch.randn(SHAPES[name], generator=g), torch.rand(SHAPES[name], generator=g)


def _model(tp, tp_rank):
    """Parameters (shards at tp > 1), their loss coefficients, and the model's sharded state."""
    params, coeffs, sharded = {}, {}, {}
    for axis, name in enumerate(SHAPES):
        init, coeff = _full(name)
        size = SHAPES[name][axis] // tp
        params[name] = torch.nn.Parameter(init.narrow(axis, tp_rank * size, size).clone())
        coeffs[name] = coeff.narrow(axis, tp_rank * size, size)
        sharded[name] = ShardedTensor.from_rank_offsets(f"model.{name}", params[name], (axis, tp_rank, tp))
    return params, coeffs, sharded


def _train(optimizer, params, coeffs, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        sum((coeffs[n] * params[n] ** 2).sum() for n in params).backward()
        optimizer.step()


def save_tp2(rank, world_size, root):
    for name, make in OPTIMIZERS.items():
        params, coeffs, model_sd = _model(2, rank)
        optimizer = make(list(params.values()))
        _train(optimizer, params, coeffs, STEPS)
        dc.save({"model": model_sd, "optimizer": optimizer_sharded_state_dict(optimizer, model_sd)}, f"{root}/{name}")


@pytest.fixture(scope="module")
def tp2_checkpoints(tmp_path_factory):
    """One 2-rank run saves the checkpoints of all three optimizers."""
    root = str(tmp_path_factory.mktemp("optim"))
    run_ranks(save_tp2, 2, root)
    return root


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_saved_at_tp2_resumes_at_tp1(tp2_checkpoints, name):
    ckpt = f"{tp2_checkpoints}/{name}"
    reference_params, coeffs, _ = _model(1, 0)
    reference = OPTIMIZERS[name](list(reference_params.values()))
    _train(reference, reference_params, coeffs, STEPS)

    params, _, model_sd = _model(1, 0)
    optimizer = OPTIMIZERS[name](list(params.values()))
    request = {"model": model_sd, "optimizer": optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)}
    loaded = dc.load(request, ckpt)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(loaded["model"][n])
    load_optimizer_state_dict(optimizer, loaded["optimizer"])

    state_names = set()
    for p, q in zip(params.values(), reference_params.values()):
        assert torch.equal(p, q)
        assert optimizer.state[p].keys() == reference.state[q].keys()
        for key, value in reference.state[q].items():
            assert torch.equal(optimizer.state[p][key], value), key
            state_names.add(key)
    _train(optimizer, params, coeffs, 2)
    _train(reference, reference_params, coeffs, 2)
    for p, q in zip(params.values(), reference_params.values()):
        assert torch.equal(p, q)
    stored = set(dc.load_tensors_metadata(ckpt))
    assert {f"optimizer.state.{s}.model.w1" for s in state_names - {"step"}} <= stored
    assert not any(".step." in key for key in stored)  # one step counter, in the common state
    if "step" in state_names:
        assert dc.load_common_state_dict(ckpt)["optimizer"]["param_groups"][0]["step"] == STEPS


def test_optimizer_tensor_must_match_the_parameter_or_say_its_flat_range():
    param = ShardedTensor.from_rank_offsets("w", torch.zeros(4, 6), (0, 1, 2))
    with pytest.raises(CheckpointingException, match="Pass flattened_range"):
        make_sharded_optimizer_tensor(param, torch.zeros(10), "optimizer.state.exp_avg")
    flat = make_sharded_optimizer_tensor(param, torch.zeros(10), "optimizer.state.exp_avg", flattened_range=slice(5, 15))
    assert flat.key == "optimizer.state.exp_avg.w" and flat.global_offset == (4, 0) and flat.flattened_range == slice(5, 15)

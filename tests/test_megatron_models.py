"""Megatron-Core's own model code (0.15.3, installed --no-deps) on this library, through
`install_as_megatron()`, on CPU ranks: a GPTModel (local layer spec, SwiGLU MLP) and a MoE GPT
(4 experts, top-2 router), their `sharded_state_dict()` saved at TP2 x PP2, loaded at TP1 x PP4
and TP4 x PP1 (and the zarr engine at TP2 x PP2), each parameter bit-exact against the global
weights assembled from the saving ranks' shards; and the same torch_dist checkpoint loaded by
Megatron-Core's own `dist_checkpointing` (no substitution), also resharded.

The reference is independent of this library's I/O: each saving rank dumps its shards' boxes
(after Megatron's own factories built them) with `torch.save`, and the test assembles the
global tensors from them."""

import importlib.util
import os
import sys
import warnings

import pytest
import torch
from multirank import run_ranks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="installed by `make test` (--no-deps)")

MODELS = ("gpt", "moe")
PEERS = os.path.join(sys.prefix, "peers")


def _model(kind: str, tp: int, pp: int, seed: int):
    """A GPTModel of `kind` at TP x PP (the model parallel state initialized here)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, pp)
    moe = dict(num_moe_experts=4, moe_router_topk=2, moe_grouped_gemm=False, add_bias_linear=False) if kind == "moe" else {}
    config = TransformerConfig(
        num_layers=4, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True, gated_linear_unit=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32, **moe,
    )
    torch.manual_seed(seed)
    spec = get_gpt_layer_local_spec(num_experts=moe.get("num_moe_experts"), moe_grouped_gemm=False)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=4,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
    )


def _boxes(sharded_state_dict):
    """(key, global offset, values) of every ShardedTensor, after the model's factories built
    their pieces (values viewed with the prepended axes). With the classes of the package that
    is Megatron-Core's `dist_checkpointing` in this process (the library or Megatron's own)."""
    import copy

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    built = copy.copy(sharded_state_dict)
    apply_factories(built)
    return [
        (sh.key, sh.global_offset, sh.data.detach().reshape((1,) * sh.prepend_axis_num + tuple(sh.local_shape)).clone())
        for sh in nested_values(built)
        if isinstance(sh, ShardedTensor)
    ]


def _save(rank, world_size, root):
    import dist_checkpointing as dc

    dc.install_as_megatron()
    warnings.filterwarnings("ignore")
    for kind in MODELS:
        state = _model(kind, 2, 2, seed=1).sharded_state_dict()
        torch.save(_boxes(state), os.path.join(root, f"{kind}-boxes-{rank}.pt"))
        for engine in ("torch_dist", "zarr"):
            dc.save(state, os.path.join(root, f"{kind}-{engine}"), sharded_strategy=engine)


def _check(model, reference) -> int:
    """Every parameter shard of `model` against the global reference; the number compared."""
    compared = 0
    for key, offset, values in _boxes(model.sharded_state_dict()):
        if key not in reference:
            continue  # _extra_state: no tensor
        expected = reference[key][tuple(slice(o, o + n) for o, n in zip(offset, values.shape))]
        assert values.dtype == expected.dtype and torch.equal(values, expected), key
        compared += 1
    return compared


def _load(rank, world_size, root, reference, megatron_own):
    """Loads each model at TP1 x PP4 and TP4 x PP1 (and at the saved layout, from zarr), with
    this library installed as Megatron's, or with Megatron-Core's own package."""
    warnings.filterwarnings("ignore")
    if megatron_own:
        sys.path[0:0] = [os.path.join(PEERS, "zarr2")]  # Megatron-Core 0.15 imports zarr 2
        from megatron.core import dist_checkpointing
    else:
        import dist_checkpointing

        dist_checkpointing.install_as_megatron()
    import megatron.core.dist_checkpointing as in_use

    assert (in_use is dist_checkpointing) and (in_use.__name__ == ("megatron.core.dist_checkpointing" if megatron_own else "dist_checkpointing"))
    compared = {}
    layouts = [("torch_dist", 1, 4), ("torch_dist", 4, 1)] + ([] if megatron_own else [("zarr", 2, 2)])
    for kind in MODELS:
        for engine, tp, pp in layouts:
            model = _model(kind, tp, pp, seed=2)  # other initial values
            loaded = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(root, f"{kind}-{engine}"))
            model.load_state_dict(loaded)
            compared[kind, engine, tp, pp] = _check(model, reference[kind])
    return compared


def _assemble(root, world_size):
    """kind -> key -> the global tensor, from the saving ranks' boxes."""
    reference = {}
    for kind in MODELS:
        boxes = [box for rank in range(world_size) for box in torch.load(os.path.join(root, f"{kind}-boxes-{rank}.pt"))]
        shapes, dtypes = {}, {}
        for key, offset, values in boxes:
            ends = [o + n for o, n in zip(offset, values.shape)]
            shapes[key] = [max(a, b) for a, b in zip(shapes.get(key, ends), ends)]
            dtypes[key] = values.dtype
        tensors = {key: torch.zeros(shape, dtype=dtypes[key]) for key, shape in shapes.items()}
        covered = {key: torch.zeros(shape, dtype=torch.bool) for key, shape in shapes.items()}
        for key, offset, values in boxes:
            box = tuple(slice(o, o + n) for o, n in zip(offset, values.shape))
            tensors[key][box] = values
            covered[key][box] = True
        assert all(c.all() for c in covered.values())  # every element saved
        reference[kind] = tensors
    return reference


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("megatron-models"))
    run_ranks(_save, 4, root, timeout=300)
    return root, _assemble(root, 4)


def test_megatron_models_reshard_through_the_library(saved):
    root, reference = saved
    results = run_ranks(_load, 4, root, reference, False, timeout=300)
    for compared in results:
        assert set(compared) == {(k, e, tp, pp) for k in MODELS for e, tp, pp in [("torch_dist", 1, 4), ("torch_dist", 4, 1), ("zarr", 2, 2)]}
        assert all(n >= 5 for n in compared.values()), compared  # every rank compared parameters of its stage
    assert sum(r["moe", "torch_dist", 1, 4] for r in results) > sum(r["gpt", "torch_dist", 1, 4] for r in results)  # the experts


def test_megatron_core_loads_the_models_the_library_saved(saved):
    root, reference = saved
    results = run_ranks(_load, 4, root, reference, True, timeout=300)
    assert all(n >= 5 for compared in results for n in compared.values()), results

"""Training resumes at another TP/PP/DP layout, distributed-optimizer state included.

A tiny GPT (tinygpt.py) trains at layout A and saves after step SAVE_AT in every engine; the
same run continues uninterrupted. At layout B each checkpoint is loaded and training resumes:
the losses must match the uninterrupted run's to float rounding (TP and DP sum in other orders).
"""

import pytest

import dist_checkpointing as dc
from multirank import run_ranks
from tinygpt import TinyGPT, train

ENGINES = ["zarr", "tensorstore", "torch_dist"]
SAVE_AT, STEPS = 2, 6  # save after step 2, compare steps 3..5
TOLERANCE = 1e-5  # relative

# (TP, PP, DP) before and after
LAYOUT_PAIRS = [((2, 1, 2), (1, 1, 4)), ((2, 2, 1), (1, 1, 1)), ((1, 1, 4), (1, 1, 2))]


def uninterrupted(rank, world_size, layout, root):
    model = TinyGPT(*layout)
    return train(model, range(STEPS), SAVE_AT, [(f"{root}/{e}", e) for e in ENGINES])


def resumed(rank, world_size, layout, root):
    losses = {}
    for engine in ENGINES:
        model = TinyGPT(*layout)
        model.load_state_dict(dc.load(model.sharded_state_dict(), f"{root}/{engine}"))
        assert model.optimizer.step_count == SAVE_AT + 1
        losses[engine] = train(model, range(SAVE_AT + 1, STEPS))
    return losses


def _last_stage(per_rank):
    """The losses the last pipeline stage reported (other stages report None)."""
    return next(losses for losses in per_rank if losses[-1] is not None)


def _world(layout):
    tp, pp, dp = layout
    return tp * pp * dp


@pytest.mark.parametrize("before, after", LAYOUT_PAIRS, ids=lambda l: "TP%dxPP%dxDP%d" % l)
def test_training_resumes_at_a_new_layout_in_every_engine(tmp_path, before, after):
    root = str(tmp_path)
    reference = _last_stage(run_ranks(uninterrupted, _world(before), before, root, timeout=240))
    per_rank = run_ranks(resumed, _world(after), after, root, timeout=240)
    for engine in ENGINES:
        got = _last_stage([r[engine] for r in per_rank])
        expected = reference[SAVE_AT + 1 :]
        worst = max(abs(g - e) / abs(e) for g, e in zip(got, expected))
        assert worst <= TOLERANCE, (engine, got, expected)
    assert reference[-1] < reference[0]  # it trains
    stored = dc.load_tensors_metadata(f"{root}/zarr")
    for key in ("layers.fc1.weight.gate", "optimizer.state.exp_avg_sq.layers.fc1.bias.up"):  # factories
        assert key in stored

"""Training resumes at another TP/PP/DP layout, distributed-optimizer state included.

A tiny GPT (tinygpt.py) trains at layout A and saves after step SAVE_AT in every engine; the
same run continues uninterrupted. At layout B each checkpoint is loaded and training resumes:
the losses must match the uninterrupted run's to float rounding (TP and DP sum in other orders).
"""

import pytest
from multirank import run_ranks
from tinygpt import TinyGPT, train

import dist_checkpointing as dc

ENGINES = ["zarr", "tensorstore", "torch_dist"]
SAVE_AT, STEPS = 2, 6  # save after step 2, compare steps 3..5
TOLERANCE = 1e-5  # relative

# (TP, PP, DP) before and after; TP=2 x DP=2 -> TP=1 x DP=4 is the demo's (test_demo.py, zarr)
LAYOUT_PAIRS = [((2, 2, 1), (1, 1, 1)), ((1, 1, 4), (1, 1, 2))]


def uninterrupted(rank, world_size, layout, root):
    model = TinyGPT(*layout)
    return train(model, range(STEPS), SAVE_AT, [(f"{root}/{e}", e) for e in ENGINES])


def every_uninterrupted_run(rank, world_size, root):
    """Each pair's first layout (all of 4 ranks) in one process group: starting ranks costs
    more than a run."""
    return [uninterrupted(rank, world_size, before, f"{root}/{i}") for i, (before, _) in enumerate(LAYOUT_PAIRS)]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """(root, losses of the uninterrupted run of each pair); pair i saved into root/i."""
    assert {_world(before) for before, _ in LAYOUT_PAIRS} == {4}
    root = str(tmp_path_factory.mktemp("uninterrupted"))
    per_rank = run_ranks(every_uninterrupted_run, 4, root, timeout=360)
    return root, [_last_stage([losses[i] for losses in per_rank]) for i in range(len(LAYOUT_PAIRS))]


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


@pytest.mark.parametrize("pair", range(len(LAYOUT_PAIRS)), ids=lambda i: "TP%dxPP%dxDP%d-TP%dxPP%dxDP%d" % sum(LAYOUT_PAIRS[i], ()))
def test_training_resumes_at_a_new_layout_in_every_engine(references, pair):
    root, reference = f"{references[0]}/{pair}", references[1][pair]
    after = LAYOUT_PAIRS[pair][1]
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

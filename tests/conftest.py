import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.join(os.path.dirname(__file__), "..", "examples"))  # tinygpt.py, the demo's model

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tp2_checkpoints(tmp_path_factory):
    """A directory with the layouts.py state saved at TP=2 by 2 ranks, one checkpoint per entry
    of layouts.TP2_SAVES. Shared: tests that damage one copy it first."""
    from layouts import save_tp2_checkpoints
    from multirank import run_ranks

    root = str(tmp_path_factory.mktemp("tp2"))
    run_ranks(save_tp2_checkpoints, 2, root)
    return root


@pytest.fixture
def copy_of(tp2_checkpoints, tmp_path):
    """copy_of(name): a private copy of one of the `tp2_checkpoints`, to damage."""
    import shutil

    def copy(name):
        shutil.copytree(f"{tp2_checkpoints}/{name}", tmp_path / name)
        return str(tmp_path / name)

    return copy

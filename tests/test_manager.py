"""CheckpointManager: step directories, the newest complete step, retention after sync and
async saves, Megatron-LM's tracker file, leftovers of crashed saves, and misuse."""

import os
import signal

import pytest
from layouts import check_loaded, sharded_state_dict
from multirank import run_ranks

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, CheckpointManager


def _tracker(root) -> str:
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        return f.read().strip()


def manager_on_two_ranks(rank, world_size, root):
    outcome = {}
    sync = CheckpointManager(f"{root}/sync", keep_latest=2, keep_every=2)
    for step in (1, 2, 3, 4, 5):
        sync.save(step, sharded_state_dict(rank, 2))
    outcome["sync steps"] = sync.steps()  # the newest two, and every multiple of 2
    outcome["sync tracker"] = _tracker(f"{root}/sync")
    for step, message in ((5, "already saved"), (3, "older than step 5")):
        with pytest.raises(CheckpointingException, match=message):
            sync.save(step, sharded_state_dict(rank, 2))
    outcome["loaded"] = check_loaded(sync.load(sharded_state_dict(rank, 2, with_data=False)), rank, 2)
    sync.close()

    asynchronous = CheckpointManager(f"{root}/async", keep_latest=2, sharded_strategy="torch_dist", async_save=True)
    for step in (10, 20, 30):
        asynchronous.save(step, sharded_state_dict(rank, 2))
        with pytest.raises(CheckpointingException, match="already saved"):  # it commits first
            asynchronous.save(step, sharded_state_dict(rank, 2))
    asynchronous.wait()  # commits 30 (each save commits the one before)
    outcome["async steps"] = asynchronous.steps()
    outcome["async tracker"] = _tracker(f"{root}/async")
    # the step being loaded is kept by retention, whatever its age
    asynchronous.load(sharded_state_dict(rank, 2, with_data=False), step=20)
    asynchronous.save(40, sharded_state_dict(rank, 2))
    asynchronous.wait()
    # rank 1's writer dies during the save of 50: it fails on every rank, and 50 can be saved again
    if rank == 1:
        os.kill(asynchronous.queue.writer.process.pid, signal.SIGSTOP)  # idle: it cannot finish 50
    asynchronous.save(50, sharded_state_dict(rank, 2))
    if rank == 1:
        os.kill(asynchronous.queue.writer.process.pid, signal.SIGKILL)
    with pytest.raises(CheckpointingException, match="writer process died"):
        asynchronous.wait()
    outcome["steps after the failed save"] = asynchronous.steps()
    asynchronous.save(50, sharded_state_dict(rank, 2))
    asynchronous.close()
    outcome["async steps after loading 20"] = CheckpointManager(f"{root}/async").steps()
    return outcome


def test_retention_tracker_and_misuse_on_two_ranks(tmp_path):
    root = str(tmp_path)
    for outcome in run_ranks(manager_on_two_ranks, 2, root, timeout=180):
        assert outcome["sync steps"] == [2, 4, 5] and outcome["sync tracker"] == "5"
        assert outcome["loaded"] > 10
        assert outcome["async steps"] == [20, 30] and outcome["async tracker"] == "30"
        assert outcome["steps after the failed save"] == [20, 30, 40]
        assert outcome["async steps after loading 20"] == [20, 40, 50]
    assert sorted(os.listdir(f"{root}/sync")) == ["iter_0000002", "iter_0000004", "iter_0000005", "latest_checkpointed_iteration.txt"]


def test_incomplete_directories_are_skipped_and_old_ones_removed(tmp_path, caplog):
    root = str(tmp_path / "run")
    manager = CheckpointManager(root)
    assert manager.latest_step() is None and manager.steps() == []
    with pytest.raises(CheckpointingException, match="No complete checkpoint"):
        manager.load(sharded_state_dict(0, 1, with_data=False))
    manager.save(5, sharded_state_dict(0, 1))
    for crashed in ("iter_0000003", "iter_0000009"):  # a crash before 5 committed, and one after
        os.makedirs(os.path.join(root, crashed, "embedding.weight"))
        open(os.path.join(root, crashed, "common.pt"), "wb").close()
    with caplog.at_level("WARNING"):
        restarted = CheckpointManager(root)
    assert "iter_0000003" in caplog.text and not os.path.exists(os.path.join(root, "iter_0000003"))
    assert os.path.exists(os.path.join(root, "iter_0000009"))  # newer: perhaps another job's save in flight
    assert restarted.latest_step() == 5 and restarted.steps() == [5]
    assert check_loaded(restarted.load(sharded_state_dict(0, 1, with_data=False, objects=False)), 0, 1) > 10
    open(tmp_path / "file", "w").close()
    with pytest.raises(CheckpointingException, match="is a file"):
        CheckpointManager(str(tmp_path / "file"))
    for bad in ({"keep_latest": 0}, {"keep_latest": None}, {"keep_every": 0}):
        with pytest.raises(CheckpointingException, match="must be an integer >= 1"):
            CheckpointManager(root, **bad)
    with pytest.raises(CheckpointingException, match="step must be an integer"):
        restarted.save(-1, sharded_state_dict(0, 1))
    assert dc.check_is_distributed_checkpoint(os.path.join(root, "iter_0000005"))


def test_a_failed_deletion_raises(tmp_path, monkeypatch):
    """Retention deletes in the background; its failure is raised by `close` (or the next
    retention), not lost: a run must not fill its storage unnoticed."""
    manager = CheckpointManager(str(tmp_path), keep_latest=1)

    def refuse(path):
        raise PermissionError(f"cannot delete {path}")

    monkeypatch.setattr(manager.storage, "remove_tree", refuse)
    manager.save(1, sharded_state_dict(0, 1))
    manager.save(2, sharded_state_dict(0, 1))  # step 1 loses its metadata.json, then its files fail
    with pytest.raises(CheckpointingException, match="cannot delete .*iter_0000001"):
        manager.close()
    assert manager.steps() == [2] and os.path.isdir(tmp_path / "iter_0000001")

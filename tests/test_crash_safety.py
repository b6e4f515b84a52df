"""Crashes during a save: the previous checkpoint stays intact, the interrupted one is reported
incomplete (never loaded), and a retry into the same directory succeeds."""

import os
import resource
import signal

import pytest
from layouts import check_loaded, sharded_state_dict
from multirank import RankFailed, run_ranks

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, ShardedObject
from dist_checkpointing.cli import main


class KillOnSave:
    """Pickling it (when its rank writes it) kills the process: a crash in the middle of a save."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


def save(rank, world_size, ckpt, engine="zarr"):
    dc.save(sharded_state_dict(rank, 2), ckpt, engine)


def save_and_get_killed(rank, world_size, ckpt, engine):
    state = sharded_state_dict(rank, 2)
    if rank == 1:  # rank 1 dies while writing; its peer's collective fails
        state["rng"] = ShardedObject("rng_state", KillOnSave(), (2,), (1,))
    with pytest.raises(CheckpointingException, match="a rank was lost.*Nothing was committed"):
        dc.save(state, ckpt, engine)
    return "raised"


def load_tp1(ckpt):
    return check_loaded(dc.load(sharded_state_dict(0, 1, with_data=False, objects=False), ckpt), 0, 1)


def save_each(rank, world_size, root, engines):
    for engine in engines:
        save(rank, world_size, f"{root}/{engine}", engine)


def test_rank_killed_mid_save(tmp_path, capsys):
    engines = ["zarr", "torch_dist"]
    previous, interrupted = str(tmp_path / "previous"), str(tmp_path / "interrupted")
    run_ranks(save_each, 2, previous, engines)
    for engine in engines:  # a killed rank ends its run: one run per engine
        with pytest.raises(RankFailed) as failure:
            run_ranks(save_and_get_killed, 2, f"{interrupted}/{engine}", engine)
        assert "rank 1" in str(failure.value) and "exit code -9" in str(failure.value)
        assert "--- rank 0 ---" not in str(failure.value)  # rank 0 raised, as expected, and returned
        assert load_tp1(f"{previous}/{engine}") > 10
        ckpt = f"{interrupted}/{engine}"
        assert os.listdir(ckpt) and not os.path.exists(os.path.join(ckpt, "metadata.json"))
        with pytest.raises(CheckpointingException, match="incomplete checkpoint"):
            load_tp1(ckpt)
        assert main(["verify", ckpt]) == 1 and "incomplete" in capsys.readouterr().out
    run_ranks(save_each, 2, interrupted, engines)  # the retries overwrite the partial files
    for engine in engines:
        assert load_tp1(f"{interrupted}/{engine}") > 10
        assert main(["verify", f"{interrupted}/{engine}"]) == 0


def saves_over_file_size_limit(rank, world_size, root, engines):
    """Per engine: a save that succeeds, then one that hits the file size limit on rank 1."""
    messages = {}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for engine in engines:
        dc.save(sharded_state_dict(rank, 2), f"{root}/{engine}-previous", engine)
        if rank == 1:
            # torch_dist: past the first write of a file, where torch.save used to lose the cause
            resource.setrlimit(resource.RLIMIT_FSIZE, (2000 if engine == "torch_dist" else 256, hard))
        try:
            with pytest.raises(CheckpointingException, match=r"rank\(s\) 1.*File too large.*Nothing was committed") as error:
                dc.save(sharded_state_dict(rank, 2), f"{root}/{engine}-too-large", engine)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        messages[engine] = str(error.value)
    return messages


def test_file_size_limit_during_sync_save(tmp_path):
    engines = ["zarr", "tensorstore", "torch_dist"]
    messages = run_ranks(saves_over_file_size_limit, 2, str(tmp_path), engines)
    for engine in engines:
        assert messages[0][engine] == messages[1][engine]  # the same error on every rank
        assert engine != "torch_dist" or ".distcp" in messages[0][engine]  # it names the file
        assert not os.path.exists(tmp_path / f"{engine}-too-large" / "metadata.json")
        assert load_tp1(str(tmp_path / f"{engine}-previous")) > 10

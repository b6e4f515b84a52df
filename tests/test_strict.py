"""StrictHandling: every mode's raise / log / return behaviour."""

import logging

import pytest
import torch

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, ShardedTensor, StrictHandling


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("strict") / "c")
    dc.save(
        {
            "a": ShardedTensor.from_rank_offsets("a", torch.ones(3)),
            "b": ShardedTensor.from_rank_offsets("b", torch.full((2,), 2.0)),
        },
        path,
    )
    return path


def request():  # asks for "a" and "x" (unexpected); leaves out "b" (missing)
    return {
        "a": ShardedTensor.from_rank_offsets("a", torch.zeros(3)),
        "x": ShardedTensor.from_rank_offsets("x", torch.zeros(1)),
    }


def test_assume_ok_unexpected_lets_the_engine_raise(ckpt):
    with pytest.raises(CheckpointingException, match="'x' is not in the checkpoint"):
        dc.load(request(), ckpt)


@pytest.mark.parametrize("mode", ["raise_unexpected", StrictHandling.RAISE_ALL])
def test_raise_modes(ckpt, mode):
    with pytest.raises(CheckpointingException, match="Unexpected keys") as info:
        dc.load(request(), ckpt, strict=mode)
    assert ("Missing keys" in str(info.value)) == (mode == StrictHandling.RAISE_ALL)


@pytest.mark.parametrize("mode, logs_missing", [("log_unexpected", False), ("log_all", True)])
def test_log_modes_skip_unexpected_keys(ckpt, mode, logs_missing, caplog):
    with caplog.at_level(logging.WARNING):
        state = dc.load(request(), ckpt, strict=mode)
    assert torch.equal(state["a"], torch.ones(3)) and "x" not in state
    assert "['x']" in caplog.text and ("['b']" in caplog.text) == logs_missing


def test_return_modes(ckpt):
    state, missing, unexpected = dc.load(request(), ckpt, strict=StrictHandling.RETURN_ALL)
    assert (missing, unexpected) == ({"b"}, {"x"}) and "x" not in state
    state, missing, unexpected = dc.load(request(), ckpt, strict="return_unexpected")
    assert (missing, unexpected) == (set(), {"x"})


def test_ignore_all(ckpt, caplog):
    with caplog.at_level(logging.WARNING):
        state = dc.load(request(), ckpt, strict=StrictHandling.IGNORE_ALL)
    assert set(state) == {"a"} and caplog.text == ""


def test_strict_flag_parsing():
    assert dc.validation.parse_strict_flag(True) is StrictHandling.ASSUME_OK_UNEXPECTED
    assert dc.validation.parse_strict_flag(False) is StrictHandling.LOG_UNEXPECTED
    with pytest.raises(ValueError):
        dc.validation.parse_strict_flag("sometimes")

"""Nothing in a checkpoint runs code: weights_only everywhere, with a way to allow user classes."""

import argparse
import json
import os
import pathlib

import numpy as np
import pytest
import torch
from userclasses import Exploit, TrainerState

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, ShardedObject, ShardedTensor


def test_user_class_needs_add_safe_globals(tmp_path):
    path = str(tmp_path / "c")
    dc.save({"trainer": TrainerState(3), "w": ShardedTensor.from_rank_offsets("w", torch.ones(2))}, path)
    request = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(2))}
    with pytest.raises(CheckpointingException) as info:
        dc.load(request, path)
    message = str(info.value)
    assert "userclasses.TrainerState" in message and "add_safe_globals" in message
    assert "common.pt" in message
    torch.serialization.add_safe_globals([TrainerState])
    try:
        assert dc.load(request, path)["trainer"] == TrainerState(3)
    finally:
        torch.serialization.clear_safe_globals()


def test_megatron_common_types_load_without_setup(tmp_path):
    path = str(tmp_path / "c")
    common = {
        "args": argparse.Namespace(lr=0.1, save=pathlib.PosixPath("/ckpt")),
        "np_rng": np.random.RandomState(0).get_state(),
        "scale": np.float32(2.0),
    }
    dc.save(dict(common), path)
    loaded = dc.load_common_state_dict(path)
    assert loaded["args"] == common["args"] and loaded["scale"] == 2.0
    assert all(np.array_equal(a, b) for a, b in zip(loaded["np_rng"], common["np_rng"]))


@pytest.mark.parametrize("target", ["common", "object"])
def test_tampered_files_never_run_code(tmp_path, target):
    path = str(tmp_path / "c")
    state = {"rng": ShardedObject("rng", {"seed": 1}, (1,), (0,)), "it": 1}
    dc.save(state, path)
    marker = str(tmp_path / "pwned")
    victim = os.path.join(path, "common.pt") if target == "common" else os.path.join(path, "rng", "shard_0_1.pt")
    torch.save({"payload": Exploit(marker)}, victim)
    request = {"rng": ShardedObject("rng", None, (1,), (0,))}
    with pytest.raises(CheckpointingException, match="damaged"):  # its checksum no longer matches
        dc.load(request, path)
    # an attacker who also rewrites the index: the unpickler still refuses the class
    with open(os.path.join(path, "index.json")) as f:
        metadata = json.load(f)
    metadata["checksums"] = {}
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(metadata, f)
    with pytest.raises(CheckpointingException, match="not allowed|not a valid"):
        dc.load(request, path)
    assert not os.path.exists(marker)


def test_no_unsafe_loading_in_the_library():
    root = os.path.join(os.path.dirname(__file__), "..", "dist_checkpointing")
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(dirpath, name)).read()
                assert "weights_only=False" not in text and "pickle.load(" not in text, name

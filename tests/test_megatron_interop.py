"""Megatron-Core's own `dist_checkpointing.load` (also `load_common_state_dict` and
`load_plain_tensors`) reads the checkpoints this library writes: 0.15.3 (torch_dist, and Zarr v2
through both its tensorstore and its zarr-python 2 reader) and 0.16.1 (torch_dist), at TP2 as
saved and at TP1. Also the bridge: a checkpoint of the newest Megatron-Core format (which
0.15/0.16 cannot read) converted by `dist-ckpt convert --to torch_dist` loads with both.

Megatron-Core 0.15.3 is installed in the test venv; 0.16.1 and the zarr-python 2 stack of 0.15's
zarr reader are installed beside it (Makefile) and put first on sys.path of the ranks that use
them, before anything imports zarr."""

import dataclasses
import importlib.util
import os
import sys
import warnings

import pytest
import torch
from layouts import check_loaded, full, sharded_state_dict
from multirank import run_ranks
from test_megatron_fixture import FIXTURES, manifest, request_at_tp

import dist_checkpointing as dc
from dist_checkpointing.cli import main as cli

NEWEST = FIXTURES[-1]

# not imported here: the ranks import the Megatron-Core version they test
pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="installed by `make test` (--no-deps)")

PEERS = os.path.join(sys.prefix, "peers")
ZARR_V2 = {"backend": "zarr", "zarr_format": 2}


def _save_ours(rank, world_size, root):
    dc.save(sharded_state_dict(rank, 2), os.path.join(root, "torch_dist"), sharded_strategy="torch_dist")
    dc.save(sharded_state_dict(rank, 2), os.path.join(root, "zarr_v2"), sharded_strategy=ZARR_V2)


def _megatron_loads_ours(rank, world_size, root, peer_dirs):
    """Every Megatron reader of every checkpoint, at TP2 (this rank's shard) and at TP1 (the
    whole tensors, as DP replicas): values, common state, objects and plain tensors."""
    sys.path[0:0] = [os.path.join(PEERS, d) for d in peer_dirs]  # before megatron imports zarr
    warnings.filterwarnings("ignore")
    from importlib.metadata import version

    from megatron.core import dist_checkpointing as mdc
    from megatron.core.dist_checkpointing import ShardedObject as MObject
    from megatron.core.dist_checkpointing import ShardedTensor as MTensor

    version = version("megatron-core")

    def to_megatron(x):
        if isinstance(x, dc.ShardedTensor):
            return MTensor(**{f.name: getattr(x, f.name) for f in dataclasses.fields(MTensor)})
        if isinstance(x, dc.ShardedObject):
            return MObject(x.key, None, x.global_shape, x.global_offset, x.replica_id)
        if isinstance(x, dict):
            return {k: to_megatron(v) for k, v in x.items() if k != "iteration"}
        if isinstance(x, list):
            return [to_megatron(v) for v in x]
        return x

    readers = [("torch_dist", None)]
    if version == "0.15.3":
        from megatron.core.dist_checkpointing.strategies.zarr import ZarrLoadShardedStrategy

        readers += [("zarr_v2", None), ("zarr_v2", ZarrLoadShardedStrategy())]  # None: tensorstore
    compared = []
    for name, strategy in readers:
        ckpt = os.path.join(root, name)
        for tp in (2, 1):
            request = to_megatron(sharded_state_dict(rank, tp, dp=world_size // tp, with_data=False, objects=tp == 2))
            loaded = mdc.load(request, ckpt, sharded_strategy=strategy)
            assert loaded["iteration"] == 7
            if tp == 2:
                assert loaded["rng"] == {"seed": 1000 + rank}
            compared.append(check_loaded(loaded, rank, tp, dp=world_size // tp))
        assert mdc.load_common_state_dict(ckpt) == {"iteration": 7}
        plain = mdc.load_plain_tensors(ckpt)
        assert torch.equal(plain["embedding.weight"], full("embedding.weight", (64, 16), torch.bfloat16))
        assert torch.equal(plain["layers.fc2.weight"], full("layers.fc2.weight", (2, 16, 64), torch.float16))
    # the bridge: the newest format, converted
    bridge = os.path.join(root, "bridge")
    request, expected = request_at_tp(rank, 2, NEWEST)
    loaded = mdc.load(to_megatron(request), bridge)
    assert loaded["common"] == manifest(NEWEST)["common"] and loaded["rng"] == manifest(NEWEST)["sharded_objects"]["rng_state"]
    for key, exp in expected.items():
        for e, g in zip(exp, loaded[key]) if isinstance(exp, list) else [(exp, loaded[key])]:
            assert g.dtype == e.dtype and torch.equal(g, e), key
    compared.append(len(expected))
    return version, compared


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ours"))
    run_ranks(_save_ours, 2, root)
    assert cli(["convert", NEWEST, os.path.join(root, "bridge"), "--to", "torch_dist"]) == 0
    return root


def test_megatron_core_0_15_loads_our_torch_dist_and_zarr_v2_checkpoints(ours):
    results = run_ranks(_megatron_loads_ours, 2, ours, ["zarr2"])
    assert results == [("0.15.3", [16] * 6 + [5])] * 2


def test_megatron_core_0_16_loads_our_torch_dist_checkpoints(ours):
    results = run_ranks(_megatron_loads_ours, 2, ours, ["megatron-core-0.16.1"])
    assert results == [("0.16.1", [16] * 2 + [5])] * 2

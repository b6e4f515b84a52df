"""Checkpoints in S3-compatible object storage, against a real S3 server on 127.0.0.1 (moto's,
started and stopped by this module) behind a fault-injecting proxy (s3server.py)."""

import os
import pathlib

import pytest
import torch
from layouts import check_loaded, full, load_tp1, sharded_state_dict
from multirank import run_ranks
from s3server import S3Endpoint, fault_hits, set_faults

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, CheckpointManager, ShardedTensor
from dist_checkpointing.cli import main
from dist_checkpointing.strategies import load_strategy_from_config, save_strategy_from_config
from dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from dist_checkpointing.strategies.config import StrategyConfig
from dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper, FullyParallelSaveStrategyWrapper


@pytest.fixture(scope="module")
def s3():
    endpoint = S3Endpoint()
    saved = {name: os.environ.get(name) for name in endpoint.environment()}
    os.environ.update(endpoint.environment())
    yield endpoint
    set_faults()
    endpoint.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _committed(url: str) -> bool:
    return dc.check_is_distributed_checkpoint(url)


# tensorstore encodes compressed arrays through its own `s3` kvstore
SAVES = {
    "zarr": "zarr",  # raw chunks: the layout's own writer and reader (both Zarr engines)
    "torch_dist": "torch_dist",
    "zstd": StrategyConfig(compression="zstd"),  # through zarr-python's ObjectStore
    "tensorstore-zstd": StrategyConfig(backend="tensorstore", compression="zstd"),  # tensorstore's s3 kvstore
}


def saves_and_loads(rank, world_size, root):
    """Every engine and format at TP=2 (sync, async, fully parallel), each loaded back at TP=2
    with objects, by the plain and the fully parallel loader."""
    for name, strategy in SAVES.items():
        dc.save(sharded_state_dict(rank, 2), f"{root}/{name}", strategy)
    queue = AsyncCallsQueue(persistent=True)  # one writer process for both saves
    for engine in ("torch_dist", "zarr"):
        state = sharded_state_dict(rank, 2)
        request = dc.save(state, f"{root}/async-{engine}", engine, async_sharded_save=True)
        queue.schedule_async_request(request)
        queue.maybe_finalize_async_calls(blocking=True)
    queue.close()
    parallel = FullyParallelSaveStrategyWrapper(save_strategy_from_config(StrategyConfig(backend="torch_dist")))
    dc.save(sharded_state_dict(rank, 2), f"{root}/fully-parallel", parallel)
    names = list(SAVES) + ["async-torch_dist", "async-zarr", "fully-parallel"]
    compared = {}
    for name in names:
        loaded = dc.load(sharded_state_dict(rank, 2, with_data=False), f"{root}/{name}")
        assert loaded["rng"] == {"seed": 1000 + rank}, name
        compared[name] = check_loaded(loaded, rank, 2)
    loader = FullyParallelLoadStrategyWrapper(load_strategy_from_config(StrategyConfig(backend="zarr")))
    compared["fully-parallel-load"] = check_loaded(dc.load(sharded_state_dict(rank, 2, with_data=False), f"{root}/zarr", loader), rank, 2)
    with pytest.raises(CheckpointingException, match="already holds a complete checkpoint"):
        dc.save(sharded_state_dict(rank, 2), f"{root}/zarr")
    return compared


def test_every_engine_saves_at_tp2_and_loads_at_tp1(s3):
    root = s3.create_bucket("engines") + "/run/1"
    results = run_ranks(saves_and_loads, 2, root, timeout=240)
    assert all(n > 10 for result in results for n in result.values()), results
    for name in list(SAVES) + ["async-torch_dist", "async-zarr", "fully-parallel"]:
        url = f"{root}/{name}"
        assert check_loaded(load_tp1(url), 0, 1) > 10, name  # every dtype, bit-exact
        assert main(["verify", url]) == 0, name
    # each Zarr engine decodes what the other encoded, each through its own S3 client
    assert check_loaded(load_tp1(f"{root}/zstd", sharded_strategy="tensorstore"), 0, 1) > 10
    assert check_loaded(load_tp1(f"{root}/tensorstore-zstd", sharded_strategy="zarr"), 0, 1) > 10
    keys = s3.keys("engines", "run/1/torch_dist/")
    assert "run/1/torch_dist/metadata.json" in keys and "run/1/torch_dist/.metadata" in keys
    # the helpers of the API read the same URLs
    url = f"{root}/torch_dist"
    assert dc.load_common_state_dict(url)["iteration"] == 7
    assert dc.load_tensors_metadata(url)["embedding.weight"].global_shape == (64, 16)
    assert "rng_state/shard_1_2" in dc.load_sharded_metadata(url)
    assert torch.equal(dc.load_plain_tensors(url)["final_norm"], sharded_state_dict(0, 1)["final_norm"].data)
    for name in ("zarr", "torch_dist"):
        dc.remove_sharded_tensors(f"{root}/{name}", "dtypes.")
        assert "dtypes.int8" not in dc.load_tensors_metadata(f"{root}/{name}")
        assert main(["verify", f"{root}/{name}"]) == 0
    assert not any(key.startswith("run/1/zarr/dtypes.") for key in s3.keys("engines", "run/1/zarr/"))


def test_large_objects_upload_in_parts_and_load_by_ranges(s3):
    """An object over 64 MiB is a multipart upload; a load that needs part of a chunk or file
    reads byte ranges of it, not the whole object."""
    root = s3.create_bucket("large")
    big = torch.arange(9000 * 2048, dtype=torch.float32).reshape(9000, 2048)  # 70 MiB
    small = torch.arange(1000, dtype=torch.int64)
    for name, strategy in (("torch_dist", "torch_dist"), ("zarr_v2", StrategyConfig(zarr_format=2))):
        dc.save({"big": ShardedTensor.from_rank_offsets("big", big), "small": ShardedTensor.from_rank_offsets("small", small)},
                f"{root}/{name}", strategy)
    uploads = [path for method, path, _, _ in s3.traffic.requests if method == "POST" and "uploads" in path]
    assert any("torch_dist/__0_0.distcp" in path for path in uploads), uploads
    assert any("zarr_v2/big/0.0" in path for path in uploads), uploads

    def bytes_read(name, request):
        s3.traffic.requests.clear()
        loaded = dc.load(request, f"{root}/{name}", validate_access_integrity=False)
        gets = [(path, n) for method, path, _, n in s3.traffic.requests if method == "GET" and "list-type" not in path]
        return loaded, gets

    rows = ShardedTensor.from_rank_offsets("big", torch.empty(10, 2048), (0, 10, 900))  # rows 100..110
    loaded, gets = bytes_read("zarr_v2", {"rows": rows})  # Zarr v2 raw chunks carry no CRC: only the rows
    assert torch.equal(loaded["rows"], big[100:110])
    assert 0 < sum(n for path, n in gets if "big/0.0" in path) <= 10 * 2048 * 4, gets
    loaded, gets = bytes_read("torch_dist", {"small": ShardedTensor.from_rank_offsets("small", torch.empty(1000, dtype=torch.int64))})
    assert torch.equal(loaded["small"], small)
    assert 0 < sum(n for path, n in gets if path.endswith(".distcp")) < 64 * 1024, gets  # not the 70 MiB item
    whole = {"big": ShardedTensor.from_rank_offsets("big", torch.empty_like(big))}
    for name in ("torch_dist", "zarr_v2"):  # the objects uploaded in parts, read back whole
        assert torch.equal(dc.load(whole, f"{root}/{name}")["big"], big), name


def saves_under_faults(rank, world_size, root):
    """Phases on the same 2 ranks; rank 0 sets the proxy's faults between barriers."""
    import torch.distributed as dist

    def phase(*faults):
        dist.barrier()
        if rank == 0:
            set_faults(*faults)
        dist.barrier()

    outcome = {}
    # transient failures (503 SlowDown, dropped connections) are retried
    phase({"method": "PUT", "status": 503, "times": 3}, {"method": "GET", "status": None, "times": 2},
          {"method": "HEAD", "status": 500, "times": 2})
    dc.save(sharded_state_dict(rank, 2), f"{root}/retried", "torch_dist")
    outcome["retried"] = check_loaded(dc.load(sharded_state_dict(rank, 2, with_data=False), f"{root}/retried"), rank, 2)
    dist.barrier()
    outcome["transient hits"] = fault_hits() if rank == 0 else None
    # one rank's upload fails for good: the same error on every rank, nothing committed
    phase({"method": "PUT", "path_contains": "/__1_0.distcp", "status": 503})
    with pytest.raises(CheckpointingException) as failure:
        dc.save(sharded_state_dict(rank, 2), f"{root}/failed", "torch_dist")
    outcome["failed"] = str(failure.value)
    # the server goes away in the middle of a save (connections dropped after 6 uploads)
    phase({"method": "PUT", "status": None, "after": 6})
    with pytest.raises(CheckpointingException) as failure:
        dc.save(sharded_state_dict(rank, 2), f"{root}/gone", "zarr")
    outcome["gone"] = str(failure.value)
    phase()
    for name in ("failed", "gone"):
        assert not _committed(f"{root}/{name}")
        with pytest.raises(CheckpointingException, match="incomplete checkpoint"):
            dc.load(sharded_state_dict(rank, 2, with_data=False), f"{root}/{name}")
    return outcome


def test_faults_are_retried_or_raise_on_every_rank(s3):
    root = s3.create_bucket("faults") + "/ckpt"
    outcomes = run_ranks(saves_under_faults, 2, root, timeout=240)
    assert all(o["retried"] > 10 for o in outcomes)
    assert outcomes[0]["transient hits"] == [3, 2, 2]
    for outcome in outcomes:
        assert "__1_0.distcp" in outcome["failed"] and "Nothing was committed" in outcome["failed"], outcome["failed"]
        assert "Nothing was committed" in outcome["gone"], outcome["gone"]
    assert "s3://faults/ckpt/gone" in outcomes[0]["gone"]


def test_checkpoint_manager_on_an_s3_root(s3):
    """Step prefixes, retention (the commit marker deleted first) and the tracker object."""
    root = s3.create_bucket("manager") + "/run"
    manager = CheckpointManager(root, keep_latest=1)
    for step in (100, 200, 300):
        manager.save(step, sharded_state_dict(0, 1))
    assert manager.steps() == [300] and manager.latest_step() == 300
    assert s3.client.get_object(Bucket="manager", Key="run/latest_checkpointed_iteration.txt")["Body"].read() == b"300\n"
    manager.close()  # retention's deletions finish
    assert not any(key.startswith(("run/iter_0000100/", "run/iter_0000200/")) for key in s3.keys("manager"))
    assert check_loaded(manager.load(sharded_state_dict(0, 1, with_data=False, objects=False)), 0, 1) > 10


def test_tools_and_conversions_between_local_and_s3(s3, tmp_path, capsys):
    root = s3.create_bucket("tools")
    local = str(tmp_path / "local")
    dc.save(sharded_state_dict(0, 1), local, "zarr")
    assert main(["convert", local, f"{root}/converted", "--to", "torch_dist"]) == 0
    assert main(["inspect", f"{root}/converted"]) == 0 and "complete" in capsys.readouterr().out
    with pytest.raises(CheckpointingException, match="pass object store locations as strings"):
        dc.load_common_state_dict(pathlib.Path(f"{root}/converted"))  # s3:/tools/converted
    assert main(["convert", f"{root}/converted", str(tmp_path / "back"), "--to", "zarr"]) == 0
    assert check_loaded(load_tp1(str(tmp_path / "back")), 0, 1) > 10
    assert main(["convert", f"{root}/converted", f"{root}/model.pt", "--to", "torch"]) == 0
    assert "model.pt" in s3.keys("tools")
    assert main(["convert", f"{root}/converted", f"{root}/hf", "--to", "safetensors"]) == 0
    tensors = dc.load_plain_tensors(f"{root}/hf")  # safetensors holds the tensors only
    assert torch.equal(tensors["embedding.weight"], full("embedding.weight", (64, 16), torch.bfloat16))
    # a damaged object: verify names it, a load raises instead of returning its bytes
    sizes = {e["Key"]: e["Size"] for e in s3.client.list_objects_v2(Bucket="tools", Prefix="converted/")["Contents"]}
    key = max((k for k in sizes if k.endswith(".distcp")), key=sizes.get)  # a tensor's file
    data = bytearray(s3.client.get_object(Bucket="tools", Key=key)["Body"].read())
    for position in range(100, len(data), 512):  # in every item
        data[position] ^= 0xFF
    s3.client.put_object(Bucket="tools", Key=key, Body=bytes(data))
    capsys.readouterr()
    assert main(["verify", f"{root}/converted"]) == 1
    assert key.rsplit("/", 1)[1] in capsys.readouterr().out
    with pytest.raises(CheckpointingException, match="damaged"):
        load_tp1(f"{root}/converted")


def test_a_commit_never_replaces_a_complete_checkpoint(s3, tmp_path):
    """Two saves racing into one location: the second commit finds metadata.json and raises
    (a conditional PUT in an object store, link(2) locally); the first checkpoint stays."""
    from dist_checkpointing.core import CheckpointingConfig, commit_config

    root = s3.create_bucket("race")
    for location in (f"{root}/ckpt", str(tmp_path / "ckpt")):
        dc.save(sharded_state_dict(0, 1), location, "torch_dist")
        with pytest.raises(CheckpointingException, match="committed by another save"):
            commit_config(location, CheckpointingConfig("zarr"))
        assert dc.load_tensors_metadata(location)  # still the torch_dist checkpoint
        assert check_loaded(load_tp1(location), 0, 1) > 10


def test_the_s3_specific_endpoint_variable_wins(s3, monkeypatch):
    root = s3.create_bucket("endpoints")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("DIST_CKPT_S3_RETRIES", "0")
    dc.save(sharded_state_dict(0, 1), f"{root}/ckpt", "zarr")
    assert check_loaded(load_tp1(f"{root}/ckpt"), 0, 1) > 10
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    with pytest.raises(CheckpointingException, match="127.0.0.1:9"):
        load_tp1(f"{root}/ckpt")

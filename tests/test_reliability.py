"""Untrusted checkpoints and failing peers: every damage, tampering or bad request surfaces as a
CheckpointingException naming the key and the file, on every rank; never zeros, never a read
outside the checkpoint, never a parser's traceback, never a hang."""

import json
import os
import pickle
import shutil
import signal
import subprocess

import pytest
import torch
from layouts import check_loaded, load_tp1, sharded_state_dict
from multirank import run_ranks

import dist_checkpointing as dc
from dist_checkpointing import CheckpointingException, ShardedTensor
from dist_checkpointing.cli import main
from dist_checkpointing.pickling import dump_dcp_metadata, load_dcp_metadata
from dist_checkpointing.strategies import load_strategy_from_config
from dist_checkpointing.strategies.config import ENGINES, StrategyConfig
from dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper


def rewrite_dcp_metadata(ckpt, change):
    metadata = load_dcp_metadata(os.path.join(ckpt, ".metadata"), as_dcp_objects=True)
    change(metadata)
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        f.write(dump_dcp_metadata(metadata))


def assert_reported(ckpt, capsys, *fragments, inspect_reads_it=True):
    """`dist-ckpt verify` exits 1 on `ckpt` naming each fragment; `inspect` never crashes, and
    exits 1 naming the problem where the damage is in what it reads (not the data files)."""
    assert main(["verify", ckpt]) == 1
    out = capsys.readouterr()
    for fragment in fragments:
        assert fragment in out.out + out.err, (fragment, out)
    code = main(["inspect", ckpt])
    out = capsys.readouterr().out
    if inspect_reads_it:
        assert code == 1 and ("problem" in out or "INCOMPLETE" in out), out
    else:
        assert code in (0, 1), out


# 2: a tampered .metadata makes no load read a file outside the checkpoint
@pytest.mark.parametrize("where", ["../outside.distcp", "/ABSOLUTE/outside.distcp", "symlink"])
def test_dcp_data_file_outside_the_checkpoint_is_refused(copy_of, tmp_path, capsys, where):
    ckpt = copy_of("torch_dist")
    outside = str(tmp_path / "outside.distcp")
    shutil.copy(os.path.join(ckpt, "__0_0.distcp"), outside)  # the bytes an attacker offers
    if where == "symlink":
        os.remove(os.path.join(ckpt, "__0_0.distcp"))
        os.symlink(outside, os.path.join(ckpt, "__0_0.distcp"))
    else:
        target = where.replace("/ABSOLUTE", str(tmp_path))

        def redirect(metadata):
            for info in metadata.storage_data.values():
                if info.relative_path == "__0_0.distcp":
                    info.relative_path = target

        rewrite_dcp_metadata(ckpt, redirect)
    with pytest.raises(CheckpointingException, match="outside|absolute|'\\.\\.'") as error:
        load_tp1(ckpt)
    assert "__0_0.distcp" in str(error.value) or "outside.distcp" in str(error.value)
    assert_reported(ckpt, capsys, "outside.distcp" if where != "symlink" else "__0_0.distcp", inspect_reads_it=where != "symlink")


def test_zarr_array_linked_outside_the_checkpoint_is_refused(copy_of, tmp_path, capsys):
    ckpt = copy_of("zarr")
    array = os.path.join(ckpt, "final_norm")
    shutil.move(array, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", array)
    with pytest.raises(CheckpointingException, match="Key 'final_norm'.*outside the checkpoint"):
        load_tp1(ckpt)
    assert_reported(ckpt, capsys, "final_norm")
    os.remove(array)  # a linked chunk file: verify names it
    shutil.copytree(tmp_path / "elsewhere", array)
    chunk = os.path.join(array, "c.0")
    os.rename(chunk, tmp_path / "chunk")
    os.symlink(tmp_path / "chunk", chunk)
    assert main(["verify", ckpt]) == 1
    assert "c.0: a symbolic link" in capsys.readouterr().out


# 3: chunks that do not cover a tensor are damage, not zeros
def test_dcp_chunks_that_leave_a_hole_are_damage(copy_of, capsys):
    ckpt = copy_of("torch_dist")

    def drop_a_chunk(metadata):
        metadata.state_dict_metadata["embedding.weight"].chunks.pop()

    rewrite_dcp_metadata(ckpt, drop_a_chunk)
    with pytest.raises(CheckpointingException, match="Key 'embedding.weight'.*no chunk holds elements"):
        load_tp1(ckpt)
    assert_reported(ckpt, capsys, "embedding.weight", "no chunk holds", inspect_reads_it=False)


# 4: out-of-bounds requests (main replica or not) raise instead of reading zeros
@pytest.mark.parametrize("engine", ENGINES)
def test_request_outside_the_stored_tensor_is_refused(tmp_path, engine):
    ckpt = str(tmp_path / engine)
    dc.save({"w": ShardedTensor.from_rank_offsets("w", torch.arange(8.0).reshape(8, 1))}, ckpt, engine)
    beyond = ShardedTensor("w", torch.empty(4, 1), torch.float32, (4, 1), (8, 1), (6, 0), None, replica_id=1)
    with pytest.raises(CheckpointingException, match="Key 'w'.*outside the global shape"):
        dc.load({"w": beyond}, ckpt, validate_access_integrity=False)
    # the engines refuse it too, when called directly
    with pytest.raises(CheckpointingException, match="outside the global shape"):
        load_strategy_from_config(StrategyConfig(backend=engine)).load({"w": beyond}, ckpt)
    # inside the tensor, a non-main replica reads the real values
    inside = ShardedTensor("w", torch.empty(2, 1), torch.float32, (2, 1), (8, 1), (6, 0), None, replica_id=1)
    assert dc.load({"w": inside}, ckpt, validate_access_integrity=False)["w"].flatten().tolist() == [6.0, 7.0]


# 6, 9: Zarr array documents that are not JSON, or whose numbers are absurd
@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"zarr_format": 3, "node_type": "array", "shape": [' + b"9" * 5000 + b"]}", None],
    ids=["not-json", "5000-digits", "huge-shape"],
)
@pytest.mark.parametrize("where", ["array", "root"])  # the array's own document; its copy in the root group
def test_damaged_zarr_document_raises_and_is_reported(copy_of, capsys, content, where):
    ckpt = copy_of("zarr")
    path = os.path.join(ckpt, "embedding.weight", "zarr.json")
    with open(path) as f:
        document = json.load(f)
    if content is None:  # well-formed JSON, a shape of 2**124 elements in 1-element chunks
        document["shape"] = [2**62, 2**62]
        document["chunk_grid"]["configuration"]["chunk_shape"] = [1, 1]
        content = json.dumps(document).encode()
    if where == "array":
        os.remove(os.path.join(ckpt, "zarr.json"))  # as written before the root group existed
    else:
        path = os.path.join(ckpt, "zarr.json")
        if content.startswith(b"{not"):  # the root document itself is not JSON
            root = content
        else:  # the root's copy of the array's document is damaged; the array's own is sound
            with open(path) as f:
                root = json.load(f)
            root["consolidated_metadata"]["metadata"]["embedding.weight"] = json.loads(content.replace(b"9" * 5000, b"9" * 400))
            root = json.dumps(root).encode()
        content = root
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointingException, match="zarr.json") as error:
        load_tp1(ckpt)
    if where == "array" or not content.startswith(b"{not"):
        assert "embedding.weight" in str(error.value)
    if where == "array":
        assert_reported(ckpt, capsys, "embedding.weight", "zarr.json")
    else:  # inspect reads the arrays' own documents
        assert_reported(ckpt, capsys, "zarr.json" if content.startswith(b"{not") else "embedding.weight", inspect_reads_it=False)
        # a damaged root document does not stop verify from checking every array
        os.remove(os.path.join(ckpt, "final_norm", "c.0"))
        assert main(["verify", ckpt]) == 1
        assert "final_norm/c.0: missing" in capsys.readouterr().out


def test_consolidated_documents_are_checked_once_per_distinct_document(copy_of):
    """Arrays of one shape and dtype share a checked document (a load of 10^4 arrays checks a
    few); any document that differs is checked, and damage is still named by its key."""
    from dist_checkpointing.strategies.zarr_spec import read_array_document, read_consolidated

    ckpt = copy_of("zarr")
    consolidated = read_consolidated(ckpt)
    good = json.load(open(os.path.join(ckpt, "embedding.weight", "zarr.json")))
    equal, as_floats, damaged = json.loads(json.dumps(good)), json.loads(json.dumps(good)), json.loads(json.dumps(good))
    grid = as_floats["chunk_grid"]["configuration"]
    grid["chunk_shape"] = [float(n) for n in grid["chunk_shape"]]  # equal in value: the checked one is used
    damaged["chunk_grid"]["configuration"]["chunk_shape"] = [0] * len(good["shape"])
    float_shape = dict(good, shape=[float(n) for n in good["shape"]])
    consolidated.documents.update({"a": good, "b": equal, "c": as_floats, "d": damaged, "e": float_shape})
    first = read_array_document(ckpt, "a", consolidated)
    assert read_array_document(ckpt, "b", consolidated) is first
    assert read_array_document(ckpt, "c", consolidated) is first  # so its numbers are ints
    with pytest.raises(CheckpointingException, match="Key 'd'.*chunk shape"):
        read_array_document(ckpt, "d", consolidated)
    with pytest.raises(CheckpointingException, match="Key 'e'.*64-bit integers"):
        read_array_document(ckpt, "e", consolidated)


def test_equal_consolidated_documents_are_one_object_once_read(copy_of):
    """Read, the consolidated metadata keeps one object per distinct good document (the parsed
    documents of 10^4 arrays would take tens of MB); a damaged one stays, refused by its key."""
    from dist_checkpointing.strategies.zarr_spec import read_array_document, read_consolidated

    ckpt = copy_of("zarr")
    path = os.path.join(ckpt, "zarr.json")
    root = json.load(open(path))
    documents = root["consolidated_metadata"]["metadata"]
    good = documents["embedding.weight"]
    documents.update({"x": dict(good), "y": dict(good), "z": dict(good, shape="damaged")})
    json.dump(root, open(path, "w"))
    consolidated = read_consolidated(ckpt)
    assert consolidated.documents["x"] is consolidated.documents["y"] is consolidated.documents["embedding.weight"]
    assert consolidated.documents["z"]["shape"] == "damaged"
    assert read_array_document(ckpt, "x", consolidated) is consolidated.documents["x"]
    with pytest.raises(CheckpointingException, match="Key 'z'.*64-bit integers"):
        read_array_document(ckpt, "z", consolidated)


def test_dcp_metadata_damage_beyond_the_requested_keys(copy_of, capsys):
    """Every n-d formulation shape in mcore_data is checked, also of keys without an entry."""
    ckpt = copy_of("torch_dist")
    rewrite_dcp_metadata(ckpt, lambda metadata: setattr(metadata, "mcore_data", {"no.such.key": {"nd_reformulated_orig_global_shape": [-1]}}))
    with pytest.raises(CheckpointingException, match=r"\.metadata is damaged.*no\.such\.key.*nd_reformulated_orig_global_shape"):
        load_tp1(ckpt)
    assert_reported(ckpt, capsys, ".metadata")


def test_dcp_entries_sharing_bytes_are_damage(copy_of):
    """A byte entry pointed at a tensor chunk's bytes raises; it would fill only one of them."""
    ckpt = copy_of("torch_dist")

    def share(metadata):
        chunk = next(info for index, info in metadata.storage_data.items() if index.fqn == "embedding.weight")
        rng = next(index for index in metadata.storage_data if index.fqn == "rng_state/shard_0_2")
        metadata.storage_data[rng] = chunk

    rewrite_dcp_metadata(ckpt, share)
    with pytest.raises(CheckpointingException, match="'embedding.weight' and 'rng_state/shard_0_2'.*same bytes"):
        dc.load(sharded_state_dict(0, 2, with_data=False), ckpt, validate_access_integrity=False)


# 7: a .metadata that unpickles to the wrong type
@pytest.mark.parametrize("value", [{"state_dict_metadata": {}}, ["not", "metadata"], 42])
def test_dcp_metadata_of_the_wrong_type(copy_of, capsys, value):
    ckpt = copy_of("torch_dist")
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(value, f)
    with pytest.raises(CheckpointingException, match=r"\.metadata is damaged.*not DCP's Metadata"):
        load_tp1(ckpt)
    assert_reported(ckpt, capsys, ".metadata")


def test_common_state_of_the_wrong_type(tmp_path):
    ckpt = str(tmp_path / "c")
    dc.save({"w": ShardedTensor.from_rank_offsets("w", torch.ones(2))}, ckpt)
    document_path = os.path.join(ckpt, "index.json")
    with open(document_path) as f:
        document = json.load(f)
    del document["checksums"]["common.pt"]  # as if written by a writer that records none
    with open(document_path, "w") as f:
        json.dump(document, f)
    torch.save([1, 2, 3], os.path.join(ckpt, "common.pt"))
    with pytest.raises(CheckpointingException, match="common.pt holds a list, not the common state dict"):
        dc.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(2))}, ckpt)


# 8, 11: metadata.json with a 5000-digit number, or an index naming a checksummed file outside the checkpoint
def test_metadata_json_numbers_and_paths_are_bounded(copy_of, capsys):
    ckpt = copy_of("zarr")
    path = os.path.join(ckpt, "metadata.json")
    with open(path) as f:
        original = f.read()
    with open(path, "w") as f:
        f.write(original.replace('"sharded_backend_version": 1', '"sharded_backend_version": ' + "9" * 5000))
    with pytest.raises(CheckpointingException, match="Malformed .*metadata.json: not valid JSON"):
        load_tp1(ckpt)
    assert dc.check_is_distributed_checkpoint(ckpt) is False
    assert_reported(ckpt, capsys, "metadata.json")
    with open(path, "w") as f:  # a number Python parses but no 64-bit reader could
        f.write(original.replace('"sharded_backend_version": 1', f'"sharded_backend_version": {2**64}'))
    with pytest.raises(CheckpointingException, match="'sharded_backend_version' must be an integer"):
        load_tp1(ckpt)
    with open(path, "w") as f:
        f.write(original)
    index_path = os.path.join(ckpt, "index.json")
    with open(index_path) as f:
        index = f.read()
    for name in ["/etc/hostname", "../outside", "a/../../outside"]:
        document = json.loads(index)
        document["checksums"][name] = [[0, 1, 0]]
        with open(index_path, "w") as f:
            json.dump(document, f)
        with pytest.raises(CheckpointingException, match="cannot be inside the checkpoint"):
            load_tp1(ckpt)
        assert_reported(ckpt, capsys, name)


# 5, and a lost peer: failures on one rank raise the same exception on every rank, no hang
def one_rank_fails(rank, world_size, root):
    messages = {}
    good = sharded_state_dict(rank, 2, with_data=False)
    bad = dict(good, extra=ShardedTensor.from_rank_offsets("not.saved", torch.zeros(2)))
    fully_parallel = FullyParallelLoadStrategyWrapper(load_strategy_from_config(StrategyConfig()))
    for name, strategy in [("plain", None), ("fully-parallel", fully_parallel)]:
        with pytest.raises(CheckpointingException, match="rank\\(s\\) 1.*'not.saved' is not in the checkpoint") as e:
            dc.load(bad if rank == 1 else good, f"{root}/zarr", strategy)
        messages[name] = str(e.value)
    # a damaged chunk only rank 1 reads: rank 0's load fails too
    if rank == 1:
        chunk = f"{root}/damaged/embedding.weight/c.1.0"
        with open(chunk, "r+b") as f:
            f.write(b"\xff\xff\xff\xff")
    torch.distributed.barrier()
    with pytest.raises(CheckpointingException, match="rank\\(s\\) 1.*embedding.weight/c.1.0") as e:
        dc.load(sharded_state_dict(rank, 2, with_data=False), f"{root}/damaged")
    messages["damaged"] = str(e.value)
    assert check_loaded(dc.load(good, f"{root}/zarr"), rank, 2) > 10  # the group is still usable
    return messages


def test_failure_on_one_rank_raises_on_every_rank(tp2_checkpoints, tmp_path):
    shutil.copytree(f"{tp2_checkpoints}/zarr", tmp_path / "zarr")
    shutil.copytree(f"{tp2_checkpoints}/zarr", tmp_path / "damaged")
    messages = run_ranks(one_rank_fails, 2, str(tmp_path), timeout=90)
    assert messages[0] == messages[1]


def killed_during_load(rank, world_size, ckpt):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    with pytest.raises(CheckpointingException, match="load planning failed: a rank was lost"):
        dc.load(sharded_state_dict(rank, 2, with_data=False), ckpt)
    return "raised"


def test_rank_killed_during_load(tp2_checkpoints):
    from multirank import RankFailed

    with pytest.raises(RankFailed) as failure:
        run_ranks(killed_during_load, 2, f"{tp2_checkpoints}/torch_dist", timeout=90)
    assert "--- rank 1 ---" in str(failure.value) and "--- rank 0 ---" not in str(failure.value)


# 10: a disk that fills up names the cause and the file, and commits nothing
def _small_file_system(path):
    os.makedirs(path)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", path], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a small tmpfs here: {e}")


def save_onto_full_disk(rank, world_size, ckpt):
    with pytest.raises(CheckpointingException) as error:
        dc.save(sharded_state_dict(rank, 2) | {"big": ShardedTensor.from_rank_offsets("big", torch.ones(2, 40000), (0, rank, 2))}, ckpt, "torch_dist")
    return str(error.value)


def test_disk_full_names_the_cause(tmp_path):
    mount = str(tmp_path / "small")
    _small_file_system(mount)
    try:
        messages = run_ranks(save_onto_full_disk, 2, f"{mount}/ckpt")
        for message in messages:
            assert "No space left on device" in message and ".distcp" in message, message
            assert "Nothing was committed" in message, message
        assert not os.path.exists(f"{mount}/ckpt/metadata.json")
    finally:
        subprocess.run(["umount", mount], check=False)

"""`dist-ckpt inspect`, `verify` and `convert`, on our checkpoints and Megatron-Core's."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from layouts import check_loaded, sharded_state_dict

import dist_checkpointing as dc
from dist_checkpointing.cli import main
from dist_checkpointing.dtypes import DTYPES, safetensors_dtype, torch_dtype

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MEGATRON = ["mcore015_zarr_tp2", "mcore015_torch_dist_tp2", "mcore016_torch_dist_tp2"]


@pytest.fixture
def saved(tp2_checkpoints):
    return tp2_checkpoints


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_inspect_table_and_json(saved, capsys):
    code, out = run(capsys, "inspect", f"{saved}/zarr")
    assert code == 0 and "complete" in out and "engine: zarr, Zarr v3" in out
    assert any(line.split()[:5] == ["embedding.weight", "64x16", "bfloat16", "2.0", "KB"] and line.split()[-1] == "2x1"
               for line in out.splitlines()), out
    assert "rng_state/shard_0_2" in out and "iteration" in out
    code, out = run(capsys, "inspect", f"{saved}/torch_dist", "--json")
    info = json.loads(out)
    tensors = {t["key"]: t for t in info["tensors"]}
    assert code == 0 and info["complete"] and info["engine"] == "torch_dist"
    assert tensors["layers.fc2.weight"] == {"key": "layers.fc2.weight", "shape": [2, 16, 64], "dtype": "float16",
                                            "bytes": 4096, "grid": [2, 1, 2]}
    assert info["objects"] == ["rng_state/shard_0_2", "rng_state/shard_1_2"] and "iteration" in info["common_keys"]


@pytest.mark.parametrize("name", MEGATRON)
def test_inspect_and_verify_megatron_checkpoints(name, capsys):
    code, out = run(capsys, "inspect", os.path.join(FIXTURES, name), "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "Megatron-Core (no index)" and len(info["tensors"]) >= 4
    code, out = run(capsys, "verify", os.path.join(FIXTURES, name))
    assert code == 0 and "sound" in out


def test_inspect_and_verify_incomplete(saved, tmp_path, capsys):
    ckpt = shutil.copytree(f"{saved}/zarr", tmp_path / "partial")
    os.remove(ckpt / "metadata.json")
    code, out = run(capsys, "inspect", str(ckpt))
    assert code == 1 and "INCOMPLETE" in out and "metadata.json" in out
    code, out = run(capsys, "verify", str(ckpt))
    assert code == 1 and "incomplete" in out


def test_verify_names_each_damaged_key_and_file(saved, tmp_path, capsys):
    assert run(capsys, "verify", f"{saved}/zarr")[0] == 0
    ckpt = str(shutil.copytree(f"{saved}/torch_dist", tmp_path / "damaged"))
    code, out = run(capsys, "verify", ckpt, "--json")
    assert code == 0 and json.loads(out)["sound"] and json.loads(out)["checked"]["files"] > 1
    # change one byte of every .distcp file, and the common state
    for name in sorted(os.listdir(ckpt)):
        if name.endswith(".distcp") or name == "common.pt":
            with open(os.path.join(ckpt, name), "r+b") as f:
                f.seek(os.path.getsize(os.path.join(ckpt, name)) - 200)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 1]))
    code, out = run(capsys, "verify", ckpt)
    assert code == 1 and "DAMAGED" in out
    assert "common state: " in out and "common.pt" in out
    damaged = [line for line in out.splitlines() if ".distcp" in line]
    assert damaged and all("CRC-32C" in line and line.split(":")[0].strip() for line in damaged)


def _plain(ckpt):
    return dc.load_plain_tensors(ckpt)


def _assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("source, to, extra", [
    ("zarr", "torch_dist", []),
    ("torch_dist", "zarr", ["--zarr-format", "2"]),
    ("torch_dist", "tensorstore", []),
    ("mcore015_zarr_tp2", "zarr", []),
    ("mcore016_torch_dist_tp2", "torch_dist", []),
])
def test_convert_between_engines(saved, tmp_path, capsys, source, to, extra):
    src = os.path.join(FIXTURES, source) if source.startswith("mcore") else f"{saved}/{source}"
    dst = str(tmp_path / "converted")
    code, out = run(capsys, "convert", src, dst, "--to", to, *extra)
    assert code == 0 and "tensors" in out
    assert dc.load_common_state_dict(dst) == dc.load_common_state_dict(src)
    _assert_same_tensors(_plain(dst), _plain(src))
    assert run(capsys, "verify", dst)[0] == 0
    if not source.startswith("mcore"):  # a regular checkpoint: it reshards and holds the objects
        assert check_loaded(dc.load(sharded_state_dict(0, 1, with_data=False, objects=False), dst), 0, 1) > 10
        request = {"rng": sharded_state_dict(1, 2, with_data=False)["rng"]}
        assert dc.load(request, dst, validate_access_integrity=False)["rng"] == {"seed": 1001}
    assert run(capsys, "convert", src, dst, "--to", to)[0] == 1  # never over a complete checkpoint


def test_convert_to_torch_file(saved, tmp_path, capsys):
    dst = str(tmp_path / "model.pt")
    code, out = run(capsys, "convert", f"{saved}/zarr", dst, "--to", "torch")
    assert code == 0 and "not in torch: the common state and 2 ShardedObjects" in out
    _assert_same_tensors(torch.load(dst, weights_only=True), _plain(f"{saved}/zarr"))
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left


def _read_safetensors(path):
    """A reader from the format's definition (no safetensors package)."""
    names = {safetensors_dtype(name): torch_dtype(name) for name in DTYPES}
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    header.pop("__metadata__")
    tensors, end = {}, 0
    for key, entry in header.items():
        start, stop = entry["data_offsets"]
        assert start == end  # packed in order, no gaps
        end = stop
        raw = torch.frombuffer(bytearray(data[start:stop]), dtype=torch.uint8) if stop > start else torch.empty(0, dtype=torch.uint8)
        tensors[key] = raw.view(names[entry["dtype"]]).reshape(entry["shape"])
    assert end == len(data)
    return tensors


@pytest.mark.parametrize("max_size, files", [("1GB", 1), ("3KB", 4)])
def test_convert_to_safetensors(saved, tmp_path, capsys, max_size, files):
    dst = tmp_path / "hf"
    code, _ = run(capsys, "convert", f"{saved}/torch_dist", str(dst), "--to", "safetensors", "--max-file-size", max_size)
    assert code == 0
    expected = _plain(f"{saved}/torch_dist")
    shards = sorted(n for n in os.listdir(dst) if n.endswith(".safetensors"))
    assert len(shards) == files
    loaded = {}
    for name in shards:
        loaded.update(_read_safetensors(dst / name))
    _assert_same_tensors(loaded, expected)
    if files > 1:
        with open(dst / "model.safetensors.index.json") as f:
            index = json.load(f)
        assert sorted(index["weight_map"]) == sorted(expected)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
        assert all(_read_safetensors(dst / name).keys() >= {k for k, n in index["weight_map"].items() if n == name}
                   for name in shards)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_command_line_entry_points(saved, monkeypatch, capsys):
    piped = subprocess.run([sys.executable, "-m", "dist_checkpointing", "verify", f"{saved}/zarr"],
                           capture_output=True, text=True, check=True)
    assert "sound" in piped.stdout and piped.stderr == ""  # no progress bar when piped
    terminal = _Terminal()  # on a terminal, a progress bar on stderr (in this process: no new interpreter)
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["verify", f"{saved}/zarr"]) == 0
    monkeypatch.undo()
    assert "verifying" in terminal.getvalue() and "entry" in terminal.getvalue()
    script = os.path.join(os.path.dirname(sys.executable), "dist-ckpt")
    done = subprocess.run([script, "inspect", os.path.join(FIXTURES, "mcore015_zarr_tp2")], capture_output=True, text=True)
    assert done.returncode == 0 and "complete" in done.stdout
    with pytest.raises(SystemExit) as usage_error:
        main(["inspect"])
    assert usage_error.value.code == 2 and "usage" in capsys.readouterr().err

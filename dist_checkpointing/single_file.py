"""Single-file exports, written one tensor at a time: memory holds the largest tensor, never the
whole state. Used by `dist-ckpt convert --to torch|safetensors`.

- `torch`: the zip archive `torch.save` writes (records `data/<i>` with raw storage bytes, and
  `data.pkl` that rebuilds `{key: tensor}` from them), readable by
  `torch.load(path, weights_only=True)`. Written by hand because `torch.save` needs the whole
  dict in memory.
- `safetensors`: Hugging Face's format (8-byte little-endian header size, a JSON header giving
  each tensor's dtype, shape and byte range, then the bytes), split into
  `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json` above a size limit.

Both are written to a temporary name and renamed when complete, so a failed export never leaves
a file that looks whole.
"""

import collections
import io
import json
import os
import pickle
import zipfile
from typing import Callable, Dict, List, Tuple

import torch

from .dtypes import name_of_torch, safetensors_dtype
from .fs import atomic_write, atomic_write_with

TensorSource = Callable[[str], torch.Tensor]  # key -> the whole tensor (on the CPU)
Entry = Tuple[str, torch.dtype, Tuple[int, ...]]  # key, dtype, global shape


def _nbytes(entry: Entry) -> int:
    return torch.Size(entry[2]).numel() * entry[1].itemsize


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.detach().to("cpu").contiguous()
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")


class _Storage:
    def __init__(self, index: int, dtype: torch.dtype, numel: int):
        self.index, self.dtype, self.numel = index, dtype, numel


class _Tensor:
    """Pickles as `torch.save` pickles a contiguous CPU tensor of storage `index`."""

    def __init__(self, index: int, dtype: torch.dtype, shape: Tuple[int, ...]):
        self.storage = _Storage(index, dtype, torch.Size(shape).numel())
        self.shape = tuple(shape)

    def __reduce__(self):
        stride = tuple(torch.empty(self.shape, device="meta").stride())
        args = (self.storage, 0, self.shape, stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, str(obj.index), "cpu", obj.numel)
        return None


def write_torch_file(path: str, entries: List[Entry], read: TensorSource, progress=None) -> None:
    """`{key: tensor}` for every entry, as a `torch.save` file at `path`."""
    archive = os.path.splitext(os.path.basename(path))[0] or "archive"

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            tensors = {}
            for index, (key, dtype, shape) in enumerate(entries):
                with zf.open(f"{archive}/data/{index}", "w", force_zip64=True) as record:
                    record.write(_raw_bytes(read(key)))
                tensors[key] = _Tensor(index, dtype, shape)
                if progress:
                    progress(key)
            pickled = io.BytesIO()
            _TorchPickler(pickled, protocol=2).dump(tensors)
            zf.writestr(f"{archive}/data.pkl", pickled.getvalue())
            zf.writestr(f"{archive}/byteorder", "little")
            zf.writestr(f"{archive}/version", "3\n")

    atomic_write_with(path, write)


SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def plan_safetensors_files(entries: List[Entry], max_file_bytes: int) -> List[List[Entry]]:
    """Entries split, in order, into files of at most `max_file_bytes` (a bigger tensor gets a
    file of its own)."""
    files, size = [[]], 0
    for entry in entries:
        nbytes = _nbytes(entry)
        if files[-1] and size + nbytes > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += nbytes
    return files if files[0] else []


def write_safetensors(directory: str, entries: List[Entry], read: TensorSource, max_file_bytes: int, progress=None) -> List[str]:
    """The entries as safetensors file(s) in `directory`; returns the file names. Several files
    come with `model.safetensors.index.json` (Hugging Face's sharded layout)."""
    os.makedirs(directory, exist_ok=True)
    files = plan_safetensors_files(entries, max_file_bytes)
    if len(files) <= 1:
        names = [SAFETENSORS_SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for name, file_entries in zip(names, files or [[]]):
        _write_safetensors_file(os.path.join(directory, name), file_entries, read, progress)
    if len(files) > 1:
        weight_map = {key: name for name, file_entries in zip(names, files) for key, _, _ in file_entries}
        index = {"metadata": {"total_size": sum(map(_nbytes, entries))}, "weight_map": weight_map}
        atomic_write(os.path.join(directory, SAFETENSORS_INDEX), json.dumps(index, indent=2).encode())
        names.append(SAFETENSORS_INDEX)
    return names


def safetensors_header(entries: List[Entry]) -> bytes:
    """The length-prefixed JSON header (padded with spaces to 8 bytes, as the reference
    implementation writes it)."""
    header: Dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = _nbytes((key, dtype, shape))
        name = safetensors_dtype(name_of_torch(dtype, key))
        header[key] = {"dtype": name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_safetensors_file(path: str, entries: List[Entry], read: TensorSource, progress) -> None:
    def write(f):
        f.write(safetensors_header(entries))
        for key, _, _ in entries:
            f.write(_raw_bytes(read(key)))
            if progress:
                progress(key)

    atomic_write_with(path, write)

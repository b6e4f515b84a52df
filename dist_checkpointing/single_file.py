"""Single-file exports, written one tensor at a time: memory holds the largest tensor, never the
whole state. Used by `dist-ckpt convert --to torch|safetensors`; safetensors directories (ours
or Hugging Face's) are also read (`read_safetensors_index`, strategies/safetensors.py).

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
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from .core import MISSING, CheckpointingException, is_int, parse_json, read_json
from .dtypes import DTYPES, name_of_torch, safetensors_dtype
from .layout import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, contained_path
from .storage import storage_of

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

    storage_of(path).write_atomic_with(path, write)




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
    if storage_of(directory).local:
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
        path = os.path.join(directory, SAFETENSORS_INDEX)
        storage_of(path).write_atomic(path, json.dumps(index, indent=2).encode())
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

    storage_of(path).write_atomic_with(path, write)


MAX_HEADER_BYTES = 100 * 2**20  # as the reference implementation: a larger header is damage
_NAME_OF_SAFETENSORS = {st: name for name, (_, _, st) in DTYPES.items()}


@dataclass(frozen=True)
class SafetensorsEntry:
    """Where one tensor of a safetensors directory is: its values are C-ordered little-endian
    bytes at [start, start + nbytes) of `file`."""

    file: str  # relative to the directory
    dtype: str  # a dtype table name
    shape: Tuple[int, ...]
    start: int


def read_safetensors_index(directory: str) -> Dict[str, SafetensorsEntry]:
    """Every tensor of a safetensors directory (`model.safetensors`, or the files that
    `model.safetensors.index.json` names), from the files' headers, each checked: nothing read
    from the files is trusted (sizes bounded, byte ranges inside the file, file names inside
    the directory)."""
    index = read_json(os.path.join(directory, SAFETENSORS_INDEX), missing_ok=True)
    if index is MISSING:
        files = [SAFETENSORS_SINGLE]
    else:
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointingException(
                f"Malformed {os.path.join(directory, SAFETENSORS_INDEX)}: expected a 'weight_map' of tensor names to file names"
            )
        files = sorted(set(weight_map.values()))
    entries: Dict[str, SafetensorsEntry] = {}
    for name in files:
        for key, entry in _read_header(directory, name).items():
            if key in entries:
                raise CheckpointingException(f"Tensor '{key}' is in both {entries[key].file} and {name} of {directory}; the checkpoint is damaged")
            entries[key] = entry
    return entries


def _read_header(directory: str, name: str) -> Dict[str, SafetensorsEntry]:
    path = contained_path(directory, name, SAFETENSORS_INDEX)

    def fail(problem: str):
        raise CheckpointingException(f"{path} is not a valid safetensors file: {problem}. It is damaged or was not written completely.")

    try:
        with storage_of(path).open(path) as f:
            size = f.size
            length = int.from_bytes(f.read(0, 8), "little")
            if size < 8 or length > min(MAX_HEADER_BYTES, size - 8):
                fail(f"its header size {length} does not fit the file ({size} bytes)")
            header = parse_json(bytes(f.read(8, length)), path)
    except FileNotFoundError:
        raise CheckpointingException(f"{path} is missing; the safetensors checkpoint is incomplete") from None
    if not isinstance(header, dict):
        fail("its header is not a JSON object")
    data_start, entries = 8 + length, {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            fail(f"the entry of '{key}' is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _NAME_OF_SAFETENSORS:
            fail(f"'{key}' has dtype {dtype!r}; this library reads {sorted(_NAME_OF_SAFETENSORS)}")
        if not isinstance(shape, list) or not all(is_int(n) and n >= 0 for n in shape) or math.prod(shape) >= 2**62:
            fail(f"'{key}' has shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) and o >= 0 for o in offsets):
            fail(f"'{key}' has data_offsets {offsets!r}")
        nbytes = math.prod(shape) * DTYPES[_NAME_OF_SAFETENSORS[dtype]][0].itemsize
        if offsets[1] - offsets[0] != nbytes or data_start + offsets[1] > size:
            fail(f"'{key}' has bytes {offsets} for {nbytes} bytes of values, in a file of {size - data_start} data bytes")
        entries[key] = SafetensorsEntry(name, _NAME_OF_SAFETENSORS[dtype], tuple(shape), data_start + offsets[0])
    return entries

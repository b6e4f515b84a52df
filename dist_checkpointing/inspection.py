"""Looking inside a checkpoint without loading it: `describe` (what `dist-ckpt inspect` prints)
and `verify` (what `dist-ckpt verify` checks), and their counterparts for a node's memory-tier
directory. One process, no torch.distributed.
"""

import math
import os
from typing import Callable, Dict, List, Optional, Tuple

from .core import CONFIG_FNAME, CheckpointingException, CheckpointMetadata, read_metadata
from .dtypes import name_of_torch, zarr_v2_dtype
from .integrity import integrity_problems, verify_file
from .layout import COMMON_FNAME, INTEGRITY_FNAME, contained_path, object_file
from .memory_format import list_node, piece_file_problems
from .serialization import COMMON_STATE_IN_FILE, common_state_place, load_common_state_dict, load_sharded_metadata
from .single_file import read_safetensors_index
from .storage import storage_of
from .strategies.config import ZARR_ENGINES
from .strategies.dcp_format import METADATA_FNAME as DCP_METADATA
from .strategies.dcp_format import check_chunks_tile, read_dcp_index
from .strategies.zarr_format import damaged_chunks
from .strategies.zarr_spec import chunk_shape, list_arrays, read_array_document, read_consolidated

Problem = Tuple[str, str]  # (what is damaged: a key, "common state", ...; the problem and file)


def describe(checkpoint_dir) -> dict:
    """Format, engine, completeness, tensors (shape, dtype, bytes, shard grid), objects and
    common keys of a checkpoint, as plain data."""
    checkpoint_dir = str(checkpoint_dir)
    info = {"path": checkpoint_dir, "complete": False, "problem": None}
    info.update(_disk_usage(checkpoint_dir))
    try:
        metadata = read_metadata(checkpoint_dir)
    except CheckpointingException as e:
        info["problem"] = str(e)
        return info
    if metadata is None:
        info["problem"] = f"no {CONFIG_FNAME}: the save did not finish (or this is not a checkpoint)"
        return info
    config = metadata.config
    info.update(
        complete=True,
        format=_format_name(metadata),
        engine=config.sharded_backend,
        common_backend=config.common_backend,
    )
    try:
        entries = load_sharded_metadata(checkpoint_dir)
        grids = _shard_grids(checkpoint_dir, config.sharded_backend)
    except CheckpointingException as e:  # a damaged index of the engine: report, do not crash
        info.update(tensors=[], objects=[], tensor_bytes=0, common_keys=None, problem=str(e))
        return info
    tensors, objects = [], []
    for name, sh in sorted(entries.items()):
        if hasattr(sh, "dtype"):
            tensors.append({
                "key": name,
                "shape": list(sh.global_shape),
                "dtype": name_of_torch(sh.dtype, name),
                "bytes": math.prod(sh.global_shape) * sh.dtype.itemsize,
                "grid": grids.get(name),
            })
        else:
            objects.append(name)
    info.update(tensors=tensors, objects=objects, tensor_bytes=sum(t["bytes"] for t in tensors))
    try:
        if config.sharded_backend in ZARR_ENGINES and tensors:
            info["zarr_format"] = read_array_document(checkpoint_dir, tensors[0]["key"])["zarr_format"]
        info["common_keys"] = sorted(map(str, load_common_state_dict(checkpoint_dir)))
    except CheckpointingException as e:
        info.setdefault("common_keys", None)
        info["problem"] = str(e)
    return info


def _format_name(metadata: CheckpointMetadata) -> str:
    if metadata.foreign:
        return f"{metadata.foreign} (read-only)"
    if metadata.is_legacy:
        return "Megatron-Core (no index)"
    return f"dist_checkpointing v{metadata.format_version}"


def _disk_usage(checkpoint_dir: str) -> dict:
    sizes = storage_of(checkpoint_dir).files(checkpoint_dir)
    return {"files": len(sizes), "bytes_on_disk": sum(sizes.values())}


def _shard_grids(checkpoint_dir: str, engine: str) -> Dict[str, List[int]]:
    """key -> stored pieces along each axis (Zarr chunks, or distinct DCP chunk offsets);
    none for safetensors (one piece per tensor)."""
    if engine == "safetensors":
        return {}
    if engine in ZARR_ENGINES:
        grids = {}
        for key in list_arrays(checkpoint_dir):
            document = read_array_document(checkpoint_dir, key)
            grids[key] = [-(-s // c) if c else 0 for s, c in zip(document["shape"], chunk_shape(document))]
        return grids
    index = read_dcp_index(checkpoint_dir)
    return {
        key: [len({offsets[axis] for offsets, _ in stored.chunks}) for axis in range(len(stored.size))]
        for key, stored in index.tensors.items()
    }


def verify(checkpoint_dir, progress: Optional[Callable[[str], None]] = None) -> Tuple[List[Problem], dict]:
    """Checks completeness, every checksum and `integrity.json` where there is one; reads every
    data file once (twice with `integrity.json`). Returns the problems (empty if the checkpoint
    is sound) and counts of what was checked. `progress(name)` is called after each checksummed
    file and each Zarr array."""
    checkpoint_dir = str(checkpoint_dir)
    checked = {"tensors": 0, "objects": 0, "files": 0, "integrity_files": 0}
    try:
        metadata = read_metadata(checkpoint_dir)
    except CheckpointingException as e:
        return [(CONFIG_FNAME, str(e))], checked
    if metadata is None:
        return [(CONFIG_FNAME, f"{os.path.join(checkpoint_dir, CONFIG_FNAME)} is missing: the checkpoint is incomplete")], checked
    problems: List[Problem] = []
    owners = _owners_of_ranges(checkpoint_dir, metadata, problems)
    for name, ranges in sorted((metadata.checksums or {}).items()):
        checked["files"] += 1
        for offset, problem in verify_file(checkpoint_dir, name, ranges):
            problems.append((owners.get((name, offset), name), problem))
        if progress:
            progress(name)
    storage = storage_of(checkpoint_dir)
    if not storage.is_file(os.path.join(checkpoint_dir, COMMON_FNAME)) and _common_state_in_file(checkpoint_dir):
        problems.append(("common state", f"{os.path.join(checkpoint_dir, COMMON_FNAME)} is missing"))
    try:
        integrity = integrity_problems(checkpoint_dir)
    except CheckpointingException as e:
        integrity = [(INTEGRITY_FNAME, str(e))], 0
    if integrity is not None:
        problems.extend(integrity[0])
        checked["integrity_files"] = integrity[1]
    if metadata.config.sharded_backend in ZARR_ENGINES:
        try:
            keys = list_arrays(checkpoint_dir) if metadata.is_legacy else sorted(metadata.tensors)
        except CheckpointingException as e:
            keys, problems = [], problems + [(checkpoint_dir, str(e))]
        try:  # a damaged root document is reported; every array is still checked
            consolidated = read_consolidated(checkpoint_dir)
            consolidated = consolidated.documents if consolidated else {}
        except CheckpointingException as e:
            consolidated, problems = {}, problems + [(checkpoint_dir, str(e))]
        for key in keys:
            checked["tensors"] += 1
            try:
                problems.extend((key, p) for p in _array_problems(checkpoint_dir, key, metadata, consolidated.get(key)))
            except CheckpointingException as e:
                problems.append((key, str(e)))
            if progress:
                progress(key)
        for unique_key in metadata.objects or []:
            checked["objects"] += 1
            if not storage.is_file(object_file(checkpoint_dir, unique_key)):
                problems.append((unique_key, f"{object_file(checkpoint_dir, unique_key)} is missing"))
    if metadata.config.sharded_backend == "safetensors":  # its headers: every byte range inside its file
        try:
            checked["tensors"] = len(read_safetensors_index(checkpoint_dir))
        except CheckpointingException as e:
            problems.append((checkpoint_dir, str(e)))
    return list(dict.fromkeys(problems)), checked


def _common_state_in_file(checkpoint_dir: str) -> bool:
    """Whether the common state belongs in `common.pt` (serialization's rule); so it does where
    the engine's index cannot be read to tell (reported by its own checks)."""
    try:
        return common_state_place(checkpoint_dir) == COMMON_STATE_IN_FILE
    except CheckpointingException:
        return True


def _array_problems(checkpoint_dir: str, key: str, metadata: CheckpointMetadata, consolidated: Optional[dict]) -> List[str]:
    """The array of `key` against the index (shape, dtype) and against the root's
    `consolidated` document of it (which loads use; None if the root lists none), and its
    chunk files."""
    problems = []
    document = read_array_document(checkpoint_dir, key)
    if consolidated is not None and consolidated != document:
        problems.append("its document in the root group's consolidated metadata (which loads read) differs from its own")
    if not metadata.is_legacy:
        entry = metadata.tensors[key]
        dtype = document.get("data_type", document.get("dtype"))
        if document["shape"] != entry.shape or dtype not in (entry.dtype, zarr_v2_dtype(entry.dtype)):
            problems.append(
                f"the array document says shape {document['shape']} and dtype {dtype}, "
                f"{CONFIG_FNAME} says {entry.shape} and {entry.dtype}"
            )
    return problems + damaged_chunks(checkpoint_dir, key)


def _owners_of_ranges(checkpoint_dir: str, metadata: CheckpointMetadata, problems: List[Problem]) -> Dict:
    """(file, offset) -> the key stored there; for torch_dist also checks that `.metadata`
    lists every indexed key, that each key's chunks tile it, and that every listed item lies
    inside an existing file of the checkpoint."""
    owners = {(COMMON_FNAME, 0): "common state"}
    for unique_key in metadata.objects or []:
        owners[(os.path.relpath(object_file(checkpoint_dir, unique_key), checkpoint_dir), 0)] = unique_key
    if metadata.config.sharded_backend != "torch_dist":
        return owners
    try:
        dcp = read_dcp_index(checkpoint_dir)
    except CheckpointingException as e:
        problems.append((DCP_METADATA, str(e)))
        return owners
    stored = set(dcp.tensors) | set(dcp.objects)
    for key in sorted(set(metadata.tensors or ()) | set(metadata.objects or ())):
        if key not in stored:
            problems.append((key, f"{os.path.join(checkpoint_dir, DCP_METADATA)} does not list it"))
    for key, entry in sorted(dcp.tensors.items()):
        try:
            check_chunks_tile(checkpoint_dir, key, entry)
        except CheckpointingException as e:
            problems.append((key, str(e)))
    storage = storage_of(checkpoint_dir)
    sizes: Dict[str, Optional[int]] = {}  # file -> its size; None if missing
    refused = set()  # files that are not inside the checkpoint (reported once)
    for key, item in dcp.stored_items():
        owners[(item.file, item.offset)] = key
        if item.file in refused:
            continue
        if item.file not in sizes:
            try:
                path = contained_path(checkpoint_dir, item.file, f"{DCP_METADATA} (key '{key}')")
            except CheckpointingException as e:
                problems.append((key, str(e)))
                refused.add(item.file)
                continue
            sizes[item.file] = storage.size(path) if storage.is_file(path) else None
        size = sizes[item.file]
        if size is None or size < item.offset + item.length:
            state = "is missing" if size is None else f"ends at byte {size}, before the item's end"
            problems.append((key, f"{os.path.join(checkpoint_dir, item.file)} {state}"))
    return owners


def describe_memory(directory) -> dict:
    """The steps a node's memory-tier directory holds: per step, the saving ranks whose piece
    files are here (its own and those it keeps as replicas), their bytes and tensors, and
    whether every rank of that save is here (else a restore needs other nodes too)."""
    directory = str(directory)
    steps = {}
    for held in list_node(directory):
        index, problems = piece_file_problems(directory, held.step, held.rank)
        entry = steps.setdefault((held.step, held.save_id), {
            "step": held.step, "save_id": held.save_id, "world_size": held.world_size, "ranks": [], "bytes": 0, "tensors": 0, "problems": []})
        entry["ranks"].append(held.rank)
        entry["problems"] += problems
        if index is not None:
            entry["bytes"] += index.nbytes
            entry["tensors"] += len(index.tensors)
    for entry in steps.values():
        entry["all_ranks_here"] = entry["ranks"] == list(range(entry["world_size"]))
    return {"path": directory, "kind": "memory tier node", "steps": [steps[k] for k in sorted(steps)]}


def verify_memory(directory, progress: Optional[Callable[[str], None]] = None) -> Tuple[List[Problem], dict]:
    """Every piece file of a node's memory-tier directory: its index checked, every piece's
    CRC-32C verified."""
    directory = str(directory)
    problems, pieces, files = [], 0, 0
    for held in list_node(directory):
        index, found = piece_file_problems(directory, held.step, held.rank)
        files += 1
        pieces += len(index.tensors) + len(index.objects) + (index.common is not None) if index else 0
        problems += [(f"step {held.step}, rank {held.rank}", p) for p in found]
        if progress:
            progress(f"step {held.step}, rank {held.rank}")
    return problems, {"piece_files": files, "pieces": pieces}

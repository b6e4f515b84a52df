"""The zarr engine (zarr-python 3): one Zarr array per ShardedTensor key.

Save: each main replica writes its shard as exactly one chunk (chunk shape = the save-time
shard shape), so no two ranks touch the same file: no locks, no read-modify-write. Every rank
builds the array metadata in memory from the validated plan; only the holder of the chunk at
the origin writes `zarr.json`. Files are fsync'd as they are written.

Load: each request reads any rectangle of the global array (zarr reads only the chunks it
overlaps), which is what makes resharding free.
"""

import asyncio
import json
import math
import os
import shutil
from typing import Dict, Tuple

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore, StorePath

from ..core import CheckpointingException
from ..dict_utils import dict_list_map_inplace
from ..dtypes import name_of_numpy, name_of_torch, register_zarr_bfloat16, to_numpy, to_torch, torch_dtype
from ..fs import fsync_dirs, parents_up_to, write_durably
from ..layout import check_key, entry_dir
from ..mapping import ShardedTensor, is_main_replica, whole_tensor_metadata
from ..validation import shards_of
from .base import LoadShardedStrategy, SaveShardedStrategy

register_zarr_bfloat16()

ARRAY_METADATA_FNAME = "zarr.json"  # Zarr v3
LEGACY_ARRAY_METADATA_FNAME = ".zarray"  # Zarr v2 (Megatron-Core <= 0.15)


def chunk_shape(sh: ShardedTensor) -> Tuple[int, ...]:
    """The chunk shape of `sh`'s key: the global shape over the fragmentation, rounded up.

    For shards built with `from_rank_offsets` that is the local shape (1 on prepended axes).
    """
    if sh.axis_fragmentations is None:
        raise CheckpointingException(
            f"Key '{sh.key}' has no regular sharding grid (axis_fragmentations is None); the "
            f"zarr engine stores each shard as one chunk of a regular grid."
        )
    return tuple(max(1, math.ceil(g / f)) for g, f in zip(sh.global_shape, sh.axis_fragmentations))


def array_document(global_shape, chunks, dtype_name: str) -> dict:
    """The `zarr.json` this engine writes (specified in docs/format.md)."""
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(global_shape),
        "data_type": dtype_name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": False if dtype_name == "bool" else 0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "attributes": {},
    }


class DurableLocalStore(LocalStore):
    """A zarr LocalStore whose writes are fsync'd, remembering which directories gained entries.

    Chunks are written in place (not via a temporary file): a checkpoint is committed as a whole
    by `metadata.json`, so a half-written chunk only ever exists in an uncommitted directory.
    """

    def __init__(self, root):
        super().__init__(root)
        self.touched_dirs = set()

    async def set(self, key: str, value) -> None:
        await asyncio.to_thread(self._write, key, value.as_buffer_like())

    def _write(self, key: str, data) -> None:
        path = os.path.join(str(self.root), key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_durably(path, data)
        self.touched_dirs.update(parents_up_to(path, str(self.root)))


class ZarrSaveShardedStrategy(SaveShardedStrategy):
    def __init__(self, backend: str = "zarr", version: int = 1):
        super().__init__(backend, version)

    def check_sharding(self, shards_by_key: Dict[str, list]) -> None:
        """Each main shard must be exactly one chunk of its key's regular grid."""
        for key, shards in shards_by_key.items():
            check_key(key)
            tensors = [sh for sh in shards if isinstance(sh, ShardedTensor)]
            if not tensors:
                continue
            chunks = chunk_shape(tensors[0])
            for sh in tensors:
                if sh.flattened_range is not None:
                    raise CheckpointingException(
                        f"Key '{key}' has flattened (distributed-optimizer) shards, which the "
                        f"zarr engine cannot store yet."
                    )
                if chunk_shape(sh) != chunks:
                    raise CheckpointingException(
                        f"Shards of key '{key}' disagree on axis_fragmentations "
                        f"({tensors[0].axis_fragmentations} vs {sh.axis_fragmentations})"
                    )
                if not is_main_replica(sh.replica_id):
                    continue
                offset, shape = sh.global_box()
                expected = tuple(min(c, g - o) for c, g, o in zip(chunks, sh.global_shape, offset))
                if any(o % c for o, c in zip(offset, chunks)) or shape != expected:
                    raise CheckpointingException(
                        f"Shard of key '{key}' at offset {offset} with shape {shape} is not one "
                        f"chunk of the regular grid {chunks} implied by axis_fragmentations "
                        f"{sh.axis_fragmentations}; the zarr engine needs one chunk per shard."
                    )

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        store = DurableLocalStore(str(checkpoint_dir))
        for sh in shards_of(sharded_state_dict, ShardedTensor):
            if is_main_replica(sh.replica_id):
                self._write_shard(store, sh)
        fsync_dirs(store.touched_dirs)

    def _write_shard(self, store: DurableLocalStore, sh: ShardedTensor) -> None:
        doc = array_document(sh.global_shape, chunk_shape(sh), name_of_torch(sh.dtype, sh.key))
        offset, shape = sh.global_box()
        if not any(offset):  # the origin chunk's writer creates the array
            path = os.path.join(entry_dir(store.root, sh.key), ARRAY_METADATA_FNAME)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_durably(path, json.dumps(doc, indent=1).encode())
            store.touched_dirs.update(parents_up_to(path, str(store.root)))
        if 0 in shape:
            return
        array = zarr.Array(
            zarr.AsyncArray(
                metadata=doc,
                store_path=StorePath(store, sh.key),
                config={"write_empty_chunks": True},  # a zero chunk is still written, unscanned
            )
        )
        data = to_numpy(sh.data.detach().to("cpu").contiguous()).reshape(shape)
        array[tuple(slice(o, o + s) for o, s in zip(offset, shape))] = data


class ZarrLoadShardedStrategy(LoadShardedStrategy):
    """Reads Zarr v3 arrays written by this library or tensorstore, and Megatron's Zarr v2."""

    def __init__(self, backend: str = "zarr", version: int = 1):
        super().__init__(backend, version)

    def load(self, sharded_state_dict, checkpoint_dir):
        arrays: Dict[str, zarr.Array] = {}

        def load_one(sh):
            if not isinstance(sh, ShardedTensor):
                return sh
            if sh.key not in arrays:
                arrays[sh.key] = open_array(checkpoint_dir, sh.key)
            return read_request(arrays[sh.key], sh, checkpoint_dir)

        return dict_list_map_inplace(load_one, sharded_state_dict)

    def load_tensors_metadata(self, checkpoint_dir):
        result = {}
        for key in list_arrays(checkpoint_dir):
            array = open_array(checkpoint_dir, key)
            dtype = torch_dtype(name_of_numpy(array.dtype, key))
            result[key] = whole_tensor_metadata(key, dtype, tuple(array.shape))
        return result

    def remove_sharded_tensors(self, checkpoint_dir, key_prefix: str) -> None:
        for key in list_arrays(checkpoint_dir):
            if key.startswith(key_prefix):
                shutil.rmtree(entry_dir(checkpoint_dir, key))
        fsync_dirs([str(checkpoint_dir)])


def list_arrays(checkpoint_dir):
    """Keys of the arrays in a checkpoint directory (those with `zarr.json` or `.zarray`)."""
    keys = []
    for name in sorted(os.listdir(str(checkpoint_dir))):
        path = os.path.join(str(checkpoint_dir), name)
        if os.path.isfile(os.path.join(path, LEGACY_ARRAY_METADATA_FNAME)):
            keys.append(name)
        elif os.path.isfile(os.path.join(path, ARRAY_METADATA_FNAME)):
            with open(os.path.join(path, ARRAY_METADATA_FNAME), "rb") as f:
                if json.loads(f.read()).get("node_type") == "array":
                    keys.append(name)
    return keys


def open_array(checkpoint_dir, key: str) -> zarr.Array:
    path = entry_dir(checkpoint_dir, key)
    if not os.path.isdir(path):
        raise CheckpointingException(
            f"Key '{key}' is not in the checkpoint {checkpoint_dir} (no array at {path}). "
            f"Check the key, or load with strict='log_unexpected' to skip it."
        )
    try:
        return zarr.open_array(LocalStore(path, read_only=True), mode="r")
    except Exception as e:  # zarr raises many types for a damaged array
        raise CheckpointingException(f"Key '{key}': cannot open the Zarr array at {path}: {e}") from e


def read_request(array: zarr.Array, sh: ShardedTensor, checkpoint_dir) -> torch.Tensor:
    """The values of request `sh`, on the device of `sh.data` (CPU if it has none)."""
    stored_dtype = name_of_numpy(array.dtype, sh.key)
    wanted_dtype = name_of_torch(sh.dtype, sh.key)
    if stored_dtype != wanted_dtype:
        where = entry_dir(checkpoint_dir, sh.key)
        raise CheckpointingException(
            f"Key '{sh.key}' is stored as {stored_dtype} in {where}, requested as {wanted_dtype}. "
            f"Request the stored dtype and convert after loading."
        )
    stored_shape = tuple(array.shape)
    if stored_shape != sh.global_shape and not sh.allow_shape_mismatch:
        where = entry_dir(checkpoint_dir, sh.key)
        raise CheckpointingException(
            f"Key '{sh.key}' has global shape {stored_shape} in {where}, requested "
            f"{sh.global_shape}. Set allow_shape_mismatch=True to read the overlap, zero-padded."
        )
    if sh.flattened_range is not None:
        raise CheckpointingException(
            f"Key '{sh.key}': flattened (distributed-optimizer) requests are not supported by "
            f"the zarr engine yet"
        )
    offset, shape = sh.global_box()
    values = _read_box(array, offset, shape)
    tensor = to_torch(values).reshape(sh.local_shape)
    if sh.data is not None and sh.data.device.type != "cpu":
        tensor = tensor.to(sh.data.device)
    return tensor


def _read_box(array: zarr.Array, offset, shape) -> np.ndarray:
    """Reads the box; where it extends past the stored array, zeros."""
    stops = [min(o + s, n) for o, s, n in zip(offset, shape, array.shape)]
    inside = tuple(slice(o, max(o, stop)) for o, stop in zip(offset, stops))
    if all(stop == o + s for stop, o, s in zip(stops, offset, shape)):
        return array[inside] if shape else np.asarray(array[()]).reshape(())
    values = np.zeros(shape, dtype=array.dtype)
    if all(stop > o for stop, o in zip(stops, offset)):
        values[tuple(slice(0, stop - o) for stop, o in zip(stops, offset))] = array[inside]
    return values

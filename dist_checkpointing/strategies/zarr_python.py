"""zarr-python under the zarr engine: the stores and array access it needs, imported only
when an array is written or must be decoded by zarr-python (raw chunks are loaded without it,
zarr_format.RawChunkReads), so that such loads do not pay for importing it.

Each array's metadata is built in memory from the plan (no file is read or locked to create
it), and each rank writes its chunks through a store writing into the save's write target
(whose `sync` makes them durable). Local directories use zarr's LocalStore, object stores its
ObjectStore over the storage layer's own client (storage.py, object_storage.py).
"""

import asyncio
import os

import numpy as np
import zarr
from zarr.core.buffer.cpu import NDBuffer
from zarr.storage import LocalStore, ObjectStore, StorePath

from ..dtypes import register_zarr_bfloat16
from ..storage import storage_of
from .zarr_format import StoredArray

register_zarr_bfloat16()


class _WritesThroughTarget:
    """Chunks are written through the save's write target (`fs.DurableDir` or
    `object_storage.ObjectTarget`), in place: a checkpoint is committed as a whole by
    `metadata.json`, so a half-written chunk only ever exists in an uncommitted checkpoint."""

    async def set(self, key: str, value) -> None:
        await asyncio.to_thread(self._write, key, value.as_buffer_like())

    def _write(self, key: str, data) -> None:
        path = os.path.join(self.location, key)
        self.target.makedirs(os.path.dirname(path))
        self.target.write(path, [data])


class _MissingChunksRaise:
    """For reading: a missing chunk is an error. (zarr-python reads a missing chunk as the fill
    value, which would load a lost file as zeros.)"""

    _DOCUMENTS = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}

    async def get(self, key, prototype, byte_range=None):
        value = await super().get(key, prototype, byte_range)
        if value is None and os.path.basename(key) not in self._DOCUMENTS:
            raise FileNotFoundError(f"chunk file {os.path.join(self.location, key)} is missing")
        return value


class DurableLocalStore(_WritesThroughTarget, LocalStore):
    def __init__(self, target):
        super().__init__(str(target))
        self.target, self.location = target, str(target)


class DurableObjectStore(_WritesThroughTarget, ObjectStore):
    """Keys are the bucket's (an array's StorePath carries the checkpoint's prefix)."""

    def __init__(self, target, storage):
        super().__init__(storage.store)
        self.target, self.location = target, f"s3://{storage.bucket}"


class StrictLocalStore(_MissingChunksRaise, LocalStore):
    def __init__(self, root):
        super().__init__(root, read_only=True)
        self.location = str(root)


class StrictObjectStore(_MissingChunksRaise, ObjectStore):
    def __init__(self, storage):
        super().__init__(storage.store, read_only=True)
        self.location = f"s3://{storage.bucket}"


def write_shards(arrays, shards, target, concurrency: int) -> None:
    """Writes each (key, global offset, values) into `arrays[key]` (ArrayPlans) through the
    save's write target."""
    storage = storage_of(target)
    if storage.local:
        store, root = DurableLocalStore(target), ""
    else:
        store, root = DurableObjectStore(target, storage), storage.key(str(target))
    with zarr.config.set({"async.concurrency": concurrency}):
        for key, offset, data in shards:
            document, data = _encodable(arrays[key].document, data)
            array = zarr.Array(
                zarr.AsyncArray(
                    metadata=document,
                    store_path=StorePath(store, f"{root}/{key}" if root else key),
                    config={"write_empty_chunks": True},  # zero chunks written, not scanned
                )
            )
            array[tuple(slice(o, o + s) for o, s in zip(offset, data.shape))] = data


def open_array(array_dir: str, concurrency: int) -> StoredArray:
    """The existing array at `array_dir`, read-only; a missing chunk is an error."""
    storage = storage_of(array_dir)
    if storage.local:
        array = zarr.open_array(StrictLocalStore(array_dir), mode="r")
    else:
        array = zarr.open_array(StrictObjectStore(storage), path=storage.key(array_dir), mode="r")
    return ZarrArray(array, concurrency)


def _encodable(document: dict, data: np.ndarray):
    """Zarr v2 compressors (numcodecs) take only buffers numpy can describe, which bfloat16
    is not: write those chunks through an int16 view (the same bytes on disk)."""
    if document["zarr_format"] == 2 and data.dtype.name == "bfloat16":
        return dict(document, dtype="<i2"), data.view(np.int16)
    return document, data


class ZarrArray(StoredArray):
    def __init__(self, array: zarr.Array, concurrency: int):
        self.array, self.concurrency = array, concurrency
        self.shape, self.dtype = tuple(array.shape), array.dtype

    def read_into(self, selection, out: np.ndarray) -> None:
        with zarr.config.set({"async.concurrency": self.concurrency}):
            if out.dtype == self.dtype:
                self.array.get_basic_selection(selection or (), out=NDBuffer.from_numpy_array(out))
            else:
                out[...] = self.array[selection or ()]

"""zarr-python under the zarr engine: the stores and array access it needs, imported only
when an array is written or must be decoded by zarr-python (raw chunks are loaded without it,
zarr_format.RawChunkReads), so that such loads do not pay for importing it.

Each array's metadata is built in memory from the plan (no file is read or locked to create
it), and each rank writes its chunks through a store writing into the save's DurableDir (whose
`sync` makes them durable).
"""

import asyncio
import os

import numpy as np
import zarr
from zarr.core.buffer.cpu import NDBuffer
from zarr.storage import LocalStore, StorePath

from ..dtypes import BFLOAT16, register_zarr_bfloat16
from ..fs import DurableDir
from .zarr_format import StoredArray

register_zarr_bfloat16()


class DurableLocalStore(LocalStore):
    """A zarr LocalStore writing through a DurableDir (which makes the files durable).

    Chunks are written in place (not via a temporary file): a checkpoint is committed as a whole
    by `metadata.json`, so a half-written chunk only ever exists in an uncommitted directory.
    """

    def __init__(self, target: DurableDir):
        super().__init__(str(target))
        self.target = target

    async def set(self, key: str, value) -> None:
        await asyncio.to_thread(self._write, key, value.as_buffer_like())

    def _write(self, key: str, data) -> None:
        path = os.path.join(str(self.root), key)
        self.target.makedirs(os.path.dirname(path))
        self.target.write(path, [data])


class StrictLocalStore(LocalStore):
    """A read-only LocalStore for which a missing chunk is an error. (zarr-python reads a
    missing chunk as the fill value, which would load a lost file as zeros.)"""

    _DOCUMENTS = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}

    def __init__(self, root):
        super().__init__(root, read_only=True)

    async def get(self, key, prototype, byte_range=None):
        value = await super().get(key, prototype, byte_range)
        if value is None and os.path.basename(key) not in self._DOCUMENTS:
            raise FileNotFoundError(f"chunk file {os.path.join(str(self.root), key)} is missing")
        return value


def write_shards(arrays, shards, checkpoint_dir: DurableDir, concurrency: int) -> None:
    """Writes each (key, global offset, values) into `arrays[key]` (ArrayPlans) through a
    DurableLocalStore."""
    store = DurableLocalStore(checkpoint_dir)
    with zarr.config.set({"async.concurrency": concurrency}):
        for key, offset, data in shards:
            document, data = _encodable(arrays[key].document, data)
            array = zarr.Array(
                zarr.AsyncArray(
                    metadata=document,
                    store_path=StorePath(store, key),
                    config={"write_empty_chunks": True},  # zero chunks written, not scanned
                )
            )
            array[tuple(slice(o, o + s) for o, s in zip(offset, data.shape))] = data


def open_array(array_dir: str, concurrency: int) -> StoredArray:
    """The existing array at `array_dir`, read-only; a missing chunk is an error."""
    return ZarrArray(zarr.open_array(StrictLocalStore(array_dir), mode="r"), concurrency)


def _encodable(document: dict, data: np.ndarray):
    """Zarr v2 compressors (numcodecs) take only buffers numpy can describe, which bfloat16
    is not: write those chunks through an int16 view (the same bytes on disk)."""
    if document["zarr_format"] == 2 and data.dtype == BFLOAT16:
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

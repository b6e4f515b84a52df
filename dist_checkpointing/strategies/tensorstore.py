"""The tensorstore engine: the Zarr layout (zarr_spec.py) written and read with tensorstore.

Same files as the zarr engine, so either engine reads what the other wrote. Arrays are opened
with `assume_metadata` (the document comes from the plan; nothing is read or locked), with no
chunk cache (a checkpoint is written once and read once), and all shard writes of a rank are
issued at once so tensorstore encodes and writes chunks in parallel.
"""

import functools
import os

import numpy as np

from ..layout import entry_dir
from ..opening import OpenCheckpoint
from ..storage import storage_of
from .zarr_format import StoredArray, ZarrFormatLoadStrategy, ZarrFormatSaveStrategy, engine_chunk_files

DRIVER = {3: "zarr3", 2: "zarr"}


def _tensorstore():
    """The tensorstore library, imported on first use: raw chunks are loaded without it
    (zarr_format.RawChunkReads), so such loads do not pay for importing it."""
    import tensorstore

    return tensorstore


def _context(checkpoint_dir: str, thread_count: int, fsync: bool = False):
    return _tensorstore().Context(
        {
            "cache_pool": {"total_bytes_limit": 0},
            "data_copy_concurrency": {"limit": thread_count},
            "file_io_concurrency": {"limit": thread_count},
            "file_io_sync": fsync,  # each chunk file, where its DurableDir does not syncfs
            **storage_of(checkpoint_dir).tensorstore_context(),
        }
    )


def _spec(checkpoint_dir: str, key: str, zarr_format: int) -> dict:
    array_dir = entry_dir(checkpoint_dir, key)
    return {
        "driver": DRIVER[zarr_format],
        "kvstore": storage_of(array_dir).tensorstore_kvstore(array_dir),
        "store_data_equal_to_fill_value": True,  # every chunk has a file (as zarr-python writes)
        "fill_missing_data_reads": False,  # so a missing file is an error, not zeros
    }


class TensorStoreSaveShardedStrategy(ZarrFormatSaveStrategy):
    """Encodes compressed arrays with tensorstore (raw arrays are written by the layout's own
    writer, zarr_format.RawChunkWrites)."""

    def __init__(self, backend: str = "tensorstore", version: int = 1, config=None):
        super().__init__(backend, version, config)

    def write_shards(self, plan, shards, checkpoint_dir) -> None:
        context = _context(str(checkpoint_dir), self.config.thread_count, fsync=not checkpoint_dir.syncfs)
        opened, writes, files = {}, [], []
        for key, offset, data in shards:
            array = plan.arrays[key]
            if key not in opened:
                spec = dict(_spec(str(checkpoint_dir), key, array.zarr_format), metadata=array.document)
                opened[key] = _tensorstore().open(spec, open=True, assume_metadata=True, context=context).result()
            box = tuple(slice(o, o + s) for o, s in zip(offset, data.shape))
            files += engine_chunk_files(checkpoint_dir, key, array, offset, data.shape)
            writes.append(opened[key][box].write(data))
        for write in writes:
            write.result()
        for path in files:
            checkpoint_dir.add_written(path)


class TensorStoreArray(StoredArray):
    def __init__(self, array):
        self.array = array
        self.shape, self.dtype = tuple(array.shape), np.dtype(array.dtype.numpy_dtype)

    def read_into(self, selection, out: np.ndarray) -> None:
        if out.dtype == self.dtype:
            _tensorstore().array(out, copy=False, write=True).write(self.array[selection]).result()
        else:
            out[...] = self.array[selection].read().result()


class TensorStoreLoadShardedStrategy(ZarrFormatLoadStrategy):
    """Reads the same arrays as the zarr engine (Zarr v3 and v2, Megatron's Zarr v2 included)."""

    def __init__(self, backend: str = "tensorstore", version: int = 1, config=None):
        super().__init__(backend, version, config)

    def open_array(self, checkpoint_dir, key: str, zarr_format: int) -> StoredArray:
        """Arrays of one open checkpoint share one context (one concurrency limit), made when
        the first array needs the engine (raw chunks are read without it)."""
        path = os.fspath(checkpoint_dir)
        make = functools.partial(_context, path, self.config.thread_count)
        context = checkpoint_dir.parsed(("tensorstore", self.config.thread_count), make) if isinstance(checkpoint_dir, OpenCheckpoint) else make()
        return TensorStoreArray(_tensorstore().open(_spec(path, key, zarr_format), open=True, read=True, context=context).result())

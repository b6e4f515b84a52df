"""The zarr engine: the Zarr layout (zarr_spec.py) written, and read where an engine must
decode, with zarr-python 3 (zarr_python.py, imported on first use)."""

from ..layout import entry_dir
from .zarr_format import StoredArray, ZarrFormatLoadStrategy, ZarrFormatSaveStrategy


class ZarrSaveShardedStrategy(ZarrFormatSaveStrategy):
    def __init__(self, backend: str = "zarr", version: int = 1, config=None):
        super().__init__(backend, version, config)

    def write_shards(self, plan, shards, checkpoint_dir) -> None:
        from . import zarr_python

        zarr_python.write_shards(plan.arrays, shards, checkpoint_dir, self.config.thread_count)


class ZarrLoadShardedStrategy(ZarrFormatLoadStrategy):
    """Reads Zarr v3 and v2 arrays written by either Zarr engine, and Megatron's Zarr v2."""

    def __init__(self, backend: str = "zarr", version: int = 1, config=None):
        super().__init__(backend, version, config)

    def open_array(self, checkpoint_dir: str, key: str, zarr_format: int) -> StoredArray:
        from . import zarr_python

        return zarr_python.open_array(entry_dir(checkpoint_dir, key), self.config.thread_count)

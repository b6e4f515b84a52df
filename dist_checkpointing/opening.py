"""A checkpoint opened once per load (DCP's `set_up_storage_reader(metadata)`, Orbax's handlers).

`open_checkpoint` resolves the location's storage and parses `metadata.json` and the index with its
checksums once; the engine's own index
(`.metadata`, the Zarr array documents) is parsed on first use and kept. The load hands the
`OpenCheckpoint` to the strategies where Megatron-Core's signatures take a directory: it is an
`os.PathLike` of that directory, so a strategy called with a plain path (as Megatron-Core code
calls them) opens it itself, and one called with the open checkpoint reads nothing twice.
"""

import os
from typing import Callable, Dict, Hashable, Optional

from .core import CheckpointMetadata, read_metadata, require_complete_checkpoint
from .integrity import ChecksumIndex
from .storage import storage_of
from .storage_interface import Storage


class OpenCheckpoint(os.PathLike):
    """A checkpoint directory, the storage it is on, and what has been parsed of it."""

    def __init__(self, path: str, storage: Storage, metadata: Optional[CheckpointMetadata]):
        self.path, self.storage = path, storage
        self.metadata = metadata  # None where there is no metadata.json (strategies used directly)
        self.checksums = ChecksumIndex(metadata.checksums if metadata else None)
        self._parsed: Dict[Hashable, object] = {}

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"OpenCheckpoint({self.path!r})"

    def parsed(self, name: Hashable, parse: Callable[[], object]):
        """What `parse()` returns for entry `name` (e.g. an engine's index), parsed once."""
        if name not in self._parsed:
            self._parsed[name] = parse()
        return self._parsed[name]


def open_checkpoint(checkpoint_dir, require_complete: bool = False) -> OpenCheckpoint:
    """`checkpoint_dir` opened (itself if it already is an OpenCheckpoint); with
    `require_complete`, a directory without `metadata.json` raises a clear error."""
    if isinstance(checkpoint_dir, OpenCheckpoint):
        return checkpoint_dir
    path = os.fspath(checkpoint_dir)
    storage = storage_of(path)
    metadata = require_complete_checkpoint(path, storage) if require_complete else read_metadata(path, storage)
    return OpenCheckpoint(path, storage, metadata)

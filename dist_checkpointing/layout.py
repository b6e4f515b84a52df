"""Where each entry of a checkpoint lives in its directory (see docs/format.md).

Keys become directory names, so a key must be a single safe path component: a key such as
`../x` must never make a save write outside the checkpoint directory. Likewise every file name a
checkpoint's documents refer to (checksummed files, DCP data files) is resolved with
`contained_path`, the one place that decides whether a path read from a checkpoint stays inside
it.
"""

import os
from typing import FrozenSet, Optional

from .errors import CheckpointingException
from .storage import storage_of
from .storage_interface import Storage

CONFIG_FNAME = "metadata.json"  # the commit marker, written last
INDEX_FNAME = "index.json"  # our index of the content, written just before metadata.json
INTEGRITY_FNAME = "integrity.json"  # SHA-256 of every file (Megatron-Core's, optional)
COMMON_FNAME = "common.pt"
DCP_METADATA_FNAME = ".metadata"  # PyTorch DCP's index, which DCP itself writes last
ZARR_GROUP_FNAME = "zarr.json"  # the Zarr engines' root group (their consolidated metadata)
_RESERVED = {CONFIG_FNAME, INDEX_FNAME, INTEGRITY_FNAME, COMMON_FNAME, DCP_METADATA_FNAME, ZARR_GROUP_FNAME}
# Megatron-Core >= 0.19 keeps the common state inside the sharded files, as this ShardedObject
# (global shape (1,), offset (0,)) instead of in common.pt
COMMON_STATE_KEY = "common_state"
COMMON_STATE_UNIQUE_KEY = "common_state/shard_0_1"
# Hugging Face's safetensors directory: one file, or files listed in the index's weight_map
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_MAX_NAME_BYTES = 255


def check_key(key: str) -> str:
    """Returns `key` if it can name a directory entry, else raises naming the rule it breaks."""
    problem = None
    if not isinstance(key, str) or not key:
        problem = "it must be a non-empty string"
    elif "/" in key or "\\" in key or "\0" in key:
        problem = "it must not contain '/', '\\' or NUL"
    elif key.startswith("."):
        problem = "it must not start with '.'"
    elif key in _RESERVED:
        problem = f"{key!r} is a reserved file name"
    elif len(key.encode()) > _MAX_NAME_BYTES:
        problem = f"it must be at most {_MAX_NAME_BYTES} bytes long"
    if problem:
        raise CheckpointingException(f"Invalid checkpoint key {key!r}: {problem}. Rename the entry.")
    return key


def entry_dir(checkpoint_dir, key: str) -> str:
    """The directory of a tensor (a Zarr array) or of the pieces of a ShardedObject."""
    return os.path.join(str(checkpoint_dir), check_key(key))


def object_file(checkpoint_dir, unique_key: str) -> str:
    """`<dir>/<key>/shard_<offsets>_<shape>.pt` for a ShardedObject's unique key."""
    key, shard = split_unique_key(unique_key)
    return os.path.join(entry_dir(checkpoint_dir, key), f"{shard}.pt")


def split_unique_key(unique_key: str):
    """(key, "shard_<offsets>_<shape>") of a ShardedObject's unique key, refused unless both
    are safe file names."""
    parts = unique_key.split("/") if isinstance(unique_key, str) else []
    if len(parts) != 2 or not parts[1].startswith("shard_"):
        raise CheckpointingException(
            f"Invalid ShardedObject unique key {unique_key!r}: expected '<key>/shard_<offsets>_<shape>'"
        )
    check_key(parts[1])
    return check_key(parts[0]), parts[1]


def common_file(checkpoint_dir) -> str:
    return os.path.join(str(checkpoint_dir), COMMON_FNAME)


def relative_path_problem(name) -> str:
    """Why `name` (a path read from a checkpoint) cannot be a file inside the checkpoint
    directory, or "" if it can: it must be relative, with no empty, '.' or '..' component."""
    if not isinstance(name, str) or not name:
        return "it is not a non-empty string"
    if "\0" in name or "\\" in name:
        return "it contains NUL or a backslash"
    if os.path.isabs(name):
        return "it is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "it has an empty, '.' or '..' component"
    return ""


def contained_path(checkpoint_dir, name: str, what: str, storage: Optional[Storage] = None) -> str:
    """The path of file `name` of the checkpoint, refused (naming `what` refers to it) unless it
    stays inside the checkpoint directory, also after following symbolic links (on storage
    that has them; `storage`: the checkpoint's, where the caller has it)."""
    root = str(checkpoint_dir)
    problem = relative_path_problem(name)
    path = os.path.join(root, name) if not problem else ""
    if not problem and (storage or storage_of(root)).links:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            problem = "it resolves (through a symbolic link) outside the checkpoint"
    if problem:
        raise CheckpointingException(
            f"{what} refers to the file {name!r} of checkpoint {root}, which is refused: {problem}. "
            f"A checkpoint only refers to files inside its directory; it is damaged or was tampered with."
        )
    return path


def linked_entries(root: str, storage: Storage) -> FrozenSet[str]:
    """The names directly below directory `root` that are symbolic links (none on a storage
    without links): one listing instead of a query per entry (a model of 10^4 tensors has as
    many array directories)."""
    if not storage.links:
        return frozenset()
    with os.scandir(root) as entries:
        return frozenset(entry.name for entry in entries if entry.is_symlink())


class LinkFreeTree:
    """Files below a directory of a checkpoint that `contained_path` admitted (e.g. a Zarr
    array's), for reading many of them: no component below it may be a symbolic link (the
    files themselves are opened with O_NOFOLLOW), each directory checked once. Cheaper than
    resolving every path, and as strict as `dist-ckpt verify` is about chunk files."""

    def __init__(self, root: str, what: str, storage: Storage):
        self.what, self.storage = what, storage
        self.prefix = os.path.join(root, "")  # a file's path is prefix + name (os.path.join per file costs)
        self.checked = set()

    def path(self, name: str) -> str:
        """The path of file `name` (built by this library, e.g. a chunk key), every directory
        on the way to it checked; open it with `follow_links=False`, and an ELOOP from that
        with `refused`."""
        if self.storage.links and "/" in name:
            parts = name.split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in self.checked:
                    if os.path.islink(self.prefix + directory):
                        raise self.refused(directory)
                    self.checked.add(directory)
        return self.prefix + name

    def refused(self, name: str) -> CheckpointingException:
        return CheckpointingException(
            f"{self.what}: {self.prefix + name} is a symbolic link; the files of a "
            f"checkpoint are never links. It is damaged or was tampered with."
        )

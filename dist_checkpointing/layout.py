"""Where each entry of a checkpoint lives in its directory (see docs/format.md).

Keys become directory names, so a key must be a single safe path component: a key such as
`../x` must never make a save write outside the checkpoint directory.
"""

import os

from .core import CONFIG_FNAME, CheckpointingException

COMMON_FNAME = "common.pt"
_RESERVED = {CONFIG_FNAME, COMMON_FNAME, ".metadata"}
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
    key, shard = unique_key.split("/")
    return os.path.join(entry_dir(checkpoint_dir, key), f"{shard}.pt")


def common_file(checkpoint_dir) -> str:
    return os.path.join(str(checkpoint_dir), COMMON_FNAME)

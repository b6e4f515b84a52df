"""The common strategy: `common.pt` and ShardedObjects as `torch.save` files.

Layout (Megatron-Core's): `<dir>/common.pt`, and one file per ShardedObject piece at
`<dir>/<key>/shard_<offsets>_<shape>.pt`, written by the piece's main replica.
"""

import os

from ..core import CheckpointingException
from ..dict_utils import dict_list_map_inplace, nested_values
from ..integrity import Checksums
from ..layout import COMMON_FNAME, common_file, object_file
from ..mapping import ShardedObject, is_main_replica
from ..opening import OpenCheckpoint, open_checkpoint
from ..pickling import load_object, save_object
from ..storage import storage_of
from .base import LoadCommonStrategy, SaveCommonStrategy, StrategyAction, register_default_strategy

COMMON_STATE_FNAME = COMMON_FNAME  # Megatron-Core's name for it


def register_default_common_strategies() -> None:
    """Makes these strategies the defaults for ("torch", 1) (Megatron-Core's function; the
    defaults are also made on first use)."""
    register_default_strategy(StrategyAction.LOAD_COMMON, "torch", 1, TorchCommonLoadStrategy())
    register_default_strategy(StrategyAction.SAVE_COMMON, "torch", 1, TorchCommonSaveStrategy())


class TorchCommonSaveStrategy(SaveCommonStrategy):
    def __init__(self, backend: str = "torch", version: int = 1):
        super().__init__(backend, version)

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save_common(self, common_state_dict, checkpoint_dir) -> Checksums:
        return {COMMON_FNAME: save_object(common_state_dict, checkpoint_dir, common_file(checkpoint_dir))}

    def save_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir) -> Checksums:
        checksums = {}
        for obj in nested_values(sharded_objects_state_dict):
            if isinstance(obj, ShardedObject) and is_main_replica(obj.replica_id):
                path = object_file(checkpoint_dir, obj.unique_key)
                checkpoint_dir.makedirs(os.path.dirname(path))
                checksums[os.path.relpath(path, str(checkpoint_dir))] = save_object(obj.data, checkpoint_dir, path)
        return checksums


class TorchCommonLoadStrategy(LoadCommonStrategy):
    def __init__(self, backend: str = "torch", version: int = 1):
        super().__init__(backend, version)

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def load_common(self, checkpoint_dir):
        checkpoint = open_checkpoint(checkpoint_dir)
        path = common_file(checkpoint.path)
        state = _load_verified(checkpoint, path, "common state dict")
        if not isinstance(state, dict):
            raise CheckpointingException(
                f"{path} holds a {type(state).__name__}, not the common state dict; the checkpoint is damaged"
            )
        return state

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        checkpoint = open_checkpoint(checkpoint_dir)

        def load_one(obj):
            if not isinstance(obj, ShardedObject):
                return obj
            path = object_file(checkpoint.path, obj.unique_key)
            return _load_verified(checkpoint, path, f"ShardedObject '{obj.unique_key}'")

        return dict_list_map_inplace(load_one, sharded_objects_state_dict)

    def load_sharded_metadata(self, checkpoint_dir):
        """Every `<key>/shard_*.pt` in the directory (for checkpoints without an index)."""
        found = {}
        root = str(checkpoint_dir)
        for name in storage_of(root).files(root):
            parts = name.split("/")
            if len(parts) == 2 and parts[1].startswith("shard_") and parts[1].endswith(".pt"):
                unique_key = name[: -len(".pt")]
                found[unique_key] = ShardedObject.empty_from_unique_key(unique_key)
        return found


def _load_verified(checkpoint: OpenCheckpoint, path: str, what: str):
    name = os.path.relpath(path, checkpoint.path)
    return load_object(checkpoint.checksums.read_file(checkpoint.path, name, what, checkpoint.storage), what, path)

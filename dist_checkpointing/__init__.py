"""Distributed (sharded) checkpoints for PyTorch, API-compatible with Megatron-Core's
`megatron.core.dist_checkpointing`: change the import, keep the model code."""

from .core import CheckpointingConfig, CheckpointingException, check_is_distributed_checkpoint
from .install import install_as_megatron
from .manager import CheckpointManager
from .mapping import (
    LocalNonpersistentObject,
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
    apply_factory_merges,
    is_main_replica,
)
from .memory_tier import MemoryTier
from .serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
    load,
    load_common_state_dict,
    load_content_metadata,
    load_plain_tensors,
    load_sharded_metadata,
    load_tensors_metadata,
    prepare_async_save,
    remove_sharded_tensors,
    save,
)
from .validation import StrictHandling

__all__ = [
    "CheckpointManager",
    "CheckpointingConfig",
    "CheckpointingException",
    "LocalNonpersistentObject",
    "MemoryTier",
    "ShardedObject",
    "ShardedTensor",
    "ShardedTensorFactory",
    "StrictHandling",
    "apply_factories",
    "apply_factory_merges",
    "check_is_distributed_checkpoint",
    "get_default_load_sharded_strategy",
    "get_default_save_sharded_strategy",
    "install_as_megatron",
    "is_main_replica",
    "load",
    "load_common_state_dict",
    "load_content_metadata",
    "load_plain_tensors",
    "load_sharded_metadata",
    "load_tensors_metadata",
    "prepare_async_save",
    "remove_sharded_tensors",
    "save",
]

"""Every module and name that Megatron-Core's own code imports from
`megatron.core.dist_checkpointing` (0.15 and 0.16: `megatron/core/**` outside it,
`megatron/training/**`, `megatron/post_training/**`, and its dist_checkpointing unit tests)
exists in the library; and `install_as_megatron()` makes those imports resolve to it."""

import importlib
import subprocess
import sys
import textwrap

import pytest

# relative module -> names (collected from the sources of Megatron-LM core_v0.15.0 and core_r0.16.0)
MEGATRON_IMPORTS = {
    "": ["ShardedTensor", "ShardedObject", "LocalNonpersistentObject", "load", "save", "load_content_metadata",
         "load_plain_tensors", "load_common_state_dict", "load_tensors_metadata", "remove_sharded_tensors",
         "check_is_distributed_checkpoint"],
    "core": ["CheckpointingException", "maybe_load_config"],
    "dict_utils": ["dict_list_map_outplace", "dict_list_map_inplace", "diff", "map_reduce", "merge", "nested_values",
                   "extract_matching_values"],
    "exchange_utils": ["_get_empty_tensor_for_exchange", "distribute_shards_to_ranks", "ShardDistribution",
                       "determine_main_replica_uniform_distribution", "exchange_by_distribution"],
    "mapping": ["LocalNonpersistentObject", "ReplicaId", "ShardedBase", "ShardedObject", "ShardedStateDict",
                "ShardedTensor", "ShardedTensorFactory", "StateDict", "apply_factories", "apply_factory_merges",
                "is_main_replica"],
    "optimizer": ["KEEP_VARS_HINT", "get_param_id_to_sharded_param_map", "make_sharded_optimizer_tensor",
                  "optim_state_to_sharding_state"],
    "serialization": ["get_default_load_sharded_strategy", "get_default_save_sharded_strategy", "load_sharded_metadata",
                      "load_tensors_metadata", "CkptShardedMetadata"],
    "strategies.async_utils": ["AsyncCallsQueue", "AsyncRequest"],
    "strategies.base": ["LoadShardedStrategy", "SaveShardedStrategy", "AsyncSaveShardedStrategy", "StrategyAction",
                        "get_default_strategy", "register_default_strategy"],
    "strategies.checkpointable": ["CheckpointableShardedTensor", "LocalShardsContainer"],
    "strategies.common": ["COMMON_STATE_FNAME", "register_default_common_strategies", "TorchCommonSaveStrategy",
                          "TorchCommonLoadStrategy"],
    "strategies.filesystem_async": ["FileSystemWriterAsync", "_results_queue"],
    "strategies.fully_parallel": ["FullyParallelLoadStrategyWrapper", "FullyParallelSaveStrategyWrapper",
                                  "_sharded_tensor_shard_id"],
    "strategies.resharding": ["apply_nd_flattened_tensors_reformulation", "restore_nd_flattened_tensors_formulation"],
    "strategies.torch": ["MCoreLoadPlanner", "TorchDistSaveShardedStrategy", "TorchDistLoadShardedStrategy",
                         "get_reformulation_metadata"],
    "tensor_aware_state_dict": ["MCoreTensorAwareStateDict"],
    "utils": ["_clean_metadata_for_serialization", "add_prefix_for_sharding", "apply_prefix_mapping",
              "extract_nonpersistent", "extract_sharded_tensors", "extract_sharded_tensors_and_factories",
              "extract_sharded_tensors_or_nonpersistent", "extract_sharded_base", "replace_prefix_for_sharding",
              "force_all_tensors_to_non_fp8", "zip_strict", "logger_stack", "debug_time", "debug_msg"],
    "validation": ["StrictHandling", "determine_global_metadata", "validate_sharding_integrity",
                   "validate_integrity_and_strict_load", "parse_strict_flag"],
}


@pytest.mark.parametrize("module", sorted(MEGATRON_IMPORTS))
def test_megatron_imports_exist(module):
    imported = importlib.import_module("dist_checkpointing" + ("." + module if module else ""))
    missing = [name for name in MEGATRON_IMPORTS[module] if not hasattr(imported, name)]
    assert not missing, (module, missing)


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_install_as_megatron_aliases_every_module():
    out = _run(
        """
        import importlib, dist_checkpointing as dc
        dc.install_as_megatron()
        dc.install_as_megatron()  # idempotent
        import megatron.core.dist_checkpointing as mdc
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        import megatron.core
        assert mdc is dc and megatron.core.dist_checkpointing is dc
        assert ShardedTensor is dc.ShardedTensor
        fully_parallel = importlib.import_module("dist_checkpointing.strategies.fully_parallel")
        assert FullyParallelSaveStrategyWrapper is fully_parallel.FullyParallelSaveStrategyWrapper
        for name in ("utils", "exchange_utils", "strategies.torch", "strategies.resharding", "tensor_aware_state_dict"):
            assert importlib.import_module("megatron.core.dist_checkpointing." + name) is importlib.import_module("dist_checkpointing." + name)
        try:
            importlib.import_module("megatron.core.dist_checkpointing.no_such_module")
        except ModuleNotFoundError:
            print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_install_as_megatron_after_megatron_raises():
    out = _run(
        """
        import megatron.core.dist_checkpointing
        import dist_checkpointing as dc
        try:
            dc.install_as_megatron()
        except dc.CheckpointingException as e:
            print(e)
        """
    )
    assert "must run before Megatron-Core is imported" in out

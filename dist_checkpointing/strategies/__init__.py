"""Storage engines. One module per engine; `base` says what an engine implements."""

_registered = False


def register_builtin_strategies() -> None:
    """Registers the built-in engines as defaults (on first use: engines import heavy libraries)."""
    global _registered
    if _registered:
        return
    _registered = True
    from .base import StrategyAction, register_default_strategy
    from .common import TorchCommonLoadStrategy, TorchCommonSaveStrategy
    from .zarr import ZarrLoadShardedStrategy, ZarrSaveShardedStrategy

    register_default_strategy(StrategyAction.SAVE_COMMON, "torch", 1, TorchCommonSaveStrategy())
    register_default_strategy(StrategyAction.LOAD_COMMON, "torch", 1, TorchCommonLoadStrategy())
    register_default_strategy(StrategyAction.SAVE_SHARDED, "zarr", 1, ZarrSaveShardedStrategy())
    register_default_strategy(StrategyAction.LOAD_SHARDED, "zarr", 1, ZarrLoadShardedStrategy())

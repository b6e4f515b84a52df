"""Storage engines. One module per engine; `base` says what an engine implements.

Engines are imported on first use (they import heavy libraries): zarr (zarr-python),
tensorstore (same Zarr files, C++ engine) and torch_dist (PyTorch DCP format).
"""

import importlib
from typing import Tuple

from .config import ENGINES, StrategyConfig

_ENGINE_CLASSES = {
    "zarr": ("zarr", "ZarrSaveShardedStrategy", "ZarrLoadShardedStrategy"),
    "tensorstore": ("tensorstore", "TensorStoreSaveShardedStrategy", "TensorStoreLoadShardedStrategy"),
    "torch_dist": ("torch", "TorchDistSaveShardedStrategy", "TorchDistLoadShardedStrategy"),
}
_registered = False


def engine_classes(backend: str) -> Tuple[type, type]:
    """The (save, load) strategy classes of an engine."""
    module_name, save_name, load_name = _ENGINE_CLASSES[backend]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, save_name), getattr(module, load_name)


def save_strategy_from_config(config: StrategyConfig):
    return engine_classes(config.backend)[0](config.backend, 1, config)


def load_strategy_from_config(config: StrategyConfig):
    return engine_classes(config.backend)[1](config.backend, 1, config)


def register_builtin_strategies() -> None:
    """Registers the built-in engines as the defaults for their (backend, 1)."""
    global _registered
    if _registered:
        return
    _registered = True
    from .base import StrategyAction, register_default_strategy
    from .common import TorchCommonLoadStrategy, TorchCommonSaveStrategy

    register_default_strategy(StrategyAction.SAVE_COMMON, "torch", 1, TorchCommonSaveStrategy())
    register_default_strategy(StrategyAction.LOAD_COMMON, "torch", 1, TorchCommonLoadStrategy())
    for backend in ENGINES:
        config = StrategyConfig(backend=backend)
        register_default_strategy(StrategyAction.SAVE_SHARDED, backend, 1, save_strategy_from_config(config))
        register_default_strategy(StrategyAction.LOAD_SHARDED, backend, 1, load_strategy_from_config(config))

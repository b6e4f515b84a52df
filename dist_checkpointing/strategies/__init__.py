"""Storage engines. One module per engine; `base` says what an engine implements.

Engines are imported on first use (they import heavy libraries): zarr (zarr-python),
tensorstore (same Zarr files, C++ engine) and torch_dist (PyTorch DCP format); and a reader of
Hugging Face safetensors directories (backend "safetensors", load only).
"""

import importlib
from typing import Tuple

from .config import ENGINES, StrategyConfig

_ENGINE_CLASSES = {
    "zarr": ("zarr", "ZarrSaveShardedStrategy", "ZarrLoadShardedStrategy"),
    "tensorstore": ("tensorstore", "TensorStoreSaveShardedStrategy", "TensorStoreLoadShardedStrategy"),
    "torch_dist": ("torch", "TorchDistSaveShardedStrategy", "TorchDistLoadShardedStrategy"),
}


def engine_class(backend: str, action: str) -> type:
    """An engine's strategy class for `action` ("save" or "load"); only what it needs is
    imported (a torch_dist load does not import DCP's package)."""
    module_name, save_name, load_name = _ENGINE_CLASSES[backend]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, save_name if action == "save" else load_name)


def save_strategy_from_config(config: StrategyConfig):
    return engine_class(config.backend, "save")(config.backend, 1, config=config)


def load_strategy_from_config(config: StrategyConfig):
    return engine_class(config.backend, "load")(config.backend, 1, config=config)


READ_ONLY_BACKENDS = ("safetensors",)


def builtin_backends(action) -> Tuple[Tuple[str, int], ...]:
    """The (backend, version) pairs with a built-in strategy for `action`."""
    from .base import StrategyAction

    if action in (StrategyAction.SAVE_COMMON, StrategyAction.LOAD_COMMON):
        return (("torch", 1),)
    readers = READ_ONLY_BACKENDS if action == StrategyAction.LOAD_SHARDED else ()
    return tuple((backend, 1) for backend in ENGINES + readers)


def builtin_strategy(action, backend: str, version: int):
    """A new built-in strategy for `action` and (backend, version), or None if there is none.
    Only that engine's module (and the libraries it needs) is imported."""
    from .base import StrategyAction

    if (backend, version) not in builtin_backends(action):
        return None
    if action in (StrategyAction.SAVE_COMMON, StrategyAction.LOAD_COMMON):
        from .common import TorchCommonLoadStrategy, TorchCommonSaveStrategy

        return TorchCommonSaveStrategy() if action == StrategyAction.SAVE_COMMON else TorchCommonLoadStrategy()
    if backend == "safetensors":
        from .safetensors import SafetensorsLoadShardedStrategy

        return SafetensorsLoadShardedStrategy()
    config = StrategyConfig(backend=backend)
    if action == StrategyAction.SAVE_SHARDED:
        return save_strategy_from_config(config)
    return load_strategy_from_config(config)

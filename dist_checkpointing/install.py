"""`install_as_megatron()`: this library stands in for `megatron.core.dist_checkpointing`.

Megatron-Core's model, optimizer and training code import `megatron.core.dist_checkpointing`
and its submodules by name. After `install_as_megatron()`, each of those names resolves to the
module of this library with the same relative name (`megatron.core.dist_checkpointing.mapping`
is `dist_checkpointing.mapping`, the very module object), so Megatron's code builds this
library's ShardedTensors and calls its `save` and `load`. The precedent is
`pymysql.install_as_MySQLdb()`.

Call it before anything imports Megatron-Core (`import megatron.core` already imports its
`dist_checkpointing`); afterwards it raises rather than mix two libraries' classes.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .errors import CheckpointingException

MEGATRON_NAME = "megatron.core.dist_checkpointing"
_LIBRARY_NAME = __name__.rpartition(".")[0]


def _library_name(megatron_name: str) -> str:
    return _LIBRARY_NAME + megatron_name[len(MEGATRON_NAME) :]


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `megatron.core.dist_checkpointing[.X]` as this library's module `[.X]`: the import
    system then binds that module under Megatron's name, and as an attribute of its parent."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != MEGATRON_NAME and not fullname.startswith(MEGATRON_NAME + "."):
            return None
        module = importlib.import_module(_library_name(fullname))  # a missing module raises here
        is_package = hasattr(module, "__path__")
        return importlib.util.spec_from_loader(fullname, self, is_package=is_package)

    def create_module(self, spec):
        return sys.modules[_library_name(spec.name)]

    def exec_module(self, module):
        """Nothing to run: the library's module is already imported."""


def install_as_megatron() -> None:
    """Makes `megatron.core.dist_checkpointing` and each of its submodules this library's
    modules of the same relative name. Idempotent; raises `CheckpointingException` if
    Megatron-Core's own `dist_checkpointing` was imported already."""
    if any(isinstance(finder, _Alias) for finder in sys.meta_path):
        return
    own = sorted(name for name in sys.modules if name == MEGATRON_NAME or name.startswith(MEGATRON_NAME + "."))
    if own:
        raise CheckpointingException(
            f"install_as_megatron() must run before Megatron-Core is imported: {own[0]} is "
            f"already Megatron-Core's own module, which its model code has bound. Call it first "
            f"thing in the program (e.g. at the top of the training script)."
        )
    sys.meta_path.insert(0, _Alias())

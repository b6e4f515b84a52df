"""The one place for pickling rules: nothing read from a checkpoint may run code.

Objects are written with `torch.save` and read with `torch.load(weights_only=True)`, whose
unpickler only builds tensors, containers, primitives and explicitly allowed classes. We allow,
for the duration of a load only, the plain-data classes Megatron-LM's `common.pt` holds
(`argparse.Namespace`, `SimpleNamespace`, `PosixPath`, numpy arrays, scalars and RNG states).
Users allow their own classes globally with `torch.serialization.add_safe_globals([...])`.
"""

import argparse
import hashlib
import io
import pathlib
import pickle
import types

import numpy as np
import torch

from .core import CheckpointingException
from .fs import write_with_durably

SAFE_GLOBALS = [
    argparse.Namespace,
    types.SimpleNamespace,
    pathlib.PosixPath,
    np.ndarray,
    np.dtype,
    np._core.multiarray._reconstruct,
    np._core.multiarray.scalar,
    *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUV"},
]


def save_object(obj, path: str) -> None:
    """`torch.save` to `path`, fsync'd."""
    write_with_durably(path, lambda f: torch.save(obj, f))


def digest_object(obj) -> str:
    """A digest of `obj`'s `torch.save` bytes (deterministic for equal content)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return hashlib.sha256(buffer.getbuffer()).hexdigest()


def load_object(path: str, what: str):
    """`torch.load(path, weights_only=True)`; `what` names the entry in error messages."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointingException(
            f"{what}: file {path} is missing; the checkpoint is damaged or incomplete"
        ) from None
    except pickle.UnpicklingError as e:
        raise _not_allowed(path, what, e) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointingException(f"{what}: cannot read {path}: {e}") from None


def _not_allowed(path: str, what: str, error: Exception) -> CheckpointingException:
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a file too damaged to list its globals: report the original error
        unsafe = []
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in torch.serialization.get_safe_globals()}
    blocked = [name for name in unsafe if name not in allowed]
    if not blocked:
        return CheckpointingException(f"{what}: {path} is not a valid torch.save file ({error})")
    names = ", ".join(blocked)
    return CheckpointingException(
        f"{what}: {path} contains objects of classes that are not allowed to be unpickled: "
        f"{names}. Loading runs with weights_only=True so that a checkpoint cannot run code. "
        f"If you trust these classes, allow them before loading with "
        f"torch.serialization.add_safe_globals([{names}])."
    )

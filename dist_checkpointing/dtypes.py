"""The one dtype table, and the one place that knows about bfloat16.

Names are the Zarr v3 data type names (what `zarr.json` and the index, `index.json`, say).
numpy has no bfloat16; `ml_dtypes.bfloat16` (the type tensorstore uses) stands in for it, and
torch tensors cross into numpy through a 16-bit integer view, which is exact. ml_dtypes is
imported only where a numpy bfloat16 is needed (`bfloat16_numpy`): its import takes 0.6 s
here, which every process would pay (ranks, writers, tools) although most never need it.
"""

import functools
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np
import torch

from .core import CheckpointingException

# name -> (torch dtype, numpy dtype (None for bfloat16: `bfloat16_numpy`), safetensors dtype)
DTYPES = {
    "bool": (torch.bool, np.dtype(np.bool_), "BOOL"),
    "int8": (torch.int8, np.dtype(np.int8), "I8"),
    "int16": (torch.int16, np.dtype(np.int16), "I16"),
    "int32": (torch.int32, np.dtype(np.int32), "I32"),
    "int64": (torch.int64, np.dtype(np.int64), "I64"),
    "uint8": (torch.uint8, np.dtype(np.uint8), "U8"),
    "float16": (torch.float16, np.dtype(np.float16), "F16"),
    "bfloat16": (torch.bfloat16, None, "BF16"),
    "float32": (torch.float32, np.dtype(np.float32), "F32"),
    "float64": (torch.float64, np.dtype(np.float64), "F64"),
}
DTYPE_NAMES = tuple(DTYPES)  # a dtype's code (in a plan) is its position here
_NAME_OF_TORCH = {t: name for name, (t, _, _) in DTYPES.items()}
_CODE_OF_TORCH = {t: code for code, (t, _, _) in enumerate(DTYPES.values())}
_NAME_OF_NUMPY = {n: name for name, (_, n, _) in DTYPES.items() if n is not None}
_NAME_OF_ZARR_V2 = {("bfloat16" if n is None else n.str): name for name, (_, n, _) in DTYPES.items()}
NUMPY_NATIVE = frozenset(t for t, n, _ in DTYPES.values() if n is not None)  # torch dtypes numpy has itself


@functools.cache
def bfloat16_numpy() -> np.dtype:
    """numpy's stand-in for bfloat16 (ml_dtypes', imported on first use)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def name_of_torch(dtype: torch.dtype, key: str = "") -> str:
    try:
        return _NAME_OF_TORCH[dtype]
    except KeyError:
        where = f" (key '{key}')" if key else ""
        raise CheckpointingException(
            f"dtype {dtype}{where} cannot be stored; supported: {sorted(DTYPES)}"
        ) from None


def dtype_code(dtype: torch.dtype, key: str = "") -> int:
    """The position of `dtype` in DTYPE_NAMES (refused like `name_of_torch`)."""
    if dtype not in _CODE_OF_TORCH:
        name_of_torch(dtype, key)  # raises, naming the supported dtypes
    return _CODE_OF_TORCH[dtype]


def name_of_numpy(dtype: np.dtype, key: str = "") -> str:
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":  # only ml_dtypes makes one: it is imported already
        return "bfloat16"
    try:
        return _NAME_OF_NUMPY[dtype.newbyteorder("=")]
    except KeyError:
        where = f" (key '{key}')" if key else ""
        raise CheckpointingException(f"stored dtype {dtype}{where} has no torch equivalent") from None


def zarr_v2_dtype(name: str) -> str:
    """The `.zarray` "dtype" for a table name: numpy's typestr, "bfloat16" as Megatron wrote it."""
    return next(typestr for typestr, known in _NAME_OF_ZARR_V2.items() if known == name)


def name_of_zarr_v2(typestr) -> Optional[str]:
    """The table name of a `.zarray` "dtype" (little-endian or byte-sized); None otherwise."""
    return _NAME_OF_ZARR_V2.get(typestr) if isinstance(typestr, str) else None


def safetensors_dtype(name: str) -> str:
    return DTYPES[name][2]


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name][0]
    except KeyError:
        raise CheckpointingException(f"unknown dtype name {name!r}") from None


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (bfloat16 included); no copy."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(bfloat16_numpy())
    return tensor.numpy()


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing memory with a numpy array (bfloat16 included)."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def register_zarr_bfloat16() -> None:
    """Teaches zarr-python 3 the `bfloat16` data type (Zarr v3 name; v2 name "bfloat16").

    zarr-python has no bfloat16 of its own; tensorstore writes `"data_type": "bfloat16"` in
    zarr.json and Megatron-Core wrote `"dtype": "bfloat16"` in .zarray. Values are raw 2-byte
    little-endian bfloat16 in both.
    """
    from zarr.core.dtype import data_type_registry
    from zarr.core.dtype.npy.float import BaseFloat

    if "bfloat16" in data_type_registry.contents:
        return

    @dataclass(frozen=True, kw_only=True)
    class BFloat16(BaseFloat):
        dtype_cls = type(bfloat16_numpy())
        _zarr_v3_name = "bfloat16"
        _zarr_v2_names: ClassVar = ("bfloat16",)

        @property
        def item_size(self) -> int:
            return 2

    data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)

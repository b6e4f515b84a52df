"""`StrategyConfig`: choosing and tuning an engine from plain data (e.g. a YAML section).

    save(state, dir, sharded_strategy=StrategyConfig.from_dict(yaml["checkpoint"]))

Every field is documented in docs/strategies.md. A config names an engine by its backend; the
same config given to `load` picks the engine that reads (any engine reads the formats it
understands, e.g. tensorstore reads zarr checkpoints and the reverse).
"""

from dataclasses import dataclass, fields
from typing import Optional

from ..core import CheckpointingException

ENGINES = ("zarr", "tensorstore", "torch_dist")
ZARR_ENGINES = ("zarr", "tensorstore")  # the two engines of the one Zarr format
COMPRESSORS = {"zstd": 3, "blosc": 5}  # name -> default level


@dataclass(frozen=True)
class StrategyConfig:
    """How sharded tensors are written and read.

    Attributes:
        backend: the engine: "zarr" (zarr-python, default), "tensorstore" (C++, same files)
            or "torch_dist" (PyTorch DCP format)
        zarr_format: 3 (default) or 2 (Zarr v2 arrays, readable by Megatron-Core <= 0.15 and
            other zarr-python 2 era readers); zarr engines only
        compression: None (default: raw little-endian chunks), "zstd" or "blosc" (blosc with
            zstd inside and byte-shuffle); zarr engines only
        compression_level: the codec's level (default: zstd 3, blosc 5)
        thread_count: I/O threads (or concurrent requests) per rank
        verify_checksums: on load, check each torch_dist item against its recorded CRC-32C
            (default). Zarr v3 chunks are always verified by the engines, which decode the
            `crc32c` codec; common.pt and ShardedObject files are always verified (small)
        common_state_in_dcp: torch_dist only: store the common state inside the DCP files as
            the ShardedObject `common_state` instead of in `common.pt`, the layout of
            Megatron-Core >= 0.19 (which Megatron-Core 0.15/0.16 cannot read)
    """

    backend: str = "zarr"
    zarr_format: int = 3
    compression: Optional[str] = None
    compression_level: Optional[int] = None
    thread_count: int = 8
    verify_checksums: bool = True
    common_state_in_dcp: bool = False

    def __post_init__(self):
        if self.backend not in ENGINES:
            self._fail(f"backend {self.backend!r} is not one of {list(ENGINES)}")
        if self.zarr_format not in (2, 3):
            self._fail(f"zarr_format must be 2 or 3, got {self.zarr_format!r}")
        if self.compression is not None and self.compression not in COMPRESSORS:
            self._fail(f"compression must be None or one of {sorted(COMPRESSORS)}")
        if self.compression_level is not None and self.compression is None:
            self._fail("compression_level needs a compression")
        if self.backend not in ZARR_ENGINES and (self.compression or self.zarr_format != 3):
            self._fail(f"zarr_format and compression apply to {list(ZARR_ENGINES)} only")
        if not isinstance(self.common_state_in_dcp, bool) or (self.common_state_in_dcp and self.backend != "torch_dist"):
            self._fail("common_state_in_dcp must be a bool, and True only for the torch_dist backend")
        if not isinstance(self.verify_checksums, bool):
            self._fail(f"verify_checksums must be a bool, got {self.verify_checksums!r}")
        if not isinstance(self.thread_count, int) or self.thread_count < 1:
            self._fail(f"thread_count must be a positive integer, got {self.thread_count!r}")

    @property
    def level(self) -> Optional[int]:
        """The effective compression level."""
        if self.compression is None:
            return None
        return COMPRESSORS[self.compression] if self.compression_level is None else self.compression_level

    @classmethod
    def from_dict(cls, values: dict) -> "StrategyConfig":
        """Builds a config from plain data; unknown fields are an error, not ignored."""
        if not isinstance(values, dict):
            raise CheckpointingException(f"A strategy config must be a dict, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointingException(
                f"Unknown strategy config fields {unknown}; the fields are {sorted(known)}"
            )
        return cls(**values)

    @staticmethod
    def _fail(problem: str):
        raise CheckpointingException(f"Invalid StrategyConfig: {problem}")

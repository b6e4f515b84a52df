"""The data model: how a local piece of state maps onto a global checkpoint entry.

Model code wraps each local tensor in a `ShardedTensor` (mostly via `from_rank_offsets`), each
piece of non-tensor state that differs per rank in a `ShardedObject`, and everything else stays
a plain value that goes to `common.pt`.
"""

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from .core import CheckpointingException
from .dict_utils import dict_list_map_inplace

logger = logging.getLogger(__name__)

# Hints that tell a plain state dict from one whose tensors are wrapped in Sharded* classes.
StateDict = Dict[str, Any]
CommonStateDict = Dict[str, Any]
ShardedStateDict = Dict[str, Any]
ReplicaId = Union[int, Tuple[int, ...]]


class ShardedBase(ABC):
    """Anything that `save` writes as a piece of a global, possibly sharded, entry."""

    key: str
    data: object
    replica_id: ReplicaId

    @abstractmethod
    def validate_metadata_integrity(self) -> None:
        """Checks the constraints between the metadata attributes."""

    @abstractmethod
    def without_data(self) -> "ShardedBase":
        """A copy with `data=None` (what ranks exchange to plan a save or load)."""


@dataclass
class ShardedTensor(ShardedBase):
    """A local tensor and where it sits in a global tensor.

    Args:
        key: unique identifier of the global tensor
        data: the local tensor (None only in metadata exchanged for validation)
        dtype: tensor dtype
        local_shape: shape of the local tensor
        global_shape: shape of the global tensor
        global_offset: offset of the local tensor in the global one, in elements
        axis_fragmentations: into how many pieces each global axis is split (None: irregular)
        replica_id: 0 (or all zeros) for the main replica, which is the one that gets written
        prepend_axis_num: leading global axes of size 1 in the local view (e.g. a stacked
            layer index): the local tensor is the global slice at fixed indices of those axes
        allow_shape_mismatch: on load, the stored global shape may differ; the request reads
            the stored values it overlaps and is zero-padded elsewhere
        flattened_range: slice of the flattened `local_shape` tensor that `data` holds
            (distributed-optimizer shards)
    """

    key: str
    data: Optional[torch.Tensor] = field(repr=False)
    dtype: torch.dtype
    local_shape: Tuple[int, ...]
    global_shape: Tuple[int, ...]
    global_offset: Tuple[int, ...]
    axis_fragmentations: Optional[Tuple[int, ...]]
    replica_id: ReplicaId = 0
    prepend_axis_num: int = 0
    allow_shape_mismatch: bool = False
    flattened_range: Optional[slice] = None

    def __post_init__(self):
        self.local_shape = tuple(self.local_shape)
        self.global_shape = tuple(self.global_shape)
        self.global_offset = tuple(self.global_offset)
        if self.axis_fragmentations is not None:
            self.axis_fragmentations = tuple(self.axis_fragmentations)
        self.validate_metadata_integrity()

    def validate_metadata_integrity(self) -> None:
        """Checks shape, offset and dtype consistency; raises `CheckpointingException`."""

        def fail(what: str):
            raise CheckpointingException(f"ShardedTensor '{self.key}': {what} ({self})")

        if not isinstance(self.key, str) or not self.key:
            fail("the key must be a non-empty string")
        if self.data is not None:
            if self.data.dtype != self.dtype:
                fail(f"data dtype {self.data.dtype} differs from `dtype` {self.dtype}")
            if self.flattened_range is None and tuple(self.data.shape) != self.local_shape:
                fail(f"data shape {tuple(self.data.shape)} differs from `local_shape`")
        if len(self.global_shape) != len(self.global_offset):
            fail("global_offset must have as many dimensions as global_shape")
        if len(self.local_shape) + self.prepend_axis_num != len(self.global_shape):
            fail("local_shape plus prepend_axis_num must have as many dimensions as global_shape")
        if any(o < 0 for o in self.global_offset) or any(s < 0 for s in self.global_shape):
            fail("offsets and shapes must be non-negative")
        if self.axis_fragmentations is not None:
            if len(self.axis_fragmentations) != len(self.global_shape):
                fail("axis_fragmentations must have as many dimensions as global_shape")
            for off, sh in zip(self.global_offset[self.prepend_axis_num :], self.local_shape):
                if sh != 0 and off % sh != 0:
                    fail(f"global offset {off} is not a multiple of the local shape {sh}")
        if self.flattened_range is not None:
            r = self.flattened_range
            if not isinstance(r, slice) or r.step not in (None, 1) or not all(
                isinstance(x, int) for x in (r.start, r.stop)
            ):
                fail("flattened_range must be a slice with integer start and stop, and step 1")
            numel = math.prod(self.local_shape)
            if not (0 <= r.start <= r.stop <= numel):
                fail(f"flattened_range {r} exceeds the {numel} elements of local_shape")
            if self.data is not None and tuple(self.data.shape) != (r.stop - r.start,):
                fail(f"flat data must have shape ({r.stop - r.start},)")

    @property
    def data_shape(self) -> Tuple[int, ...]:
        """The shape of `data`: `local_shape`, or the flat range's length for a flattened shard."""
        r = self.flattened_range
        return self.local_shape if r is None else (r.stop - r.start,)

    @property
    def nbytes(self) -> int:
        return math.prod(self.data_shape) * self.dtype.itemsize

    @property
    def has_regular_grid(self) -> bool:
        return self.axis_fragmentations is not None

    def global_slice(self) -> Tuple[Union[int, slice], ...]:
        """Index of this shard in the global tensor (ints on prepended axes)."""
        n = self.prepend_axis_num
        return tuple(self.global_offset[:n]) + tuple(
            slice(off, off + sh) for off, sh in zip(self.global_offset[n:], self.local_shape)
        )

    def global_box(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(offset, shape) of the region covered in the global tensor, prepended axes as size 1."""
        return self.global_offset, (1,) * self.prepend_axis_num + self.local_shape

    def local_chunk_offset_in_global(self) -> Tuple[int, ...]:
        """Position of this shard in the global grid of shards."""
        n = self.prepend_axis_num
        chunk_offset = list(self.global_offset[:n])
        for off, sh in zip(self.global_offset[n:], self.local_shape):
            if sh == 0 or off % sh:
                raise CheckpointingException(f"'{self.key}' is not on a regular grid: {self}")
            chunk_offset.append(off // sh)
        return tuple(chunk_offset)

    def max_allowed_chunks(self) -> Tuple[int, ...]:
        """The chunk shape implied by `axis_fragmentations`."""
        if self.axis_fragmentations is None:
            raise CheckpointingException(f"'{self.key}' has no regular grid: {self}")
        chunks = []
        for axis_sh, axis_fragm in zip(self.global_shape, self.axis_fragmentations):
            if not self.allow_shape_mismatch and axis_sh % axis_fragm != 0:
                raise CheckpointingException(
                    f"'{self.key}': axis shape {axis_sh} not divisible by fragmentation {axis_fragm}"
                )
            chunks.append(axis_sh // axis_fragm)
        return tuple(chunks)

    def without_data(self) -> "ShardedTensor":
        return _without_data(self)

    def covering_box(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """The smallest global box whose values give this shard's data: `global_box()`, or for
        a flattened shard only the rows (along the first local axis) its flat range touches."""
        offset, shape = self.global_box()
        if self.flattened_range is None or not self.local_shape:
            return offset, shape
        first, stop, _ = self._flat_rows()
        offset, shape = list(offset), list(shape)
        offset[self.prepend_axis_num] += first
        shape[self.prepend_axis_num] = max(stop - first, 0)
        return tuple(offset), tuple(shape)

    def from_covering_box(self, values: torch.Tensor) -> torch.Tensor:
        """This shard's data from the values of `covering_box()`."""
        r = self.flattened_range
        if r is None:
            return values.reshape(self.local_shape)
        first, _, row = self._flat_rows() if self.local_shape else (0, 0, 0)
        skipped = first * row
        return values.reshape(-1)[r.start - skipped : r.stop - skipped]

    def load_destination(self) -> Optional[torch.Tensor]:
        """The caller's tensor a load fills in place: `data` when it can hold this request's
        values (the dtype and `data_shape`, any strides and device, not the meta device);
        None when the load must allocate. Writers write through `.detach()` (a parameter that
        requires grad is filled as it is, like `torch.no_grad()` would)."""
        data = self.data
        if data is None or data.is_meta or data.dtype != self.dtype or data.shape != self.data_shape:
            return None
        return data

    def box_target(self, stored_dtype: torch.dtype, host_only: bool = False) -> torch.Tensor:
        """Where a reader writes the values of `covering_box()`, stored as `stored_dtype`: the
        destination (`load_destination`) viewed with the box's leading unit axes; or a new CPU
        tensor of the box where the load must allocate: no destination, a flattened request
        (its box is the rows around its range), a stored dtype other than the request's
        (`deliver` converts), or with `host_only` a destination off the CPU."""
        destination = self.load_destination()
        if (
            destination is None
            or self.flattened_range is not None
            or stored_dtype != self.dtype
            or (host_only and destination.device.type != "cpu")
        ):
            return torch.empty(self.covering_box()[1], dtype=stored_dtype)
        destination = destination.detach()
        return destination[(None,) * self.prepend_axis_num] if self.prepend_axis_num else destination

    def deliver(self, box_values: torch.Tensor) -> torch.Tensor:
        """What a load returns for this request, given the values of its `covering_box()`."""
        data = self.data
        if self.flattened_range is None and not self.prepend_axis_num and data is not None and box_values.dtype == data.dtype:
            if same_elements(box_values, data):
                return data  # read in place (the common case, told apart cheaply)
        return self.fill(self.from_covering_box(box_values))

    def fill(self, values: torch.Tensor) -> torch.Tensor:
        """What a load returns for this request, given its values (of `data_shape`, any dtype;
        on the CPU, or already read into the destination): the destination
        (`load_destination`) filled in place, else the values converted to the request's
        dtype (a checkpoint saved in bf16 loads into fp32, as with Megatron-Core and DCP) and
        moved to `data`'s device when that is not the CPU."""
        destination = self.load_destination()
        if destination is None:
            on_device = self.data is not None and self.data.device.type not in ("cpu", "meta")
            return values.to(device=self.data.device if on_device else values.device, dtype=self.dtype)
        if not same_elements(values, destination):
            destination.detach().copy_(values)  # detached: a parameter that requires grad is filled too
        return destination

    def _flat_rows(self) -> Tuple[int, int, int]:
        """(first row, end row, elements per row) of the local rows the flat range touches."""
        r, row = self.flattened_range, math.prod(self.local_shape[1:])
        if not row:
            return 0, 0, 0
        return r.start // row, -(-r.stop // row), row

    @classmethod
    def from_rank_offsets_flat(
        cls,
        key: str,
        data: torch.Tensor,
        non_flat_local_shape: Tuple[int, ...],
        *args,
        flattened_range: Optional[slice] = None,
        **kwargs,
    ) -> "ShardedTensor":
        """A flattened ShardedTensor: `data` is `flattened_range` of the flattened local shard
        of shape `non_flat_local_shape`, which sits in the global tensor as `from_rank_offsets`
        (with the other arguments) describes. A distributed optimizer's DP ranks each hold one
        contiguous range of the same local shard.
        """
        if flattened_range is None:
            raise CheckpointingException(
                f"'{key}': cannot instantiate a non-flat ShardedTensor with "
                f"`from_rank_offsets_flat`; use `from_rank_offsets` instead"
            )
        if data.ndim != 1:
            raise CheckpointingException(
                f"'{key}': a flattened ShardedTensor requires 1-D data, got shape {tuple(data.shape)}"
            )
        if flattened_range.stop - flattened_range.start != data.numel():
            raise CheckpointingException(
                f"'{key}': flattened data length ({data.numel()}) must equal the length of "
                f"flattened_range {flattened_range}"
            )
        meta = torch.empty(*non_flat_local_shape, dtype=data.dtype, device="meta")
        return replace(cls.from_rank_offsets(key, meta, *args, **kwargs), data=data, flattened_range=flattened_range)

    @classmethod
    def from_rank_offsets(
        cls,
        key: str,
        data: torch.Tensor,
        *rank_offsets: Tuple[int, int, int],
        replica_id: ReplicaId = 0,
        prepend_axis_num: int = 0,
        flattened_range: None = None,
        **init_kwargs,
    ) -> "ShardedTensor":
        """Builds a ShardedTensor from (axis, rank offset along the axis, fragments) triples.

        `(axis, i, n)` says the global tensor is split into `n` equal pieces along `axis`
        and `data` is piece `i`. Axes are global axes, prepended ones included.
        """
        if flattened_range is not None:
            raise ValueError(
                "Cannot instantiate a flat ShardedTensor with `from_rank_offsets`;"
                " use `from_rank_offsets_flat` instead"
            )
        ndim = data.ndim + prepend_axis_num
        global_offset = [0] * ndim
        global_shape = [1] * prepend_axis_num + list(data.shape)
        axis_fragmentations = [1] * ndim
        seen_axes = set()
        for axis, axis_rank_offset, axis_fragm in rank_offsets:
            if (
                not 0 <= axis < ndim
                or axis in seen_axes
                or axis_fragm < 1
                or not 0 <= axis_rank_offset < axis_fragm
            ):
                raise CheckpointingException(f"Invalid rank offsets {rank_offsets} for key '{key}'")
            seen_axes.add(axis)
            local_axis_shape = 1 if axis < prepend_axis_num else data.shape[axis - prepend_axis_num]
            global_shape[axis] = axis_fragm * local_axis_shape
            global_offset[axis] = axis_rank_offset * local_axis_shape
            axis_fragmentations[axis] = axis_fragm
        return cls(
            key,
            data,
            data.dtype,
            tuple(data.shape),
            tuple(global_shape),
            tuple(global_offset),
            tuple(axis_fragmentations),
            replica_id,
            prepend_axis_num,
            **init_kwargs,
        )

    def init_data(self, device: Union[str, torch.device], init_fn=torch.empty) -> None:
        """Allocates `data` (only if it is None)."""
        if self.data is None:
            self.data = init_fn(self.local_shape, dtype=self.dtype, device=device)

    def narrow(self, dim: int, start: int, length: int) -> List["ShardedTensor"]:
        """`torch.narrow` of the local tensor, with the global view narrowed accordingly.

        Every rank narrows its shard the same way, so along `dim` the global shape and offset
        scale by `length / local size`. `dim` does not count prepended axes. A flattened shard
        (narrowed along its first local axis only) keeps the part of its flat range inside
        the narrowed rows: the result is one ShardedTensor, or none if that part is empty.
        """
        axis = dim + self.prepend_axis_num
        local = self.local_shape[dim]
        if self.global_shape[axis] % local or self.global_offset[axis] % local:
            raise CheckpointingException(
                f"Only a regular grid of local tensors can be narrowed, got {self}"
            )
        global_shape = list(self.global_shape)
        global_offset = list(self.global_offset)
        global_shape[axis] = self.global_shape[axis] // local * length
        global_offset[axis] = self.global_offset[axis] // local * length
        local_shape = self.local_shape[:dim] + (length,) + self.local_shape[dim + 1 :]
        if self.flattened_range is None:
            data, flattened_range = self.data.narrow(dim, start, length), None
        else:
            if dim != 0:
                raise CheckpointingException(
                    f"'{self.key}': a flattened ShardedTensor is narrowed along its first local "
                    f"axis only, got dim={dim}"
                )
            row = math.prod(self.local_shape[1:])
            first, stop = max(self.flattened_range.start, start * row), min(self.flattened_range.stop, (start + length) * row)
            if first >= stop:
                return []
            data = self.data[first - self.flattened_range.start : stop - self.flattened_range.start]
            flattened_range = slice(first - start * row, stop - start * row)
        return [
            replace(
                self,
                data=data,
                local_shape=tuple(local_shape),
                global_shape=tuple(global_shape),
                global_offset=tuple(global_offset),
                flattened_range=flattened_range,
            )
        ]


def same_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` view the very same elements in the same order (a load that read
    into the destination in place). Strides of length-1 axes are compared not at all: they
    never address memory, and views, `reshape` and `zeros_like` give them any value."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.device == b.device
        and (a.stride() == b.stride() or all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1))
    )


def whole_tensor_metadata(key: str, dtype: torch.dtype, global_shape, flattened: bool = False) -> ShardedTensor:
    """A data-less ShardedTensor for a whole global tensor (what checkpoint metadata lists).
    `flattened`: as the whole flat range of the tensor (how Megatron-Core lists a key it
    stored flattened, a distributed optimizer's state: loaded, it is 1-D)."""
    global_shape = tuple(global_shape)
    ndim = len(global_shape)
    if not isinstance(key, str) or not key or min(global_shape, default=0) < 0:
        return ShardedTensor(key, None, dtype, global_shape, global_shape, (0,) * ndim, (1,) * ndim)  # raises
    # Built without __init__: what its checks could refuse is checked above, and a checkpoint
    # lists 10^4-10^5 entries (the checks cost twice the object). Set in the fields' order, as
    # __init__ does, so that the entries share their attribute names (a dict built at once
    # would not: 3x the memory).
    entry = object.__new__(ShardedTensor)
    entry.key, entry.data, entry.dtype = key, None, dtype
    entry.local_shape = entry.global_shape = global_shape
    entry.global_offset, entry.axis_fragmentations = (0,) * ndim, (1,) * ndim
    entry.replica_id, entry.prepend_axis_num, entry.allow_shape_mismatch = 0, 0, False
    entry.flattened_range = slice(0, math.prod(global_shape)) if flattened else None
    return entry


def is_main_replica(replica_id: ReplicaId) -> bool:
    """The main replica (integer 0 or all zeros) is the copy that gets written."""
    if isinstance(replica_id, int):
        return replica_id == 0
    return not any(replica_id)  # (of 10^4-10^5 shards: a generator of comparisons costs 3x)


class LocalNonpersistentObject:
    """A value that is not saved; `load` puts the caller's own value back in its place."""

    def __init__(self, obj):
        self.obj = obj

    def unwrap(self):
        return self.obj


@dataclass
class ShardedObject(ShardedBase):
    """A local object that is one piece of a global, n-dimensional grid of objects.

    Unlike a ShardedTensor, the grid cannot be resharded: a load requests the same pieces.

    Args:
        key: unique identifier of the global object
        data: the local object (None only in metadata exchanged for validation)
        global_shape: shape of the grid of objects
        global_offset: position of this object in the grid
        replica_id: 0 (or all zeros) for the main replica, which is the one that gets written
    """

    key: str
    data: object
    global_shape: Tuple[int, ...]
    global_offset: Tuple[int, ...]
    replica_id: ReplicaId = 0

    def __post_init__(self):
        self.global_shape = tuple(self.global_shape)
        self.global_offset = tuple(self.global_offset)
        self.validate_metadata_integrity()

    def validate_metadata_integrity(self) -> None:
        if not isinstance(self.key, str) or not self.key or "/" in self.key:
            raise CheckpointingException(
                f"ShardedObject key must be a non-empty string without '/', got {self.key!r}"
            )
        if len(self.global_shape) != len(self.global_offset):
            raise CheckpointingException(
                f"ShardedObject '{self.key}': global_offset must have as many dimensions as "
                f"global_shape"
            )
        if any(not 0 <= o < s for o, s in zip(self.global_offset, self.global_shape)):
            raise CheckpointingException(
                f"ShardedObject '{self.key}': offset {self.global_offset} outside the grid "
                f"{self.global_shape}"
            )

    def without_data(self) -> "ShardedObject":
        return _without_data(self)

    @property
    def unique_key(self) -> str:
        """`<key>/shard_<offsets>_<shape>`, numbers joined with '.'."""
        return (
            f"{self.key}/shard_"
            f"{'.'.join(map(str, self.global_offset))}_"
            f"{'.'.join(map(str, self.global_shape))}"
        )

    def __str__(self):
        return f"{self.__class__.__name__}(key='{self.key}')"

    @classmethod
    def empty_from_unique_key(cls, unique_key: str, replica_id: ReplicaId = 0) -> "ShardedObject":
        """Parses `<key>/shard_<offsets>_<shape>` back into a ShardedObject with data=None."""
        try:
            key, shard = unique_key.split("/")
            prefix, offset, shape = shard.split("_")
            if prefix != "shard":
                raise ValueError(prefix)
            offset = tuple(map(int, offset.split("."))) if offset else ()
            shape = tuple(map(int, shape.split("."))) if shape else ()
        except ValueError:
            raise CheckpointingException(
                f"Not a ShardedObject unique key: {unique_key!r} "
                f"(expected '<key>/shard_<offsets>_<shape>')"
            ) from None
        return cls(key, None, shape, offset, replica_id)


FactoryBuildFn = Callable[[str, torch.Tensor, ReplicaId, Optional[slice]], ShardedStateDict]
FactoryMergeFn = Callable[[StateDict], torch.Tensor]


@dataclass
class ShardedTensorFactory(ShardedBase):
    """Transforms a tensor into a sharded sub-state-dict on save, and back on load.

    `build_fn(key, data, replica_id, flattened_range)` returns the sub-state-dict that is saved
    (and requested on load); `merge_fn(loaded_sub_state_dict)` returns the tensor again. The
    result must depend only on those arguments, so optimizer states can reuse the factories
    of their parameters.
    """

    key: str
    data: torch.Tensor
    build_fn: FactoryBuildFn
    merge_fn: FactoryMergeFn
    replica_id: ReplicaId = 0
    flattened_range: Optional[slice] = None

    def build(self) -> ShardedStateDict:
        return self.build_fn(self.key, self.data, self.replica_id, self.flattened_range)

    def validate_metadata_integrity(self) -> None:
        """Nothing to check before `build`."""

    def without_data(self) -> "ShardedTensorFactory":
        return _without_data(self)


def _without_data(sharded: ShardedBase) -> ShardedBase:
    """A shallow copy with `data=None`; its metadata was validated when `sharded` was made, so
    it is not validated again (`replace` would: ~25 us each, thousands per save)."""
    clone = object.__new__(type(sharded))  # copy.copy, without its generic machinery (~10x)
    clone.__dict__.update(sharded.__dict__)
    clone.data = None
    return clone


def apply_factories(sharded_state_dict: ShardedStateDict) -> None:
    """Replaces every ShardedTensorFactory by what it builds, in place."""

    def apply(x):
        return x.build() if isinstance(x, ShardedTensorFactory) else x

    dict_list_map_inplace(apply, sharded_state_dict)


def apply_factory_merges(x1: StateDict, x2: ShardedStateDict, key: Tuple = ()) -> StateDict:
    """Merges the sub-state-dicts that factories built back into tensors, in place.

    `x2` holds the factories at the places where `x1` holds what they built (after loading).
    """
    if isinstance(x2, ShardedTensorFactory):
        return x2.merge_fn(x1)
    if isinstance(x1, dict) and isinstance(x2, dict):
        pairs = x2.items()
        for k, _ in pairs:
            if k not in x1:
                raise ValueError(
                    f"Different dict keys encountered in `apply_factory_merges` at {key}: "
                    f"{list(x1.keys())} vs {list(x2.keys())}"
                )
    elif isinstance(x1, list) and isinstance(x2, list):
        if len(x1) != len(x2):
            raise ValueError(
                f"Cannot merge two lists with different lengths ({len(x1)} and {len(x2)}, "
                f"encountered at key {key})"
            )
        pairs = enumerate(x2)
    elif isinstance(x1, list) and isinstance(x2, dict):
        pairs = x2.items()
        for k, _ in pairs:
            if not isinstance(k, int) or not 0 <= k < len(x1):
                raise ValueError(f"Invalid list index {k!r} in a list-dict merge at {key}")
    else:
        raise ValueError(
            f"Duplicate non-dict and non-list values encountered: `{x1}` and `{x2}` (at key {key})"
        )
    for k, v2 in list(pairs):
        x1[k] = apply_factory_merges(x1[k], v2, key + (k,))
    return x1

"""ShardedTensors that stock `torch.distributed.checkpoint.save` and `load` understand
(Megatron-Core's names): DCP's checkpointable protocol (`__create_write_items__`,
`__create_chunk_list__`, `__get_tensor_shard__`) on tensor subclasses standing for a
ShardedTensor, or for several local shards of one key; and Megatron-Core's load planner.

    state_dict = {"w": CheckpointableShardedTensor.from_sh_ten(sharded_tensor)}
    torch.distributed.checkpoint.save(state_dict, checkpoint_id=path)   # each rank its box
    torch.distributed.checkpoint.load(state_dict, checkpoint_id=path)   # into sharded_tensor.data

The chunk of a shard is its global box (prepended axes as axes of length 1), so DCP reshards
between any boxes as this library does. Flattened shards have no box and are refused.
"""

from typing import List, Optional

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from ..core import CheckpointingException
from ..mapping import ShardedTensor
from .resharding import is_nd_flattened_tensor, nd_flattened_tensor_reformulated_global_shape


class _Placeholder(torch.Tensor):
    """A tensor of the global shape that holds no data and takes part in no tensor op."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise CheckpointingException(f"{cls.__name__} stands for shards in a DCP state dict; it supports no tensor operations ({func})")


class CheckpointableShardedTensor(_Placeholder):
    """A ShardedTensor as DCP sees it: a tensor of the global shape whose local chunk is the
    shard's box, written from and read into the ShardedTensor's `data`."""

    def __new__(cls, data: torch.Tensor, sh_ten: ShardedTensor):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(sh_ten.global_shape), dtype=sh_ten.dtype)

    def __init__(self, data: torch.Tensor, sh_ten: ShardedTensor):
        if sh_ten.flattened_range is not None:
            raise CheckpointingException(f"'{sh_ten.key}': a flattened ShardedTensor has no box for DCP to store")
        if data is None or tuple(data.shape) != sh_ten.local_shape:
            raise CheckpointingException(f"'{sh_ten.key}': DCP needs the shard's data, of shape {sh_ten.local_shape}")
        self._sh_ten = sh_ten

    @classmethod
    def from_sh_ten(cls, sh_ten: ShardedTensor) -> "CheckpointableShardedTensor":
        return cls(sh_ten.data, sh_ten)

    def _chunk(self) -> ChunkStorageMetadata:
        offset, shape = self._sh_ten.global_box()
        return ChunkStorageMetadata(offsets=torch.Size(offset), sizes=torch.Size(shape))

    def __create_write_items__(self, fqn: str, sh_ten: "CheckpointableShardedTensor", index: Optional[int] = None) -> List[WriteItem]:
        chunk = sh_ten._chunk()
        return [
            WriteItem(
                index=MetadataIndex(fqn, chunk.offsets, index),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=chunk,
                    properties=TensorProperties.create_from_tensor(sh_ten._sh_ten.data),
                    size=torch.Size(sh_ten._sh_ten.global_shape),
                ),
            )
        ]

    def __create_chunk_list__(self) -> List[ChunkStorageMetadata]:
        return [self._chunk()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        """The shard's data, viewed with the box's leading unit axes (DCP reads into it)."""
        return self._sh_ten.data.view(self._chunk().sizes)

    def __repr__(self):
        return f"{type(self).__name__}({self._sh_ten!r})"


class LocalShardsContainer(_Placeholder):
    """Several local shards of one key (`CheckpointableShardedTensor`s) under one DCP name:
    DCP allows one tensor per name and rank."""

    def __new__(cls, local_shards: List[CheckpointableShardedTensor]):
        if not local_shards:
            raise CheckpointingException("A LocalShardsContainer needs at least one shard")
        return torch.Tensor._make_wrapper_subclass(cls, local_shards[0].size(), dtype=local_shards[0].dtype)

    def __init__(self, local_shards: List[CheckpointableShardedTensor]):
        if not all(isinstance(shard, CheckpointableShardedTensor) for shard in local_shards):
            raise CheckpointingException("A LocalShardsContainer holds CheckpointableShardedTensors")
        self._local_shards = list(local_shards)

    def __create_write_items__(self, fqn: str, container: "LocalShardsContainer") -> List[WriteItem]:
        return [item for i, shard in enumerate(container._local_shards) for item in shard.__create_write_items__(fqn, shard, index=i)]

    def __create_chunk_list__(self) -> List[ChunkStorageMetadata]:
        return [shard._chunk() for shard in self._local_shards]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        shard = _find(self._local_shards, [shard._chunk().offsets for shard in self._local_shards], index)
        return shard.__get_tensor_shard__(index)

    def __repr__(self):
        return f"{type(self).__name__}({self._local_shards!r})"


def _find(items: list, offsets: List[torch.Size], index: MetadataIndex):
    """The item at `index.offset` (`index.index`, DCP's position hint, is tried first)."""
    if index.index is not None and index.index < len(items) and offsets[index.index] == index.offset:
        return items[index.index]
    for item, offset in zip(items, offsets):
        if offset == index.offset:
            return item
    raise CheckpointingException(f"No local shard of '{index.fqn}' at offset {tuple(index.offset or ())}")


class MCoreLoadPlanner(DefaultLoadPlanner):
    """Megatron-Core's DCP load planner, for stock `torch.distributed.checkpoint.load`: DCP's
    default planner that first checks the global shapes of `shapes_validation_sharded_tensors`
    against the checkpoint's (a flattened one against its n-d formulation);
    `allow_shape_mismatch_sharded_tensors` are not checked."""

    def __init__(self, *args, shapes_validation_sharded_tensors=(), allow_shape_mismatch_sharded_tensors=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.shapes_validation_sharded_tensors = shapes_validation_sharded_tensors
        self.allow_shape_mismatch_sharded_tensors = allow_shape_mismatch_sharded_tensors

    def _validate_global_shapes(self, metadata: Metadata, sharded_tensors) -> None:
        for sh in sharded_tensors:
            stored = metadata.state_dict_metadata.get(sh.key)
            if not isinstance(stored, TensorStorageMetadata):
                raise CheckpointingException(f"Key '{sh.key}' is not a tensor of the checkpoint")
            reformulated = is_nd_flattened_tensor(sh) and len(sh.global_shape) > 1
            expected = nd_flattened_tensor_reformulated_global_shape(sh) if reformulated else sh.global_shape
            if tuple(stored.size) != tuple(expected):
                raise CheckpointingException(
                    f"Global shape mismatch for loaded ({tuple(stored.size)}) and expected ({tuple(expected)}) "
                    f"tensor for key {sh.key}"
                )

    def create_local_plan(self):
        self._validate_global_shapes(self.metadata, self.shapes_validation_sharded_tensors)
        return super().create_local_plan()

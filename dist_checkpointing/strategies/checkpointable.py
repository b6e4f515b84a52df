"""ShardedTensors that stock `torch.distributed.checkpoint.save` and `load` understand
(Megatron-Core's names): DCP's checkpointable protocol (`__create_write_items__`,
`__create_chunk_list__`, `__get_tensor_shard__`) on tensor subclasses standing for a
ShardedTensor, or for several local shards of one key.

    state_dict = {"w": CheckpointableShardedTensor.from_sh_ten(sharded_tensor)}
    torch.distributed.checkpoint.save(state_dict, checkpoint_id=path)   # each rank its box
    torch.distributed.checkpoint.load(state_dict, checkpoint_id=path)   # into sharded_tensor.data

The chunk of a shard is its global box (prepended axes as axes of length 1), so DCP reshards
between any boxes as this library does. Flattened shards have no box and are refused.
"""

from typing import List, Optional

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from ..core import CheckpointingException
from ..mapping import ShardedTensor


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


class BoxesToRead(_Placeholder):
    """Boxes of one stored tensor that a load reads into, as a DCP state dict value: the
    torch_dist engine's request to its planner (`torch.MCoreLoadPlanner`). Each box is (global
    offset, the tensor it is read into), a chunk in the order added."""

    def __new__(cls, size: torch.Size, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, size, dtype=dtype)

    def __init__(self, size: torch.Size, dtype: torch.dtype):
        self.offsets: List[torch.Size] = []
        self.targets: List[torch.Tensor] = []

    def add(self, offset, target: torch.Tensor) -> None:
        self.offsets.append(torch.Size(offset))
        self.targets.append(target)

    def __create_chunk_list__(self) -> List[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=o, sizes=t.shape) for o, t in zip(self.offsets, self.targets)]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return _find(self.targets, self.offsets, index)


def _find(items: list, offsets: List[torch.Size], index: MetadataIndex):
    """The item at `index.offset` (`index.index`, DCP's position hint, is tried first)."""
    if index.index is not None and index.index < len(items) and offsets[index.index] == index.offset:
        return items[index.index]
    for item, offset in zip(items, offsets):
        if offset == index.offset:
            return item
    raise CheckpointingException(f"No local shard of '{index.fqn}' at offset {tuple(index.offset or ())}")

"""The torch_dist engine (module name as in Megatron-Core): PyTorch's DCP format, laid out as
Megatron-Core lays it out.

Files: `.metadata` (a pickle of DCP's `Metadata`: each key's global size, dtype and chunk boxes,
and where each chunk's bytes are) and `__<rank>_<n>.distcp` data files, each a concatenation of
`torch.save` blobs. A DCP tensor is named by the ShardedTensor key and its chunks are the main
replicas' boxes (prepended axes included); a ShardedObject is a byte entry named by its
unique key holding `torch.save([value])`. Stock `torch.distributed.checkpoint.load` and
Megatron-Core's loader read it.

We write the data files ourselves instead of calling DCP's `save`: `serialization.save` has
already exchanged and validated the plan (DCP would do both again, with its own collectives),
and fs.py makes every file durable. Reads go through DCP's FileSystemReader; `.metadata` is
unpickled with an allow-list (pickling.py).
"""

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.storage import WriteResult

from ..collectives import get_rank
from ..core import CheckpointingException
from ..dict_utils import dict_list_map_inplace, nested_values
from ..dtypes import name_of_torch
from ..fs import atomic_write, fsync_dir, write_with_durably
from ..mapping import ShardedObject, ShardedTensor, is_main_replica, whole_tensor_metadata
from ..pickling import dump_dcp_metadata, dump_object, load_dcp_metadata, load_object
from ..validation import check_request_against_stored
from .base import LoadShardedStrategy, SaveShardedStrategy
from .config import StrategyConfig

METADATA_FNAME = ".metadata"
DCP_VERSION = "1.0.0"  # the `Metadata.version` DCP of torch 2.6+ writes


class TorchDistSaveShardedStrategy(SaveShardedStrategy):
    """Writes ShardedTensors and ShardedObjects in the DCP format."""

    def __init__(self, backend: str = "torch_dist", version: int = 1, config: Optional[StrategyConfig] = None):
        super().__init__(backend, version)
        self.config = config or StrategyConfig(backend="torch_dist")
        self.state_dict_metadata: Dict[str, object] = {}

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def plan(self, shards_by_key) -> None:
        """DCP's per-key metadata, from the main replicas of the global plan."""
        self.state_dict_metadata = {}
        for key, ranked in shards_by_key.items():
            main = [sh for _, sh in ranked if is_main_replica(sh.replica_id)]
            if isinstance(ranked[0][1], ShardedObject):
                for sh in main:
                    self.state_dict_metadata[sh.unique_key] = BytesStorageMetadata()
                continue
            chunks = []
            for sh in main:
                if sh.flattened_range is not None:
                    raise CheckpointingException(
                        f"Key '{key}' has flattened (distributed-optimizer) shards, which the "
                        f"torch_dist engine cannot store yet."
                    )
                offset, shape = sh.global_box()
                if 0 not in shape:
                    chunks.append(ChunkStorageMetadata(torch.Size(offset), torch.Size(shape)))
            first = ranked[0][1]
            properties = TensorProperties(dtype=first.dtype)
            self.state_dict_metadata[key] = TensorStorageMetadata(properties, torch.Size(first.global_shape), chunks)

    def save(self, sharded_state_dict, checkpoint_dir) -> List[WriteResult]:
        items = []  # (index, tensor or BytesIO)
        for sh in nested_values(sharded_state_dict):
            if not isinstance(sh, (ShardedTensor, ShardedObject)) or not is_main_replica(sh.replica_id):
                continue
            if isinstance(sh, ShardedObject):
                # Megatron-Core's byte entry: a list of the values stored under the unique key
                items.append((MetadataIndex(sh.unique_key), dump_object([sh.data])))
                continue
            offset, shape = sh.global_box()
            if 0 not in shape:
                items.append((MetadataIndex(sh.key, torch.Size(offset)), _compact_cpu(sh.data).reshape(shape)))
        files = _balance(items, self.config.thread_count)
        rank = get_rank()
        names = [f"__{rank}_{n}.distcp" for n in range(len(files))]
        with ThreadPoolExecutor(max(1, len(files))) as pool:
            results = list(pool.map(_write_file, [str(checkpoint_dir)] * len(files), names, files))
        if files:
            fsync_dir(str(checkpoint_dir))
        return [r for file_results in results for r in file_results]

    def finalize(self, checkpoint_dir, write_results: List[List[WriteResult]]) -> None:
        """Writes `.metadata` (rank 0), pointing at every rank's chunks."""
        storage_data = {r.index: r.storage_data for results in write_results for r in results}
        metadata = Metadata(
            state_dict_metadata=self.state_dict_metadata,
            storage_data=storage_data,
            storage_meta=StorageMeta(checkpoint_id=str(checkpoint_dir), save_id=str(uuid.uuid4())),
            version=DCP_VERSION,
        )
        atomic_write(os.path.join(str(checkpoint_dir), METADATA_FNAME), dump_dcp_metadata(metadata))


def _compact_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly its elements (`torch.save` of a view writes its whole storage)."""
    tensor = tensor.detach().to("cpu")
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def _balance(items, bins: int) -> List[list]:
    """Splits items into at most `bins` files of similar byte size (largest first)."""
    def nbytes(item):
        data = item[1]
        return data.numel() * data.element_size() if isinstance(data, torch.Tensor) else data.getbuffer().nbytes

    files, sizes = [[] for _ in range(bins)], [0] * bins
    for item in sorted(items, key=nbytes, reverse=True):
        smallest = sizes.index(min(sizes))
        files[smallest].append(item)
        sizes[smallest] += nbytes(item)
    return [f for f in files if f]


def _write_file(checkpoint_dir: str, name: str, items) -> List[WriteResult]:
    results = []

    def write(f):
        for index, data in items:
            offset = f.tell()
            if isinstance(data, torch.Tensor):
                torch.save(data, f)
            else:
                f.write(data.getbuffer())
            length = f.tell() - offset
            results.append(WriteResult(index, length, _StorageInfo(name, offset, length)))

    write_with_durably(os.path.join(checkpoint_dir, name), write)
    return results


class TorchDistLoadShardedStrategy(LoadShardedStrategy):
    """Reads DCP checkpoints: ours and Megatron-Core's (v0.15 and v0.16 layouts)."""

    def __init__(self, backend: str = "torch_dist", version: int = 1, config: Optional[StrategyConfig] = None):
        super().__init__(backend, version)
        self.config = config or StrategyConfig(backend="torch_dist")

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def load(self, sharded_state_dict, checkpoint_dir):
        checkpoint_dir = str(checkpoint_dir)
        metadata = read_dcp_metadata(checkpoint_dir)
        reads = _Reads(checkpoint_dir, metadata)
        placeholders = dict_list_map_inplace(reads.plan, sharded_state_dict)
        reads.run()
        return dict_list_map_inplace(reads.result, placeholders)

    def load_tensors_metadata(self, checkpoint_dir):
        return _stored_entries(read_dcp_metadata(str(checkpoint_dir)), with_objects=False)

    def load_sharded_metadata(self, checkpoint_dir):
        return _stored_entries(read_dcp_metadata(str(checkpoint_dir)), with_objects=True)

    def remove_sharded_tensors(self, checkpoint_dir, key_prefix: str) -> None:
        """Drops the keys from `.metadata` (rewritten atomically); their bytes stay in the files."""
        path = os.path.join(str(checkpoint_dir), METADATA_FNAME)
        metadata = load_dcp_metadata(path)
        metadata.state_dict_metadata = {
            k: v for k, v in metadata.state_dict_metadata.items() if not k.startswith(key_prefix)
        }
        metadata.storage_data = {
            k: v for k, v in metadata.storage_data.items() if not k.fqn.startswith(key_prefix)
        }
        atomic_write(path, dump_dcp_metadata(metadata))


def read_dcp_metadata(checkpoint_dir: str) -> Metadata:
    return load_dcp_metadata(os.path.join(checkpoint_dir, METADATA_FNAME))


def _stored_entries(metadata: Metadata, with_objects: bool) -> dict:
    """key -> data-less whole ShardedTensor (and unique key -> ShardedObject) from `.metadata`."""
    result = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            result[key] = whole_tensor_metadata(key, md.properties.dtype, tuple(md.size))
        elif with_objects and isinstance(md, BytesStorageMetadata):
            result[key] = ShardedObject.empty_from_unique_key(key)
    return result


class _Pending:
    """Stands in the state dict for a value until the reads are done."""

    def __init__(self, n: int):
        self.n = n


class _Reads:
    """The reads of one load: DCP ReadItems per file, and DCP's LoadPlanner callbacks."""

    def __init__(self, checkpoint_dir: str, metadata: Metadata):
        self.checkpoint_dir, self.metadata = checkpoint_dir, metadata
        self.requests: List = []  # per _Pending.n: the request
        self.values: List = []  # per _Pending.n: the target tensor or the loaded object
        self.items: List[ReadItem] = []

    def plan(self, sh):
        if isinstance(sh, ShardedObject):
            self._stored(sh.unique_key, BytesStorageMetadata, "ShardedObject")
            index = MetadataIndex(sh.unique_key)
            n = self._add(sh, None)
            empty = torch.Size([])
            dest = MetadataIndex(sh.unique_key, index=n)
            self.items.append(ReadItem(LoadItemType.BYTE_IO, dest, empty, index, empty, empty))
            return _Pending(n)
        if not isinstance(sh, ShardedTensor):
            return sh
        stored = self._stored(sh.key, TensorStorageMetadata, "ShardedTensor")
        where = os.path.join(self.checkpoint_dir, METADATA_FNAME)
        check_request_against_stored(sh, name_of_torch(stored.properties.dtype, sh.key), stored.size, where)
        reformulated = getattr(self.metadata, "mcore_data", {}).get(sh.key, {})
        if "nd_reformulated_orig_global_shape" in reformulated:
            raise CheckpointingException(
                f"Key '{sh.key}' in {where} was saved flattened by Megatron-Core (distributed "
                f"optimizer); reading that layout is not supported yet"
            )
        offset, shape = sh.global_box()
        n = self._add(sh, torch.zeros(shape, dtype=sh.dtype))  # zeros: the allow_shape_mismatch pad
        for chunk in stored.chunks:
            start = [max(o, c) for o, c in zip(offset, chunk.offsets)]
            stop = [min(o + s, c + l) for o, s, c, l in zip(offset, shape, chunk.offsets, chunk.sizes)]
            if any(b <= a for a, b in zip(start, stop)):
                continue
            self.items.append(
                ReadItem(
                    LoadItemType.TENSOR,
                    dest_index=MetadataIndex(sh.key, torch.Size(offset), index=n),
                    dest_offsets=torch.Size([a - o for a, o in zip(start, offset)]),
                    storage_index=MetadataIndex(sh.key, chunk.offsets),
                    storage_offsets=torch.Size([a - c for a, c in zip(start, chunk.offsets)]),
                    lengths=torch.Size([b - a for a, b in zip(start, stop)]),
                )
            )
        return _Pending(n)

    def _stored(self, name: str, kind, what: str):
        stored = self.metadata.state_dict_metadata.get(name)
        if not isinstance(stored, kind):
            raise CheckpointingException(
                f"{what} '{name}' is not in the checkpoint {self.checkpoint_dir}. Check the key, "
                f"or load with strict='log_unexpected' to skip keys the checkpoint does not have."
            )
        return stored

    def _add(self, sh, value) -> int:
        self.requests.append(sh)
        self.values.append(value)
        return len(self.values) - 1

    def run(self) -> None:
        """Reads file by file, so that an error names the file and the keys read from it."""
        storage_data = self.metadata.storage_data
        by_file: Dict[str, List[ReadItem]] = {}
        for item in self.items:
            info = storage_data.get(item.storage_index)
            if info is None:
                raise CheckpointingException(
                    f"Key '{item.storage_index.fqn}': {self.checkpoint_dir}/{METADATA_FNAME} "
                    f"lists no bytes for the chunk at {item.storage_index.offset}; it is damaged"
                )
            by_file.setdefault(info.relative_path, []).append(item)
        reader = FileSystemReader(self.checkpoint_dir)
        reader.set_up_storage_reader(self.metadata, False)
        for name, items in by_file.items():
            try:
                reader.read_data(LoadPlan(items), self).wait()
            except CheckpointingException:
                raise
            except Exception as e:  # a missing, truncated or corrupt data file
                keys = sorted({i.storage_index.fqn for i in items})
                raise CheckpointingException(
                    f"Cannot read keys {keys} from {os.path.join(self.checkpoint_dir, name)}: "
                    f"{type(e).__name__}: {e}. The checkpoint is damaged."
                ) from e

    # DCP's LoadPlanner callbacks used by FileSystemReader.read_data
    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        target = self.values[item.dest_index.index]
        for axis, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            target = target.narrow(axis, start, length)
        return target

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, item: ReadItem, value) -> None:
        n = item.dest_index.index
        what = f"ShardedObject '{self.requests[n].unique_key}'"
        where = f"{self.checkpoint_dir} (DCP byte entry)"
        values = load_object(value, what, where)
        if not isinstance(values, list) or not values:
            raise CheckpointingException(f"{what} in {where}: expected a non-empty list of values")
        self.values[n] = values[0]

    def result(self, value):
        if not isinstance(value, _Pending):
            return value
        sh, loaded = self.requests[value.n], self.values[value.n]
        if isinstance(sh, ShardedObject):
            return loaded
        loaded = loaded.reshape(sh.local_shape)
        if sh.data is not None and sh.data.device.type != "cpu":
            loaded = loaded.to(sh.data.device)
        return loaded

"""Reading Hugging Face safetensors directories (read-only; backend name "safetensors").

A tensor's values are one C-ordered box of raw bytes in its file, so a request is read like a
raw Zarr chunk (reading.py): straight into the caller's tensor when it asks for the whole
tensor, else only the leading-axis rows its box spans, through the scratch buffer. So each rank
reads its own slice, and a Hugging Face model can start a TP/PP run.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

import torch

from ..core import CheckpointingException
from ..dict_utils import dict_list_map_inplace, nested_values
from ..dtypes import torch_dtype
from ..layout import contained_path
from ..mapping import ShardedTensor, whole_tensor_metadata
from ..opening import OpenCheckpoint, open_checkpoint
from ..single_file import SafetensorsEntry, read_safetensors_index
from ..storage import storage_of
from ..validation import check_request_against_stored
from .base import LoadShardedStrategy
from .reading import destination, piece_of, read_chunk

Read = Tuple[ShardedTensor, torch.Tensor, SafetensorsEntry]  # request, its box's target, where


class SafetensorsLoadShardedStrategy(LoadShardedStrategy):
    def __init__(self, backend: str = "safetensors", version: int = 1, thread_count: int = 8):
        super().__init__(backend, version)
        self.thread_count = thread_count

    def load(self, sharded_state_dict, checkpoint_dir):
        checkpoint = open_checkpoint(checkpoint_dir)
        entries = _index(checkpoint)
        reads: List[Read] = []
        for sh in nested_values(sharded_state_dict):
            if not isinstance(sh, ShardedTensor):
                continue
            entry = entries.get(sh.key)
            if entry is None:
                raise CheckpointingException(
                    f"Tensor '{sh.key}' is not in the safetensors checkpoint {checkpoint.path}. Check the "
                    f"key, or load with strict='log_unexpected' to skip keys the checkpoint does not have."
                )
            check_request_against_stored(sh, entry.shape, os.path.join(checkpoint.path, entry.file))
            reads.append((sh, sh.box_target(torch_dtype(entry.dtype)), entry))
        batches = storage_of(checkpoint.path).read_batches(reads, self.thread_count, lambda read: (read[1].numel() * read[1].element_size(),))
        with ThreadPoolExecutor(max(1, len(batches))) as pool:
            list(pool.map(lambda batch: _read_batch(checkpoint.path, batch), batches))
        loaded = {id(sh): sh.deliver(target) for sh, target, _ in reads}
        return dict_list_map_inplace(lambda sh: loaded.get(id(sh), sh), sharded_state_dict)

    def load_tensors_metadata(self, checkpoint_dir):
        return {
            key: whole_tensor_metadata(key, torch_dtype(entry.dtype), entry.shape)
            for key, entry in _index(open_checkpoint(checkpoint_dir)).items()
        }

    def remove_sharded_tensors(self, checkpoint_dir, key_prefix: str) -> None:
        raise CheckpointingException(f"{checkpoint_dir} is a safetensors checkpoint, which this library only reads")


def _index(checkpoint: OpenCheckpoint) -> Dict[str, SafetensorsEntry]:
    """The tensors of the directory, parsed once per open checkpoint."""
    return checkpoint.parsed("safetensors", lambda: read_safetensors_index(checkpoint.path))


def _read_batch(directory: str, batch: List[Read]) -> None:
    for sh, target, entry in batch:
        path = contained_path(directory, entry.file, f"Tensor '{sh.key}'")
        offset, shape = sh.covering_box()
        inside = [max(0, min(o + n, g) - o) for o, n, g in zip(offset, shape, entry.shape)]
        if inside != list(shape):
            target.zero_()  # the allow_shape_mismatch pad beyond the stored shape
        if math.prod(inside) == 0:
            continue
        with storage_of(path).open(path) as file:
            piece = piece_of((0,) * len(shape), (offset, inside), destination(target), offset)
            read_chunk(file, entry.start, entry.shape, target.dtype, [piece], None)

"""DTensor leaves of a state dict (`torch.distributed.tensor.DTensor`): each is saved and loaded
as the ShardedTensor of its local shard, keyed by its path in the state dict joined with '.'
(e.g. `model.layers.0.attn.wq.weight`, the name PyTorch DCP gives it too).

Shard(d) and Replicate() placements on meshes of any dimension map onto a ShardedTensor: the
local shard's box is where `distribute_tensor` put it (even or uneven), and the coordinates
along the Replicate dimensions of the mesh are its replica id (all zeros: the main replica).
Partial and strided (FSDP-within-TP) placements are refused.
"""

from typing import Any, Dict, List, Tuple, Union

from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .errors import CheckpointingException
from .mapping import ShardedTensor, same_elements

Path = Tuple[Union[str, int], ...]  # of a leaf in nested dicts and lists


def sharded_tensor_of(path: Path, dtensor: DTensor) -> ShardedTensor:
    """The ShardedTensor of this rank's shard of `dtensor`, found at `path` of its state dict
    (whose parts, joined with '.', are its key); its data is the local tensor itself (a load
    fills it in place)."""
    key = ".".join(map(str, path))
    mesh, placements = dtensor.device_mesh, tuple(dtensor.placements)
    for dim, placement in enumerate(placements):
        if type(placement) not in (Shard, Replicate):
            name = (mesh.mesh_dim_names or [None] * mesh.ndim)[dim]
            raise CheckpointingException(
                f"DTensor '{key}': placement {placement!r} on mesh dimension {dim}"
                f"{f' ({name!r})' if name else ''} is not supported; only Shard(d) and Replicate() are. "
                f"Redistribute it before saving or loading (e.g. `dtensor.redistribute(placements=[...])`)."
            )
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise CheckpointingException(f"DTensor '{key}': this rank is not in its device mesh {mesh}")
    local_shape, offset = compute_local_shape_and_global_offset(dtensor.shape, mesh, placements)
    local = dtensor.to_local().detach()
    if tuple(local.shape) != tuple(local_shape):
        raise CheckpointingException(
            f"DTensor '{key}': its local tensor has shape {tuple(local.shape)}, its placements "
            f"{placements} on mesh {tuple(mesh.shape)} give {tuple(local_shape)}"
        )
    replicas = tuple(c for c, placement in zip(coordinate, placements) if isinstance(placement, Replicate))
    replica_id = replicas[0] if len(replicas) == 1 else (replicas or 0)
    return ShardedTensor(key, local, local.dtype, tuple(local_shape), tuple(dtensor.shape), tuple(offset), None, replica_id)


def replace_dtensors(state_dict: Any) -> Dict[Path, DTensor]:
    """Replaces every DTensor leaf of `state_dict` (nested dicts and lists, modified in place)
    by its ShardedTensor; returns where each DTensor was."""
    found: Dict[Path, DTensor] = {}

    def visit(container, path: Path) -> None:
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for name, value in list(items):
            if isinstance(value, DTensor):
                found[path + (name,)] = value
                container[name] = sharded_tensor_of(path + (name,), value)
            elif isinstance(value, (dict, list)):
                visit(value, path + (name,))

    if isinstance(state_dict, (dict, list)):
        visit(state_dict, ())
    return found


def restore_dtensors(state_dict: Any, dtensors: Dict[Path, DTensor]) -> None:
    """Puts each loaded DTensor back at its path of the loaded `state_dict`, its local tensor
    holding the loaded values (they were read into it in place; copied where they were not)."""
    for path, dtensor in dtensors.items():
        container: List = state_dict
        for name in path[:-1]:
            container = container[name]
        loaded, local = container[path[-1]], dtensor.to_local().detach()
        if not same_elements(loaded, local):  # else it is the local tensor itself
            local.copy_(loaded)
        container[path[-1]] = dtensor

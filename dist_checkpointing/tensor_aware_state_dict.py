"""A state dict whose tensors a checkpoint manager stores by itself (Megatron-Core's
`MCoreTensorAwareStateDict`, the interface to nvidia_resiliency_ext's local checkpoints).

    tasd, distribution = MCoreTensorAwareStateDict.from_state_dict(model_sd, "fully_parallel", dp_group)
    tensors = tasd.pop_tensors()        # the manager writes them, and the hollow rest (pickled)
    ...
    tasd.insert_tensors(tensors)        # read back
    state = tasd.to_state_dict(model.sharded_state_dict(), "fully_parallel", parallelization_group=dp_group)

With "fully_parallel", a shard replicated over the ranks of the group is kept by one of them
(Megatron-Core's distribution, exchange_utils.py) and sent to the others by `to_state_dict`;
with "atomic" every rank keeps all it holds. Restoring needs the same layout: each request is
one of the saved shards. Works with or without nvidia_resiliency_ext installed (its base class
is used when it is).
"""

import copy
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from .collectives import get_rank, within
from .core import CheckpointingException
from .dict_utils import dict_list_map_inplace, dict_list_map_outplace, merge, nested_values
from .exchange_utils import ShardDistribution, determine_main_replica_uniform_distribution, exchange_by_distribution, load_shard_id
from .mapping import ShardedObject, ShardedStateDict, ShardedTensor, StateDict, apply_factory_merges
from .state_dict_utils import load_preprocess, save_preprocess
from .utils import _sharded_object_id, zip_strict
from .validation import StrictHandling, determine_global_metadata, parse_strict_flag, validate_integrity_and_strict_load

try:
    from nvidia_resiliency_ext.checkpointing.local.base_state_dict import TensorAwareStateDict
except ImportError:  # the interface only; nothing of it is needed here

    class TensorAwareStateDict:
        """nvidia_resiliency_ext's base class, when it is not installed."""


ALGOS = ("atomic", "fully_parallel")


def _check_algo(algo: str) -> bool:
    """Whether `algo` is "fully_parallel" (else "atomic"); any other raises."""
    if algo not in ALGOS:
        raise CheckpointingException(f"algo must be one of {list(ALGOS)}, got {algo!r}")
    return algo == "fully_parallel"


@dataclass
class MCoreTensorAwareStateDict(TensorAwareStateDict):
    """The common state, and the sharded part whose ShardedTensors hold the tensors (or, hollow,
    their metadata only; the devices of the popped tensors are kept for `init_tensors`)."""

    common: StateDict
    sharded_state_dict: ShardedStateDict
    _is_hollow: bool = False
    _popped: List[ShardedTensor] = field(default_factory=list)  # the hollow ShardedTensors, in order
    _devices: List[torch.device] = field(default_factory=list)  # of the tensors popped or copied

    @classmethod
    def from_state_dict(
        cls,
        sharded_state_dict: ShardedStateDict,
        algo: str = "fully_parallel",
        parallelization_group=None,
        cached_metadata: Optional[ShardDistribution] = None,
    ) -> Tuple["MCoreTensorAwareStateDict", Optional[ShardDistribution]]:
        """The tensor-aware state dict of `sharded_state_dict`, and the distribution to pass as
        `cached_metadata` to the next call for a state dict of the same structure (collective
        for "fully_parallel" without it). The sharded part keeps only this rank's tensors: with
        "fully_parallel", those the distribution gives it."""
        fully_parallel = _check_algo(algo)
        sharded_part, common = save_preprocess(sharded_state_dict)
        distribution = None
        if fully_parallel:
            distribution = cached_metadata or determine_main_replica_uniform_distribution(sharded_part, parallelization_group, ignore_groups=True)
        with within(parallelization_group):
            rank = get_rank()

        def own(sh):  # a copy this state dict owns; without data where another rank keeps it
            if not isinstance(sh, ShardedTensor):
                return sh
            if distribution is not None and distribution.main_rank_for_shard[load_shard_id(sh)] != rank:
                return sh.without_data()
            return copy.copy(sh)

        return cls(common=common, sharded_state_dict=dict_list_map_inplace(own, sharded_part)), distribution

    @property
    def is_hollow(self) -> bool:
        """Whether the tensors were popped and not inserted back yet."""
        return self._is_hollow

    @property
    def _kept(self) -> List[ShardedTensor]:
        """The ShardedTensors whose tensors this rank keeps (data, or popped), in order."""
        if self._is_hollow:
            return self._popped
        return [sh for sh in nested_values(self.sharded_state_dict) if isinstance(sh, ShardedTensor) and sh.data is not None]

    def _require(self, hollow: bool) -> None:
        if self._is_hollow != hollow:
            raise CheckpointingException(f"The tensor-aware state dict is {'' if self._is_hollow else 'not '}hollow")

    @property
    def tensors(self) -> Iterator[torch.Tensor]:
        self._require(hollow=False)
        return (sh.data for sh in self._kept)

    @property
    def common_state_dict(self) -> Dict:
        return self.common

    def pop_tensors(self) -> List[torch.Tensor]:
        """The tensors, removed from the state dict (which becomes hollow)."""
        self._require(hollow=False)
        kept = self._kept
        tensors = [sh.data for sh in kept]
        self._devices = [t.device for t in tensors]
        self._popped = kept
        for sh in kept:
            sh.data = None
        self._is_hollow = True
        return tensors

    def insert_tensors(self, tensor_data: Iterable[torch.Tensor]) -> None:
        """Puts tensors (those `pop_tensors` returned, or equal ones) back, in order."""
        self._require(hollow=True)
        for sh, tensor in zip_strict(self._popped, tensor_data):
            sh.data = tensor
        self._is_hollow, self._popped = False, []

    def init_tensors(self) -> None:
        """New empty tensors in place of the popped ones (shape, dtype, device), e.g. to read
        into."""
        self._require(hollow=True)
        for sh, device in zip(self._popped, self._devices):
            sh.init_data(device)
        self._is_hollow, self._popped = False, []

    def copy_tensors_to_cpu(self, non_blocking: bool = False) -> None:
        """Replaces the tensors by CPU copies (the originals are left intact); their devices
        are kept for `restore_tensor_device`."""
        self._require(hollow=False)
        kept = self._kept
        self._devices = [sh.data.device for sh in kept]
        for sh in kept:
            sh.data = sh.data.detach().to("cpu", non_blocking=non_blocking, copy=True)

    def restore_tensor_device(self, non_blocking: bool = True) -> None:
        """Moves the tensors back to the devices `copy_tensors_to_cpu` took them from."""
        self._require(hollow=False)
        for sh, device in zip(self._kept, self._devices):
            sh.data = sh.data.to(device, non_blocking=non_blocking)

    def to_state_dict(
        self,
        sharded_state_dict: ShardedStateDict,
        algo: str = "atomic",
        exchange_algo: str = "broadcast",
        validate_access_integrity: bool = True,
        parallelization_group=None,
        strict: StrictHandling = StrictHandling.ASSUME_OK_UNEXPECTED,
        return_mismatch_keys: bool = False,
    ):
        """The state dict `sharded_state_dict` asks for, from this one (collective for
        "fully_parallel", or with `validate_access_integrity` or a strict mode that needs
        every rank's request): the common state, the requested tensors and objects (each
        request one of the stored shards), nonpersistent values and factories merged."""
        self._require(hollow=False)
        fully_parallel = _check_algo(algo)
        result = dict_list_map_outplace(lambda x: x, self.common)
        if not sharded_state_dict:
            return (result, set(), set()) if return_mismatch_keys else result
        request, nonpersistent, factories, _ = load_preprocess(sharded_state_dict)
        merge(result, nonpersistent)
        strict = parse_strict_flag(strict)
        stored = None
        if StrictHandling.requires_explicit_ckpt_mismatch_check(strict):
            stored = {sh.key: sh.without_data() for sh in nested_values(self.sharded_state_dict)}
        local_metadata = global_metadata = None
        if validate_access_integrity or StrictHandling.requires_global_app_metadata(strict):
            local_metadata, global_metadata = determine_global_metadata(request, parallelization_group)
        request, missing, unexpected = validate_integrity_and_strict_load(
            request, strict, validate_access_integrity, local_metadata, global_metadata, stored
        )
        held = {load_shard_id(sh): sh.data for sh in nested_values(self.sharded_state_dict) if isinstance(sh, ShardedTensor) and sh.data is not None}
        if fully_parallel:
            distribution = determine_main_replica_uniform_distribution(self.sharded_state_dict, parallelization_group, ignore_groups=True)
            if distribution is not None:
                requested = [sh for sh in nested_values(request) if isinstance(sh, ShardedTensor)]
                missing_here = {load_shard_id(sh): sh for sh in requested if load_shard_id(sh) not in held}
                held = exchange_by_distribution(held, missing_here, distribution, parallelization_group, exchange_algo)
        objects = {_sharded_object_id(sh): sh.data for sh in nested_values(self.sharded_state_dict) if isinstance(sh, ShardedObject)}

        def fill(sh):
            if isinstance(sh, ShardedTensor):
                if load_shard_id(sh) not in held:
                    raise CheckpointingException(
                        f"ShardedTensor '{sh.key}' at {sh.global_offset} of shape {sh.local_shape} is not one of the stored shards"
                    )
                return sh.fill(held[load_shard_id(sh)])
            if isinstance(sh, ShardedObject):
                if _sharded_object_id(sh) not in objects:
                    raise CheckpointingException(f"ShardedObject '{sh.unique_key}' is not stored here")
                return objects[_sharded_object_id(sh)]
            return sh

        merge(result, apply_factory_merges(dict_list_map_inplace(fill, request), factories))
        return (result, missing, unexpected) if return_mismatch_keys else result

"""What a storage engine implements, and the registry that finds one by (backend, version).

A save is split in two kinds of strategies: a *common* strategy writes what every rank shares
(`common.pt`, written by rank 0) and the ShardedObjects; a *sharded* strategy writes the
ShardedTensors. Loads mirror that. Strategies never talk to other ranks except where a
docstring says so: planning, validation and the commit are done by `serialization`.
"""

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, DefaultDict, Dict, List, Optional, Sequence, Set, Tuple, Union

from ..collectives import exchange, gather, get_rank, on_every_rank
from ..core import CheckpointingException
from ..dict_utils import nested_values
from ..fs import DurableDir
from ..global_plan import GlobalPlan, LocalPlan, gather_plan
from ..integrity import Checksums
from ..mapping import ShardedBase, ShardedStateDict, StateDict
from ..storage import storage_of
from .async_utils import AsyncRequest


class StrategyAction(Enum):
    LOAD_COMMON = "load_common"
    LOAD_SHARDED = "load_sharded"
    SAVE_COMMON = "save_common"
    SAVE_SHARDED = "save_sharded"


default_strategies: DefaultDict[str, Dict[Tuple[str, int], Any]] = defaultdict(dict)


def register_default_strategy(action: StrategyAction, backend: str, version: int, strategy):
    """Makes `strategy` the default for `action` on checkpoints of (backend, version)."""
    default_strategies[action.value][(backend, version)] = strategy


def get_default_strategy(action: StrategyAction, backend: str, version: int):
    """The registered default strategy for `action` and (backend, version); a built-in one is
    created on first use, importing only its own engine."""
    from . import builtin_backends, builtin_strategy

    registered = default_strategies[action.value]
    if (backend, version) not in registered:
        builtin = builtin_strategy(action, backend, version)
        if builtin is not None:
            registered[(backend, version)] = builtin
    try:
        return registered[(backend, version)]
    except KeyError:
        known = sorted(set(registered) | set(builtin_backends(action)))
        raise CheckpointingException(
            f"No default {action.value} strategy for backend {backend!r} version {version}; "
            f"available: {known}"
        ) from None


class StrategyBase:
    """An engine for one (backend, version) of the format, and what it can handle. (A load
    strategy written for Megatron-Core's interface may name no backend: it then implements
    the compatibility checks itself.)"""

    def __init__(self, backend: Optional[str] = None, version: int = 1):
        self.backend = backend
        self.version = version

    @property
    def can_handle_sharded_objects(self) -> bool:
        return False

    def __str__(self):
        return f"{type(self).__name__}({self.backend}, {self.version})"


class LoadStrategyBase(StrategyBase):
    """Base of load strategies: says which checkpoints it can read."""

    def check_backend_compatibility(self, loaded_backend: str) -> None:
        if loaded_backend not in self.readable_backends():
            raise CheckpointingException(
                f"{type(self).__name__} cannot read a checkpoint written with backend "
                f"{loaded_backend!r} (it reads {sorted(self.readable_backends())})"
            )

    def check_version_compatibility(self, loaded_version: int) -> None:
        if loaded_version != self.version:
            raise CheckpointingException(
                f"{type(self).__name__} reads version {self.version} of backend "
                f"{self.backend!r}, the checkpoint has version {loaded_version}"
            )

    def readable_backends(self) -> Tuple[str, ...]:
        return () if self.backend is None else (self.backend,)


class SaveStrategyBase(StrategyBase):
    """Base of save strategies: its (backend, version) is recorded in `metadata.json`."""


class LoadCommonStrategy(LoadStrategyBase, ABC):
    """Reads `common.pt` and ShardedObjects."""

    @abstractmethod
    def load_common(self, checkpoint_dir: Union[str, Path]) -> StateDict:
        """The common state dict."""

    @abstractmethod
    def load_sharded_objects(
        self, sharded_objects_state_dict: ShardedStateDict, checkpoint_dir: Union[str, Path]
    ) -> StateDict:
        """The request with each ShardedObject replaced by its stored value."""

    @abstractmethod
    def load_sharded_metadata(self, checkpoint_dir: Union[str, Path]) -> ShardedStateDict:
        """unique key -> ShardedObject (without data) for every stored object."""


class LoadShardedStrategy(LoadStrategyBase, ABC):
    """Reads ShardedTensors: any rectangle of any stored global tensor."""

    @abstractmethod
    def load(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Union[str, Path]):
        """The request with each ShardedTensor replaced by a tensor with its values."""

    @abstractmethod
    def load_tensors_metadata(self, checkpoint_dir: Union[str, Path]) -> ShardedStateDict:
        """key -> unsharded ShardedTensor (without data) for every stored tensor."""

    def load_sharded_metadata(self, checkpoint_dir: Union[str, Path]) -> ShardedStateDict:
        """Like `load_tensors_metadata`, plus ShardedObjects where this strategy stores them."""
        return self.load_tensors_metadata(checkpoint_dir)

    def flattened_keys(self, checkpoint_dir) -> Set[str]:
        """The keys stored flattened (Megatron-Core's n-d formulation of a distributed
        optimizer's state), which the metadata helpers list as flattened whole ranges."""
        return set()

    def remove_sharded_tensors(self, checkpoint_dir: Union[str, Path], key_prefix: str) -> None:
        """Deletes the stored tensors whose key starts with `key_prefix`."""
        raise CheckpointingException(f"{type(self).__name__} cannot remove tensors from a checkpoint")


class SaveCommonStrategy(SaveStrategyBase, ABC):
    """Writes `common.pt` (rank 0) and ShardedObjects (their main replicas)."""

    @abstractmethod
    def save_common(self, common_state_dict: StateDict, checkpoint_dir: DurableDir) -> Checksums:
        """Writes the common state dict (rank 0 only) through `checkpoint_dir`; returns the
        files' checksums."""

    @abstractmethod
    def save_sharded_objects(self, sharded_objects_state_dict: ShardedStateDict, checkpoint_dir: DurableDir) -> Checksums:
        """Writes the main replicas among the given ShardedObjects through `checkpoint_dir`;
        returns the files' checksums."""


@dataclass(frozen=True)
class ShardedSavePlan:
    """What `PlannedSaveStrategy.plan` decided for one save on one rank. A value: it travels with
    its save (the write job, an async request) into `stage`, `write` and `finalize`, and is never
    kept on the strategy, so one strategy object can run overlapping saves. Engines extend it."""

    rank: int  # names this rank's files; an async writer process has no process group to ask


class SaveShardedStrategy(SaveStrategyBase, ABC):
    """Writes the ShardedTensors of a state dict (Megatron-Core's interface).

    `save(sharded_state_dict, checkpoint_dir)`, called on every rank, writes this strategy's
    part of a checkpoint: the tensors (and the ShardedObjects, if it handles them), not
    `common.pt` nor `metadata.json`, which `serialization.save` writes around it. A strategy
    written for Megatron-Core implements just this; the library's engines plan together with
    the rest of the save (`PlannedSaveStrategy`).
    """

    @abstractmethod
    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Union[str, Path]) -> None:
        """Writes the main replicas among the shards (collective)."""


class AsyncSaveShardedStrategy(SaveShardedStrategy):
    """A Megatron-Core strategy that can also save in the background: `async_save` returns the
    `AsyncRequest` that writes; `save` executes it at once."""

    @abstractmethod
    def async_save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Union[str, Path]) -> AsyncRequest:
        """Prepares the save; the caller schedules the request (or executes it)."""

    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Union[str, Path]) -> None:
        self.async_save(sharded_state_dict, checkpoint_dir).execute_sync()


class PlannedSaveStrategy(SaveShardedStrategy):
    """An engine of this library: writes ShardedTensors in four calls mirroring the steps of
    `serialization.save`, which plans, validates, stages and commits around them.

    A strategy object holds configuration only; what one save decides is its plan.

    1. `plan(global_plan, planning_infos, rank)` on every rank with the validated `GlobalPlan`
       (the shards of all ranks, without data), what each rank's `planning_info()` returned
       (it travels in the same exchange) and this rank: reject what the engine cannot store,
       decide the layout; returns this rank's `ShardedSavePlan` (its part of the layout).
       A failure here is raised on every rank, even where only one rank found it;
    2. `stage(plan, sharded_state_dict)` on every rank: the only step that may move tensor data
       between ranks (e.g. to assemble flattened pieces on the rank that writes them);
    3. `write(plan, ...)` on every rank with what `stage` returned: write the main replicas
       without talking to other ranks, through `checkpoint_dir`, the save's write target
       (`Storage.target`: an `fs.DurableDir` locally, an `ObjectTarget` in an object store; a
       path that also writes files and creates directories; its `sync`, called after `write`,
       makes them durable, so files written otherwise must be made durable by the strategy,
       e.g. fsync'd, or counted with `add_written` once uploaded); return the
       checksums of the files written (integrity.py; empty where the format checksums its own
       chunks) and a small picklable write result. For an async save this runs in a background
       process on pickled copies of the strategy and the plan;
    4. `finalize(plan, dir, results)` on rank 0 with every rank's write result, before
       `metadata.json` is written: write the engine's own index, if it has one.

    Called alone, Megatron-Core's way, `save(sharded_state_dict, checkpoint_dir)` runs the four
    steps on those shards, without `serialization.save`'s validation, index and commit.
    """

    @property
    def plans_with_library(self) -> bool:
        """Whether `serialization.save` runs this strategy's four steps (False for a wrapper of
        a strategy written for Megatron-Core's interface)."""
        return True

    @property
    def stores_common_state(self) -> bool:
        """Whether the common state is saved through this strategy, as the ShardedObject
        `common_state` (Megatron-Core >= 0.19's layout), instead of in `common.pt`."""
        return False

    def planning_info(self) -> Any:
        """Small picklable facts about this rank that `plan` needs from every rank."""
        return None

    def plan(self, global_plan: GlobalPlan, planning_infos: Sequence[Any], rank: int) -> ShardedSavePlan:
        """Checks the global layout and decides `rank`'s part (called on every rank before any
        write)."""
        return ShardedSavePlan(rank)

    def stage(self, plan: ShardedSavePlan, sharded_state_dict: ShardedStateDict) -> ShardedStateDict:
        """What `write` writes on this rank (called on every rank, collectively, after `plan`).

        Runs between two collectives of `serialization.save`, so anything that can fail on
        one rank only must be checked in `plan` instead.
        """
        return sharded_state_dict

    @abstractmethod
    def write(
        self, plan: ShardedSavePlan, sharded_state_dict: ShardedStateDict, checkpoint_dir: DurableDir
    ) -> Tuple[Checksums, Any]:
        """Writes this rank's main-replica shards through `checkpoint_dir`; returns the files'
        checksums and this rank's write result (for `finalize`)."""

    def finalize(self, plan: ShardedSavePlan, checkpoint_dir: Union[str, Path], write_results: List[Any]) -> None:
        """Completes the engine's files from all ranks' write results (rank 0 only)."""

    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Union[str, Path]) -> None:
        checkpoint_dir, what = str(checkpoint_dir), f"save of the shards to {checkpoint_dir}"
        local_plan = LocalPlan.of([sh for sh in nested_values(sharded_state_dict) if isinstance(sh, ShardedBase)])
        planned = exchange(lambda: (local_plan.digests(None, b""), self.planning_info()), what)
        global_plan = gather_plan(local_plan, [digests for digests, _ in planned], what)
        plan = on_every_rank(lambda: self.plan(global_plan, [info for _, info in planned], get_rank()), what)
        shards = self.stage(plan, sharded_state_dict)

        def write():
            with storage_of(checkpoint_dir).target(checkpoint_dir) as target:
                result = self.write(plan, shards, target)[1]
                target.sync()
            return result

        results = gather(write, what)

        def finalize():
            if get_rank() == 0:  # results() raises there if a rank's write failed
                self.finalize(plan, checkpoint_dir, results())

        exchange(finalize, what)


def is_planned(strategy: SaveShardedStrategy) -> bool:
    """Whether `serialization.save` plans, stages and writes with `strategy`'s four steps
    (`PlannedSaveStrategy`), or calls its `save` (a strategy of Megatron-Core's interface)."""
    return isinstance(strategy, PlannedSaveStrategy) and strategy.plans_with_library

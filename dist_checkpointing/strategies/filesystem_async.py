"""The torch_dist engine's file writer (Megatron-Core's names): the items of one save on one
rank are split into buckets, one `.distcp` file each, and `FileSystemWriterAsync.write_preloaded_data`
writes one bucket, in a thread of the writing process (an async save's writer process, or the
training process of a sync save).

Each worker reports `(its index, its write results or the exception it raised)` on the results
queue and then checks out of the count queue, as Megatron-Core's workers do; `write_buckets`
runs the workers, waits for all of them and raises if any failed, naming the file.

`_results_queue` is the module global Megatron-LM's `reset_persistent_async_worker` shuts down
when it is set: Megatron-Core's writers share a multiprocessing queue there. This writer's
queues belong to one save each, so it stays None.
"""

import queue
import threading
from typing import Any, Callable, List, Sequence, Tuple

from ..core import CheckpointingException

_results_queue = None

WriteBucket = Tuple[Any, str, Sequence]  # (the save's write target, file name, items)


class FileSystemWriterAsync:
    """Writes the buckets of one rank's torch_dist save (see the module docstring)."""

    @staticmethod
    def write_preloaded_data(
        transform_list,
        local_proc_idx: int,
        write_bucket: WriteBucket,
        results_queue: queue.Queue,
        count_queue: queue.Queue,
        use_fsync: bool,
        **kwargs,
    ) -> None:
        """Writes one bucket with `kwargs["write_file"](target, name, items)` and reports
        (`local_proc_idx`, what it returned or the exception it raised) on `results_queue`.
        `transform_list` (DCP's storage transforms) must be empty; durability is the write
        target's (`use_fsync` is accepted for Megatron-Core's signature)."""
        try:
            if transform_list:
                raise CheckpointingException(f"storage transforms {transform_list} are not supported")
            target, name, items = write_bucket
            output = (local_proc_idx, kwargs["write_file"](target, name, items))
        except Exception as e:
            output = (local_proc_idx, e)
        results_queue.put(output)
        count_queue.get()
        count_queue.task_done()


def write_buckets(buckets: List[WriteBucket], write_file: Callable[[Any, str, Sequence], Any]) -> List[Any]:
    """Writes every bucket in its own thread through `FileSystemWriterAsync.write_preloaded_data`;
    returns what `write_file` returned for each, in bucket order. A failed bucket raises a
    `CheckpointingException` naming its file ("Worker failure", Megatron-Core's words)."""
    results_queue, count_queue = queue.Queue(), queue.Queue()
    for _ in buckets:
        count_queue.put(None)
    workers = [
        threading.Thread(
            target=FileSystemWriterAsync.write_preloaded_data,
            args=([], index, bucket, results_queue, count_queue, True),
            kwargs={"write_file": write_file},
            name=f"dist-ckpt-write-{index}",
        )
        for index, bucket in enumerate(buckets)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    outputs = {}
    while not results_queue.empty():
        index, output = results_queue.get()
        outputs[index] = output
    for index, bucket in enumerate(buckets):
        output = outputs.get(index, RuntimeError("the worker reported nothing"))
        if isinstance(output, BaseException):
            raise CheckpointingException(f"Worker failure: writing {bucket[1]} failed: {type(output).__name__}: {output}") from output
    return [outputs[index] for index in range(len(buckets))]

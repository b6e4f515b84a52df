"""Checksums: a damaged checkpoint raises, it never loads as wrong values.

One checksum everywhere, CRC-32C (Castagnoli; hardware-accelerated, ~15 GB/s here), the one the
Zarr v3 `crc32c` codec uses:
- Zarr v3 chunks end with their own CRC-32C (the codec); both Zarr engines verify it whenever
  they decode a chunk;
- every other file the library writes (`common.pt`, ShardedObject files, torch_dist `.distcp`
  files) is recorded in `metadata.json` as byte ranges with a CRC-32C each: one range per file,
  or one per item of a `.distcp` file, so a load that reads one item checks just that item.
"""

import io
from typing import Callable, Dict, List, Optional, Tuple

import google_crc32c
import numpy as np

from .core import CheckpointingException
from .fs import DurableDir
from .layout import contained_path

Range = Tuple[int, int, int]  # (offset, length, crc32c) of bytes in a file
Checksums = Dict[str, List[Range]]  # path relative to the checkpoint directory -> its ranges


def crc32c(data, value: int = 0) -> int:
    """The CRC-32C of `data` (any buffer), continuing from `value`."""
    return google_crc32c.extend(value, np.frombuffer(data, dtype=np.uint8))


class ChecksummingFile:
    """A binary file for writers such as `torch.save` that records a Range per `item()` block.

    It also keeps the first write error: `torch.save` reports a failed write (e.g. ENOSPC) as
    an unrelated "unexpected pos" RuntimeError, so the real cause would otherwise be lost."""

    def __init__(self, f):
        self.f, self.crc, self.start, self.ranges = f, 0, f.tell(), []
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        self.crc = crc32c(memoryview(data).cast("B"), self.crc)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.f.tell()

    def end_item(self) -> Range:
        """Closes the range written since the previous item; returns it."""
        end = self.f.tell()
        item = (self.start, end - self.start, self.crc)
        self.ranges.append(item)
        self.crc, self.start = 0, end
        return item


def write_checksummed(target: DurableDir, path: str, data) -> List[Range]:
    """Writes `data` to `path` through `target`; its one Range."""
    target.write(path, [data])
    return [(0, memoryview(data).nbytes, crc32c(memoryview(data).cast("B")))]


def write_items_checksummed(target: DurableDir, path: str, write_items: Callable[[ChecksummingFile], None]) -> List[Range]:
    """Calls `write_items(file)` (which ends each item with `file.end_item()`) on `path` opened
    for writing through `target`, and returns the items' Ranges."""
    ranges = []

    def write(f):
        checked = ChecksummingFile(f)
        try:
            write_items(checked)
        except Exception as e:
            if checked.error is not None and checked.error is not e:
                raise checked.error from e
            raise
        ranges.extend(checked.ranges)

    target.write_with(path, write)
    return ranges


class ChecksumIndex:
    """The recorded Ranges of a checkpoint, looked up by (file, offset)."""

    def __init__(self, checksums: Optional[Checksums]):
        self.files = set(checksums or ())
        self.ranges = {(name, o): (n, crc) for name, rs in (checksums or {}).items() for o, n, crc in rs}

    def recorded(self, checkpoint_dir, name: str, offset: int, what: str) -> Optional[Tuple[int, int]]:
        """(length, crc) recorded for the range of file `name` at `offset`; None for a file
        without records (written by Megatron-Core, or by no checksumming writer)."""
        if name not in self.files:
            return None
        if (name, offset) not in self.ranges:
            raise CheckpointingException(
                f"{what}: {contained_path(checkpoint_dir, name, what)} has no recorded item at byte "
                f"{offset}; metadata.json and the data file disagree. The checkpoint is damaged."
            )
        return self.ranges[name, offset]

    def verify(self, data, checkpoint_dir, name: str, offset: int, what: str) -> None:
        """Checks bytes `data` read from `name` at `offset` against their recorded Range (a
        recorded range read shorter, e.g. from a truncated file, or with another CRC fails)."""
        recorded = self.recorded(checkpoint_dir, name, offset, what)
        if recorded is not None:
            size = memoryview(data).nbytes
            self._check(_problem(size, *recorded, lambda: crc32c(memoryview(data).cast("B"))), checkpoint_dir, name, offset, what)

    def verify_crc(self, crc: int, size: int, checkpoint_dir, name: str, offset: int, what: str) -> None:
        """Like `verify`, for `size` bytes whose CRC-32C `crc` the reader computed as they landed."""
        recorded = self.recorded(checkpoint_dir, name, offset, what)
        if recorded is not None:
            self._check(_problem(size, *recorded, lambda: crc), checkpoint_dir, name, offset, what)

    def _check(self, problem: Optional[str], checkpoint_dir, name: str, offset: int, what: str) -> None:
        if problem:
            length = self.ranges[name, offset][0]
            raise CheckpointingException(
                f"{what}: bytes {offset}..{offset + length} of {contained_path(checkpoint_dir, name, what)} "
                f"are damaged: {problem}. Restore the file or the checkpoint from a copy, or save again."
            )

    def read_file(self, checkpoint_dir, name: str, what: str) -> io.BytesIO:
        """The whole file `name` of the checkpoint, verified."""
        path = contained_path(checkpoint_dir, name, what)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CheckpointingException(
                f"{what}: file {path} is missing; the checkpoint is damaged or incomplete"
            ) from None
        self.verify(data, checkpoint_dir, name, 0, what)
        return io.BytesIO(data)


def _range_problem(data, length: int, crc: int) -> Optional[str]:
    """What is wrong with bytes `data` read for a recorded Range (None if they match it)."""
    return _problem(memoryview(data).nbytes, length, crc, lambda: crc32c(memoryview(data).cast("B")))


def _problem(size: int, length: int, crc: int, actual_crc: Callable[[], int]) -> Optional[str]:
    """What is wrong with `size` bytes read for a recorded Range of `length` and `crc`, whose
    CRC-32C `actual_crc()` gives (None if they match it)."""
    if size < length:
        return f"only {size} of {length} bytes could be read (the file is truncated)"
    if size > length:
        return f"the file has {size} bytes, not {length} (it was replaced or appended to)"
    if actual_crc() != crc:
        return "their CRC-32C does not match (the bytes were changed)"
    return None


def verify_file(checkpoint_dir, name: str, ranges: List[Range]) -> List[Tuple[int, str]]:
    """(offset, problem) for each damaged Range of file `name` (empty if sound); reads it whole."""
    try:
        path = contained_path(checkpoint_dir, name, "metadata.json's checksums")
    except CheckpointingException as e:
        return [(0, str(e))]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return [(0, f"{path}: cannot read ({e.strerror or e})")]
    problems = []
    for offset, length, crc in ranges:
        problem = _range_problem(memoryview(data)[offset : offset + length], length, crc)
        if problem:
            problems.append((offset, f"{path}: bytes {offset}..{offset + length}: {problem}"))
    return problems

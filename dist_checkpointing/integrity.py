"""Checksums: a damaged checkpoint raises, it never loads as wrong values.

One checksum everywhere, CRC-32C (Castagnoli; hardware-accelerated, ~15 GB/s here), the one the
Zarr v3 `crc32c` codec uses:
- Zarr v3 chunks end with their own CRC-32C (the codec); both Zarr engines verify it whenever
  they decode a chunk;
- every other file the library writes (`common.pt`, ShardedObject files, torch_dist `.distcp`
  files) is recorded in the index, `index.json`, as byte ranges with a CRC-32C each: one range per file,
  or one per item of a `.distcp` file, so a load that reads one item checks just that item.

Besides, Megatron-Core's `integrity.json` (optional: `save(..., verify_integrity=True)`): the
SHA-256 of every file of the checkpoint, checked as a whole by `load(..., verify_integrity=True)`
and `dist-ckpt verify`.
"""

import hashlib
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple

import google_crc32c
import numpy as np

from .core import MISSING, CheckpointingException, read_json
from .fs import DurableDir
from .layout import INTEGRITY_FNAME, contained_path
from .storage import read_whole, storage_of
from .storage_interface import Storage

Range = Tuple[int, int, int]  # (offset, length, crc32c) of bytes in a file
Checksums = Dict[str, List[Range]]  # path relative to the checkpoint directory -> its ranges


def crc32c(data, value: int = 0) -> int:
    """The CRC-32C of `data` (any C-contiguous buffer), continuing from `value`."""
    if type(data) is not bytes and type(data) is not np.ndarray:  # what google_crc32c takes as it is
        data = np.frombuffer(data, dtype=np.uint8)  # (costs twice the CRC of a small item)
    return google_crc32c.extend(value, data)


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

    def write_items(self, items: List[bytes]) -> List[Range]:
        """Writes whole items (after the previous item's end) in one write; returns their
        Ranges (small items: a write and a `tell` each would cost more than their bytes)."""
        added, start = [], self.start
        for item in items:
            added.append((start, len(item), crc32c(item)))
            start += len(item)
        try:
            self.f.write(b"".join(items))
        except OSError as e:
            self.error = self.error or e
            raise
        self.ranges.extend(added)
        self.start = start
        return added


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
        # file -> offset -> (length, crc): 10^5 ranges, keyed by the offsets' own int objects
        self.ranges = {name: {o: (n, crc) for o, n, crc in rs} for name, rs in (checksums or {}).items()}

    def recorded(self, checkpoint_dir, name: str, offset: int, what: str) -> Optional[Tuple[int, int]]:
        """(length, crc) recorded for the range of file `name` at `offset`; None for a file
        without records (written by Megatron-Core, or by no checksumming writer)."""
        ranges = self.ranges.get(name)
        if ranges is None:
            return None
        if offset not in ranges:
            raise CheckpointingException(
                f"{what}: {contained_path(checkpoint_dir, name, what)} has no recorded item at byte "
                f"{offset}; index.json and the data file disagree. The checkpoint is damaged."
            )
        return ranges[offset]

    def verify(self, data, checkpoint_dir, name: str, offset: int, what: str) -> None:
        """Checks bytes `data` read from `name` at `offset` against their recorded Range (a
        recorded range read shorter, e.g. from a truncated file, or with another CRC fails)."""
        recorded = self.recorded(checkpoint_dir, name, offset, what)
        if recorded is None:
            return
        size = memoryview(data).nbytes
        if size == recorded[0] and crc32c(data) == recorded[1]:
            return  # sound: checked inline (10^5 items may be verified per load)
        self._check(_problem(size, *recorded, lambda: crc32c(data)), checkpoint_dir, name, offset, what)

    def verify_crc(self, crc: int, size: int, checkpoint_dir, name: str, offset: int, what: str) -> None:
        """Like `verify`, for `size` bytes whose CRC-32C `crc` the reader computed as they landed."""
        recorded = self.recorded(checkpoint_dir, name, offset, what)
        if recorded is not None:
            self._check(_problem(size, *recorded, lambda: crc), checkpoint_dir, name, offset, what)

    def _check(self, problem: Optional[str], checkpoint_dir, name: str, offset: int, what: str) -> None:
        if problem:
            length = self.ranges[name][offset][0]
            raise CheckpointingException(
                f"{what}: bytes {offset}..{offset + length} of {contained_path(checkpoint_dir, name, what)} "
                f"are damaged: {problem}. Restore the file or the checkpoint from a copy, or save again."
            )

    def read_file(self, checkpoint_dir, name: str, what: str, storage: Optional[Storage] = None) -> io.BytesIO:
        """The whole file `name` of the checkpoint (on `storage`, where the caller has it), verified."""
        data = read_whole(contained_path(checkpoint_dir, name, what, storage), what, storage)
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
        path = contained_path(checkpoint_dir, name, "index.json's checksums")
    except CheckpointingException as e:
        return [(0, str(e))]
    try:
        data = storage_of(path).read(path)
    except OSError as e:
        return [(0, f"{path}: cannot read ({e.strerror or e})")]
    problems = []
    for offset, length, crc in ranges:
        problem = _range_problem(memoryview(data)[offset : offset + length], length, crc)
        if problem:
            problems.append((offset, f"{path}: bytes {offset}..{offset + length}: {problem}"))
    return problems


_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_THREADS = 8  # hashlib releases the GIL on large buffers


_HASH_BLOCK = 16 * 2**20


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with storage_of(path).open(path) as f:
        for offset in range(0, f.size, _HASH_BLOCK):
            digest.update(f.read(offset, _HASH_BLOCK))
    return digest.hexdigest()


def _files_below(checkpoint_dir: str) -> List[str]:
    """Every file of the checkpoint but `integrity.json`, as relative '/'-separated paths."""
    return [name for name in storage_of(checkpoint_dir).files(checkpoint_dir) if name != INTEGRITY_FNAME]


def write_integrity(checkpoint_dir, pending: Dict[str, bytes]) -> None:
    """Writes `integrity.json`: the SHA-256 of every file of the checkpoint, and of the files
    `pending` (name -> content) that are written after it (`metadata.json`, the commit marker)."""
    root = str(checkpoint_dir)
    names = [name for name in _files_below(root) if name not in pending]
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = dict(zip(names, pool.map(lambda name: _sha256_of(os.path.join(root, name)), names)))
    digests.update({name: hashlib.sha256(data).hexdigest() for name, data in pending.items()})
    document = {"algorithm": "sha256", "files": dict(sorted(digests.items()))}
    path = os.path.join(root, INTEGRITY_FNAME)
    storage_of(path).write_atomic(path, json.dumps(document, indent=2).encode())


def integrity_problems(checkpoint_dir) -> Optional[Tuple[List[Tuple[str, str]], int]]:
    """(file, problem) for every file that does not match `integrity.json` (missing, changed,
    or not listed), and how many files it lists; None if the checkpoint has none."""
    root = str(checkpoint_dir)
    path = os.path.join(root, INTEGRITY_FNAME)
    document = read_json(path, missing_ok=True)
    if document is MISSING:
        return None
    files = document.get("files") if isinstance(document, dict) else None
    if (
        not isinstance(document, dict)
        or document.get("algorithm") != "sha256"
        or not isinstance(files, dict)
        or not all(isinstance(d, str) and _SHA256.fullmatch(d) for d in files.values())
    ):
        raise CheckpointingException(
            f"Malformed {path}: expected {{'algorithm': 'sha256', 'files': {{name: hex digest}}}}. "
            f"The checkpoint is damaged; restore it from a copy."
        )
    problems, present = [], []
    for name in sorted(files):
        try:
            present.append((name, contained_path(root, name, INTEGRITY_FNAME)))
        except CheckpointingException as e:
            problems.append((name, str(e)))
    storage = storage_of(root)
    found = set(_files_below(root))
    problems += [(name, f"{file_path} is missing") for name, file_path in present if name not in found]
    present = [(name, file_path) for name, file_path in present if name in found and (not storage.links or storage.is_file(file_path))]
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        actual = list(pool.map(lambda entry: _sha256_of(entry[1]), present))
    for (name, file_path), digest in zip(present, actual):
        if digest != files[name]:
            problems.append((name, f"{file_path}: its SHA-256 does not match {INTEGRITY_FNAME} (the file was changed)"))
    problems += [(name, f"{os.path.join(root, name)} is not listed in {INTEGRITY_FNAME}") for name in sorted(found) if name not in files]
    return problems, len(files)


def verify_integrity(checkpoint_dir) -> None:
    """Raises, naming the damaged files (the first five), unless every file matches `integrity.json`."""
    found = integrity_problems(checkpoint_dir)
    if found is None:
        raise CheckpointingException(
            f"{checkpoint_dir} has no {INTEGRITY_FNAME} to verify against; it was saved without "
            f"verify_integrity=True. Load it with verify_integrity=False (its items are still "
            f"checked against their CRC-32C where recorded), or run `dist-ckpt verify`."
        )
    problems = found[0]
    if problems:
        details = "; ".join(problem for _, problem in problems[:5])
        raise CheckpointingException(
            f"{checkpoint_dir} failed the integrity check ({len(problems)} file(s)): {details}. "
            f"Restore the checkpoint from a copy, or save again."
        )

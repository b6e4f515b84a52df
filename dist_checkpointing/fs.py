"""Durable file writes: the only place that decides when bytes reach the disk.

A checkpoint is committed by `metadata.json`; everything it points at must be on disk first.
So every data file is fsync'd after writing, every directory that gained an entry is fsync'd,
and `metadata.json` itself is replaced atomically (temp file, fsync, rename, directory fsync).
"""

import contextlib
import os
import signal
import threading
from typing import Callable, Iterable, List, Set

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def write_durably(path: str, data) -> None:
    """Writes `data` (any buffer) to `path` and fsyncs the file before returning."""
    view = memoryview(data).cast("B")
    with naming_file(path):
        fd = os.open(path, _OPEN_FLAGS, 0o644)
        try:
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
            os.fsync(fd)
        finally:
            os.close(fd)


def write_with_durably(path: str, writer: Callable) -> None:
    """Calls `writer(file)` on `path` opened for binary writing, then fsyncs the file."""
    with naming_file(path), open(path, "wb") as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def naming_file(path: str):
    """An OSError without a file name (a failed write: "No space left on device") gets `path`,
    so that the error every rank sees says which file could not be written."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise type(e)(e.errno, e.strerror, path) from e
        raise


def fsync_dir(path: str) -> None:
    """Makes the entries of directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(paths: Iterable[str]) -> None:
    for path in sorted(set(paths)):
        fsync_dir(path)


def parents_up_to(path: str, root: str) -> Set[str]:
    """Directories from `path`'s parent up to and including `root` (entries were created there)."""
    root = os.path.abspath(root)
    dirs = set()
    current = os.path.dirname(os.path.abspath(path))
    while True:
        dirs.add(current)
        if current == root or len(current) <= len(root):
            return dirs
        current = os.path.dirname(current)


def atomic_write(path: str, data: bytes) -> None:
    """Replaces `path` with `data` so a crash leaves either the old or the new file, never half."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: str, writer: Callable) -> None:
    """`atomic_write` of what `writer(file)` writes into a binary file (temp file in the same
    directory, fsync, rename, directory fsync); on any error the temp file is removed."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write_with_durably(tmp, writer)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def file_size_limit_raises():
    """A file size limit (RLIMIT_FSIZE) fails writes with EFBIG instead of killing the process
    (SIGXFSZ's default action), so the save can report it on every rank. Dispositions can only
    change in the main thread; elsewhere the process keeps its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGXFSZ, previous)


def balance(items: list, bins: int, size: Callable[[object], int], min_bin: int = 0) -> List[list]:
    """I/O work (files to write, chunks to read) split into at most `bins` lists of similar
    total `size`, largest first, so that each thread gets one list: one hand-off per thread,
    not per item. With `min_bin`, fewer lists, none much under that size: threads pay off only
    where the work releases the GIL long enough (large reads and copies), not for many small
    items, where they contend for it."""
    total = sum(size(item) for item in items)
    bins = max(1, min(bins, -(-total // min_bin) if min_bin else bins))
    lists, totals = [[] for _ in range(bins)], [0] * bins
    for item in sorted(items, key=size, reverse=True):
        smallest = totals.index(min(totals))
        lists[smallest].append(item)
        totals[smallest] += size(item)
    return [batch for batch in lists if batch]

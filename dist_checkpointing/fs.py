"""Durable file writes: the only place that decides when bytes reach the disk.

A checkpoint is committed by `metadata.json`; everything it points at must be on stable storage
first. A save step writes its files through a `DurableDir`, which makes them durable in one of
two ways (docs/format.md, "Durability"):
- `syncfs`: files are written without syncing, then one `syncfs(2)` of their file system flushes
  every file and directory entry and reports any write-back error since the step began. Used on
  Linux >= 5.8 (which reports those errors) for local file systems that implement it;
- `fsync`: each file is fsync'd as it is written, and every directory that gained an entry is
  fsync'd at the end. Used everywhere else (network and parallel file systems, other platforms).
`metadata.json` itself is replaced atomically (temp file, fsync, rename, directory fsync).
"""

import contextlib
import ctypes
import errno
import functools
import os
import platform
import signal
import sys
import threading
from typing import Callable, Iterable, List, Optional, Sequence, Set

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def _write_file(path: str, buffers: Sequence, sync: bool, size: Optional[int]) -> int:
    """Writes the buffers one after another into a new file `path` (one `writev` where the
    system takes them all), fsync'd if `sync`; returns the file's size (`size`, their total
    bytes, where the caller knows it). Kept lean: a save of many small tensors calls it per
    chunk file."""
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o644)
        try:
            if size is None:
                size = sum([memoryview(b).nbytes for b in buffers])
            written = os.writev(fd, buffers)
            if written < size:  # a short write: the rest, one buffer at a time
                views = [memoryview(b).cast("B") for b in buffers]
                while views:
                    while views and written >= len(views[0]):
                        written -= len(views[0])
                        views.pop(0)
                    if views:
                        views[0] = views[0][written:]
                        written = os.writev(fd, views)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _named(e, path) from e
    return size


# file systems whose syncfs(2) flushes all of their files' data and metadata (statfs f_type)
_SYNCFS_FILESYSTEMS = {0xEF53: "ext4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0xF2F52010: "f2fs", 0x01021994: "tmpfs"}


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def syncfs_covers(path: str) -> bool:
    """Whether one `syncfs` of the file system holding `path` makes files written below it
    durable and reports their write-back errors: Linux >= 5.8 (earlier kernels may not report
    errors of files already closed) on a local file system listed in _SYNCFS_FILESYSTEMS."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        version = tuple(int(part) for part in platform.release().split("-")[0].split(".")[:2])
        libc = _libc()
        buffer = ctypes.create_string_buffer(256)  # struct statfs; f_type (a long) comes first
        if version < (5, 8) or not hasattr(libc, "syncfs") or libc.statfs(os.fsencode(path), buffer) != 0:
            return False
    except (ValueError, OSError):
        return False
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF in _SYNCFS_FILESYSTEMS


def _mkdir(directory: str) -> None:
    try:
        os.mkdir(directory)
    except FileExistsError:  # e.g. made by another rank
        pass


class DurableDir(os.PathLike):
    """The directory one save step writes into (on one rank), and how what it writes there
    becomes durable: `write` and `makedirs` below it, then `sync()` once every file is written
    (the step's results may be reported only after `sync` returns). The mode (module docstring)
    is chosen per directory by `syncfs_covers`. Safe to use from several threads."""

    def __init__(self, path: str):
        self.path = str(path)
        os.makedirs(self.path, exist_ok=True)
        self.syncfs = syncfs_covers(self.path)
        # held from the start: syncfs reports the write-back errors seen since its fd was opened
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        # the parent too: it gained the checkpoint directory's entry if this save created it
        self._dirs: Set[str] = {self.path, os.path.dirname(os.path.abspath(self.path))}
        self._lock = threading.Lock()
        self._sizes: List[int] = []  # of the files written so far (appending is thread-safe)

    @property
    def files(self) -> int:
        return len(self._sizes)

    @property
    def nbytes(self) -> int:
        return sum(self._sizes)

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def makedirs(self, directory: str) -> None:
        """Creates `directory` (below the root) and its missing parents: one `mkdir` where the
        parent exists (directories are costly to create on some file systems; `os.makedirs`
        would also look its parents up first)."""
        if directory in self._dirs:
            return
        try:
            _mkdir(directory)
        except FileNotFoundError:
            self.makedirs(os.path.dirname(directory))
            _mkdir(directory)
        with self._lock:
            self._dirs.add(directory)

    def write(self, path: str, buffers: Sequence, size: Optional[int] = None) -> None:
        """Writes a new file `path` (in an existing directory) holding the buffers in order
        (`size` bytes in all, where the caller knows it)."""
        self._sizes.append(_write_file(path, buffers, not self.syncfs, size))

    def write_if_made(self, directory: str, path: str, buffers: Sequence, size: Optional[int] = None) -> bool:
        """`write` of `path` in `directory` if another writer has made that directory already;
        False (nothing written) if it is still missing. Making it here instead would cost the
        other writer a `mkdir` failing with EEXIST, a system call that locks the parent
        directory, on which every other rank's `mkdir` waits."""
        try:
            self.write(path, buffers, size)
        except FileNotFoundError:
            return False
        if directory not in self._dirs:  # it gained an entry: synced like those made here
            with self._lock:
                self._dirs.add(directory)
        return True

    def write_with(self, path: str, writer: Callable) -> None:
        """Calls `writer(file)` on a new file `path` opened for binary writing."""
        self._sizes.append(_write_with(path, writer, sync=not self.syncfs))

    def add_written(self, path: str) -> None:
        """Counts a file that an engine wrote below the root by itself."""
        self._sizes.append(os.stat(path).st_size)

    def sync(self) -> None:
        """Makes everything written so far durable: one syncfs, or the directories' fsyncs."""
        with naming_file(self.path):
            if self.syncfs:
                if _libc().syncfs(self._fd) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"syncfs failed: {os.strerror(error)}", self.path)
            else:
                fsync_dirs(self._dirs)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "DurableDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_with(path: str, writer: Callable, sync: bool) -> int:
    """Calls `writer(file)` on `path` opened for binary writing, fsyncs the file if `sync`;
    returns its size."""
    with naming_file(path), open(path, "wb") as f:
        writer(f)
        f.flush()
        if sync:
            os.fsync(f.fileno())
        return f.tell()


@contextlib.contextmanager
def naming_file(path: str):
    """An OSError without a file name (a failed write: "No space left on device") gets `path`,
    so that the error every rank sees says which file could not be written."""
    try:
        yield
    except OSError as e:
        named = _named(e, path)
        if named is e:
            raise
        raise named from e


def _named(error: OSError, path: str) -> OSError:
    if error.filename is None and error.errno is not None:
        return type(error)(error.errno, error.strerror, path)
    return error


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


def atomic_write(path: str, data: bytes, exclusive: bool = False) -> None:
    """Replaces `path` with `data` so a crash leaves either the old or the new file, never half.
    With `exclusive`, an existing `path` is never replaced (FileExistsError)."""
    atomic_write_with(path, lambda f: f.write(data), exclusive)


def atomic_write_with(path: str, writer: Callable, exclusive: bool = False) -> None:
    """`atomic_write` of what `writer(file)` writes into a binary file (temp file in the same
    directory, fsync, rename, directory fsync); on any error the temp file is removed. With
    `exclusive` the temp file is linked into place instead of renamed: link(2) fails if `path`
    exists (on a file system without hard links: checked, then renamed)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        _write_with(tmp, writer, sync=True)
        if exclusive:
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _link_new(tmp: str, path: str) -> None:
    with naming_file(path):
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "exists", path) from None
            os.replace(tmp, path)


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
    sizes = [size(item) for item in items]
    total = sum(sizes)
    bins = max(1, min(bins, -(-total // min_bin) if min_bin else bins))
    if bins == 1:
        return [list(items)] if items else []
    lists, totals = [[] for _ in range(bins)], [0] * bins
    for n, item in sorted(zip(sizes, items), key=lambda pair: pair[0], reverse=True):
        smallest = totals.index(min(totals))
        lists[smallest].append(item)
        totals[smallest] += n
    return [batch for batch in lists if batch]

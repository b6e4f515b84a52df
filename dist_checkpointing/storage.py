"""One storage layer under the engines: where a checkpoint's files live, and how they are read
and written (zarr-python's `abc/store.py` is the model).

Paths stay strings everywhere: a local path, or a URL such as `s3://bucket/prefix/iter_0000100`
(`os.path.join` composes both). `storage_of(path)` gives the `Storage` that holds it:
- `LocalStorage`: the local (or mounted) file system; durability as fs.py decides;
- object stores (object_storage.py, S3 and S3-compatible servers), where a PUT of one object is
  atomic and durable once confirmed, there is no rename, and there are no links.

What differs between them is declared, not tested for by callers: `local` (engines may use
their own file APIs on the path), `links` (containment must resolve symbolic links), and the
concurrency that pays off for reads and writes (`io_threads`, `thread_bytes`).
"""

import os
import shutil
from abc import ABC, abstractmethod
from typing import Callable, Dict, List

from .errors import CheckpointingException
from .fs import DurableDir, atomic_write, atomic_write_with, balance, fsync_dir

URL_SCHEMES = ("s3",)  # object stores; any other path is local


def is_url(path) -> bool:
    """Whether `path` names an object in an object store (`s3://...`), not a local file."""
    return isinstance(path, str) and path.split("://", 1)[0] in URL_SCHEMES and "://" in path


def storage_of(path) -> "Storage":
    """The storage holding `path` (a local path, an `s3://` URL or an open checkpoint)."""
    path = os.fspath(path)
    if any(path.startswith(f"{scheme}:/") for scheme in URL_SCHEMES) and not is_url(path):
        raise CheckpointingException(
            f"{path} looks like a URL whose '//' was collapsed (pathlib.Path does that); pass "
            f"object store locations as strings, e.g. 's3://bucket/prefix'"
        )
    if is_url(path):
        from .object_storage import s3_storage

        return s3_storage(path)
    return LOCAL


class Reader(ABC):
    """One file opened for reading byte ranges (a descriptor, or ranged GETs of an object)."""

    path: str
    size: int

    @abstractmethod
    def readinto(self, offset: int, buffer) -> int:
        """Reads into `buffer` (writable) from byte `offset` until it is full or the file ends;
        returns the bytes read."""

    def read(self, offset: int, n: int) -> memoryview:
        """Up to `n` bytes from `offset`."""
        data = bytearray(max(0, min(n, self.size - offset)))
        return memoryview(data)[: self.readinto(offset, data)]

    def prefetch(self, offset: int, n: int) -> "Reader":
        """This file for reads within bytes [offset, offset + n), all of which the caller will
        read: an object store fetches them at once (one request, not one per small read);
        a local file reads on demand."""
        return self

    def close(self) -> None:
        pass

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Storage(ABC):
    """Where a checkpoint's files live. Missing files raise FileNotFoundError, other failures
    OSError naming the file (so that errors read alike on every storage)."""

    local = False  # paths are local file system paths (engines may open them themselves)
    links = False  # may hold symbolic links, which containment checks must resolve
    thread_bytes = 64 * 2**20  # data per I/O thread below which more threads do not pay

    def io_threads(self, configured: int) -> int:
        """Concurrent reads or writes of one rank (`configured`: the engine's thread_count)."""
        return configured

    def io_batches(self, items: list, configured: int, size: Callable[[object], int]) -> List[list]:
        """`items` to read or write split into one list per I/O thread (`fs.balance`): on
        local storage few threads for small data (they would contend for the GIL), on an
        object store more and smaller (requests wait on round trips, not on the CPU, and
        smaller objects go up in one PUT each)."""
        return balance(items, self.io_threads(configured), size, self.thread_bytes)

    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether there is an entry at `path` (a file, a link or a directory; an object)."""

    @abstractmethod
    def is_file(self, path: str) -> bool: ...

    @abstractmethod
    def is_dir(self, path: str) -> bool:
        """A directory (in an object store: a prefix that objects have)."""

    @abstractmethod
    def size(self, path: str) -> int: ...

    @abstractmethod
    def read(self, path: str) -> bytes:
        """The whole file."""

    @abstractmethod
    def open(self, path: str, follow_links: bool = True, whole: bool = False) -> Reader:
        """`path` for reading; `whole`: the caller will read every byte (an object store then
        fetches it in one request instead of a size query and ranged reads)."""

    @abstractmethod
    def files(self, root: str) -> Dict[str, int]:
        """Every file below `root`: relative '/'-separated name -> size, sorted by name."""

    @abstractmethod
    def entries(self, root: str) -> List[str]:
        """The names directly below `root` (files and directories), sorted."""

    @abstractmethod
    def write_atomic(self, path: str, data: bytes, exclusive: bool = False) -> None:
        """Replaces `path` with `data`: a crash leaves the old or the new content, never part,
        and it is durable on return. With `exclusive`, an existing file is never replaced
        (FileExistsError)."""

    @abstractmethod
    def write_atomic_with(self, path: str, writer: Callable) -> None:
        """`write_atomic` of what `writer(file)` writes into a binary file (streamed, for
        files too large to assemble in memory); an existing file is replaced."""

    @abstractmethod
    def remove(self, path: str) -> None:
        """Deletes file `path` durably (if it exists)."""

    @abstractmethod
    def remove_tree(self, path: str) -> None:
        """Deletes the directory `path` and everything below it."""

    @abstractmethod
    def target(self, path: str):
        """The write target (`fs.DurableDir`'s interface) of one save step into directory `path`."""

    # tensorstore brings its own clients: how it reaches directory `path` of this storage
    @abstractmethod
    def tensorstore_kvstore(self, path: str) -> dict: ...

    @abstractmethod
    def tensorstore_context(self) -> dict:
        """Context resources for its requests (concurrency, retries)."""


class LocalStorage(Storage):
    local = True
    links = True

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def is_file(self, path: str) -> bool:
        return os.path.isfile(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def open(self, path: str, follow_links: bool = True, whole: bool = False) -> Reader:
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | (0 if follow_links else os.O_NOFOLLOW)
        return FileReader(path, os.open(path, flags))

    def files(self, root: str) -> Dict[str, int]:
        found = {}
        for directory, _, files in os.walk(root):
            for name in files:
                path = os.path.join(directory, name)
                # lstat: a dangling link is listed, not a crash
                found[os.path.relpath(path, root).replace(os.sep, "/")] = os.lstat(path).st_size
        return dict(sorted(found.items()))

    def entries(self, root: str) -> List[str]:
        return sorted(os.listdir(root))

    def write_atomic(self, path: str, data: bytes, exclusive: bool = False) -> None:
        atomic_write(path, data, exclusive)

    def write_atomic_with(self, path: str, writer: Callable) -> None:
        atomic_write_with(path, writer)

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        fsync_dir(os.path.dirname(os.path.abspath(path)))

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))

    def target(self, path: str) -> DurableDir:
        return DurableDir(path)

    def tensorstore_kvstore(self, path: str) -> dict:
        return {"driver": "file", "path": path.rstrip("/") + "/"}

    def tensorstore_context(self) -> dict:
        return {}


class FileReader(Reader):
    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd
        self.size = os.fstat(fd).st_size

    def readinto(self, offset: int, buffer) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < view.nbytes:  # a single read stops at 2 GiB on Linux
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def close(self) -> None:
        os.close(self.fd)


class MemoryReader(Reader):
    """Bytes of a file already read: all of it, or those from `start` of a file of `size`
    (reads outside them are a bug of the caller, and fail)."""

    def __init__(self, path: str, data, start: int = 0, size: int = None):
        self.path, self.data, self.start = path, memoryview(data).cast("B"), start
        self.size = self.data.nbytes if size is None else size

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(view.nbytes, self.size - offset)
        if offset < self.start or offset + wanted > self.start + self.data.nbytes:
            raise ValueError(f"{self.path}: bytes {offset}..{offset + wanted} were not fetched")
        part = self.data[offset - self.start : offset - self.start + wanted]
        view[: part.nbytes] = part
        return part.nbytes


LOCAL = LocalStorage()


def read_whole(path: str, what: str) -> bytes:
    """The bytes of file `path` of a checkpoint; a missing or unreadable file raises a
    CheckpointingException naming `what` needs it."""
    try:
        return storage_of(path).read(path)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointingException(f"{what}: file {path} is missing; the checkpoint is damaged or incomplete") from None
    except OSError as e:
        raise CheckpointingException(f"{what}: cannot read {path}: {e.strerror or e}") from None

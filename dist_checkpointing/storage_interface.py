"""The storage layer's interface: a `Storage` (where a checkpoint's files live) and a `Reader`
(one file opened for byte ranges), which every backend implements (storage.py: local files;
object_storage.py: S3), and `MemoryReader` for bytes already fetched. storage.py chooses the
backend for a path (`storage_of`); backends depend on this module only.
"""

from abc import ABC, abstractmethod
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

from .fs import balance


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

    @abstractmethod
    def close(self) -> None:
        """Releases what this reader holds (a descriptor, buffers)."""

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
    small_read_bytes = 2**20  # reads up to this size are CPU work, not waiting (`read_batches`)

    def io_threads(self, configured: int) -> int:
        """Concurrent reads or writes of one rank (`configured`: the engine's thread_count)."""
        return configured

    def read_batches(self, entries: list, configured: int, reads: Callable[[object], Iterable[int]]) -> List[list]:
        """`io_batches` of `entries` to read, each one or more reads of `reads(entry)` bytes.
        Only large reads earn threads on local storage: a small one (up to `small_read_bytes`,
        usually from the page cache) is CPU work, and more threads would contend for the GIL
        (20,001 small chunks load twice as fast on one thread as on two here). On an object
        store every request waits on a round trip, so every read counts."""
        return self.io_batches(entries, configured, lambda entry: sum(n for n in reads(entry) if n > self.small_read_bytes))

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

    def read_files(self, reads: Sequence[Tuple[str, Sequence]], follow_links: bool = True) -> List[int]:
        """Reads each file of `reads` ((path, buffers) pairs) into its buffers (writable,
        filled in order) if it holds exactly as many bytes as they do; returns each file's
        size either way (its buffers are filled only when it matches). Many small files
        (chunks) in one call, each in one request: a local storage pays its per-file costs in
        one loop. A missing file raises FileNotFoundError naming it."""
        sizes = []
        for path, buffers in reads:
            total = sum([memoryview(buffer).nbytes for buffer in buffers])
            with self.open(path, follow_links=follow_links, whole=True) as file:
                if file.size == total:
                    offset = 0
                    for buffer in buffers:
                        offset += file.readinto(offset, buffer)
                sizes.append(file.size)
        return sizes

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

    def close(self) -> None:
        self.data = memoryview(b"")

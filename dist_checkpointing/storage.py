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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .errors import CheckpointingException
from .fs import DurableDir, atomic_write, atomic_write_with, fsync_dir
from .object_storage import s3_storage
from .storage_interface import Reader, Storage

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
        return s3_storage(path)
    return LOCAL


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
        return FileReader(path, os.open(path, _read_flags(follow_links)))

    def read_files(self, reads: Sequence[Tuple[str, Sequence]], follow_links: bool = True) -> List[int]:
        flags = _read_flags(follow_links)
        sizes, spare = [], bytearray(1)  # one byte more than expected tells a longer file without asking its size
        for path, buffers in reads:
            total = sum([memoryview(buffer).nbytes for buffer in buffers])
            if total >= 2**31 - 2**12:  # one preadv stops short of 2 GiB; FileReader.readinto loops
                sizes += super().read_files([(path, buffers)], follow_links)
                continue
            fd = os.open(path, flags)
            try:
                n = os.preadv(fd, [*buffers, spare], 0)
                sizes.append(total if n == total else os.fstat(fd).st_size)
            finally:
                os.close(fd)
        return sizes

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


def _read_flags(follow_links: bool) -> int:
    return os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | (0 if follow_links else os.O_NOFOLLOW)


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


LOCAL = LocalStorage()


def read_whole(path: str, what: str, storage: Optional[Storage] = None) -> bytes:
    """The bytes of file `path` of a checkpoint (on `storage`, where the caller has it); a
    missing or unreadable file raises a CheckpointingException naming `what` needs it."""
    try:
        return (storage or storage_of(path)).read(path)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointingException(f"{what}: file {path} is missing; the checkpoint is damaged or incomplete") from None
    except OSError as e:
        raise CheckpointingException(f"{what}: cannot read {path}: {e.strerror or e}") from None

"""S3 and S3-compatible object stores (AWS, MinIO, Ceph, ...) under the storage layer.

The client is obstore (Python bindings of the Rust `object_store` crate of Apache Arrow): one
small wheel without dependencies that retries transient failures (5xx, throttling, dropped
connections) with exponential backoff, uploads large objects in concurrent multipart parts,
reads byte ranges concurrently, and PUTs conditionally (`If-None-Match`), which is what makes
a commit never replace a complete checkpoint. zarr-python's `zarr.storage.ObjectStore` takes the
same store object, so the zarr engine shares its client and settings; tensorstore uses its own
`s3` kvstore, configured from the same settings (`tensorstore_kvstore`).

A location is a URL `s3://bucket/prefix`. Settings come from the standard AWS environment:
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (a custom endpoint is addressed path-style),
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` or
`AWS_DEFAULT_REGION`; and this library's `DIST_CKPT_S3_CONCURRENCY` (requests in flight per rank,
default 16), `DIST_CKPT_S3_RETRIES` (retries of a failed request, default 3) and
`DIST_CKPT_S3_TIMEOUT` (seconds per request, default 60).

There is no rename and nothing to sync: an object exists, whole and durable, once its PUT (or
the completion of its multipart upload) is confirmed, and not before.
"""

import errno
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

from .errors import CheckpointingException
from .storage_interface import MemoryReader, Reader, Storage

PART_BYTES = 16 * 2**20  # multipart part size (10,000 parts: objects up to 156 GiB)
SINGLE_PUT_BYTES = 64 * 2**20  # smaller objects are one PUT: fewer requests, one retry unit
RANGE_BYTES = 16 * 2**20  # a larger read is split into ranges fetched concurrently


@dataclass(frozen=True)
class S3Settings:
    endpoint: Optional[str]
    region: str
    access_key_id: Optional[str]
    secret_access_key: Optional[str]
    session_token: Optional[str]
    concurrency: int
    retries: int
    timeout: float

    @classmethod
    def from_environment(cls) -> "S3Settings":
        env = os.environ

        def number(name: str, default, kind):
            try:
                value = kind(env.get(name, default))
            except ValueError:
                value = None
            if value is None or value < (1 if name != "DIST_CKPT_S3_RETRIES" else 0):
                raise CheckpointingException(f"{name}={env[name]!r} is not a valid {kind.__name__} setting")
            return value

        return cls(
            endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=env.get("AWS_SESSION_TOKEN"),
            concurrency=number("DIST_CKPT_S3_CONCURRENCY", 16, int),
            retries=number("DIST_CKPT_S3_RETRIES", 3, int),
            timeout=number("DIST_CKPT_S3_TIMEOUT", 60, float),
        )


def split_url(url: str) -> Tuple[str, str]:
    """(bucket, key prefix without a trailing '/') of `s3://bucket/prefix`."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise CheckpointingException(f"{url} names no bucket; a location is s3://bucket/prefix")
    return bucket, key.strip("/")


_stores: Dict[Tuple[str, S3Settings], "S3Storage"] = {}
_stores_lock = threading.Lock()


def s3_storage(url: str) -> "S3Storage":
    """The storage of `url`'s bucket, made once per bucket and settings in this process."""
    bucket, _ = split_url(url)
    settings = S3Settings.from_environment()
    with _stores_lock:
        if (bucket, settings) not in _stores:
            _stores[bucket, settings] = S3Storage(bucket, settings)
        return _stores[bucket, settings]


def _os_error(error: Exception, path: str) -> OSError:
    """An obstore error as the OSError a file system would raise for `path` (its first line:
    obstore's messages continue with a debug dump)."""
    import obstore.exceptions as failures

    message = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    if isinstance(error, (FileNotFoundError, failures.NotFoundError)):
        return FileNotFoundError(errno.ENOENT, f"no such object ({message})", path)
    if isinstance(error, (FileExistsError, failures.AlreadyExistsError, failures.PreconditionError)):
        return FileExistsError(errno.EEXIST, f"the object exists ({message})", path)
    if isinstance(error, (PermissionError, failures.PermissionDeniedError, failures.UnauthenticatedError)):
        return PermissionError(errno.EACCES, f"access denied ({message})", path)
    return OSError(errno.EIO, f"{type(error).__name__}: {message}", path)


class S3Storage(Storage):
    local = False
    links = False
    thread_bytes = 4 * 2**20  # a request's latency, not the GIL, bounds small reads and writes
    small_read_bytes = 0

    def __init__(self, bucket: str, settings: S3Settings):
        import obstore.store

        self.bucket, self.settings = bucket, settings
        options = {"timeout": timedelta(seconds=settings.timeout), "connect_timeout": timedelta(seconds=min(10.0, settings.timeout))}
        config = {"region": settings.region}
        if settings.endpoint:
            config.update(endpoint=settings.endpoint, virtual_hosted_style_request=False)
            options["allow_http"] = settings.endpoint.startswith("http://")
        for name in ("access_key_id", "secret_access_key", "session_token"):
            if getattr(settings, name):
                config[name] = getattr(settings, name)
        retry = {
            "max_retries": settings.retries,
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5), "base": 2},
            "retry_timeout": timedelta(seconds=settings.timeout * (settings.retries + 1)),
        }
        self.store = obstore.store.S3Store(bucket, config=config, client_options=options, retry_config=retry)

    def io_threads(self, configured: int) -> int:
        return max(configured, self.settings.concurrency)

    def key(self, path: str) -> str:
        bucket, key = split_url(path)
        if bucket != self.bucket:
            raise ValueError(f"{path} is not in bucket {self.bucket}")
        return key

    def _call(self, path: str, function, *args, **kwargs):
        try:
            return function(self.store, *args, **kwargs)
        except Exception as e:  # obstore's errors (some are OSErrors) carry a debug dump
            raise _os_error(e, path) from e

    def size(self, path: str) -> int:
        import obstore

        return self._call(path, obstore.head, self.key(path))["size"]

    def exists(self, path: str) -> bool:
        return self.is_file(path)

    def is_dir(self, path: str) -> bool:
        return bool(self._list(path, limit=1))

    def is_file(self, path: str) -> bool:
        try:
            self.size(path)
            return True
        except FileNotFoundError:
            return False

    def read(self, path: str) -> bytes:
        import obstore

        return self._call(path, obstore.get, self.key(path)).bytes().to_bytes()

    def open(self, path: str, follow_links: bool = True, whole: bool = False) -> Reader:
        if whole:
            return MemoryReader(path, self.read(path))
        return ObjectReader(self, path, self.size(path))

    def _list(self, root: str, limit: Optional[int] = None) -> Dict[str, int]:
        """Keys below directory `root`, relative to it, and their sizes."""
        import obstore

        prefix = self.key(root)
        prefix = f"{prefix}/" if prefix else ""
        found = {}
        for batch in self._call(root, obstore.list, prefix, chunk_size=1000):
            found.update((meta["path"][len(prefix):], meta["size"]) for meta in batch)
            if limit is not None and len(found) >= limit:
                break
        return found

    def files(self, root: str) -> Dict[str, int]:
        return dict(sorted(self._list(root).items()))

    def entries(self, root: str) -> List[str]:
        return sorted({name.split("/", 1)[0] for name in self._list(root)})

    def write_atomic(self, path: str, data: bytes, exclusive: bool = False) -> None:
        import obstore

        self._call(path, obstore.put, self.key(path), data, mode="create" if exclusive else "overwrite")

    def put(self, path: str, buffers) -> int:
        """Uploads a new object holding the buffers in order (multipart if large); its size."""
        import obstore

        views = [memoryview(b).cast("B") for b in buffers]
        size = sum(view.nbytes for view in views)
        if size <= SINGLE_PUT_BYTES:
            data = views[0] if len(views) == 1 else b"".join(views)
            self._call(path, obstore.put, self.key(path), data, use_multipart=False)
        else:
            self._call(
                path, obstore.put, self.key(path), _parts(views, PART_BYTES), use_multipart=True,
                chunk_size=PART_BYTES, max_concurrency=self.settings.concurrency,
            )
        return size

    def write_atomic_with(self, path: str, writer) -> int:
        """Streams what `writer(file)` writes: one PUT up to SINGLE_PUT_BYTES, else a multipart
        upload of parts of that size. The object exists once the upload completes (never
        partly). Returns its size."""
        import obstore

        try:
            with obstore.open_writer(self.store, self.key(path), buffer_size=SINGLE_PUT_BYTES, max_concurrency=self.settings.concurrency) as f:
                stream = _CountingWriter(f)
                writer(stream)
        except Exception as e:
            raise _os_error(e, path) from e
        return stream.position

    def remove(self, path: str) -> None:
        import obstore

        self._call(path, obstore.delete, self.key(path))  # deleting a missing key succeeds

    def remove_tree(self, path: str) -> None:
        import obstore

        keys = [f"{self.key(path)}/{name}" for name in self._list(path)]
        if keys:
            self._call(path, obstore.delete, keys)

    def target(self, path: str) -> "ObjectTarget":
        return ObjectTarget(self, path)

    def tensorstore_kvstore(self, path: str) -> dict:
        """tensorstore's `s3` kvstore of directory `path` (credentials from the environment)."""
        spec = {"driver": "s3", "bucket": self.bucket, "path": self.key(path).rstrip("/") + "/", "aws_region": self.settings.region}
        if self.settings.endpoint:
            spec["endpoint"] = self.settings.endpoint
        return spec

    def tensorstore_context(self) -> dict:
        """tensorstore's context resources for S3 requests: this storage's concurrency and retries."""
        return {
            "s3_request_concurrency": {"limit": self.settings.concurrency},
            "s3_request_retries": {"max_retries": max(1, self.settings.retries), "initial_delay": "100ms", "max_delay": "5s"},
        }


def _parts(views: List[memoryview], part: int):
    """The buffers cut into pieces of at most `part` bytes (views, not copies)."""
    for view in views:
        for start in range(0, view.nbytes, part):
            yield view[start : start + part]


class ObjectReader(Reader):
    """Ranged GETs of one object; a large read is split into ranges fetched concurrently."""

    def __init__(self, storage: S3Storage, path: str, size: int):
        self.storage, self.path, self.size = storage, path, size

    def close(self) -> None:
        """Nothing to release: the storage's client (and its connections) is shared."""

    def readinto(self, offset: int, buffer) -> int:
        import obstore

        view = memoryview(buffer).cast("B")
        n = max(0, min(view.nbytes, self.size - offset))
        if n == 0:
            return 0
        starts = list(range(offset, offset + n, RANGE_BYTES))
        lengths = [min(RANGE_BYTES, offset + n - start) for start in starts]
        key = self.storage.key(self.path)
        if len(starts) == 1:  # (fetched at once, concurrently, when more)
            parts = [self.storage._call(self.path, obstore.get_range, key, start=offset, length=n)]
        else:
            parts = self.storage._call(self.path, obstore.get_ranges, key, starts=starts, lengths=lengths, coalesce=0)
        done = 0
        for part in parts:
            data = memoryview(part)
            view[done : done + data.nbytes] = data
            done += data.nbytes
        return done

    def prefetch(self, offset: int, n: int) -> Reader:
        data = bytearray(max(0, min(n, self.size - offset)))
        return MemoryReader(self.path, memoryview(data)[: self.readinto(offset, data)], offset, self.size)


class ObjectTarget(os.PathLike):
    """The write target of one save step into an object store (`fs.DurableDir`'s interface).
    `write` queues an upload (up to `concurrency` in flight, so a rank's many small chunk files
    do not wait on each other's round trips) and returns; `write_with` streams a multipart
    upload from the calling thread. `sync` waits for every upload and raises the first failure:
    once it returns, every object is stored."""

    syncfs = True  # nothing to fsync per file (engines that write files themselves may skip it)

    def __init__(self, storage: S3Storage, path: str):
        self.storage, self.path = storage, path.rstrip("/")
        self.files = self.nbytes = 0
        self._pool = ThreadPoolExecutor(storage.settings.concurrency, thread_name_prefix="dist-ckpt-upload")
        self._pending: List[Future] = []
        self._lock = threading.Lock()

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.files += 1
            self.nbytes += nbytes

    def makedirs(self, directory: str) -> None:
        pass  # an object store has no directories

    def write(self, path: str, buffers, size=None) -> None:
        buffers = list(buffers)
        future = self._pool.submit(lambda: self._count(self.storage.put(path, buffers)))
        with self._lock:
            self._pending.append(future)

    def write_if_made(self, directory: str, path: str, buffers, size=None) -> bool:
        self.write(path, buffers)  # no directory to find or make
        return True

    def write_with(self, path: str, writer) -> None:
        self._count(self.storage.write_atomic_with(path, writer))

    def add_written(self, path: str) -> None:
        self._count(self.storage.size(path))

    def sync(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        errors = [e for e in errors if e is not None]
        if errors:
            raise errors[0]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ObjectTarget":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _CountingWriter:
    """A binary file over obstore's multipart writer, with the `tell` that writers expect."""

    def __init__(self, f):
        self.f, self.position = f, 0

    def write(self, data) -> int:
        # copied: the writer keeps what it is given until a part is full, and callers reuse or
        # free their buffers once `write` returns (torch.save's zip writer does)
        view = memoryview(data).cast("B")
        self.f.write(bytes(view))
        self.position += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        pass  # parts are uploaded as they fill; the object is completed on close

    def tell(self) -> int:
        return self.position

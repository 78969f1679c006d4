"""A thin storage layer over fsspec: atomic writes, ranged and batched ranged reads, listing, deletion.

Every backend (local disk, memory://, s3://, any fsspec protocol) honours one contract, checked by one
conformance suite (tests/test_storage.py):
- an object is visible whole or not at all: local files are written under a temporary name and renamed;
  S3 objects are one PUT, or a multipart upload completed only on success and aborted on error (s3fs
  commits a truncated object if an exception escapes `with fs.open(..., "wb")`: docs/benchmarks.md, "Measurements behind the design");
- `put_if_absent` is first-writer-wins (O_EXCL locally, If-None-Match on S3), for locks and markers.

Spread over hashed prefixes. S3 serves about 3,500 PUT and 5,500 GET requests per second per partitioned
prefix (https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html); pass 2 of the
1 PB plan issues tens of thousands per second against one scratch folder (docs/scale.md). A URL ending in
`#prefixes=N` (`with_prefixes`) names a Storage that keeps each object `name` under the key
`prefixed_key(name, N)`: a hashed first folder (`9/map-000003.shard` for N=16), so S3 can split the load N ways.
Names stay what they were for every caller (reads, writes, `list`, `url_of`); only the keys change. Path
after the marker stays inside it (`run-x#prefixes=16/sub-1` hashes `sub-1/<name>` under `run-x`), so a
child folder built by appending to the URL is spread over the same prefixes.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import posixpath
import re
import threading
import uuid
import zlib
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from shuffler import env
from shuffler.storage.direct import DirectWriter, open_direct

PART_BYTES = 64 << 20
"""Multipart part size on S3 (the s3fs block size): each part is one PUT-class request, so 64 MiB parts cost
a quarter of the requests of 16 MiB ones; S3 allows 10,000 parts per object, so 64 MiB parts reach 625 GiB."""
MAX_PARTS = 10_000
"""S3's limit on the parts of one multipart upload."""
#: Objects up to this size go to S3 as one PUT (s3fs uploads at close what never filled a part); larger ones
#: stream as a multipart upload.
SINGLE_PUT_BYTES = PART_BYTES
UPLOAD_BUFFERS = 2
"""Part-sized buffers one object being written holds: s3fs fills one, then copies it out for upload_part
(s3fs/core.py, S3File._upload_chunk reads the buffer into bytes before sending)."""
_PREFIXES = re.compile(r"#prefixes=(\d+)(?=/|$)")
_TMP = re.compile(r"\.tmp-[0-9a-f]{12}$")
"""A temporary name of open_atomic and put_if_absent: it hashes as the name it becomes, so it sits beside it."""
_memory_lock = threading.Lock()


def part_bytes_for(object_bytes: int) -> int:
    """Part size for an object of up to `object_bytes`: PART_BYTES, or larger (whole MiB) past MAX_PARTS parts,
    with 2% to spare for an estimate (compression headers, footers)."""
    need = math.ceil(object_bytes * 1.02 / MAX_PARTS / (1 << 20)) << 20
    return max(PART_BYTES, need)


def prefixed_key(name: str, prefixes: int) -> str:
    """The key of object `name` spread over `prefixes` hashed prefixes: "<h>/<name>", h = CRC-32 of the name
    mod prefixes in hex (zero-padded to one width); `name` itself when prefixes <= 1. CRC-32, not hash(), so
    every process and machine agrees."""
    if prefixes <= 1:
        return name
    width = len(f"{prefixes - 1:x}")
    return f"{zlib.crc32(_TMP.sub('', name).encode()) % prefixes:0{width}x}/{name}"


def with_prefixes(url: str, prefixes: int) -> str:
    """`url` marked to spread its objects over `prefixes` hashed prefixes (the URL itself when prefixes <= 1)."""
    if prefixes < 1:
        raise ValueError(f"prefixes={prefixes} must be >= 1")
    plain, _ = split_prefixes(url)
    return plain if prefixes == 1 else f"{plain}#prefixes={prefixes}"


def split_prefixes(url: str) -> tuple[str, int]:
    """(the URL without its `#prefixes=N` marker, N); N is 1 without a marker. Path after the marker is kept
    in the plain URL: `s3://b/run-x#prefixes=4/sub-1` gives (`s3://b/run-x/sub-1`, 4)."""
    m = _PREFIXES.search(url)
    if m is None:
        return url, 1
    n = int(m.group(1))
    if n < 1:
        raise ValueError(f"{url!r}: #prefixes={n} must be >= 1")
    return url[: m.start()] + url[m.end() :], n


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    options: dict = {}
    if scheme in ("s3", "s3a"):
        endpoint = env.s3_endpoint_url()
        if endpoint:
            options["endpoint_url"] = endpoint
        # Retries with backoff on throttling (503 SlowDown) and 5xx: botocore's adaptive mode.
        options["config_kwargs"] = {"retries": {"max_attempts": env.s3_max_attempts(), "mode": "adaptive"}}
        options["skip_instance_cache"] = True  # never share an aiohttp session across fork
        # No listing cache: other processes and machines write the objects this one lists and reads (markers,
        # the bucket index). s3fs answers `info` (which `cat_file` calls) from a cached listing of the folder,
        # so an object written after that listing read as FileNotFoundError (tests/test_bucket_index.py).
        options["use_listings_cache"] = False
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ValueError as e:
        if "Protocol not known" in str(e) or "not known" in str(e):
            raise ValueError(
                f"unknown URL scheme {scheme!r} in {url!r}; expected a local path, memory://, s3:// "
                "or another installed fsspec protocol"
            ) from None
        raise
    except ImportError as e:
        extra = "s3" if scheme in ("s3", "s3a") else None
        hint = f" (pip install 'activation-shuffler[{extra}]')" if extra else ""
        raise ImportError(f"{url!r} needs a filesystem package that is not installed{hint}: {e}") from None


@contextlib.contextmanager
def explain(url: str, what: str) -> Iterator[None]:
    """Turn backend errors that users hit often into messages that name the URL and the fix."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, IsADirectoryError):
        raise
    except Exception as e:
        name = type(e).__name__
        text = str(e)
        if name in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
            raise PermissionError(
                f"{what} {url}: no S3 credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
            ) from None
        if isinstance(e, OSError) and not isinstance(e, PermissionError) and url not in text:
            # Storage errors that outlived the retries (5xx, resets): say which object and what was tried.
            raise OSError(e.errno, f"{what} {url} failed after retries: {e.strerror or text}") from e
        raise


class Storage:
    """A prefix (folder) on some filesystem, addressed by relative object names."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") or url
        m = _PREFIXES.search(self.url)
        # With a `#prefixes=N` marker: keys hash under the folder before it (`base`), names under it keep the
        # path after it (`sub`) in front, so they hash the same whichever Storage names them.
        base = self.url[: m.start()] if m else self.url
        self.prefixes = int(m.group(1)) if m else 1
        self.sub = self.url[m.end() :].strip("/") + "/" if m and self.url[m.end() :].strip("/") else ""
        self.fs, self.root = _filesystem(base)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = self.root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def __reduce__(self):
        # Pickles as its URL (process pools, Ray): each process builds its own client, never sharing sockets.
        return (Storage, (self.url,))

    # -- names ----------------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        """Where object `name` lives on the filesystem (its hashed key, when spread over prefixes)."""
        if self.prefixes > 1:
            if not name:
                raise ValueError(f"{self.url}: a folder spread over prefixes has no single path")
            return posixpath.join(self.root, prefixed_key(self.sub + name, self.prefixes))
        return posixpath.join(self.root, name) if name else self.root

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    def child(self, name: str) -> Storage:
        return Storage(self.url_of(name))

    # -- reads ----------------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        with explain(self.url_of(name), "checking"):
            return self.fs.exists(self.path(name))

    def size(self, name: str) -> int:
        with explain(self.url_of(name), "sizing"):
            return int(self.fs.size(self.path(name)))

    def read(self, name: str) -> bytes:
        with explain(self.url_of(name), "reading"):
            return self.fs.cat_file(self.path(name))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object, in one request."""
        with explain(self.url_of(name), "reading"):
            if self.is_local:
                with open(self.path(name), "rb") as f:
                    return os.pread(f.fileno(), end - start, start)
            return self.fs.cat_file(self.path(name), start=start, end=end)

    def read_ranges(self, names: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
        """Many ranged reads at once; concurrent on object stores (s3fs gathers them)."""
        if self.is_local:
            return [self.read_range(n, s, e) for n, s, e in zip(names, starts, ends, strict=True)]
        with explain(self.url, "reading"):
            return self.fs.cat_ranges([self.path(n) for n in names], starts, ends, on_error="raise")

    def list(self, prefix: str = "") -> list[str]:
        """Object names under `prefix` (relative to this storage), sorted; [] if none."""
        if self.prefixes > 1:
            # One recursive listing of the whole spread folder (as many LIST pages as objects / 1,000 on S3,
            # whatever N), keeping the keys that hash to their own prefix: other layouts are not this folder's.
            want = self.sub + prefix
            out = []
            for key in Storage(self.url[: _PREFIXES.search(self.url).start()]).list(""):
                head, _, name = key.partition("/")
                if name.startswith(want) and prefixed_key(name, self.prefixes) == key:
                    out.append(name[len(self.sub) :])
            return sorted(out)
        base = self.path(prefix)
        with explain(self.url_of(prefix), "listing"):
            try:
                found = self.fs.find(base)
            except FileNotFoundError:
                return []
        root = self.root.rstrip("/") + "/"
        out = []
        for p in found:
            p = p if p.startswith("/") or not root.startswith("/") else "/" + p
            out.append(p[len(root) :] if p.startswith(root) else posixpath.relpath(p, self.root))
        return sorted(out)

    # -- writes ---------------------------------------------------------------------------------------
    def write(self, name: str, data: bytes) -> None:
        """Write a whole object atomically."""
        with self.open_atomic(name) as f:
            f.write(data)

    @contextlib.contextmanager
    def open_atomic(self, name: str, *, direct: bool = False, size: int = 0) -> Iterator[io.RawIOBase]:
        """A binary file whose content becomes visible under `name` only when the block exits cleanly.

        direct=True: a local file is written with O_DIRECT, past the page cache (storage/direct.py); for large
        objects written front to back and not read back at once (shards). size: about how large the object
        will be, if known: past MAX_PARTS parts of PART_BYTES, S3 uploads it in larger parts
        (part_bytes_for)."""
        path = self.path(name)
        with explain(self.url_of(name), "writing"):
            if self.is_local:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
                try:
                    f = open_direct(tmp) if direct else open(tmp, "wb")
                    try:
                        yield f
                    except BaseException:
                        if isinstance(f, DirectWriter):
                            f.discard()  # nothing more to write: the file is deleted below
                        raise
                    finally:
                        f.close()
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    raise
            elif self.fs.protocol in ("s3", "s3a") or "s3" in (self.fs.protocol or ()):
                f = self.fs.open(path, "wb", block_size=part_bytes_for(size))
                try:
                    yield f
                except BaseException:
                    f.discard()  # aborts the multipart upload: nothing becomes visible
                    f.closed = True  # else s3fs's __del__ tries to flush the discarded buffer
                    raise
                f.close()
            else:
                # memory:// and others: build in memory, then one put.
                buf = io.BytesIO()
                yield buf
                self.fs.pipe_file(path, buf.getvalue())

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Create `name` with `data` unless it exists. True if this call created it (first writer wins)."""
        path = self.path(name)
        with explain(self.url_of(name), "writing"):
            if self.is_local:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                # Whole or not at all, as every object: write a temporary file, then link(2) it to the name,
                # which fails if the name exists. (An O_EXCL create followed by a write leaves an empty lock
                # behind when killed in between, and an empty lock names no holder to check.)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                    except OSError:  # no hard links on this filesystem (some FUSE/SMB mounts): O_EXCL
                        try:
                            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                        except FileExistsError:
                            return False
                        with os.fdopen(fd, "wb") as f:
                            f.write(data)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                return True
            if "s3" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)):
                try:
                    with self.fs.open(path, "xb") as f:  # s3fs maps "xb" to If-None-Match: *
                        f.write(data)
                    return True
                except FileExistsError:
                    return False
            with _memory_lock:
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
                return True

    def delete(self, name: str) -> None:
        with explain(self.url_of(name), "deleting"), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(name))

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix`."""
        for n in self.list(prefix):
            self.delete(n)
        if self.is_local:
            base = self.root if self.prefixes > 1 else self.path(prefix)
            if os.path.isdir(base):
                for dirpath, _, _ in sorted(os.walk(base), key=lambda t: -len(t[0])):
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)

"""A thin storage layer over fsspec: atomic writes, ranged and batched ranged reads, listing, deletion.

Every backend (local disk, memory://, s3://, any fsspec protocol) honours one contract, checked by one
conformance suite (tests/test_storage.py):
- an object is visible whole or not at all: local files are written under a temporary name and renamed;
  S3 objects are one PUT, or a multipart upload completed only on success and aborted on error (s3fs
  commits a truncated object if an exception escapes `with fs.open(..., "wb")`: docs/benchmarks.md, "Measurements behind the design");
- `put_if_absent` is first-writer-wins (O_EXCL locally, If-None-Match on S3), for locks and markers.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import threading
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from shuffler import env
from shuffler.storage.direct import DirectWriter, open_direct

#: Objects up to this size go to S3 as one PUT; larger ones stream as a multipart upload.
SINGLE_PUT_BYTES = 64 << 20
_memory_lock = threading.Lock()


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
        self.fs, self.root = _filesystem(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = self.root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def __reduce__(self):
        # Pickles as its URL (process pools, Ray): each process builds its own client, never sharing sockets.
        return (Storage, (self.url,))

    # -- names ----------------------------------------------------------------------------------------
    def path(self, name: str) -> str:
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
    def open_atomic(self, name: str, *, direct: bool = False) -> Iterator[io.RawIOBase]:
        """A binary file whose content becomes visible under `name` only when the block exits cleanly.

        direct=True: a local file is written with O_DIRECT, past the page cache (storage/direct.py); for large
        objects written front to back and not read back at once (shards)."""
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
                f = self.fs.open(path, "wb", block_size=16 << 20)
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
            base = self.path(prefix)
            if os.path.isdir(base):
                for dirpath, _, _ in sorted(os.walk(base), key=lambda t: -len(t[0])):
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)

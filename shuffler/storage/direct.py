"""Local files written with O_DIRECT from one reused, aligned buffer: shard bytes skip the page cache.

Why: a buffered write(2) copies every byte into page-cache pages the kernel must first find and later write
back; on the project's 2-core VM that copy (`copy_folio_from_iter_atomic`) was the largest single kernel cost of
a shuffle, 2.7 of its 9.7 CPU-seconds for 2 GB of intermediates and output (docs/benchmarks.md, "Where the
kernel's time went"). With O_DIRECT the device reads the bytes straight from this buffer: 1 GiB written cost
0.03-0.08 s of system time against 0.26 s buffered into reused page-cache pages and 2.2 s into fresh ones.
Shards are written once, front to back, in multi-MiB pieces, and read later (often by another process or
machine), so the page cache gains nothing by holding them as they are written.

O_DIRECT needs the buffer address, the file offset and the length aligned to the device's logical block size
(open(2), "O_DIRECT"); ALIGN (4 KiB) covers every common device. Whole aligned blocks go out as the buffer
fills; the last partial block is written through the page cache after O_DIRECT is turned off with fcntl(2).
Where O_DIRECT is refused (tmpfs and some network or FUSE filesystems: EINVAL), open_direct returns a plain
buffered file, so the behaviour never depends on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

ALIGN = 4096
BUFFER_BYTES = 8 << 20
"""Bytes gathered before each O_DIRECT write: large enough that the device sees few requests."""
_lock = threading.Lock()


class _Pool:
    """Page-aligned buffers kept for reuse in this process, at most `keep` of them: reusing them is the point,
    since a fresh map costs a page fault per 4 KiB on first touch (2,048 per 8 MiB; fewer where transparent
    huge pages are allowed, which it asks for). New buffers are as large as the largest made so far (read
    batches vary in size: equal buffers keep fitting the next one)."""

    def __init__(self, keep: int):
        self.keep, self.largest = keep, 0
        self.free: list[mmap.mmap] = []

    def take(self, nbytes: int) -> mmap.mmap:
        with _lock:
            fits = [b for b in self.free if len(b) >= nbytes]
            if fits:
                b = min(fits, key=len)
                self.free.remove(b)
                return b
            self.largest = size = max(self.largest, -(-nbytes // (2 << 20)) * (2 << 20))
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(OSError, AttributeError):
            buf.madvise(mmap.MADV_HUGEPAGE)
        return buf

    def give_back(self, buf: mmap.mmap) -> None:
        """Keep `buf` for reuse, unless `keep` are kept already or a larger size has been made since (a smaller
        buffer may not fit the next request, and kept beside its successors it would only hold memory)."""
        with _lock:
            if len(self.free) < self.keep and len(buf) >= self.largest:
                self.free.append(buf)
                return
        with contextlib.suppress(BufferError):  # frames of it still alive: unmapped when the last one goes
            buf.close()


# Kept: two files written at once, two buffers each (a shuffle task writes one; a scatter sink, a writer beside it), and the three
# read batches in flight that the plan counts for a task (shuffling/plan.py: "3 x read batch"), so what stays
# mapped between tasks is within the task's planned peak.
_write_pool = _Pool(keep=4)
_read_pool = _Pool(keep=3)


class DirectWriter(io.RawIOBase):
    """A write-only binary file opened with O_DIRECT; write() gathers bytes into aligned buffers.

    Two buffers take turns: while the device reads one (an O_DIRECT write returns only when the device has the
    bytes), the caller fills the other, so a writer does not wait for the disk chunk by chunk. A failed write
    raises from the next write() that fills a buffer, or from close()."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd
        self.cap = BUFFER_BYTES
        # Page-aligned maps, reused for this file and later files.
        self.bufs = [_write_pool.take(BUFFER_BYTES), _write_pool.take(BUFFER_BYTES)]
        self.views = [memoryview(b) for b in self.bufs]
        self.cur = 0
        self.view = self.views[0]
        self.fill = 0
        self.pos = 0
        self.pending: Future | None = None
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-write")

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def write(self, data) -> int:
        src = memoryview(data).cast("B")
        n, at = len(src), 0
        while at < n:
            take = min(self.cap - self.fill, n - at)
            self.view[self.fill : self.fill + take] = src[at : at + take]
            self.fill += take
            at += take
            if self.fill == self.cap:
                self._flush_aligned()
        self.pos += n
        return n

    def _flush_aligned(self) -> None:
        """Hand the buffer's whole blocks to the writing thread and go on in the other buffer, the partial block
        first (once that buffer's own write is done)."""
        self._wait()
        whole = self.fill // ALIGN * ALIGN
        other = 1 - self.cur
        rest = self.fill - whole
        if rest:
            self.views[other][:rest] = self.view[whole : self.fill]
        if whole:
            self.pending = self.thread.submit(self._write_all, self.view[:whole])
        self.cur, self.view, self.fill = other, self.views[other], rest

    def _wait(self) -> None:
        """Wait for the write in flight; its error is raised here."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def _write_all(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            try:
                done += os.write(self.fd, data[done:])
            except OSError as e:
                if e.errno != errno.EINVAL or not self._buffered():
                    raise
                # Opened, but the filesystem refuses direct writes (some FUSE mounts): on through the page cache.

    def _buffered(self) -> bool:
        """Turn O_DIRECT off for the rest of the file. False if it was off already."""
        fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        if not fl & os.O_DIRECT:
            return False
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fl & ~os.O_DIRECT)
        return True

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._flush_aligned()
            self._wait()
            if self.fill:  # the last partial block, through the page cache
                self._buffered()
                self._write_all(self.view[: self.fill])
                self.fill = 0
        finally:
            self.thread.shutdown(wait=True)  # no write may outlive the descriptor
            for v in self.views:
                v.release()
            for b in self.bufs:
                _write_pool.give_back(b)
            os.close(self.fd)
            super().close()

    def discard(self) -> None:
        """Close without writing what is still buffered (the caller deletes the file)."""
        self.fill = 0
        with contextlib.suppress(OSError):
            self._wait()
        self.close()


def open_direct(path: str) -> io.RawIOBase | io.BufferedWriter:
    """`path` created (or truncated) for writing with O_DIRECT; a buffered file where O_DIRECT is refused."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0)
    if flags & getattr(os, "O_DIRECT", 0):
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        else:
            try:
                return DirectWriter(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
    return open(path, "wb")


class DirectReads:
    """Ranged reads of local files with O_DIRECT into reused aligned buffers, for objects this process will not
    read again (a shuffle's intermediates, written past the page cache by DirectWriter).

    A memory map of a file that is not in the page cache faults it in 64 KiB at a time into fresh page-cache
    pages, then drops them (storage/mapped.py); here the device writes each batch of frames into one buffer
    that later batches reuse, and the page cache is never involved. frames() hands out views into a buffer;
    release() on every view gives the buffer back once the last of its frames is decoded (a view never released
    just keeps its buffer out of the pool). Files refusing O_DIRECT (EINVAL) are read with plain preads.
    """

    def __init__(self, root_path):
        self.path_of = root_path
        self.lock = threading.Lock()
        self.users: dict[int, int] = {}  # id(buffer) -> its frames not yet released

    def _open(self, name: str) -> int:
        # Per call, not cached: fetches run on several threads, and a descriptor closed (evicted) while another
        # thread reads through it could be reused by an unrelated open.
        path = self.path_of(name)
        try:
            return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise  # FileNotFoundError when the object is missing
            return os.open(path, os.O_RDONLY)

    def frames(self, names: list[str], starts: list[int], ends: list[int]) -> list[memoryview]:
        """Bytes [start, end) of each named object (shorter at an object's end), read into one buffer: each
        run of touching ranges of one object is one aligned read."""
        runs: list[tuple[str, int, int, list[int]]] = []  # (name, start, end, indices), in order of the ranges
        for i in sorted(range(len(names)), key=lambda i: (names[i], starts[i])):
            if runs and runs[-1][0] == names[i] and starts[i] <= runs[-1][2]:
                r = runs[-1]
                runs[-1] = (r[0], r[1], max(r[2], ends[i]), [*r[3], i])
            else:
                runs.append((names[i], starts[i], ends[i], [i]))
        spans = [(s // ALIGN * ALIGN, -(-e // ALIGN) * ALIGN) for _, s, e, _ in runs]
        buf = _read_pool.take(sum(b - a for a, b in spans) or ALIGN)
        view = memoryview(buf)
        out: list[memoryview | None] = [None] * len(names)
        at = 0
        fds: dict[str, int] = {}
        try:
            for (name, _, _, idx), (a, b) in zip(runs, spans, strict=True):
                if name not in fds:
                    fds[name] = self._open(name)
                got = self._read(fds[name], view[at : at + b - a], a)
                for i in idx:
                    lo = min(at + starts[i] - a, at + got)
                    out[i] = view[lo : min(at + ends[i] - a, at + got)]
                at += b - a
        except BaseException:
            for v in out:
                if v is not None:
                    v.release()
            view.release()
            _read_pool.give_back(buf)  # nothing refers to it now
            raise
        finally:
            view.release()  # a second release() does nothing
            for fd in fds.values():
                os.close(fd)
        with self.lock:
            self.users[id(buf)] = len(names)
        return out  # type: ignore[return-value]

    @staticmethod
    def _read(fd: int, dst: memoryview, offset: int) -> int:
        """Fill dst from offset (short only at the end of the file); the bytes read."""
        got = 0
        while got < len(dst):
            try:
                n = os.preadv(fd, [dst[got:]], offset + got)
            except OSError as e:
                fl = fcntl.fcntl(fd, fcntl.F_GETFL)
                if e.errno != errno.EINVAL or not fl & os.O_DIRECT:
                    raise
                # Opened with O_DIRECT, but the filesystem refuses the read: on through the page cache.
                fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_DIRECT)
                continue
            if n == 0:
                break
            got += n
        return got

    def release(self, frame) -> bool:
        """A frame from frames() is decoded: its buffer goes back to the pool after its last frame. False if
        `frame` is not a view of a buffer this object handed out (and still counts)."""
        if not isinstance(frame, memoryview):
            return False
        buf = frame.obj
        with self.lock:
            left = self.users.get(id(buf))
            if left is None:
                return False
            if left > 1:
                self.users[id(buf)] = left - 1
                return True
            del self.users[id(buf)]
        _read_pool.give_back(buf)
        return True

    def close(self) -> None:
        """Nothing stays open between calls (frames() closes what it opens); here for ChunkReader's symmetry."""

"""The encode pipeline, and RollingShardWriter (rows in, committed shards out) built on it.

EncodePipeline is the one way chunks are encoded: the caller fills (or names rows to gather into) one of a
bounded set of reused chunk buffers, worker threads byte-split and zstd-encode them (zstd and numpy release
the GIL, so encoding overlaps the caller's work), and the frames are handed on in submission order by the
caller's thread, so the output bytes never depend on thread timing. It serves writers.ShardWriter and pass 2's
output (RollingShardWriter), pass-1 intermediates and scatter-on-write's runs (shuffling/map.py:
write_intermediate). A caller may instead lend whole chunks of its own rows (borrow=, read in place until
settle()) and put a gate before a chunk's emission: ShardWriter encodes a large batch this way while it checks
the batch, and takes the batch back (drop()) if the check refuses it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np

from shuffler.format.codec import encode_chunk, fingerprint_sum, row_hashes
from shuffler.format.manifest import Fingerprint, ShardInfo
from shuffler.format.schema import Schema
from shuffler.format.shard import ShardSink
from shuffler.io.pages import huge_empty, keeping
from shuffler.io.threads import shared_threads
from shuffler.storage.storage import Storage

DEFAULT_CHUNK_BYTES = 8 << 20  # 8 MiB: ratio-neutral, and out of S3's per-request-latency range (docs/benchmarks.md, "Measurements behind the design")
DEFAULT_SHARD_BYTES = 256 << 20


def rows_per_chunk(schema: Schema, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // schema.row_bytes)


class ChunkBuffer:
    """Room for one chunk's rows: acts [cap, d_model] storage dtype and one array per column, reused."""

    def __init__(self, schema: Schema, cap: int):
        # Pages are mapped lazily: a buffer costs nothing until rows arrive (then 2 MiB at a time: io/pages.py).
        self.acts = huge_empty((cap, schema.row_width), schema.row_dtype)  # [cap, row_width]
        self.cols = [np.empty(cap, dtype=np.dtype(t)) for _, t in schema.columns]


# Chunk buffers outlive one pipeline, as its threads do (io/threads.py): a pool worker running many tasks, or a
# program writing many datasets, does not fault in fresh pages for each (docs/benchmarks.md, "Where the
# kernel's time went").
_shared_lock = threading.Lock()
_spare: dict[tuple[Schema, int], list[ChunkBuffer]] = {}
_SPARE_MAX = 8
"""Chunk buffers kept between pipelines (threads + 1 per pipeline by default: 3 for two threads)."""


def _spare_buffer(schema: Schema, cap: int) -> ChunkBuffer | None:
    with _shared_lock:
        have = _spare.get((schema, cap))
        return have.pop() if have else None


def _keep_buffers(schema: Schema, cap: int, bufs: list[ChunkBuffer]) -> None:
    """Keep a finished pipeline's buffers for the next one of the same shape (only one shape is kept)."""
    with _shared_lock:
        have = _spare.get((schema, cap), [])
        _spare.clear()
        _spare[(schema, cap)] = (have + bufs)[:_SPARE_MAX]


def release_spares() -> None:
    """Drop the chunk buffers kept between pipelines (a coordinator about to leave the work to its pool)."""
    with _shared_lock:
        _spare.clear()


#: What the pipeline hands on for each chunk, in order: (frame, rows, checksum, fingerprint sum of its rows;
#: 0 unless the pipeline hashes).
Emit = Callable[[bytes, int, int, int], None]


class EncodePipeline:
    """Encodes chunks on `threads` threads through at most `buffers` reused buffers; emits frames in order.

        enc = EncodePipeline(schema, chunk_rows, level=1, threads=2, emit=lambda frame, rows, crc, fsum: ...)
        buf = enc.buffer(); buf.acts[:n] = ...; enc.encode(buf, n)         # rows the caller copied in
        enc.encode(enc.buffer(), len(idx), gather=(acts, cols, idx))       # rows acts[idx], gathered on a thread
        enc.close()                                                        # emits the rest, in order

    `emit` runs on the caller's thread, inside encode() or close(). A worker's first error is re-raised there.
    In a shuffle worker (io/pages.py: keeping()) the threads (io/threads.py) and, after close(), the buffers are
    shared with later pipelines of the process.
    """

    def __init__(self, schema: Schema, chunk_rows: int, *, level: int, threads: int, emit: Emit, hashes: bool = False,
                 buffers: int | None = None, hash_thread: bool = False):
        self.schema, self.chunk_rows, self.level, self.emit, self.hashes = schema, chunk_rows, level, emit, hashes
        # In a shuffle worker (pages.keeping()) threads and buffers outlive the pipeline; elsewhere they are its own.
        self.shared = keeping()
        self.pool = shared_threads("encode", max(1, threads)) if self.shared else ThreadPoolExecutor(
            max_workers=max(1, threads), thread_name_prefix="encode")
        # hash_thread: rows the caller filled are hashed on a thread of their own, beside their encode, instead of
        # after it on the encode thread. The CPU is the same; the encode threads' path per chunk is shorter by the
        # hash (1.3-1.5 ms beside a 6 ms float16 encode of 8 MiB: docs/benchmarks.md, "Writer fixed costs"),
        # which a writer whose encode threads are its bottleneck gains in wall time. Gathered rows (gather=) are
        # still hashed after their gather, on the encode thread.
        # One hash thread keeps up with about four encode threads (hash 1.3-1.5 ms against a float16 encode of
        # 6 ms per 8 MiB chunk, the fastest dtype: docs/benchmarks.md), so more encode threads get more of them.
        self.hash_pool: ThreadPoolExecutor | None = None
        if hashes and hash_thread:
            n_hash = -(-max(1, threads) // 4)
            self.hash_pool = shared_threads("hash", n_hash) if self.shared else ThreadPoolExecutor(
                max_workers=n_hash, thread_name_prefix="hash")
        # Default: one per thread encoding, plus the one the caller fills (a frame that finished early waits in
        # its buffer until its turn). Memory is buffers x chunk, plus the frames in flight.
        self.max_buffers = max(1, buffers if buffers is not None else max(1, threads) + 1)
        self.made = 0
        self.free: list[ChunkBuffer] = []
        # In flight, oldest first: (encode, hash apart or None, the buffer or None for borrowed rows, the gate or None).
        self.inflight: deque[tuple[Future, Future | None, ChunkBuffer | None, Callable[[], None] | None]] = deque()

    def buffer(self) -> ChunkBuffer:
        """A buffer to fill (encode() keeps one free; should all be in use, the oldest chunk is emitted first)."""
        if not self.free and self.made >= self.max_buffers:
            self._emit_oldest()
        if self.free:
            return self.free.pop()
        self.made += 1
        spare = _spare_buffer(self.schema, self.chunk_rows) if self.shared else None
        return spare or ChunkBuffer(self.schema, self.chunk_rows)

    def encode(self, buf: ChunkBuffer | None, rows: int, *, gather: tuple[np.ndarray, list[np.ndarray], np.ndarray] | None = None,
               borrow: tuple[np.ndarray, list[np.ndarray]] | None = None, gate: Callable[[], None] | None = None) -> None:
        """Encode rows [:rows] of `buf` (from buffer()), or with gather=(acts, cols, idx) the rows acts[idx] into
        `buf`, or with borrow=(acts, cols) and buf=None the caller's own rows, read in place: the caller keeps
        them unchanged until settle() returns. `gate`, if given, runs on the caller's thread before this chunk is
        emitted; should it raise, nothing of this chunk or after it has been emitted (drop() discards them)."""
        assert (buf is None) == (borrow is not None) and not (gather is not None and borrow is not None)
        if borrow is not None:
            a, c = borrow
        else:
            a, c = buf.acts, buf.cols
        apart = self.hash_pool is not None and gather is None
        fut = self.pool.submit(self._encode, a, c, rows, gather, self.hashes and not apart)
        try:
            hashed = self.hash_pool.submit(self._hash, a, c, rows) if apart else None
        except BaseException:
            wait([fut])  # nothing may go on reading the rows once the error is out
            raise
        self.inflight.append((fut, hashed, buf, gate))
        while len(self.inflight) >= self.max_buffers:  # emit now: one buffer is free for the caller's next chunk
            self._emit_oldest()

    def _hash(self, acts: np.ndarray, cols: list[np.ndarray], n: int) -> int:
        return fingerprint_sum(row_hashes(self.schema, acts[:n], [col[:n] for col in cols]))

    def _encode(self, acts: np.ndarray, cols: list[np.ndarray], n: int, gather, hashes: bool) -> tuple[bytes, int, int, int]:
        if gather is not None:
            src, src_cols, idx = gather
            # mode="clip": with the default "raise", numpy buffers `out` and gathers at 0.6-1.1 GB/s, against
            # 2.6-3.2 GB/s here (measured on 8 MiB chunks of 1,552-byte rows); callers' indices are in range.
            np.take(src, idx, axis=0, out=acts[:n], mode="clip")
            for s, d in zip(src_cols, cols, strict=True):
                np.take(s, idx, out=d[:n], mode="clip")
        a, c = acts[:n], [col[:n] for col in cols]
        frame, checksum = encode_chunk(self.schema, a, c, self.level)
        return frame, n, checksum, fingerprint_sum(row_hashes(self.schema, a, c)) if hashes else 0

    def _emit_oldest(self) -> None:
        fut, hashed, buf, gate = self.inflight[0]
        if gate is not None:
            gate()  # may raise: the chunk stays in flight, for drop()
        # Both done with the rows before the chunk leaves the queue (settle() and drop() wait on the queue),
        # and before anyone may reuse its buffer, even on error.
        wait([f for f in (fut, hashed) if f is not None])
        self.inflight.popleft()
        frame, rows, checksum, fsum = fut.result()  # re-raises the worker's first error here
        if hashed is not None:
            fsum = hashed.result()
        if buf is not None:
            self.free.append(buf)
        self.emit(frame, rows, checksum, fsum)

    def settle(self) -> None:
        """Wait until the threads are done reading every borrowed row in flight (their frames are still to emit)."""
        wait([f for fut, hashed, buf, _ in self.inflight if buf is None for f in (fut, hashed) if f is not None])

    def drop(self, gate: Callable[[], None] | None = None) -> None:
        """Discard the chunks in flight, once the threads are done with them (none of them is emitted); their
        buffers are free again and the pipeline stays usable. With `gate`, only the chunk that carries it and
        those after it (one batch: the chunks before it belong to earlier batches and are still to emit), and
        none if no chunk carries it."""
        entries = list(self.inflight)
        k = 0 if gate is None else next((i for i, e in enumerate(entries) if e[3] is gate), len(entries))
        gone = entries[k:]
        futs = [f for fut, hashed, _, _ in gone for f in (fut, hashed) if f is not None]
        for f in futs:
            f.cancel()
        wait(futs)
        self.free.extend(buf for _, _, buf, _ in gone if buf is not None)
        for _ in gone:
            self.inflight.pop()

    def close(self) -> None:
        """Emit every frame still in flight, in order, and stop the threads."""
        while self.inflight:
            self._emit_oldest()
        if self.shared:
            _keep_buffers(self.schema, self.chunk_rows, self.free)
        else:
            self.pool.shutdown()
            if self.hash_pool is not None:
                self.hash_pool.shutdown()
        self.free = []  # the buffers go now, not when a caller's reference cycle is collected

    def abort(self) -> None:
        """Drop what is in flight (nothing more is emitted), once the threads are done with it."""
        self.drop()
        if not self.shared:
            self.pool.shutdown(wait=True)
            if self.hash_pool is not None:
                self.hash_pool.shutdown(wait=True)
        self.free = []


class RollingShardWriter:
    """Cuts a row stream into chunks and shards under `store`, naming shard k `name_of(k)`."""

    def __init__(
        self,
        store: Storage,
        schema: Schema,
        *,
        name_of: Callable[[int], str],
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        level: int = 1,
        threads: int = 2,
        header_extra: dict | None = None,
        hash_thread: bool = False,
        borrow: bool = False,
    ):
        """hash_thread: as EncodePipeline's (rows hashed on a thread of their own).
        borrow: whole chunks of a batch that starts a chunk are encoded from the caller's arrays in place, not
        copied into a chunk buffer first; append() returns once the threads are done reading them."""
        self.store, self.schema, self.name_of, self.level = store, schema, name_of, level
        self.header_extra = header_extra
        self.chunk_rows = rows_per_chunk(schema, chunk_bytes)
        self.shard_chunks = max(1, shard_bytes // (self.chunk_rows * schema.row_bytes))
        self.encoder = EncodePipeline(schema, self.chunk_rows, level=level, threads=threads, emit=self._add, hashes=True,
                                      hash_thread=hash_thread)
        self.borrow = borrow
        self.buf: ChunkBuffer | None = None
        self.fill = 0
        self.shards: list[ShardInfo] = []
        self.fingerprint = Fingerprint()
        self.raw_bytes = 0
        self._stack: contextlib.ExitStack | None = None
        self._sink: ShardSink | None = None
        self._closed = False

    # -- input -----------------------------------------------------------------------------------------
    def append(self, acts: np.ndarray, cols: list[np.ndarray], *, check: Callable[[], None] | None = None) -> None:
        """Append rows already in storage form: acts [rows, d_model] storage dtype, cols in schema order.

        `check` (the writer's non-finite check, say) runs before any row of this batch is emitted; if it raises,
        no row of the batch is kept and the writer is as it was before the call. With borrow, whole chunks are
        encoded while it runs: a large batch's check no longer delays its first chunk's encode (a 256 MiB batch's
        check is 13 ms here, 0.4 ms per 8 MiB chunk: docs/benchmarks.md, "Writer fixed costs").
        """
        n = acts.shape[0]
        if self.borrow and self.fill == 0 and n >= self.chunk_rows:
            self._append_borrowed(acts, cols, check)
            return
        if check is not None:
            check()
        self._copy_in(acts, cols)

    def _append_borrowed(self, acts: np.ndarray, cols: list[np.ndarray], check: Callable[[], None] | None) -> None:
        state = {"check": check}

        def gate() -> None:  # the check, once: before this batch's first emission or at the end, whichever is first
            c = state.pop("check", None)
            if c is not None:
                c()
            state["passed"] = True

        n, cr, pos = acts.shape[0], self.chunk_rows, 0
        try:
            while n - pos >= cr:
                self.encoder.encode(None, cr, borrow=(acts[pos : pos + cr], [c[pos : pos + cr] for c in cols]),
                                    gate=gate if pos == 0 else None)
                pos += cr
            self._copy_in(acts[pos:], [c[pos:] for c in cols])  # the tail, less than a chunk: fill was 0
            gate()
            self.encoder.settle()
        except BaseException:
            if state.get("passed"):
                # Past the check some chunks may be emitted already: as on the copying path, the error stands,
                # and the caller's rows are left alone once the threads are done with them.
                self.encoder.settle()
                raise
            # Nothing of this batch was emitted (the gate runs before its first chunk is): take it all back, and
            # only it: chunks of earlier batches may still be in flight before it.
            self.encoder.drop(gate)
            self.fill = 0
            raise

    def _copy_in(self, acts: np.ndarray, cols: list[np.ndarray]) -> None:
        n, pos = acts.shape[0], 0
        while pos < n:
            if self.buf is None:
                self.buf, self.fill = self.encoder.buffer(), 0
            b, at = self.buf, self.fill
            take = min(self.chunk_rows - at, n - pos)
            b.acts[at : at + take] = acts[pos : pos + take]
            for dst, src in zip(b.cols, cols, strict=True):
                dst[at : at + take] = src[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == self.chunk_rows:
                self._submit()

    def _submit(self) -> None:
        if self.buf is not None and self.fill:
            # Off our hands first: should emitting an older chunk raise in encode(), this one is queued already
            # and must not be submitted again by a caller who writes on.
            buf, fill = self.buf, self.fill
            self.buf, self.fill = None, 0
            self.encoder.encode(buf, fill)

    def _add(self, frame: bytes, rows: int, checksum: int, fsum: int) -> None:
        sink = self._sink or self._open_shard()
        sink.add(frame, rows, checksum)
        self.fingerprint = self.fingerprint + Fingerprint(rows, fsum)
        self.raw_bytes += rows * self.schema.row_bytes
        if len(sink.entries) >= self.shard_chunks:
            self._close_shard()

    # -- shards ----------------------------------------------------------------------------------------
    def _open_shard(self) -> ShardSink:
        name = self.name_of(len(self.shards))
        self._stack = contextlib.ExitStack()
        # Past the page cache (storage/direct.py); on S3 in parts sized for a whole shard (storage.part_bytes_for).
        size = self.shard_chunks * self.chunk_rows * self.schema.row_bytes
        f = self._stack.enter_context(self.store.open_atomic(name, direct=True, size=size))
        self._sink = ShardSink(f, self.schema, self.level, self.header_extra)
        self._name = name
        return self._sink

    def _close_shard(self) -> None:
        sink, stack = self._sink, self._stack
        assert sink is not None and stack is not None
        size = sink.finish()
        # Recorded before the commit, so that abort() deletes it should the commit be cut short after the rename
        # (deleting a name never committed does nothing); the stack is let go only once it is closed, so that
        # abort() discards the temporary object of a commit cut short before it.
        self.shards.append(ShardInfo(name=self._name, rows=sink.rows, bytes=size, chunks=len(sink.entries)))
        stack.close()  # commits the object
        self._sink = self._stack = None

    def close(self) -> list[ShardInfo]:
        """Flush, commit the last shard and return every shard written."""
        if self._closed:
            return self.shards
        try:
            self._submit()
            self.encoder.close()
            if self._sink is not None:
                self._close_shard()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.shards

    def abort(self) -> None:
        """Discard the open shard and delete the committed ones: nothing of this writer stays visible."""
        self._closed = True
        self.encoder.abort()
        self.buf = None
        if self._stack is not None:
            try:
                self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass
            self._stack = self._sink = None
        for s in self.shards:
            self.store.delete(s.name)
        self.shards = []

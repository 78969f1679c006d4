"""RollingShardWriter: rows in, committed shards out. Shared by writers.ShardWriter and the shuffle.

Rows are copied into a small pool of reused chunk buffers; full chunks are split and zstd-encoded by worker
threads (zstd and numpy release the GIL, so encoding overlaps the caller's work), and frames are written
in order by the caller's thread, so the output bytes never depend on thread timing.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from shuffler.format.codec import encode_chunk, fingerprint_sum, row_hashes
from shuffler.format.manifest import Fingerprint, ShardInfo
from shuffler.format.schema import Schema
from shuffler.format.shard import ShardSink
from shuffler.storage.storage import Storage

DEFAULT_CHUNK_BYTES = 8 << 20  # 8 MiB: ratio-neutral, and out of S3's per-request-latency range (docs/benchmarks.md, "Measurements behind the design")
DEFAULT_SHARD_BYTES = 256 << 20


def rows_per_chunk(schema: Schema, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // schema.row_bytes)


class _Buffer:
    def __init__(self, schema: Schema, cap: int):
        self.acts = np.empty((cap, schema.d_model), dtype=schema.storage_dtype)  # [cap, d_model]
        self.cols = [np.empty(cap, dtype=np.dtype(t)) for _, t in schema.columns]
        self.n = 0


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
    ):
        self.store, self.schema, self.name_of, self.level = store, schema, name_of, level
        self.header_extra = header_extra
        self.chunk_rows = rows_per_chunk(schema, chunk_bytes)
        self.shard_chunks = max(1, shard_bytes // (self.chunk_rows * schema.row_bytes))
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="encode")
        self.max_inflight = max(1, threads) + 1
        self.inflight: deque[tuple[Future, _Buffer]] = deque()
        self.free: list[_Buffer] = []
        self.buf = _Buffer(schema, self.chunk_rows)
        self.shards: list[ShardInfo] = []
        self.fingerprint = Fingerprint()
        self.raw_bytes = 0
        self._stack: contextlib.ExitStack | None = None
        self._sink: ShardSink | None = None
        self._closed = False

    # -- input -----------------------------------------------------------------------------------------
    def append(self, acts: np.ndarray, cols: list[np.ndarray]) -> None:
        """Append rows already in storage form: acts [rows, d_model] storage dtype, cols in schema order."""
        n, pos = acts.shape[0], 0
        while pos < n:
            b = self.buf
            take = min(self.chunk_rows - b.n, n - pos)
            b.acts[b.n : b.n + take] = acts[pos : pos + take]
            for dst, src in zip(b.cols, cols, strict=True):
                dst[b.n : b.n + take] = src[pos : pos + take]
            b.n += take
            pos += take
            if b.n == self.chunk_rows:
                self._submit()

    def _submit(self) -> None:
        b = self.buf
        if b.n == 0:
            return
        self.inflight.append((self.pool.submit(self._encode, b), b))
        while len(self.inflight) >= self.max_inflight:
            self._drain_one()
        self.buf = self.free.pop() if self.free else _Buffer(self.schema, self.chunk_rows)
        self.buf.n = 0

    def _encode(self, b: _Buffer) -> tuple[bytes, int, int, int]:
        acts = b.acts[: b.n]
        cols = [c[: b.n] for c in b.cols]
        frame, checksum = encode_chunk(self.schema, acts, cols, self.level)
        return frame, checksum, b.n, fingerprint_sum(row_hashes(self.schema, acts, cols))

    def _drain_one(self) -> None:
        fut, b = self.inflight.popleft()
        frame, checksum, rows, fsum = fut.result()  # re-raises the worker's first error here
        self.free.append(b)
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
        f = self._stack.enter_context(self.store.open_atomic(name))
        self._sink = ShardSink(f, self.schema, self.level, self.header_extra)
        self._name = name
        return self._sink

    def _close_shard(self) -> None:
        sink, stack = self._sink, self._stack
        assert sink is not None and stack is not None
        size = sink.finish()
        self._sink = self._stack = None
        stack.close()  # commits the object
        self.shards.append(ShardInfo(name=self._name, rows=sink.rows, bytes=size, chunks=len(sink.entries)))

    def close(self) -> list[ShardInfo]:
        """Flush, commit the last shard and return every shard written."""
        if self._closed:
            return self.shards
        try:
            self._submit()
            while self.inflight:
                self._drain_one()
            if self._sink is not None:
                self._close_shard()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.pool.shutdown()
        return self.shards

    def abort(self) -> None:
        """Discard the open shard and delete the committed ones: nothing of this writer stays visible."""
        self._closed = True
        for fut, _ in self.inflight:
            fut.cancel()
        self.pool.shutdown(wait=True)
        self.inflight.clear()
        if self._stack is not None:
            try:
                self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass
            self._stack = self._sink = None
        for s in self.shards:
            self.store.delete(s.name)
        self.shards = []

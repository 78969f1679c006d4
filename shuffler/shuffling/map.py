"""Pass 1 of the shuffle (scatter): every row draws a bucket; each map task writes one intermediate object.

A map task reads a contiguous range of the input rows (the concatenation of every source's shards in
manifest order), draws each row's bucket from a counter-based generator keyed by (seed, global row index),
orders the rows by bucket with one stable argsort (a counting sort in effect: bucket ids are small integers)
and writes all its bucket segments, in bucket order, into ONE object in the shard format (so every chunk is
checksummed). A chunk never spans two buckets. Beside it goes a small index marker, written last, that
says where each bucket's chunks start; its presence is the task's commit.

Since a row's bucket depends only on (seed, its global index), and a bucket's rows keep their input order
(stable sort, map tasks in row order), each bucket's row sequence is the same however the rows were split
into map tasks or retried. Pass 2 only needs that sequence, so the output is too.
"""

from __future__ import annotations

import functools
import io
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shuffler.errors import FormatError
from shuffler.format.manifest import Fingerprint
from shuffler.format.schema import Schema
from shuffler.format.shard import ShardSink, decode_footer, tail_bytes
from shuffler.io.chunks import ChunkTable, iter_decoded, storage
from shuffler.io.pages import huge_empty
from shuffler.io.rolling import EncodePipeline, release_spares, rows_per_chunk
from shuffler.keys import bucket_ids
from shuffler.storage.storage import Storage

Progress = Callable[[int, int], None] | None

# ---------------------------------------------------------------------------------------------------
# Per-process reused buffers (a fresh big buffer costs a page fault per 4 KiB page on first touch:
# docs/benchmarks.md, "Measurements behind the design")

_local = threading.local()


def row_buffers(schema: Schema, rows: int, slot: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Arrays for `rows` rows, reused by later tasks of this process. ([rows, d_model], columns)."""
    key = (slot, schema)
    cache = getattr(_local, "bufs", None)
    if cache is None:
        cache = _local.bufs = {}
    have = cache.get(key)
    # Grow when too small; shrink when more than twice too large (a pass-1 run buffer kept through pass 2's
    # smaller buckets would hold memory the plan does not count).
    if have is None or have[0].shape[0] < rows or have[0].shape[0] > 2 * rows + (16 << 20) // schema.row_bytes:
        cache.pop(key, None)  # free the old one before allocating the new
        have = cache[key] = (
            huge_empty((max(rows, 1), schema.row_width), schema.row_dtype),  # 2 MiB pages: 1/512 the faults
            [np.empty(max(rows, 1), dtype=np.dtype(t)) for _, t in schema.columns],
        )
    return have[0][:rows], [c[:rows] for c in have[1]]


def release_buffers() -> None:
    _local.bufs = {}
    release_spares()


# ---------------------------------------------------------------------------------------------------
# The map task


@dataclass(frozen=True, kw_only=True)
class MapTask:
    """Rows [skip, skip + rows) of `table` (global indices row_start...) into one intermediate object."""

    index: int
    table: ChunkTable
    skip: int
    rows: int
    row_start: int
    """Global index of the task's first row: the counter of its bucket draw."""
    key: int
    """stream_key(seed, path) of this level."""
    buckets: int
    scratch: str
    """URL of the folder the intermediate goes to."""
    level: int
    """zstd level of the intermediate."""
    chunk_bytes: int
    threads: int = 2
    batch_bytes: int = 32 << 20

    @property
    def name(self) -> str:
        return map_name(self.index)


def map_name(index: int) -> str:
    return f"map-{index:06d}"


@dataclass(frozen=True)
class MapOutput:
    """A committed intermediate: its size and chunk count (to read its footer) and each bucket's first chunk."""

    index: int
    size: int
    n_chunks: int
    rows: int
    chunk_start: np.ndarray
    """[buckets + 1] int64: bucket b's chunks are chunk_start[b] .. chunk_start[b+1]-1."""
    row_start: int = -1
    """Global index of the first row it holds: a resumed shuffle reuses it only for the very same rows. -1: not
    recorded (a producer's scattered run, or a marker of version 2)."""

    def to_bytes(self) -> bytes:
        # [version 3, index, size, n_chunks, rows, crc32 of the other elements, row_start, *chunk_start], one .npy.
        a = np.concatenate([[3, self.index, self.size, self.n_chunks, self.rows, 0, self.row_start],
                            self.chunk_start]).astype("<i8")
        a[5] = _marker_crc(a)
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    @staticmethod
    def from_bytes(data: bytes, *, where: str, buckets: int) -> MapOutput:
        """Parse a marker, refusing (FormatError) any byte that differs from what to_bytes could have written:
        the exact .npy header for this bucket count, a CRC over every field, chunk_start rising from 0 to
        n_chunks. A damaged marker could otherwise move rows between buckets or size a huge read. Version 2
        (no row_start; scattered datasets written before version 3) still reads, with row_start -1."""
        layouts = [(v, f) for v, f in ((3, 7), (2, 6)) if _is_npy_of(data, f + buckets + 1, first=v)]
        if not layouts:
            raise FormatError(f"{where}: not an intermediate index for {buckets} buckets ({len(data)} bytes; "
                              "damaged, or written by another version)")
        version, fields = layouts[0]
        a = np.frombuffer(data, dtype="<i8", offset=len(data) - 8 * (fields + buckets + 1))
        cs = a[fields:]
        if a[5] != _marker_crc(a):
            raise FormatError(f"{where}: intermediate index checksum mismatch (damaged)")
        row_start = int(a[6]) if version == 3 else -1
        if cs[0] != 0 or cs[-1] != a[3] or (np.diff(cs) < 0).any() or a[2] <= 0 or a[4] < 0 or row_start < -1:
            raise FormatError(f"{where}: intermediate index is inconsistent (damaged)")
        return MapOutput(int(a[1]), int(a[2]), int(a[3]), int(a[4]), cs.astype(np.int64), row_start)


@functools.lru_cache(maxsize=8)
def _npy_header(n: int) -> bytes:
    """The .npy header np.save writes for a [n] little-endian int64 array."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(n, dtype="<i8"), allow_pickle=False)
    return buf.getvalue()[: -8 * n]


def _is_npy_of(data: bytes, n: int, *, first: int) -> bool:
    """True if `data` is what np.save writes for an [n] little-endian int64 array whose first element is `first`."""
    head = _npy_header(n)
    return (len(data) == len(head) + 8 * n and bytes(data[: len(head)]) == head
            and int.from_bytes(data[len(head) : len(head) + 8], "little", signed=True) == first)


def _marker_crc(a: np.ndarray) -> int:
    return zlib.crc32(a[:5].tobytes() + a[6:].tobytes())


def run_map(task: MapTask, progress: Progress = None) -> MapOutput:
    """Read the task's rows, order them by bucket, write the intermediate, then its index marker."""
    schema = task.table.schema
    acts, cols = row_buffers(schema, task.rows, "rows")  # [rows, d_model], reused across tasks
    for pos, a, c in iter_decoded(task.table, task.skip, task.rows, threads=task.threads, batch_bytes=task.batch_bytes):
        n = len(a)
        acts[pos : pos + n] = a
        for dst, src in zip(cols, c, strict=True):
            dst[pos : pos + n] = src
        if progress is not None:
            progress(n, n * schema.row_bytes)
    ids = bucket_ids(task.key, task.row_start, task.rows, task.buckets)
    order = np.argsort(ids, kind="stable")  # [rows] int64: rows grouped by bucket, input order kept within
    counts = np.bincount(ids, minlength=task.buckets)
    del ids
    store = storage(task.scratch)
    size, n_chunks, chunk_start, _ = write_intermediate(
        store, task.name + ".shard", schema, acts, cols, order, counts,
        level=task.level, chunk_bytes=task.chunk_bytes, threads=task.threads,
        extra={"shuffle_map": task.index, "buckets": task.buckets, "row_start": task.row_start},
    )
    out = MapOutput(task.index, size, n_chunks, task.rows, chunk_start, task.row_start)
    store.write(task.name + ".idx", out.to_bytes())  # the commit marker, written last
    return out


def write_intermediate(
    store: Storage,
    name: str,
    schema: Schema,
    acts: np.ndarray,
    cols: list[np.ndarray],
    order: np.ndarray,
    counts: np.ndarray,
    *,
    level: int,
    chunk_bytes: int,
    threads: int,
    extra: dict,
    hashes: bool = False,
) -> tuple[int, int, np.ndarray, Fingerprint]:
    """Write rows acts[order] as bucket segments (counts[b] rows each) into one shard-format object.

    Returns (object size, chunk count, chunk_start [B + 1], fingerprint of the rows; empty unless `hashes`).
    Each chunk's rows are gathered into a reused buffer and encoded on `threads` threads by the encode pipeline
    (shuffler/io/rolling.py); frames are written in order, so the bytes never depend on timing.
    """
    chunk_rows = rows_per_chunk(schema, chunk_bytes)
    nch = -(-counts.astype(np.int64) // chunk_rows)  # [B] chunks per bucket
    chunk_start = np.concatenate([[0], np.cumsum(nch)])
    bucket_pos = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    bucket = np.repeat(np.arange(len(counts)), nch)  # [n_chunks] bucket of each chunk
    k = np.arange(len(bucket)) - chunk_start[bucket]
    starts = bucket_pos[bucket] + k * chunk_rows
    ends = np.minimum(starts + chunk_rows, bucket_pos[bucket + 1])
    fp = Fingerprint()

    with store.open_atomic(name, direct=True) as f:  # past the page cache (storage/direct.py)
        sink = ShardSink(f, schema, level, extra)

        def emit(frame: bytes, rows: int, checksum: int, fsum: int) -> None:
            nonlocal fp
            sink.add(frame, rows, checksum)
            fp = fp + Fingerprint(rows, fsum)

        # Rows are gathered on the threads, not by the caller: threads + 2 buffers, the count pass 1 always used.
        enc = EncodePipeline(schema, chunk_rows, level=level, threads=threads, emit=emit, hashes=hashes,
                             buffers=max(1, threads) + 2)
        try:
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                enc.encode(enc.buffer(), e - s, gather=(acts, cols, order[s:e]))  # argsort's indices: in range
            enc.close()
        except BaseException:
            enc.abort()
            raise
        size = sink.finish()
    return size, len(bucket), chunk_start, fp if hashes else Fingerprint()


def read_intermediate_footer(store: Storage, name: str, out: MapOutput, schema: Schema) -> np.ndarray:
    """The index entries (shard.ENTRY) of a committed intermediate, checked against its marker."""
    n = tail_bytes(out.n_chunks, schema)
    where = store.url_of(name)
    tail = store.read_range(name, out.size - n, out.size)
    idx = decode_footer(tail, out.size, schema, where=where)
    if idx.n_chunks != out.n_chunks or idx.rows != out.rows:
        raise FormatError(f"{where}: holds {idx.rows} rows in {idx.n_chunks} chunks, its marker says {out.rows} in {out.n_chunks}")
    return idx.entries

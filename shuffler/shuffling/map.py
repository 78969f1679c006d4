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
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from shuffler.errors import FormatError
from shuffler.format.codec import decode_chunk, encode_chunk, splitmix64
from shuffler.format.schema import Schema
from shuffler.format.shard import ShardSink, decode_footer, tail_bytes
from shuffler.storage.storage import Storage

#: One chunk of some object: which object, where its frame lies, and what the frame must decode to.
CHUNK = np.dtype([("obj", "<i4"), ("offset", "<u8"), ("comp_len", "<u4"), ("rows", "<u4"), ("checksum", "<u4")])
GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1
Progress = Callable[[int, int], None] | None


def mix64(x: int) -> int:
    """splitmix64's finaliser on one Python int (the scalar twin of codec.splitmix64)."""
    return int(splitmix64(np.array([x & _M64], dtype=np.uint64))[0])


def stream_key(seed: int, path: tuple[int, ...] = ()) -> int:
    """Key of the bucket draws at one level: path () is the top level, (b,) the re-shuffle of bucket b."""
    k = mix64(seed ^ 0x243F6A8885A308D3)
    for p in path:
        k = mix64(k ^ mix64((p + 1) * GOLDEN))
    return k


def bucket_ids(key: int, start: int, n: int, buckets: int) -> np.ndarray:
    """Bucket of rows start..start+n-1: [n] int32 in [0, buckets).

    Row i's 64 random bits are SplitMix64's i-th output for seed `key` (mix(key + (i+1) * golden); Steele et
    al. 2014, passes BigCrush), so any row's draw is computed alone, in any task. They map to [0, B) by the
    multiply-high floor(x * B / 2^64), done in two 32-bit halves to stay within uint64 (Lemire 2019 without
    the rejection step): bucket j gets either floor or ceil of 2^64/B of the 2^64 values, a relative bias of at
    most B / 2^64 < 1e-12. Uniformity of the permutation does not even need equal bucket odds, only the same
    odds for every row (docs/shuffle.md); the bias only affects how evenly the buckets fill.
    """
    if not 1 <= buckets < (1 << 31):
        raise ValueError(f"buckets={buckets} must be in [1, 2^31)")
    out = np.empty(n, dtype=np.int32)
    b = np.uint64(buckets)
    step = 1 << 20  # bounded temporaries: five uint64 arrays of 1M rows, whatever n is
    with np.errstate(over="ignore"):
        for s in range(0, n, step):
            m = min(step, n - s)
            i = np.arange(start + s + 1, start + s + m + 1, dtype=np.uint64)
            x = splitmix64(np.uint64(key) + i * np.uint64(GOLDEN))
            hi, lo = x >> np.uint64(32), x & np.uint64(0xFFFFFFFF)
            out[s : s + m] = (hi * b + ((lo * b) >> np.uint64(32))) >> np.uint64(32)
    return out


# ---------------------------------------------------------------------------------------------------
# Where rows live, and reading them back


@dataclass(frozen=True)
class ChunkTable:
    """Rows held by chunks of shard-format objects, in row order. Pickles small: only the chunks it names."""

    schema: Schema
    objects: tuple[tuple[str, str], ...]
    """(storage URL, object name) of each object; CHUNK["obj"] indexes this."""
    chunks: np.ndarray
    """[n_chunks] CHUNK, in row order."""

    @property
    def rows(self) -> int:
        return int(self.chunks["rows"].sum(dtype=np.int64))

    def row_starts(self) -> np.ndarray:
        """First row of each chunk. [n_chunks + 1] int64."""
        return np.concatenate([[0], np.cumsum(self.chunks["rows"], dtype=np.int64)])

    def select(self, start: int, stop: int) -> tuple[ChunkTable, int]:
        """The chunks holding rows [start, stop), and how many rows of the first to skip."""
        starts = self.row_starts()
        lo = int(np.searchsorted(starts, start, side="right")) - 1
        hi = int(np.searchsorted(starts, stop, side="left"))
        sub = self.chunks[lo:hi]
        used, inverse = np.unique(sub["obj"], return_inverse=True)
        sub = sub.copy()
        sub["obj"] = inverse
        return ChunkTable(self.schema, tuple(self.objects[i] for i in used), sub), start - int(starts[lo])

    @staticmethod
    def of_datasets(datasets) -> ChunkTable:
        """Every chunk of every dataset, datasets in the given order, shards in manifest order."""
        # One ranged read per shard footer; on object stores they overlap (64 ms per GET: measure-limits.md).
        with ThreadPoolExecutor(max_workers=16, thread_name_prefix="footer") as pool:
            for _ in pool.map(lambda t: t[0].index(t[1]), [(ds, i) for ds in datasets for i in range(len(ds.shards))]):
                pass
        objects, parts = [], []
        for ds in datasets:
            for i, info in enumerate(ds.shards):
                e = ds.index(i).entries
                c = np.empty(len(e), dtype=CHUNK)
                c["obj"] = len(objects)
                for f in ("offset", "comp_len", "rows", "checksum"):
                    c[f] = e[f]
                objects.append((ds.store.url, info.name))
                parts.append(c)
        chunks = np.concatenate(parts) if parts else np.zeros(0, dtype=CHUNK)
        return ChunkTable(datasets[0].schema, tuple(objects), chunks)


@functools.lru_cache(maxsize=64)
def storage(url: str) -> Storage:
    """One Storage per URL per process (s3fs clients are costly to build)."""
    return Storage(url)


def _batches(chunks: np.ndarray, batch_bytes: int) -> list[tuple[int, int]]:
    """Consecutive chunk ranges of at most batch_bytes compressed bytes (at least one chunk each)."""
    out, lo, acc = [], 0, 0
    for j, c in enumerate(chunks["comp_len"].tolist()):
        if acc and acc + c > batch_bytes:
            out.append((lo, j))
            lo, acc = j, 0
        acc += c
    if lo < len(chunks):
        out.append((lo, len(chunks)))
    return out


def _fetch(table: ChunkTable, lo: int, hi: int) -> list[bytes]:
    """The frames of chunks lo..hi-1, with one batched ranged read per storage."""
    c = table.chunks[lo:hi]
    frames: list[bytes | None] = [None] * len(c)
    by_store: dict[str, list[int]] = {}
    for k, o in enumerate(c["obj"].tolist()):
        by_store.setdefault(table.objects[o][0], []).append(k)
    for url, ks in by_store.items():
        names = [table.objects[int(c["obj"][k])][1] for k in ks]
        starts = [int(c["offset"][k]) for k in ks]
        ends = [int(c["offset"][k] + c["comp_len"][k]) for k in ks]
        for k, data in zip(ks, storage(url).read_ranges(names, starts, ends), strict=True):
            if len(data) != int(c["comp_len"][k]):
                url_name = "/".join(table.objects[int(c["obj"][k])])
                raise FormatError(f"{url_name}: chunk at byte {starts[0]} is truncated ({len(data)} bytes read)")
            frames[k] = data
    return frames  # type: ignore[return-value]


def iter_decoded(
    table: ChunkTable, skip: int, rows: int, *, threads: int = 2, batch_bytes: int = 32 << 20
) -> Iterator[tuple[int, np.ndarray, list[np.ndarray]]]:
    """Decode rows [skip, skip + rows) of `table` in order: yields (position, acts [n, d_model], columns).

    The next batch is fetched while this one decodes; frames decode on `threads` threads (zstd and numpy
    release the GIL). Every frame's checksum is checked against the index it came with.
    """
    schema = table.schema
    chunks = table.chunks
    batches = _batches(chunks, batch_bytes)

    def decode(j: int, frame: bytes):
        e = chunks[j]
        url, name = table.objects[int(e["obj"])]
        where = f"{url}/{name} chunk at byte {int(e['offset'])}"
        return decode_chunk(schema, frame, int(e["rows"]), int(e["checksum"]), where=where)

    pos, first = 0, skip
    with ThreadPoolExecutor(max_workers=max(1, threads) + 1, thread_name_prefix="read") as pool:
        fetches: deque[Future] = deque(pool.submit(_fetch, table, lo, hi) for lo, hi in batches[:2])
        for k, (lo, _) in enumerate(batches):
            frames = fetches.popleft().result()
            if k + 2 < len(batches):
                fetches.append(pool.submit(_fetch, table, *batches[k + 2]))
            decoded = [pool.submit(decode, lo + i, f) for i, f in enumerate(frames)]
            del frames
            for fut in decoded:
                acts, cols = fut.result()
                a = acts[first : first + rows - pos]
                if len(a):
                    yield pos, a, [cols[n][first : first + len(a)] for n in schema.column_names]
                pos += len(a)
                first = 0
                if pos >= rows:
                    for f in decoded:
                        f.cancel()
                    return
    if pos != rows:
        raise FormatError(f"expected {rows} rows from {len(chunks)} chunks, got {pos}: an index is inconsistent")


# ---------------------------------------------------------------------------------------------------
# Per-process reused buffers (fresh big buffers cost page faults on every first touch: GUIDE.md)

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
            np.empty((max(rows, 1), schema.d_model), dtype=schema.storage_dtype),
            [np.empty(max(rows, 1), dtype=np.dtype(t)) for _, t in schema.columns],
        )
    return have[0][:rows], [c[:rows] for c in have[1]]


def release_buffers() -> None:
    _local.bufs = {}


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

    def to_bytes(self) -> bytes:
        # [version 2, index, size, n_chunks, rows, crc32 of the other elements, *chunk_start] as one .npy.
        a = np.concatenate([[2, self.index, self.size, self.n_chunks, self.rows, 0], self.chunk_start]).astype("<i8")
        a[5] = _marker_crc(a)
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    @staticmethod
    def from_bytes(data: bytes, *, where: str, buckets: int) -> MapOutput:
        """Parse a marker, refusing (FormatError) any byte that differs from what to_bytes could have written:
        the exact .npy header for this bucket count, a CRC over every field, chunk_start rising from 0 to
        n_chunks. A damaged marker could otherwise move rows between buckets or size a huge read."""
        n = 6 + buckets + 1
        head = _npy_header(n)
        if len(data) != len(head) + 8 * n or bytes(data[: len(head)]) != head:
            raise FormatError(f"{where}: not an intermediate index for {buckets} buckets ({len(data)} bytes; "
                              "damaged, or written by another version)")
        a = np.frombuffer(data, dtype="<i8", offset=len(head))
        cs = a[6:]
        if a[0] != 2 or a[5] != _marker_crc(a):
            raise FormatError(f"{where}: intermediate index checksum mismatch (damaged)")
        if cs[0] != 0 or cs[-1] != a[3] or (np.diff(cs) < 0).any() or a[2] <= 0 or a[4] < 0:
            raise FormatError(f"{where}: intermediate index is inconsistent (damaged)")
        return MapOutput(int(a[1]), int(a[2]), int(a[3]), int(a[4]), cs.astype(np.int64))


@functools.lru_cache(maxsize=8)
def _npy_header(n: int) -> bytes:
    """The .npy header np.save writes for a [n] little-endian int64 array."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(n, dtype="<i8"), allow_pickle=False)
    return buf.getvalue()[: -8 * n]


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
    size, n_chunks, chunk_start = write_intermediate(
        store, task.name + ".shard", schema, acts, cols, order, counts,
        level=task.level, chunk_bytes=task.chunk_bytes, threads=task.threads,
        extra={"shuffle_map": task.index, "buckets": task.buckets, "row_start": task.row_start},
    )
    out = MapOutput(task.index, size, n_chunks, task.rows, chunk_start)
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
) -> tuple[int, int, np.ndarray]:
    """Write rows acts[order] as bucket segments (counts[b] rows each) into one shard-format object.

    Returns (object size, chunk count, chunk_start [B + 1]). Rows are gathered into a few reused chunk
    buffers and encoded on `threads` threads; frames are written in order, so the bytes never depend on timing.
    """
    chunk_rows = max(1, chunk_bytes // schema.row_bytes)
    nch = -(-counts.astype(np.int64) // chunk_rows)  # [B] chunks per bucket
    chunk_start = np.concatenate([[0], np.cumsum(nch)])
    bucket_pos = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    bucket = np.repeat(np.arange(len(counts)), nch)  # [n_chunks] bucket of each chunk
    k = np.arange(len(bucket)) - chunk_start[bucket]
    starts = bucket_pos[bucket] + k * chunk_rows
    ends = np.minimum(starts + chunk_rows, bucket_pos[bucket + 1])
    bufs = [
        (np.empty((chunk_rows, schema.d_model), schema.storage_dtype), [np.empty(chunk_rows, np.dtype(t)) for _, t in schema.columns])
        for _ in range(threads + 2)
    ]

    def encode(s: int, e: int, buf) -> tuple[bytes, int, int]:  # (frame, rows, checksum)
        idx = order[s:e]
        # mode="clip": with the default "raise", numpy buffers `out` and gathers at 0.6-1.1 GB/s, against
        # 2.6-3.2 GB/s here (measured on 8 MiB chunks of 1,552-byte rows); argsort's indices are in range.
        ba = np.take(acts, idx, axis=0, out=buf[0][: e - s], mode="clip")
        bc = [np.take(c, idx, out=d[: e - s], mode="clip") for c, d in zip(cols, buf[1], strict=True)]
        frame, checksum = encode_chunk(schema, ba, bc, level)
        return frame, e - s, checksum

    with store.open_atomic(name) as f, ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="scatter") as pool:
        sink = ShardSink(f, schema, level, extra)
        inflight: deque[tuple[Future, tuple]] = deque()
        free = list(bufs)
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            if not free:
                fut, b = inflight.popleft()
                sink.add(*fut.result())
                free.append(b)
            b = free.pop()
            inflight.append((pool.submit(encode, s, e, b), b))
        while inflight:
            fut, b = inflight.popleft()
            sink.add(*fut.result())
        size = sink.finish()
    return size, len(bucket), chunk_start


def read_intermediate_footer(store: Storage, name: str, out: MapOutput, schema: Schema) -> np.ndarray:
    """The index entries (shard.ENTRY) of a committed intermediate, checked against its marker."""
    n = tail_bytes(out.n_chunks)
    where = store.url_of(name)
    tail = store.read_range(name, out.size - n, out.size)
    idx = decode_footer(tail, out.size, schema, where=where)
    if idx.n_chunks != out.n_chunks or idx.rows != out.rows:
        raise FormatError(f"{where}: holds {idx.rows} rows in {idx.n_chunks} chunks, its marker says {out.rows} in {out.n_chunks}")
    return idx.entries

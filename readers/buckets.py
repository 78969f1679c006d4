"""Permute on read: a uniformly shuffled order streamed straight from scattered data, with no second write.

    stream = ActivationStream("s3://b/scattered", batch_size=4096, permute_buckets=True, memory="4GiB")

Scattered data (shuffler/shuffling/on_write.py) holds every row in a bucket drawn i.i.d. uniformly when it was written.
Each epoch the reader visits the buckets in a permuted order keyed by (seed, epoch), and serves each bucket's
rows in a uniform permutation keyed by (seed, epoch, bucket): by the pile-shuffle argument (docs/shuffle.md)
every epoch's order is a uniformly random permutation of all rows. Only the bucket *membership* is shared by
all epochs (docs/readers.md, "permute_buckets").

The epoch's order is thus rows 0..N-1 = bucket order[0]'s permuted rows, then order[1]'s, and so on. Ranks and
DataLoader workers split it exactly as the normal stream does (readers/layout.py: contiguous ranges of what is
left of the epoch, drop_last as there), and a resume, at any world size, works as there (state.py).

Each consumer cuts its range into pieces: the part of one bucket's permuted order that falls in the range,
at most `capacity` rows. A piece is loaded by reading the bucket's chunks that hold any of its rows and
decoding each chunk's needed rows straight into their permuted places; the next piece loads on a background
thread while this one is served. So memory is two pieces, and a bucket larger than the budget (a wrong
bucket estimate at write time) is served in several pieces, each re-reading the bucket: exact, only slower.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from readers.order import EpochPlan
from readers.prefetch import ReadStats
from shuffler.format.schema import Schema
from shuffler.io.chunks import ChunkTable, iter_decoded
from shuffler.io.rolling import DEFAULT_CHUNK_BYTES
from shuffler.keys import mix_key, permutation
from shuffler.shuffling.on_write import ScatteredDataset
from shuffler.shuffling.plan import DEFAULT_MEMORY, read_batch_bytes
from shuffler.units import parse_size

TAG_BUCKET_ORDER, TAG_BUCKET_PERM = 0xB0, 0xB7
INDEX_BYTES_PER_ROW = 32
"""Index memory per row of a piece: its row ids, their sort order and chunk ids (int64 each), with slack."""


def parse_memory(memory: int | str | None) -> int:
    if memory is None:
        return DEFAULT_MEMORY
    if isinstance(memory, int) and not isinstance(memory, bool):
        return memory
    return parse_size(memory, what="memory")


def piece_capacity(row_bytes: int, memory: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per piece so that two pieces (served + prefetched) and the read batches fit `memory`."""
    fixed = 3 * read_batch_bytes(chunk_bytes)  # two compressed batches in flight and one decoding (as the chunk reader, shuffler/io/chunks.py)
    cap = (memory - fixed) // (2 * (row_bytes + INDEX_BYTES_PER_ROW))
    if cap < 1:
        raise ValueError(
            f"memory={memory} bytes is too small for permute_buckets: it needs {fixed} bytes of read batches plus "
            f"two pieces of at least one {row_bytes}-byte row; give at least {fixed + 2 * (row_bytes + 64)} bytes"
        )
    return int(cap)


class Buckets:
    """What permute-on-read needs of a scattered dataset: bucket sizes, tables and the piece capacity.

    Pickles small (DataLoader workers): numpy chunk tables and URLs, no open clients.
    """

    def __init__(self, url_or_dataset, memory: int | str | None):
        self.scattered = ScatteredDataset.open(url_or_dataset)
        self.schema = self.scattered.schema
        self.sizes = self.scattered.bucket_rows  # [B] int64
        self.memory = parse_memory(memory)
        self.capacity = piece_capacity(self.schema.row_bytes, self.memory)
        self._tables: dict[int, ChunkTable] = {}

    @property
    def buckets(self) -> int:
        return self.scattered.buckets

    def table(self, b: int) -> ChunkTable:
        t = self._tables.get(b)
        if t is None:
            t = self._tables[b] = self.scattered.table(b)
        return t

    def settings(self) -> dict:
        """What fixes the order besides the normal stream's settings: state_dict() records it. Not `memory`:
        pieces only cut each bucket's full permutation, so the order is the same under any budget."""
        return {"permute_buckets": True}


@dataclass(frozen=True)
class Piece:
    """Positions [a, z) of bucket b's permuted order; they land at position `pos` of the consumer's range."""

    bucket: int
    a: int
    z: int
    pos: int


def epoch_order(seed: int, epoch: int, buckets: int) -> np.ndarray:
    """The buckets in the order epoch `epoch` serves them. [B] int64."""
    return permutation(buckets, mix_key(seed, epoch, TAG_BUCKET_ORDER))


def bucket_permutation(seed: int, epoch: int, b: int, n: int) -> np.ndarray:
    """Position t of bucket b's epoch order holds bucket row perm[t] (rows in the bucket's fixed order). [n]"""
    return permutation(n, mix_key(seed, epoch, TAG_BUCKET_PERM, b))


def pieces(bk: Buckets, plan: EpochPlan, first_row: int) -> Iterator[Piece]:
    """The pieces covering this consumer's rows [first_row, plan.rows), in order."""
    order = epoch_order(plan.seed, plan.epoch, bk.buckets)
    sizes = bk.sizes[order]
    ends = np.cumsum(sizes)  # [B] global end row of each bucket in epoch order
    for g0, g1, pos in plan.sequence(first_row):  # each span of this consumer's rows (readers/layout.py)
        k = int(np.searchsorted(ends, g0, side="right"))
        while k < len(order) and g0 < g1:
            start = int(ends[k] - sizes[k])
            a, z = g0 - start, min(g1, int(ends[k])) - start
            while a < z:  # a bucket's part larger than the capacity is served in several pieces
                e = min(z, a + bk.capacity)
                yield Piece(int(order[k]), a, e, pos)
                pos += e - a
                a = e
            g0 = int(ends[k])
            k += 1


class _Loaded:
    """A loaded piece: its rows in permuted order."""

    __slots__ = ("piece", "acts", "cols", "bytes_read")

    def __init__(self, piece: Piece, acts: np.ndarray, cols: dict[str, np.ndarray], bytes_read: int):
        self.piece, self.acts, self.cols, self.bytes_read = piece, acts, cols, bytes_read


class PieceLoader:
    """Loads pieces on one background thread (decoding on `threads` more) into two reused slots."""

    def __init__(self, bk: Buckets, *, seed: int, epoch: int, columns: tuple[str, ...], threads: int,
                 read: Schema | None = None):
        self.bk, self.seed, self.epoch, self.columns, self.threads = bk, seed, epoch, columns, threads
        self.read = read or bk.schema
        """The rows served (Schema.select): the fields asked for, copied out of each decoded chunk."""
        s = bk.schema
        self.col_types = dict(s.columns)
        self.slots = [None, None]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bucket-load")
        self._perm: tuple[int, np.ndarray] | None = None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, piece: Piece, slot: int) -> Future:
        return self.pool.submit(self._load, piece, slot)

    def _buffers(self, slot: int, n: int):
        s = self.read
        have = self.slots[slot]
        if have is None or have[0].shape[0] < n:
            cap = max(n, min(self.bk.capacity, 1 << 16))  # grow once to a piece's size, then reuse
            have = self.slots[slot] = (
                np.empty((cap, s.row_width), dtype=s.row_dtype),
                {c: np.empty(cap, dtype=self.col_types[c]) for c in self.columns},
            )
        return have[0][:n], {c: v[:n] for c, v in have[1].items()}

    def _load(self, piece: Piece, slot: int) -> _Loaded:
        b, n = piece.bucket, piece.z - piece.a
        if self._perm is None or self._perm[0] != b:
            self._perm = (b, bucket_permutation(self.seed, self.epoch, b, int(self.bk.sizes[b])))
        need = self._perm[1][piece.a : piece.z]  # [n] bucket rows, in output order
        table = self.bk.table(b)
        starts = table.row_starts()  # [chunks + 1]
        srt = np.argsort(need, kind="stable")  # [n]: need[srt] ascending; srt[i] is where need[srt[i]] goes
        need_sorted = need[srt]
        cid = np.searchsorted(starts, need_sorted, side="right") - 1  # [n] chunk of each needed row
        used = np.unique(cid)  # chunks holding any needed row, in stored order
        sub = ChunkTable(table.schema, table.objects, table.chunks[used])
        lo = np.searchsorted(cid, used, side="left")  # needed rows of used[k]: need_sorted[lo[k]:hi[k]]
        hi = np.searchsorted(cid, used, side="right")
        acts, cols = self._buffers(slot, n)
        names = self.bk.schema.column_names
        k = 0
        for _pos, a, c in iter_decoded(sub, 0, sub.rows, threads=self.threads,
                                       batch_bytes=read_batch_bytes(DEFAULT_CHUNK_BYTES)):
            # iter_decoded yields each chunk whole, in order (skip=0): chunk k of `sub` is used[k] of the bucket
            assert len(a) == int(sub.chunks["rows"][k]), "iter_decoded yields whole chunks"
            local = need_sorted[lo[k] : hi[k]] - starts[used[k]]
            dest = srt[lo[k] : hi[k]]
            acts[dest] = self.bk.schema.project(a[local], self.read)
            for name, col in zip(names, c, strict=True):
                if name in cols:
                    cols[name][dest] = col[local]
            k += 1
        if k != len(used):
            raise RuntimeError(f"internal: bucket {b} piece read {k} chunks, expected {len(used)}")
        return _Loaded(piece, acts, cols, int(sub.chunks["comp_len"].sum(dtype=np.int64)))


def bucket_batches(
    bk: Buckets, plan: EpochPlan, first: int, *, columns: tuple[str, ...], threads: int, stats: ReadStats, alloc,
    read: Schema | None = None,
) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray], None]]:
    """(batch index, acts, columns, None) for batches first.. of this consumer's epoch. acts: [rows, d_model]."""
    B, rows = plan.batch_size, plan.rows
    if first >= plan.n_batches:
        return
    todo = pieces(bk, plan, first * B)
    loader = PieceLoader(bk, seed=plan.seed, epoch=plan.epoch, columns=columns, threads=threads, read=read)
    col_types = dict(bk.schema.columns)
    try:
        nxt = next(todo, None)
        fut = loader.submit(nxt, 0) if nxt is not None else None
        cur: _Loaded | None = None
        slot = 0
        for b in range(first, plan.n_batches):
            t0, t1 = b * B, min((b + 1) * B, rows)
            acts = alloc(t1 - t0)  # [t1 - t0, d_model]
            cols = {c: np.empty(t1 - t0, dtype=col_types[c]) for c in columns}
            t = t0
            while t < t1:
                if cur is None or t >= cur.piece.pos + (cur.piece.z - cur.piece.a):
                    if fut is None:
                        raise RuntimeError(f"internal: pieces end before row {t} of {rows} (plan and pieces disagree)")
                    w0 = time.perf_counter()
                    cur = fut.result()  # re-raises the loader's error here
                    stats.wait_seconds += time.perf_counter() - w0
                    stats.bytes_read += cur.bytes_read
                    slot ^= 1
                    nxt = next(todo, None)  # the other slot held the previous piece, now served: reuse it
                    fut = loader.submit(nxt, slot) if nxt is not None else None
                i0 = t - cur.piece.pos
                m = min(t1 - t, cur.acts.shape[0] - i0)
                acts[t - t0 : t - t0 + m] = cur.acts[i0 : i0 + m]
                for c in columns:
                    cols[c][t - t0 : t - t0 + m] = cur.cols[c][i0 : i0 + m]
                t += m
            yield b, acts, cols, None
    finally:
        loader.close()

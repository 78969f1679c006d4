"""The chunk reader: rows held by chunks of shard-format objects, fetched with batched ranged reads and
decoded on threads, in order.

    table = ChunkTable.of_datasets([Dataset.open(url)])          # every chunk, in row order
    for pos, acts, cols in iter_decoded(table, skip=0, rows=table.rows):
        ...                                                       # acts [n, d_model] storage dtype

A ChunkTable names chunks of any objects (a dataset's shards, a shuffle's intermediates, a producer's
scattered runs) by (object, byte offset, compressed length, rows, checksum), so one reader serves every
place that reads chunks: pass 1 reads the sources through it, pass 2 each bucket's pieces of every
intermediate. Every frame is checked against the index it came with (format/codec.py: decode_chunk).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from shuffler.errors import FormatError
from shuffler.format.codec import decode_chunk
from shuffler.format.schema import Schema
from shuffler.storage.storage import Storage

#: One chunk of some object: which object, where its frame lies, and what the frame must decode to.
CHUNK = np.dtype([("obj", "<i4"), ("offset", "<u8"), ("comp_len", "<u4"), ("rows", "<u4"), ("checksum", "<u4")])



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
        # One ranged read per shard footer; on object stores they overlap (a GET's latency, about 64 ms on S3
        # here, dominates a footer's few KiB: docs/benchmarks.md, "Measurements behind the design").
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

"""The chunk reader: rows held by chunks of shard-format objects, fetched (memory maps for local files,
batched ranged reads otherwise), checked and decoded on threads, in order.

    table = ChunkTable.of_datasets([Dataset.open(url)])          # every chunk, in row order
    for pos, acts, cols in iter_decoded(table, skip=0, rows=table.rows):
        ...                                                       # acts [n, d_model] storage dtype

A ChunkTable names chunks of any objects (a dataset's shards, a shuffle's intermediates, a producer's
scattered runs) by (object, byte offset, compressed length, rows, checksum), so one reader serves every
place that reads chunks: pass 1 reads the sources through it, pass 2 each bucket's pieces of every
intermediate, the readers' bucket pieces (readers/buckets.py) and `shuffler export` a dataset's chunks.
Every frame is checked against the index it came with (format/codec.py: decompress_chunk).

ChunkReader is the one way a frame is read and checked: Dataset.read_chunk/read_shard and the readers'
prefetch pool (readers/prefetch.py, which un-splits the rows straight into its batch buffers) call it, and
iter_decoded reads through one per storage.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from shuffler.errors import FormatError
from shuffler.format.codec import decompress_chunk, decompress_frame, unsplit
from shuffler.format.schema import Schema
from shuffler.storage.direct import DirectReads
from shuffler.storage.mapped import LocalMaps
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
        # One ranged read per shard footer; on object stores they overlap (a GET's latency, 64 ms against moto's
        # S3 server here, dominates a footer's few KiB: docs/benchmarks.md, "Measurements behind the design").
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


class ChunkReader:
    """Reads and checks chunk frames of the objects of one Storage.

    Local files are read through memory maps (storage/mapped.py: zstd decodes straight from the page cache, and
    each decoded chunk's pages are dropped from this process again); other stores with ranged reads. close()
    unmaps; the reader stays usable (a later read maps its file again).
    """

    def __init__(self, store: Storage, *, direct: bool = False):
        self.store = store
        self.maps = LocalMaps(store) if store.is_local and not direct else None
        self.direct = DirectReads(store.path) if store.is_local and direct else None

    def frame(self, name: str, start: int, end: int) -> bytes | memoryview:
        """Bytes [start, end) of shard `name` (shorter if the object is); FileNotFoundError naming it if missing."""
        try:
            if self.direct is not None:
                return self.direct.frames([name], [start], [end])[0]
            if self.maps is None:
                return self.store.read_range(name, start, end)
            return self.maps.read(name, start, end)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.store.url_of(name)}: shard named in the manifest is missing") from None

    def frames(self, names: list[str], starts: list[int], ends: list[int]) -> list[bytes | memoryview]:
        """Many frames at once: map views (direct: views of one reused buffer) if local, else one batched ranged
        read (concurrent on object stores)."""
        if self.direct is not None:
            try:
                return self.direct.frames(names, starts, ends)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{e.filename}: shard named in the manifest is missing") from None
        if self.maps is None:
            return self.store.read_ranges(names, starts, ends)
        return [self.maps.read(n, s, e) for n, s, e in zip(names, starts, ends, strict=True)]

    def check(self, schema: Schema, frame: bytes | memoryview, start: int, end: int, rows: int, checksum: int,
              *, where: str) -> bytes:
        """The uncompressed bytes of a frame read from [start, end), after the length, size and checksum checks
        (FormatError or ChecksumError naming `where`). A mapped frame's pages are released either way."""
        try:
            if len(frame) != end - start:
                raise FormatError(f"{where}: read {len(frame)} bytes, index says {end - start} (object truncated?)")
            return decompress_chunk(schema, frame, rows, checksum, where=where)
        finally:
            self.release(frame, start)

    def check_frame(self, frame: bytes | memoryview, start: int, end: int, expected: int, checksum: int,
                    *, where: str) -> bytes:
        """One zstd frame of a several-field chunk (a field's, or the columns'), read from [start, end): its
        `expected` uncompressed bytes after the same checks as check(). Its pages are released either way."""
        try:
            if len(frame) != end - start:
                raise FormatError(f"{where}: read {len(frame)} bytes, index says {end - start} (object truncated?)")
            return decompress_frame(frame, expected, checksum, where=where)
        finally:
            self.release(frame, start)

    def read(self, schema: Schema, name: str, start: int, end: int, rows: int, checksum: int, *, where: str) -> bytes:
        """Read one frame and check it: its uncompressed bytes (byte planes, then columns; codec.unsplit)."""
        return self.check(schema, self.frame(name, start, end), start, end, rows, checksum, where=where)

    def release(self, frame: bytes | memoryview, start: int) -> None:
        """Drop a decoded mapped frame's pages from this process (the page cache keeps them), or give a direct
        read's buffer back once all its frames are decoded."""
        if self.maps is not None:
            LocalMaps.release(frame, start)
        if self.direct is not None:
            self.direct.release(frame)

    def close(self) -> None:
        if self.maps is not None:
            self.maps.close()
        if self.direct is not None:
            self.direct.close()


def _fetch(table: ChunkTable, readers: dict[str, ChunkReader], lo: int, hi: int) -> list[bytes | memoryview]:
    """The frames of chunks lo..hi-1, with one batched read per storage."""
    c = table.chunks[lo:hi]
    frames: list[bytes | memoryview | None] = [None] * len(c)
    by_store: dict[str, list[int]] = {}
    for k, o in enumerate(c["obj"].tolist()):
        by_store.setdefault(table.objects[o][0], []).append(k)
    for url, ks in by_store.items():
        names = [table.objects[int(c["obj"][k])][1] for k in ks]
        starts = [int(c["offset"][k]) for k in ks]
        ends = [int(c["offset"][k] + c["comp_len"][k]) for k in ks]
        for k, data in zip(ks, readers[url].frames(names, starts, ends), strict=True):
            frames[k] = data
    return frames  # type: ignore[return-value]


def iter_decoded(
    table: ChunkTable, skip: int, rows: int, *, threads: int = 2, batch_bytes: int = 32 << 20, direct: bool = False
) -> Iterator[tuple[int, np.ndarray, list[np.ndarray]]]:
    """Decode rows [skip, skip + rows) of `table` in order: yields (position, acts [n, d_model], columns).

    The next batch is fetched while this one decodes; frames decode on `threads` threads (zstd and numpy
    release the GIL). Every frame's checksum is checked against the index it came with. Memory is bounded
    by batch_bytes: at most three batches of frames (two of them being fetched) and one batch decoded.
    direct=True reads local objects with O_DIRECT into reused buffers (storage/direct.py: DirectReads), for
    objects not in the page cache and not read again, such as a shuffle's intermediates.
    """
    schema = table.schema
    chunks = table.chunks
    batches = _batches(chunks, batch_bytes)
    readers = {url: ChunkReader(storage(url), direct=direct) for url in dict.fromkeys(u for u, _ in table.objects)}

    def decode(j: int, frame: bytes | memoryview):
        e = chunks[j]
        url, name = table.objects[int(e["obj"])]
        start, n = int(e["offset"]), int(e["rows"])
        where = f"{url}/{name} chunk at byte {start}"
        raw = readers[url].check(schema, frame, start, start + int(e["comp_len"]), n, int(e["checksum"]), where=where)
        return unsplit(schema, raw, n)

    pos, first = 0, skip
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads) + 1, thread_name_prefix="read") as pool:
            fetches: deque[Future] = deque(pool.submit(_fetch, table, readers, lo, hi) for lo, hi in batches[:2])
            for k, (lo, _) in enumerate(batches):
                frames = fetches.popleft().result()
                if k + 2 < len(batches):
                    fetches.append(pool.submit(_fetch, table, readers, *batches[k + 2]))
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
    finally:
        for r in readers.values():
            r.close()
    if pos != rows:
        raise FormatError(f"expected {rows} rows from {len(chunks)} chunks, got {pos}: an index is inconsistent")

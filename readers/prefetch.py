"""Background reading: a thread pool does the ranged reads and zstd decodes, straight into batch buffers.

Each work unit (rows lo..hi of one chunk, see order.py) is one task: read and check the chunk's frame with
the chunk reader (shuffler/io/chunks.py: a memory map's view for local shards, one ranged read otherwise),
decompress it (zstd releases the GIL), and un-split the byte planes of just rows lo..hi
directly into the batch buffers those rows belong to. So a row is copied once after decompression, the same
work as `codec.decode_chunk` (the benchmark's baseline), and batches are assembled with no extra copy and no
per-row Python loop.

Memory is bounded by pulling, not pushing: tasks are submitted only from the consumer's thread, and only
for units whose rows fall in the next `prefetch` batches, or while fewer than threads + 1 units are
undelivered (so every thread has work when a chunk holds several batches). A consumer that stalls stops
all new work; what is buffered is at most max(prefetch batches, threads + 1 chunks) plus the batches one
chunk spans (tests/test_readers_faults.py measures it). Errors surface in plan order, at the batch they belong to: the first failing unit's
exception is re-raised in the consumer, after the pool is shut down.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from readers.order import Unit
from shuffler.errors import ChecksumError, FormatError
from shuffler.format.schema import Schema
from shuffler.io.chunks import ChunkReader
from shuffler.io.dataset import Dataset


def unsplit_rows(
    schema: Schema, raw: bytes, rows: int, lo: int, hi: int,
    acts: np.ndarray, cols: dict[str, np.ndarray], at: int,
) -> None:
    """Write rows [lo, hi) of a decompressed chunk into acts[at:at+hi-lo] and cols[name][at:...].

    acts: [batch, row_width] C-contiguous, schema.row_dtype. Only the columns named in `cols` are copied.
    """
    cnt = hi - lo
    if not schema.multi:
        d, s = schema.d_model, schema.itemsize
        n = rows * d
        src = np.frombuffer(raw, dtype=np.uint8)
        dst = acts[at : at + cnt].view(np.uint8).reshape(cnt * d, s)
        for k in range(s):  # one strided copy per byte plane, as codec.unsplit (2.5-3 GB/s)
            dst[:, k] = src[k * n + lo * d : k * n + hi * d]
        off = n * s
    else:
        dst, off = acts[at : at + cnt].view(np.uint8), 0
        for _, at_row, d, s in schema.field_bytes():
            unsplit_plane_rows(memoryview(raw)[off : off + rows * d * s], rows, d, s, lo, hi, dst[:, at_row : at_row + d * s])
            off += rows * d * s
    copy_columns(schema, raw, off, rows, lo, hi, cols, at)


def unsplit_plane_rows(raw, rows: int, d: int, s: int, lo: int, hi: int, dst: np.ndarray) -> None:
    """Rows [lo, hi) of one field's byte planes (`raw`: rows x d elements of s bytes) into dst [hi - lo, d x s]
    bytes (a column slice of packed rows, or a whole field's rows)."""
    n = rows * d
    src = np.frombuffer(raw, dtype=np.uint8, count=n * s)
    out = dst.reshape(hi - lo, d, s)  # splits the contiguous last axis: a view, never a copy
    for k in range(s):
        out[:, :, k] = src[k * n + lo * d : k * n + hi * d].reshape(hi - lo, d)


def copy_columns(schema: Schema, raw, off: int, rows: int, lo: int, hi: int, cols: dict[str, np.ndarray],
                 at: int) -> None:
    """Rows [lo, hi) of the columns stored from byte `off` of raw into cols[name][at:...] (those named only)."""
    cnt = hi - lo
    for name, dt in schema.columns:
        size = np.dtype(dt).itemsize
        if name in cols:
            cols[name][at : at + cnt] = np.frombuffer(
                raw, dtype=np.dtype(dt).newbyteorder("<"), count=cnt, offset=off + lo * size
            )
        off += rows * size


@dataclass
class ReadStats:
    """Counters a trainer can log. Updated by the consumer's thread only."""

    batches: int = 0
    """Batches yielded."""
    rows: int = 0
    """Rows yielded."""
    bytes_read: int = 0
    """Compressed bytes fetched from storage (whole chunks, including boundary chunks)."""
    bytes_decoded: int = 0
    """Uncompressed bytes of the rows delivered."""
    wait_seconds: float = 0.0
    """Time the consumer spent blocked waiting for the next batch (0 when prefetch keeps up)."""
    skipped_chunks: int = 0
    """Damaged chunks skipped (on_damaged="skip" only)."""
    skipped_rows: int = 0
    """Rows lost with them; the batches they fell in are that much shorter."""
    damaged: list[str] = field(default_factory=list)
    """One message per skipped chunk, naming shard and chunk."""
    peak_buffered_batches: int = 0
    """Most batch buffers allocated ahead of the consumer at once (bounded: see the module docstring)."""


class _Slot:
    """One batch being filled: its buffers and the tasks writing into it."""

    __slots__ = ("index", "rows", "acts", "cols", "tasks")

    def __init__(self, index: int, rows: int, acts: np.ndarray, cols: dict[str, np.ndarray]):
        self.index, self.rows, self.acts, self.cols = index, rows, acts, cols
        self.tasks: list[tuple[Future, Unit]] = []


Allocator = Callable[[int], np.ndarray]


class Assembler:
    """Turns a stream of units into filled batches, decoding in a thread pool. One per iteration; close() it."""

    def __init__(
        self, dataset: Dataset, *, columns: tuple[str, ...], threads: int, prefetch: int,
        skip_damaged: bool, stats: ReadStats, alloc: Allocator, read: Schema | None = None,
    ):
        self.dataset = dataset
        self.schema = dataset.schema
        self.read = read or self.schema
        """The rows this assembler fills (Schema.select): some fields of a several-field dataset decode only
        those fields' frames, and the columns' frame only if columns are asked for."""
        self.frames: list[int] | None = None
        if self.read != self.schema:
            names = self.schema.field_names
            self.frames = [names.index(n) for n in self.read.field_names]
            if columns:
                self.frames.append(len(names))
        self.columns = columns
        self.prefetch = prefetch
        self.threads = threads
        self.skip_damaged = skip_damaged
        self.stats = stats
        self.alloc = alloc
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="activation-read")
        # Its own reader (memory maps for local shards), unmapped when this iteration closes.
        self.reader = ChunkReader(dataset.store)
        self._futures: set[Future] = set()

    def close(self) -> None:
        """Cancel queued tasks and wait for running ones (they write into buffers nobody will read)."""
        for f in self._futures:
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()
        self.reader.close()

    def _task(self, unit: Unit, pieces: list[tuple[_Slot, int, int, int]]) -> BaseException | None:
        ds = self.dataset
        info = ds.shards[unit.shard]
        e = ds.index(unit.shard).entries[unit.chunk]
        start, end = int(e["offset"]), int(e["offset"] + e["comp_len"])
        where = f"{ds.store.url_of(info.name)} chunk {unit.chunk}"
        try:
            if self.frames is not None:
                return self._fields_task(unit, pieces, where)
            raw = self.reader.read(self.schema, info.name, start, end, int(e["rows"]), int(e["checksum"]), where=where)
        except FormatError as err:  # ChecksumError included
            if isinstance(err, ChecksumError):
                err.obj, err.chunk = info.name, unit.chunk
            if self.skip_damaged:
                return err
            raise
        for slot, at, lo, hi in pieces:
            unsplit_rows(self.schema, raw, int(e["rows"]), lo, hi, slot.acts, slot.cols, at)
        return None

    def _fields_task(self, unit: Unit, pieces: list[tuple[_Slot, int, int, int]], where: str) -> None:
        """Fetch and decode only the frames of the fields asked for (and the columns' if asked for), with one
        batched read, and un-split them into the slots' rows (docs/format.md, "Several fields")."""
        ds = self.dataset
        name = ds.shards[unit.shard].name
        fr = ds.index(unit.shard).frames[unit.chunk][self.frames]
        starts, ends = fr["offset"].astype(np.int64), (fr["offset"] + fr["comp_len"]).astype(np.int64)
        blobs = self.reader.frames([name] * len(fr), starts.tolist(), ends.tolist())
        raws = [self.reader.check_frame(b, int(a), int(z), int(f["raw_len"]), int(f["checksum"]),
                                        where=f"{where} frame {k}")
                for b, a, z, f, k in zip(blobs, starts, ends, fr, self.frames, strict=True)]
        rows = int(fr["rows"][0])
        for slot, at, lo, hi in pieces:
            dst = slot.acts[at : at + hi - lo].view(np.uint8)
            for raw, (_, off, d, s) in zip(raws, self.read.field_bytes(), strict=False):
                unsplit_plane_rows(raw, rows, d, s, lo, hi, dst[:, off : off + d * s])
            if self.columns:
                copy_columns(self.schema, raws[-1], 0, rows, lo, hi, slot.cols, at)

    def read_bytes(self, unit: Unit) -> int:
        """Compressed bytes a unit fetches: its chunk, or the frames of the fields (and columns) asked for."""
        if self.frames is not None:
            return int(self.dataset.index(unit.shard).frames[unit.chunk][self.frames]["comp_len"].sum())
        return int(self.dataset.index(unit.shard).entries[unit.chunk]["comp_len"])

    def batches(
        self, units: Iterator[Unit], *, rows: int, batch_rows: int, first: int
    ) -> Iterator[tuple[int, _Slot, np.ndarray | None]]:
        """(batch index, filled slot, keep-mask or None) for batches first.. of a range of `rows` rows.

        `units` must cover rows [first * batch_rows, rows) in order. The keep-mask is set only when a
        damaged chunk was skipped: False marks the rows it would have filled.
        """
        n_batches = -(-rows // batch_rows)
        slots: deque[_Slot] = deque()
        self._next_slot = first
        pending: Unit | None = None
        b = first
        units = iter(units)
        while b < n_batches:
            # Submit every unit whose first row lies within the next `prefetch` batches, and enough units
            # to keep every thread busy when chunks are larger than batches (threads + 1 undelivered units).
            while True:
                if pending is None:
                    pending = next(units, None)
                    if pending is None:
                        break
                if pending.pos // batch_rows >= b + self.prefetch and len(self._futures) > self.threads:
                    break
                self._submit(pending, slots, rows, batch_rows)
                pending = None
            self.stats.peak_buffered_batches = max(self.stats.peak_buffered_batches, len(slots))
            if not slots or slots[0].index != b:
                raise RuntimeError(f"internal: units do not cover batch {b} (plan and assembler disagree)")
            slot = slots.popleft()
            keep = None
            t0 = time.perf_counter()
            for fut, unit in slot.tasks:
                err = fut.result()  # re-raises the task's exception here, in plan order
                self._futures.discard(fut)
                if err is not None:
                    keep = self._mark_skipped(slot, unit, err, batch_rows, keep)
            self.stats.wait_seconds += time.perf_counter() - t0
            yield b, slot, keep
            b += 1

    def _submit(self, unit: Unit, slots: deque[_Slot], rows: int, batch_rows: int) -> None:
        pieces = []
        pos, lo = unit.pos, unit.lo
        while lo < unit.hi:
            b = pos // batch_rows
            if b == self._next_slot:  # the first unit touching batch b: allocate its buffers
                self._next_slot += 1
                n = min(batch_rows, rows - b * batch_rows)
                cols = {c: np.empty(n, dtype=dict(self.schema.columns)[c]) for c in self.columns}
                slots.append(_Slot(b, n, self.alloc(n), cols))
            slot = slots[-1]
            assert slot.index == b, "units must cover the range in order, without gaps"
            take = min(unit.hi - lo, (b + 1) * batch_rows - pos)
            pieces.append((slot, pos - b * batch_rows, lo, lo + take))
            pos, lo = pos + take, lo + take
        fut = self.pool.submit(self._task, unit, pieces)
        self._futures.add(fut)
        self.stats.bytes_read += self.read_bytes(unit)
        for slot, *_ in pieces:
            slot.tasks.append((fut, unit))

    def _mark_skipped(self, slot: _Slot, unit: Unit, err: BaseException, batch_rows: int, keep):
        if keep is None:
            keep = np.ones(slot.rows, dtype=bool)
        a = max(unit.pos, slot.index * batch_rows) - slot.index * batch_rows
        z = min(unit.pos + unit.hi - unit.lo, (slot.index + 1) * batch_rows) - slot.index * batch_rows
        keep[a:z] = False
        self.stats.skipped_rows += z - a
        msg = str(err)
        if not self.stats.damaged or self.stats.damaged[-1] != msg:  # a unit spanning two batches counts once
            self.stats.skipped_chunks += 1
            self.stats.damaged.append(msg)
        return keep

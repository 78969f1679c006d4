"""Scattered datasets: producers write pass-1 intermediates directly, so the shuffle's first pass is free.

    with ShardWriter("s3://b/acts", d_model=768, dtype="bfloat16", scatter=ScatterSpec(seed=7, buckets=64)) as w:
        w.write(acts, token_id=tok, doc_id=doc, position=pos)
    # then either:  shuffler shuffle --from-scatter s3://b/acts s3://b/shuffled   (pass 2 only)
    # or read it:   ActivationStream("s3://b/acts", batch_size=4096, permute_buckets=True)

A producer buffers a run of rows (`ScatterSpec.run_bytes`), draws each row's bucket with keys.py's
`bucket_ids` (the very function pass 1 uses), orders the run by bucket with one stable argsort and writes it
with shuffling/map.py's `write_intermediate` (the encode pipeline of io/rolling.py, which also hashes the rows
for the fingerprint on its threads) as `map-000003.shard` plus its `map-000003.idx` marker: byte for byte
the layout of a pass-1 intermediate, so pass 2 (shuffling/reduce.py) reads it unchanged. Each producer writes its runs under its
own folder (`<producer>/map-000000.shard`; a single producer writes at the root). The manifest (or the part
manifest, joined by `shuffler seal`) lists the runs as shards, so a scattered dataset is also an ordinary
dataset (inspect, verify and the normal reader work on it; its stored order is grouped by bucket, not shuffled).

Keys. Row i of producer p draws from SplitMix64 keyed by producer_key(seed, p) at counter i: the draw depends
only on (seed, producer name, row index within the producer), never on how rows were batched, on run
boundaries, or on what other producers did (docs/shuffle.md, "Scatter on write").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from shuffler.errors import FormatError
from shuffler.format.manifest import Fingerprint, ShardInfo
from shuffler.format.schema import Schema
from shuffler.io.chunks import CHUNK, ChunkTable
from shuffler.io.dataset import Dataset
from shuffler.keys import bucket_ids, producer_key
from shuffler.shuffling.map import MapOutput, map_name, write_intermediate
from shuffler.shuffling.plan import DEFAULT_MEMORY, MAX_BUCKETS, PlanRequest, make_plan
from shuffler.shuffling.reduce import Intermediates
from shuffler.storage.storage import Storage

DEFAULT_RUN_BYTES = 128 << 20
"""Rows a producer buffers before it writes one intermediate (two runs are held: one filling, one writing).
Pass 2 then reads pieces of about run_bytes / buckets per (run, bucket): 2 MiB at 64 buckets."""
FORMAT = 1
_RUN = re.compile(r"^map-(\d{6})\.shard$")


class NotScatteredError(ValueError):
    """A dataset was used as scattered data but was not written with a ScatterSpec."""


@dataclass(frozen=True, kw_only=True)
class ScatterSpec:
    """How a producer scatters its rows into buckets while it writes them."""

    seed: int
    """Seeds every bucket draw; with the producer name and the row's index it fixes each row's bucket."""
    buckets: int
    """Bucket count B. Choose it from the expected dataset size with ScatterSpec.sized() (the shuffle's rule);
    a wrong guess costs time, never exactness: an oversize bucket is permuted recursively (pass 2) or in
    several reads (permute-on-read)."""
    run_bytes: int = DEFAULT_RUN_BYTES
    """Uncompressed bytes of rows buffered per intermediate object; memory held is about twice this."""

    def __post_init__(self) -> None:
        for name in ("seed", "buckets", "run_bytes"):
            v = getattr(self, name)
            if isinstance(v, np.integer):
                object.__setattr__(self, name, int(v))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"ScatterSpec seed={self.seed!r} must be an integer in [0, 2^64)")
        if isinstance(self.buckets, bool) or not isinstance(self.buckets, int) or not 1 <= self.buckets <= MAX_BUCKETS:
            raise ValueError(f"ScatterSpec buckets={self.buckets!r} must be an integer in [1, {MAX_BUCKETS}]")
        if isinstance(self.run_bytes, bool) or not isinstance(self.run_bytes, int) or self.run_bytes < 1:
            raise ValueError(f"ScatterSpec run_bytes={self.run_bytes!r} must be an integer >= 1")

    @classmethod
    def sized(cls, *, seed: int, rows: int, schema: Schema, memory: int = DEFAULT_MEMORY,
              run_bytes: int = DEFAULT_RUN_BYTES) -> ScatterSpec:
        """B for an expected `rows` rows and a per-task `memory` budget, by the shuffle's own rule (plan.py)."""
        return cls(seed=seed, buckets=make_plan(PlanRequest(rows=rows, schema=schema, memory=memory)).buckets,
                   run_bytes=run_bytes)

    def to_json(self) -> dict:
        return {"format": FORMAT, "seed": self.seed, "buckets": self.buckets}

    @staticmethod
    def from_json(obj: object, *, where: str) -> ScatterSpec:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise FormatError(f"{where}: 'scatter' metadata {obj!r} is not format {FORMAT}"[:300])
        try:
            return ScatterSpec(seed=obj["seed"], buckets=obj["buckets"])
        except (KeyError, ValueError) as e:
            raise FormatError(f"{where}: bad 'scatter' metadata: {e}") from None


class ScatterSink:
    """Rows in, pass-1 intermediates out. The interface of RollingShardWriter: append, close, abort, fingerprint.

    Runs are written by one background thread (encoding on `threads` more), so the producer fills the next
    run while the last one is sorted and written; the first error is re-raised at the next append or close.
    """

    def __init__(self, store: Storage, schema: Schema, *, spec: ScatterSpec, folder: str, producer: str,
                 chunk_bytes: int, level: int, threads: int = 2):
        self.store, self.schema, self.spec, self.folder = store, schema, spec, folder
        self.key = producer_key(spec.seed, producer)
        self.chunk_bytes, self.level, self.threads = chunk_bytes, level, threads
        self.run_rows = max(1, spec.run_bytes // schema.row_bytes)
        self.extra = {"scatter": dict(spec.to_json(), producer=producer)}
        self.bufs: list[tuple[np.ndarray, list[np.ndarray]]] = []
        self.cur: tuple[np.ndarray, list[np.ndarray]] | None = None
        self.fill = 0
        self.rows_done = 0  # rows before the current run: the counter of its first draw
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scatter-run")
        self.pending: tuple[Future, tuple] | None = None
        self.shards: list[ShardInfo] = []
        self.written: list[str] = []
        self.fingerprint = Fingerprint()
        self._closed = False

    def _buffer(self) -> tuple[np.ndarray, list[np.ndarray]]:
        if self.bufs:
            return self.bufs.pop()
        # np.empty maps pages lazily: a 128 MiB run buffer costs nothing until rows arrive.
        return (np.empty((self.run_rows, self.schema.row_width), self.schema.row_dtype),
                [np.empty(self.run_rows, np.dtype(t)) for _, t in self.schema.columns])

    def append(self, acts: np.ndarray, cols: list[np.ndarray], *, check: Callable[[], None] | None = None) -> None:
        """Rows in storage form: acts [rows, d_model] storage dtype, cols in schema order. `check` runs first
        (RollingShardWriter.append's contract: if it raises, nothing of the batch is kept)."""
        if check is not None:
            check()
        n, pos = acts.shape[0], 0
        while pos < n:
            if self.cur is None:
                self.cur, self.fill = self._buffer(), 0
            take = min(self.run_rows - self.fill, n - pos)
            self.cur[0][self.fill : self.fill + take] = acts[pos : pos + take]
            for d, s in zip(self.cur[1], cols, strict=True):
                d[self.fill : self.fill + take] = s[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == self.run_rows:
                self._submit()

    def _submit(self) -> None:
        if self.cur is None or self.fill == 0:
            return
        self._wait()
        buf, n, start = self.cur, self.fill, self.rows_done
        index = len(self.shards)
        self.written.append(self.folder + map_name(index))
        self.pending = (self.pool.submit(self._write_run, buf, n, start, index), buf)
        self.rows_done += n
        self.cur, self.fill = None, 0

    def _wait(self) -> None:
        if self.pending is not None:
            fut, buf = self.pending
            self.pending = None
            info, fp = fut.result()  # re-raises the writer thread's error here
            self.shards.append(info)
            self.fingerprint = self.fingerprint + fp
            self.bufs.append(buf)

    def _write_run(self, buf, n: int, start: int, index: int) -> tuple[ShardInfo, Fingerprint]:
        acts, cols = buf[0][:n], [c[:n] for c in buf[1]]  # [n, d_model]
        ids = bucket_ids(self.key, start, n, self.spec.buckets)  # the same draw as pass 1, counter = producer row
        order = np.argsort(ids, kind="stable")  # [n] rows grouped by bucket, producer order kept within
        counts = np.bincount(ids, minlength=self.spec.buckets)
        del ids
        name = self.folder + map_name(index)
        size, n_chunks, chunk_start, fp = write_intermediate(
            self.store, name + ".shard", self.schema, acts, cols, order, counts, level=self.level,
            chunk_bytes=self.chunk_bytes, threads=self.threads, hashes=True,
            extra=dict(self.extra, shuffle_map=index, buckets=self.spec.buckets, row_start=start),
        )
        self.store.write(name + ".idx", MapOutput(index, size, n_chunks, n, chunk_start).to_bytes())  # its commit
        return ShardInfo(name=name + ".shard", rows=n, bytes=size, chunks=n_chunks), fp

    def close(self) -> list[ShardInfo]:
        """Write the last run, wait for every run; returns the runs as shards, in order."""
        if self._closed:
            return self.shards
        try:
            self._submit()
            self._wait()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.pool.shutdown()
        self.bufs, self.cur = [], None
        return self.shards

    def abort(self) -> None:
        """Delete every object this sink wrote (runs and markers): nothing stays visible."""
        self._closed = True
        if self.pending is not None:
            try:
                self.pending[0].result()
            except BaseException:  # noqa: BLE001 - aborting already; the first error is the caller's
                pass
            self.pending = None
        self.pool.shutdown(wait=True)
        for name in self.written:
            self.store.delete(name + ".idx")
            self.store.delete(name + ".shard")
        self.shards, self.written, self.bufs, self.cur = [], [], [], None


# ---------------------------------------------------------------------------------------------------
# Reading a scattered dataset: where each bucket's chunks are


class ScatteredDataset:
    """A committed scattered dataset: its spec, and each bucket's chunks in a fixed order.

    A bucket's rows are ordered by producer folder (in manifest order), then run, then producer row
    order (the runs' stable sort): the same order on every machine and in every process.
    """

    def __init__(self, dataset: Dataset, spec: ScatterSpec, groups: list[Intermediates]):
        self.dataset, self.spec, self.groups = dataset, spec, groups
        self.schema = dataset.schema
        B = spec.buckets
        rows = np.zeros(B, dtype=np.int64)
        for g in groups:
            cum = np.concatenate([[0], np.cumsum(g.chunks["rows"], dtype=np.int64)])
            at = g.base[:-1, None] + g.starts  # [runs, B + 1] global chunk index of each bucket's start
            rows += (cum[at[:, 1:]] - cum[at[:, :-1]]).sum(axis=0)
        self.bucket_rows = rows
        """[B] int64: rows in each bucket."""

    def __getstate__(self) -> dict:
        return dict(self.__dict__, dataset=None)  # pickles small (readers' DataLoader workers): no open Dataset

    @property
    def buckets(self) -> int:
        return self.spec.buckets

    @classmethod
    def open(cls, url: str | Dataset) -> ScatteredDataset:
        ds = url if isinstance(url, Dataset) else Dataset.open(url)
        meta = ds.metadata.get("scatter")
        if meta is None:
            raise NotScatteredError(
                f"{ds.url} is not a scattered dataset: its manifest has no 'scatter' metadata. Scattered data is "
                "written with ShardWriter(..., scatter=ScatterSpec(seed=..., buckets=...)) or `shuffler synth/"
                "capture --scatter`; shuffle this one with `shuffler shuffle SRC DST --seed S`, or read it "
                "without permute_buckets"
            )
        spec = ScatterSpec.from_json(meta, where=ds.store.url_of("manifest.json"))
        folders: dict[str, list[tuple[int, ShardInfo]]] = {}
        for s in ds.shards:
            folder, _, base = s.name.rpartition("/")
            m = _RUN.match(base)
            if not m:
                raise FormatError(
                    f"{ds.store.url_of(s.name)}: a scattered dataset holds only runs named map-NNNNNN.shard; "
                    "this shard is not one (was a normal dataset mixed in?)"
                )
            folders.setdefault(folder, []).append((int(m.group(1)), s))
        groups = []
        for folder, runs in folders.items():
            store = ds.store.child(folder) if folder else ds.store
            outputs = []
            for index, info in sorted(runs, key=lambda t: t[0]):
                idx = map_name(index) + ".idx"
                try:
                    data = store.read(idx)
                except FileNotFoundError:
                    raise FormatError(f"{store.url_of(idx)}: the marker of run {info.name} is missing") from None
                out = MapOutput.from_bytes(data, where=store.url_of(idx), buckets=spec.buckets)
                if out.index != index or out.rows != info.rows:
                    raise FormatError(f"{store.url_of(idx)}: marker says run {out.index} of {out.rows} rows, the "
                                      f"manifest says {info.name} of {info.rows} rows")
                outputs.append(out)
            groups.append(Intermediates(ds.schema, store.url, outputs, spec.buckets))
        return cls(ds, spec, groups)

    def table(self, b: int) -> ChunkTable:
        """Bucket b's chunks, in the bucket's fixed row order."""
        if not 0 <= b < self.buckets:
            raise ValueError(f"bucket {b} is outside 0..{self.buckets - 1}")
        return concat_tables(self.schema, [g.table(b) for g in self.groups])


def concat_tables(schema: Schema, tables: list[ChunkTable]) -> ChunkTable:
    """One ChunkTable holding the rows of `tables`, in order."""
    objects: list[tuple[str, str]] = []
    parts = []
    for t in tables:
        c = t.chunks.copy()
        c["obj"] += len(objects)
        objects.extend(t.objects)
        parts.append(c)
    chunks = np.concatenate(parts) if parts else np.zeros(0, dtype=CHUNK)
    return ChunkTable(schema, tuple(objects), chunks)

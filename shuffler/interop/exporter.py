"""`shuffler export`: a dataset out to Arrow IPC, Parquet, or a SAELens activation cache.

arrow / parquet: one file at DST (any fsspec URL), written under a temporary name and committed whole.
Activations are the zero-copy `Batch.to_arrow()` column (fixed_size_list[d_model]; bfloat16 as uint16 bits
with `shuffler.dtype` in the field metadata), provenance columns are plain integer columns that DuckDB and
Polars filter on. Parquet gets one row group per `row_group_bytes` with statistics on the provenance columns
only (min/max of activation lists would prune nothing).

saelens: a Hugging Face datasets folder as SAELens's CacheActivationsRunner writes it and as its cached path
(`ActivationsStore.load_cached_activation_dataset`) loads it with `datasets.load_from_disk`: one row per
context, the hook column an `Array2D(shape=(context_size, d_in))`, `token_ids` a `Sequence(int32,
length=context_size)`; files `data-XXXXX-of-YYYYY.arrow` (Arrow IPC streams), `dataset_info.json`,
`state.json`. Array2D has no bfloat16 (datasets maps dtypes to Arrow types and Arrow has none), so bfloat16
is widened exactly to float32; SAELens's `dtype="bfloat16"` narrows it back exactly when loading. The folder
is built beside DST and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from shuffler.format.schema import Schema
from shuffler.interop.arrow import ACTS, numpy_to_arrow
from shuffler.io.chunks import ChunkTable, iter_decoded
from shuffler.io.dataset import Batch, Dataset
from shuffler.storage.storage import Storage

EXPORT_FORMATS = ("arrow", "parquet", "saelens")
COMPRESSIONS = ("none", "zstd", "lz4", "snappy")
#: datasets' own default max_shard_size for save_to_disk (500 MB); SAELens keeps files under 2 GB.
SAELENS_FILE_BYTES = 500 * 10**6
#: Our column names as SAELens / datasets spell them.
SAELENS_NAMES = {"token_id": "token_ids"}
_ARRAY2D = "datasets.features.features.Array2DExtensionType"


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """How `shuffler export` writes DST."""

    format: str
    """arrow (IPC file), parquet, or saelens (a datasets folder SAELens trains from)."""
    column: str | None = None
    """Name of the activation column; for saelens the hook name SAELens is configured with (default: the
    dataset's metadata hook_name, set by a SAELens import or a capture, kept through shuffles)."""
    compression: str | None = None
    """none, zstd, lz4 or snappy (parquet only). Default: zstd for parquet, none for arrow (so readers can
    memory-map it without a copy); saelens files are never compressed (datasets memory-maps them)."""
    context_size: int | None = None
    """saelens: rows per context (SAELens's context_size). Default: the dataset's metadata (kept through
    shuffles), else 128."""
    drop_remainder: bool = False
    """saelens: drop the last rows that do not fill a whole context instead of refusing."""
    row_group_bytes: int = 64 << 20
    """parquet: uncompressed bytes per row group (the memory bound of the export)."""
    file_bytes: int = SAELENS_FILE_BYTES
    """saelens: uncompressed bytes per data-*.arrow file."""
    threads: int = 4
    """Chunks read and decoded ahead, in parallel (zstd releases the GIL)."""
    overwrite: bool = False
    """Replace what is at DST."""
    field: str | None = None
    """The activation field to export, by name (docs/format.md, "Several fields"). Required for a dataset of
    several fields: an export holds one activation column. saelens: the default --column is this name."""

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"format={self.format!r} is not supported; expected one of {', '.join(EXPORT_FORMATS)}")
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise ValueError(f"compression={self.compression!r}; expected one of {', '.join(COMPRESSIONS)}")
        if self.compression == "snappy" and self.format != "parquet":
            raise ValueError("compression='snappy' is for parquet; Arrow IPC supports none, zstd, lz4")
        if self.compression not in (None, "none") and self.format == "saelens":
            raise ValueError("saelens folders are not compressed (datasets memory-maps them); drop --compression")
        if self.context_size is not None and self.context_size < 1:
            raise ValueError(f"context_size={self.context_size} must be >= 1")
        for name in ("row_group_bytes", "file_bytes", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class ExportReport:
    """What an export did."""

    url: str
    format: str
    rows: int = 0
    files: list[str] = field(default_factory=list)
    dropped_rows: int = 0
    context_size: int = 1
    column: str = ACTS


def iter_batches(ds: Dataset, *, threads: int = 4, schema: Schema | None = None) -> Iterator[Batch]:
    """Every chunk of `ds` in stored order, read and decoded `threads` at a time by the chunk reader
    (shuffler/io/chunks.py: memory maps for local shards, batched ranged reads otherwise, about 32 MiB of
    frames a batch, so memory stays bounded whatever the dataset's size); the first error re-raised.
    `schema` (from export_schema) keeps one field of a several-field dataset as `acts`."""
    table = ChunkTable.of_datasets([ds])
    names = ds.schema.column_names
    sch = schema or ds.schema
    for _, acts, cols in iter_decoded(table, 0, table.rows, threads=threads):
        yield Batch(ds.schema.project(acts, sch), dict(zip(names, cols, strict=True)), sch.dtype)


def export_schema(ds: Dataset, field: str | None) -> Schema:
    """The one activation field an export writes, as a one-field schema with every column. ValueError for a
    several-field dataset without `field`, or an unknown field, naming the dataset's fields."""
    if field is None:
        if ds.schema.multi:
            raise ValueError(
                f"{ds.url} holds {len(ds.fields)} activation fields {list(ds.fields)} and an export writes one "
                f"activation column: pass --field NAME (field=NAME) to choose one, and export again for each"
            )
        return ds.schema
    try:
        return ds.schema.select((field,))
    except ValueError as e:
        raise ValueError(f"{ds.url}: --field {field!r}: {e}") from None


def _split_url(dst: str) -> tuple[Storage, str]:
    dst = dst.rstrip("/")
    parent, _, name = dst.rpartition("/")
    if not name:
        raise ValueError(f"{dst!r} does not name a file")
    return Storage(parent or "."), name


def _single_file(ds: Dataset, sch: Schema, dst: str, cfg: ExportConfig, report: ExportReport,
                 progress: Callable[[int, int], None] | None) -> None:
    import pyarrow.parquet as pq

    store, name = _split_url(dst)
    if store.exists(name) and not cfg.overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    col = cfg.column or ACTS
    report.column = col
    schema = Batch(np.empty((0, sch.d_model), sch.storage_dtype),
                   {n: np.empty(0, t) for n, t in sch.columns}, sch.dtype).to_arrow().schema
    schema = _renamed(schema, col)
    with store.open_atomic(name) as f:
        if cfg.format == "arrow":
            comp = None if cfg.compression in (None, "none") else cfg.compression
            with pa.ipc.new_file(f, schema, options=pa.ipc.IpcWriteOptions(compression=comp)) as w:
                for b in iter_batches(ds, threads=cfg.threads, schema=sch):
                    w.write_batch(_renamed_batch(b.to_arrow(), schema))
                    _count(report, b, progress)
        else:
            comp = cfg.compression or "zstd"
            stats = [n for n in schema.names if n != col]
            with pq.ParquetWriter(f, schema, compression=comp, use_dictionary=False, write_statistics=stats or False,
                                  store_schema=True) as w:
                pending: list[pa.RecordBatch] = []
                size = 0
                for b in iter_batches(ds, threads=cfg.threads, schema=sch):
                    rb = _renamed_batch(b.to_arrow(), schema)
                    pending.append(rb)
                    size += rb.nbytes
                    _count(report, b, progress)
                    if size >= cfg.row_group_bytes:
                        w.write_table(pa.Table.from_batches(pending), row_group_size=sum(len(p) for p in pending))
                        pending, size = [], 0
                if pending:
                    w.write_table(pa.Table.from_batches(pending), row_group_size=sum(len(p) for p in pending))
    report.files = [store.url_of(name)]


def _renamed(schema: pa.Schema, col: str) -> pa.Schema:
    return schema if col == ACTS else schema.set(0, schema.field(0).with_name(col))


def _renamed_batch(rb: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(rb.columns, schema=schema)


def _count(report: ExportReport, b: Batch, progress) -> None:
    report.rows += len(b)
    if progress is not None:
        progress(len(b), b.acts.nbytes)


# -- saelens ---------------------------------------------------------------------------------------------
def saelens_features(hook: str, ctx: int, d: int, dtype: str, columns: list[tuple[str, str]]) -> dict:
    """datasets' Features JSON, in the spelling datasets >= 3.1 (SAELens's floor) and 5.x both read."""
    feats: dict = {hook: {"shape": [ctx, d], "dtype": dtype, "_type": "Array2D"}}
    for name, t in columns:
        feats[SAELENS_NAMES.get(name, name)] = {
            "feature": {"dtype": t, "_type": "Value"}, "length": ctx, "_type": "Sequence"
        }
    return feats


def _saelens(ds: Dataset, sch: Schema, dst: str, cfg: ExportConfig, report: ExportReport,
             progress: Callable[[int, int], None] | None) -> None:
    if "://" in dst and not dst.startswith("file://"):
        raise ValueError(f"{dst}: saelens export writes a local folder (SAELens loads it with datasets.load_from_disk)")
    dst = os.path.abspath(dst.removeprefix("file://"))
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)) and not cfg.overwrite:
        raise FileExistsError(f"{dst} already exists and is not empty; pass --overwrite to replace it")
    # provenance: a shuffled import keeps hook_name and context_size in its sources' metadata
    hook = cfg.column or (cfg.field if ds.schema.fields else None) or ds.manifest.provenance("hook_name")
    if not hook:
        raise ValueError(
            f"{ds.url}: saelens export needs the hook name SAELens is configured with; pass --column "
            "(e.g. --column blocks.8.hook_resid_pre)"
        )
    ctx = int(cfg.context_size or ds.manifest.provenance("context_size") or 128)
    n_ctx, rem = divmod(ds.num_rows, ctx)
    if rem and not cfg.drop_remainder:
        raise ValueError(
            f"{ds.url}: {ds.num_rows:,} rows are not whole contexts of {ctx} rows ({rem} left over); pass "
            "--drop-remainder to leave the last rows out, or a --context-size that divides the row count"
        )
    if n_ctx == 0:
        raise ValueError(f"{ds.url}: {ds.num_rows} rows do not fill one context of {ctx} rows")
    report.context_size, report.dropped_rows, report.column = ctx, rem, hook
    d = sch.d_model
    out_dtype = "float16" if sch.dtype == "float16" else "float32"  # no bfloat16 in datasets: widen exactly
    out_np = np.dtype(out_dtype)
    cols = list(ds.schema.columns)
    feats = saelens_features(hook, ctx, d, out_dtype, cols)
    fields = [pa.field(hook, pa.list_(pa.list_(pa.from_numpy_dtype(out_np))), metadata={
        b"ARROW:extension:name": _ARRAY2D.encode(),
        b"ARROW:extension:metadata": json.dumps([[ctx, d], out_dtype]).encode(),
    })]
    fields += [pa.field(SAELENS_NAMES.get(n, n), pa.list_(pa.from_numpy_dtype(np.dtype(t)), ctx)) for n, t in cols]
    schema = pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": feats}})})
    ctx_bytes = ctx * (d * out_np.itemsize + sum(np.dtype(t).itemsize for _, t in cols))
    per_file = max(1, cfg.file_bytes // ctx_bytes)
    n_files = -(-n_ctx // per_file)
    names = [f"data-{k:05d}-of-{n_files:05d}.arrow" for k in range(n_files)]
    tmp = f"{dst}.tmp-{uuid.uuid4().hex[:12]}"
    os.makedirs(tmp)
    try:
        contexts = _contexts(iter_batches(ds, threads=cfg.threads, schema=sch), ctx, n_ctx, max(1, (8 << 20) // ctx_bytes))
        for k, name in enumerate(names):
            want = min(per_file, n_ctx - k * per_file)
            with pa.OSFile(os.path.join(tmp, name), "wb") as f, pa.ipc.new_stream(f, schema) as w:
                while want:
                    acts, pcols = contexts.take(want)
                    k_ctx = acts.shape[0] // ctx
                    flat = _widen(acts, sch.dtype, out_np)  # [k_ctx * ctx, d]
                    values = numpy_to_arrow(flat.reshape(-1))
                    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, k_ctx * ctx + 1, dtype=np.int32) * d), values)
                    outer = pa.ListArray.from_arrays(pa.array(np.arange(0, k_ctx + 1, dtype=np.int32) * ctx), inner)
                    arrays = [outer] + [
                        pa.FixedSizeListArray.from_arrays(numpy_to_arrow(np.ascontiguousarray(pcols[n])), ctx)
                        for n, _ in cols
                    ]
                    w.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
                    want -= k_ctx
                    report.rows += k_ctx * ctx
                    if progress is not None:
                        progress(k_ctx * ctx, acts.nbytes)
        info = {"citation": "", "description": "", "features": feats, "homepage": "", "license": ""}
        with open(os.path.join(tmp, "dataset_info.json"), "w") as f:
            json.dump(info, f, indent=2)
        fp = ds.manifest.fingerprint
        finger = hashlib.sha256(f"{fp.rows}:{fp.hash_sum}:{hook}:{ctx}:{out_dtype}".encode()).hexdigest()[:16]
        with open(os.path.join(tmp, "shuffler_export.json"), "w") as f:
            json.dump({"source": ds.url, "fingerprint": fp.to_json(), "dtype": sch.dtype, "context_size": ctx,
                       "dropped_rows": rem, "hook_name": hook}, f, indent=1)
        state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": finger, "_format_columns": None,
                 "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
        with open(os.path.join(tmp, "state.json"), "w") as f:  # written last: a folder without it is no dataset
            json.dump(state, f, indent=2)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.files = [os.path.join(dst, n) for n in names]


def _widen(acts: np.ndarray, dtype: str, out: np.dtype) -> np.ndarray:
    if dtype == "bfloat16":
        return (acts.astype(np.uint32) << 16).view(np.float32)  # exact: bfloat16 is float32's high half
    return np.ascontiguousarray(acts, dtype=out)


def _replace_dir(tmp: str, dst: str) -> None:
    """Move the finished folder into place; an old DST is moved aside first and removed only after."""
    old = None
    if os.path.exists(dst):
        old = f"{dst}.old-{uuid.uuid4().hex[:12]}"
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)


class _contexts:
    """Regroups a stream of chunk batches into whole contexts, `batch_ctx` at a time, with no per-row loop."""

    def __init__(self, batches: Iterator[Batch], ctx: int, n_ctx: int, batch_ctx: int):
        self.batches, self.ctx, self.left, self.batch_ctx = batches, ctx, n_ctx * ctx, batch_ctx
        self.pending: list[Batch] = []
        self.have = 0

    def take(self, max_ctx: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        want = min(max_ctx, self.batch_ctx) * self.ctx
        want = min(want, self.left)
        while self.have < want:
            b = next(self.batches)
            self.pending.append(b)
            self.have += len(b)
        merged = Batch.concat(self.pending)
        out = merged.take(slice(0, want))
        rest = merged.take(slice(want, None))
        self.pending, self.have = ([rest] if len(rest) else []), len(rest)
        self.left -= want
        return out.acts, out.columns


# -- the export ------------------------------------------------------------------------------------------
def export_dataset(
    src: str, dst: str, cfg: ExportConfig, *, progress: Callable[[int, int], None] | None = None
) -> ExportReport:
    """Write the dataset at URL `src` to `dst` in `cfg.format`, rows in stored order."""
    report = ExportReport(url=dst, format=cfg.format)
    with Dataset.open(src) as ds:
        sch = export_schema(ds, cfg.field)
        if cfg.format == "saelens":
            _saelens(ds, sch, dst, cfg, report, progress)
        else:
            _single_file(ds, sch, dst, cfg, report, progress)
    return report


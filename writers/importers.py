"""`shuffler import`: activations cached by other tools (SAELens, Parquet, Arrow IPC, .npy; Activault and
Llamascopium through writers/tensor_caches.py) into a dataset.

SRC is a local path or any fsspec URL (s3://, memory://; shuffler/interop/sources.py opens it). Every source
is read in pieces of at most `batch_bytes` of activations, so memory stays bounded whatever the input size:
Parquet through `ParquetFile.iter_batches`, Arrow IPC and SAELens files memory-mapped and sliced (zero copy;
remote: one record batch at a time), .npy memory-mapped (remote: ranged reads of row blocks). Each piece is checked (one width, no nulls, numeric columns), converted if
`dtype` asks, and appended to a ShardWriter, which removes everything it wrote if any piece fails: a bad row
in the last file leaves nothing visible at DST. Rows keep their order.

dtype conversion (to_dtype): widening is exact (bfloat16 and float16 -> float32); narrowing rounds to
nearest, ties to even: float32 -> bfloat16 by `convert.float32_to_bfloat16_bits` (as torch's `.bfloat16()`),
float32 -> float16 by numpy's cast (IEEE 754); float64 is first cast to float32 (RNE), then as above.
Values beyond the target's range become inf and are refused unless `allow_nonfinite`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from shuffler.errors import SchemaError
from shuffler.format.convert import float32_to_bfloat16_bits
from shuffler.format.schema import COLUMN_DTYPES, COLUMN_NAME, STANDARD_COLUMNS, Schema
from shuffler.interop.arrow import (
    arrow_to_acts,
    arrow_to_column,
    is_list_like,
    leaf_dtype,
    looks_like_acts,
    storage_type,
)
from shuffler.interop.sources import (
    EXTS,
    FORMATS,
    NpyArray,
    Source,
    exported_dtype,
    files,
    read_schema,
    record_batches,
)
from shuffler.interop.sources import detect_format as _detect
from shuffler.interop.sources import saelens_files as _saelens_files
from shuffler.io.rolling import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES

DTYPES = ("float32", "float16", "bfloat16")
#: Names other tools use for our standard columns (SAELens writes `token_ids`).
ALIASES = {"token_ids": "token_id", "doc_ids": "doc_id", "positions": "position"}


@dataclass(frozen=True, kw_only=True)
class ImportConfig:
    """How `shuffler import` reads SRC and writes DST."""

    format: str = "auto"
    """One of auto, saelens, parquet, arrow, npy, activault, llamascopium. auto looks at a folder's files,
    then the suffix, then the magic bytes."""
    column: str | None = None
    """Activation column (SAELens: the hook name). None picks the only list-of-floats column."""
    dtype: str | None = None
    """Stored dtype (float32, float16, bfloat16); None keeps the source's (float64 must be converted)."""
    source_dtype: str | None = None
    """Element type where the input cannot say: fixed-size binary columns, uint16 bfloat16 bits."""
    companions: tuple[tuple[str, str], ...] = ()
    """npy only: (column name, path of a .npy with one value per row) pairs for provenance columns."""
    drop_columns: tuple[str, ...] = ()
    """Input columns to leave out (non-numeric ones must be named here)."""
    batch_bytes: int = 16 << 20
    """Activation bytes read and converted per step: the memory bound of the import."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Uncompressed bytes per stored chunk."""
    shard_bytes: int = DEFAULT_SHARD_BYTES
    """Uncompressed bytes per stored shard."""
    level: int = 1
    """zstd level of the stored chunks."""
    position_offset: int = 0
    """[records, context, d_model] input (SAELens caches): the model position of each record's first row.
    A SAELens cache made with seqpos_slice=(START, ...) holds positions START, START+1, ... and does not
    record the slice, so give START here (default 0: whole contexts)."""
    position_step: int = 1
    """Like position_offset, for a seqpos_slice with a step: positions are offset + i * step."""
    allow_nonfinite: bool = False
    """Store NaN/inf values instead of refusing them."""
    overwrite: bool = False
    """Replace a dataset already at DST."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is not supported; expected one of {', '.join(FORMATS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
        if self.source_dtype is not None and self.source_dtype not in DTYPES + ("float64",):
            raise ValueError(
                f"source_dtype={self.source_dtype!r} is not supported; expected one of {', '.join(DTYPES)}, float64"
            )
        for name, low in (("position_offset", 0), ("position_step", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name}={v!r} must be an integer >= {low} (SAELens's seqpos_slice start and step)")
        if self.batch_bytes < 1:
            raise ValueError(f"batch_bytes={self.batch_bytes} must be >= 1")
        if self.companions and self.format not in ("npy", "auto"):
            raise ValueError(f"companions are for .npy input only, not format={self.format!r}")


@dataclass
class Piece:
    """Up to batch_bytes of input rows: activations in the source's storage form plus per-row columns."""

    acts: np.ndarray  # [rows, d_model] float32 / float16 / float64 / uint16 (bfloat16 bits)
    columns: dict[str, np.ndarray]  # name -> [rows]
    per: int = 1  # rows per input record: the context length of [records, context, d_model] inputs
    nested: bool = False  # True for [records, context, d_model] inputs (even with context 1)


@dataclass
class ImportReport:
    """What an import did."""

    url: str
    format: str
    column: str
    rows: int = 0
    d_model: int = 0
    source_dtype: str = ""
    dtype: str = ""
    columns: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)
    context_size: int = 1


# -- dtype conversion ------------------------------------------------------------------------------------
def to_dtype(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Storage-form activations of dtype `src` as dtype `dst` (bfloat16 = uint16 bits); see module docstring."""
    if src == dst:
        return a
    if src == "bfloat16":
        f32 = (a.astype(np.uint32) << 16).view(np.float32)  # exact widening: bf16 is the high half of f32
        with np.errstate(over="ignore"):
            return f32 if dst == "float32" else f32.astype(np.float16)
    with np.errstate(over="ignore"):  # overflow gives inf, which ShardWriter refuses unless allow_nonfinite
        f32 = a if a.dtype == np.float32 else a.astype(np.float32)  # f16 -> f32 exact; f64 -> f32 RNE
        if dst == "bfloat16":
            return float32_to_bfloat16_bits(f32)
        return f32 if dst == "float32" else f32.astype(np.float16)


# -- finding the format ----------------------------------------------------------------------------------
def detect_format(src: str) -> str:
    """saelens for a datasets folder, else by suffix of the file (or the files in a folder), else magic bytes."""
    return _detect(Source.of(src))


def saelens_files(src: str) -> list[str]:
    """The Arrow files (paths or URLs) of a datasets folder, in row order (state.json's `_data_files`)."""
    return [f.url for f in _saelens_files(Source.of(src))]


# -- Arrow-based sources (parquet, arrow IPC, saelens) ---------------------------------------------------
@dataclass
class _Plan:
    """Decided once from the first file's schema; every later file must agree."""

    act: str
    dtype: str
    keep: list[tuple[str, str]]  # (input name, output name)
    skipped: list[str]


def plan_columns(schema: pa.Schema, cfg: ImportConfig, *, where: str, saelens: bool) -> _Plan:
    names = schema.names
    for d in cfg.drop_columns:
        if d not in names:
            raise SchemaError(f"{where}: --drop-column {d!r} is not a column; columns are {names}")
    if cfg.column is not None:
        if cfg.column not in names:
            raise SchemaError(f"{where}: activation column {cfg.column!r} not found; columns are {names}")
        act = cfg.column
    else:
        cands = [f.name for f in schema if f.name not in cfg.drop_columns and looks_like_acts(f.type)
                 and (not saelens or _depth(f.type) == 2)]
        if len(cands) != 1:
            what = "no" if not cands else f"{len(cands)} ({', '.join(cands)})"
            raise SchemaError(
                f"{where}: found {what} activation columns (lists of floats or fixed-size binary) among "
                f"{names}; name the one to import with --column"
            )
        act = cands[0]
    f = schema.field(act)
    dtype = leaf_dtype(f.type, f.metadata, cfg.source_dtype, where=f"{where} column {act!r}")
    keep, skipped, seen = [], [], set()
    for f in schema:
        if f.name == act:
            continue
        if f.name in cfg.drop_columns or (_float_leaf(f.type) and _depth(f.type) == _depth(schema.field(act).type)):
            skipped.append(f.name)  # another hook's activations in a multi-hook cache: not provenance
            continue
        t = storage_type(f.type)
        leaf = t.value_type if is_list_like(t) else t
        if not (pa.types.is_integer(leaf) or pa.types.is_floating(leaf)):
            raise SchemaError(
                f"{where} column {f.name!r}: type {f.type} is not numeric; expected integer or float values "
                f"(one per row, or one list per record); leave it out with --drop-column {f.name}"
            )
        out = ALIASES.get(f.name, f.name)
        if not COLUMN_NAME.match(out):
            raise SchemaError(
                f"{where} column {f.name!r}: name is not a valid column name ({COLUMN_NAME.pattern}); "
                f"leave it out with --drop-column {f.name!r}"
            )
        if out in seen:
            raise SchemaError(f"{where}: columns {f.name!r} and another both map to {out!r}")
        seen.add(out)
        keep.append((f.name, out))
    return _Plan(act, dtype, keep, skipped)


def _depth(t: pa.DataType) -> int:
    """List levels above the values: 1 for one row per record, 2 for [context, d_model] records."""
    t = storage_type(t)
    n = 1 if pa.types.is_fixed_size_binary(t) else 0
    while is_list_like(t):
        t, n = t.value_type, n + 1
    return n + (1 if pa.types.is_fixed_size_binary(t) and n else 0)


def _float_leaf(t: pa.DataType) -> bool:
    t = storage_type(t)
    while is_list_like(t):
        t = t.value_type
    return pa.types.is_floating(t) or pa.types.is_fixed_size_binary(t)


def _out_dtype(name: str, t: pa.DataType, *, where: str) -> str:
    if name in STANDARD_COLUMNS:
        return STANDARD_COLUMNS[name]
    t = storage_type(t)
    leaf = t.value_type if is_list_like(t) else t
    dt = str(np.dtype(leaf.to_pandas_dtype()))
    if dt not in COLUMN_DTYPES:
        raise SchemaError(f"{where} column {name!r}: dtype {dt} cannot be stored; expected one of {sorted(COLUMN_DTYPES)}")
    return dt


def _arrow_pieces(srcs: list[Source], fmt: str, cfg: ImportConfig, report: ImportReport) -> Iterator[Piece]:
    plan: _Plan | None = None
    d_model: int | None = None
    per: int | None = None
    row = 0
    for src in srcs:
        where = src.url
        try:
            schema = read_schema(src, fmt)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{where}: not a readable {fmt} file ({e})") from None
        if plan is None:
            plan = plan_columns(schema, cfg, where=where, saelens=fmt == "saelens")
            out_types = {o: _out_dtype(o, schema.field(i).type, where=where) for i, o in plan.keep}
            report.column, report.source_dtype, report.skipped = plan.act, plan.dtype, plan.skipped
        else:
            got = plan_columns(schema, replace(cfg, column=plan.act), where=where, saelens=fmt == "saelens")
            if (got.keep, got.dtype) != (plan.keep, plan.dtype):
                raise SchemaError(
                    f"{where}: columns or dtype differ from the first file's (first: {plan.dtype} {plan.keep}, "
                    f"this: {got.dtype} {got.keep})"
                )
        nested = _depth(schema.field(plan.act).type) == 2
        batches = record_batches(src, fmt, cfg.batch_bytes, [plan.act] + [i for i, _ in plan.keep])
        for rb in _guarded(batches, where, fmt):
            if rb.num_rows == 0:
                continue
            step = max(1, int(cfg.batch_bytes * rb.num_rows // max(rb.nbytes, 1)))
            for s in range(0, rb.num_rows, step):
                part = rb.slice(s, step)
                col_where = f"{where} column {plan.act!r}"
                acts, p = arrow_to_acts(part.column(plan.act), plan.dtype, where=col_where, base=row,
                                        d_model=d_model, context=per)
                d_model, per = acts.shape[1], p
                cols = {}
                for i, o in plan.keep:
                    c = arrow_to_column(part.column(i), where=f"{where} column {i!r}", base=row, per=p,
                                        nested=nested)
                    cols[o] = c if c.dtype == np.dtype(out_types[o]) else _cast_column(c, out_types[o], where, i)
                yield Piece(acts, cols, p, nested)
                row += part.num_rows


def _guarded(batches: Iterator[pa.RecordBatch], path: str, fmt: str) -> Iterator[pa.RecordBatch]:
    """Name the file in errors pyarrow raises mid-file (a corrupt page, a truncated stream)."""
    try:
        yield from batches
    except (FileNotFoundError, PermissionError) as e:
        # the source went away or became unreadable mid-read (a remote object deleted): not damage
        raise type(e)(f"{path}: {fmt} file could not be read to the end ({e})") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise ValueError(f"{path}: {fmt} file is damaged or truncated ({type(e).__name__}: {e})") from None


def _cast_column(c: np.ndarray, dt: str, where: str, name: str) -> np.ndarray:
    t = np.dtype(dt)
    if t.kind in "iu":
        if c.dtype.kind == "f":
            raise SchemaError(f"{where} column {name!r}: holds floats ({c.dtype}); expected {dt} integers")
        if c.size:
            info, lo, hi = np.iinfo(t), int(c.min()), int(c.max())
            if lo < info.min or hi > info.max:
                raise SchemaError(f"{where} column {name!r}: values in [{lo}, {hi}] do not fit {dt}")
    return c.astype(t)


# -- npy --------------------------------------------------------------------------------------------------
_NPY_DTYPES = {np.dtype("<f4"): "float32", np.dtype("<f2"): "float16", np.dtype("<f8"): "float64"}


def _npy_pieces(source: Source, cfg: ImportConfig, report: ImportReport) -> Iterator[Piece]:
    src = source.url
    a = NpyArray(source)  # [rows, d_model] or [records, context, d_model]
    if a.ndim not in (2, 3):
        raise SchemaError(f"{src}: array has shape {a.shape}; expected [rows, d_model] or [records, context, d_model]")
    if a.dtype in _NPY_DTYPES:
        dtype = _NPY_DTYPES[a.dtype]
        if cfg.source_dtype not in (None, dtype):
            raise SchemaError(f"{src}: holds {dtype} values but --source-dtype says {cfg.source_dtype}")
    elif a.dtype.itemsize == 2 and a.dtype.kind in "uV" and cfg.source_dtype == "bfloat16":
        dtype, a = "bfloat16", a.view(np.uint16)
    else:
        raise SchemaError(
            f"{src}: dtype {a.dtype} is not float32, float16 or float64 (bfloat16 bits as uint16 need "
            "--source-dtype bfloat16)"
        )
    per = a.shape[1] if a.ndim == 3 else 1
    rows = a.shape[0] * per
    d = a.shape[-1]
    read_acts = a.reader((rows, d))
    cols: dict[str, Callable[[int, int], np.ndarray]] = {}
    dts: dict[str, str] = {}
    for name, path in cfg.companions:
        out = ALIASES.get(name, name)
        c = NpyArray(Source.of(path))
        if c.dtype.kind not in "iuf":
            raise SchemaError(f"{path} (column {name!r}): dtype {c.dtype} is not numeric")
        if c.shape not in ((rows,), (a.shape[0], per)):
            raise SchemaError(
                f"{path} (column {name!r}): shape {c.shape}; expected [{rows}] to match {src} {tuple(a.shape)}"
            )
        if not COLUMN_NAME.match(out) or out in cols:
            raise SchemaError(f"companion column name {name!r} is invalid or given twice")
        cols[out], dts[out] = c.reader((rows,)), STANDARD_COLUMNS.get(out, str(c.dtype))
    report.column, report.source_dtype = source.basename, dtype
    step = max(1, cfg.batch_bytes // (d * a.dtype.itemsize))
    if per > 1:
        step = max(per, step - step % per)
    for s in range(0, rows, step):
        piece_cols = {n: _cast_column(read(s, s + step), dts[n], src, n) for n, read in cols.items()}
        yield Piece(read_acts(s, s + step), piece_cols, per, a.ndim == 3)


# -- the import ------------------------------------------------------------------------------------------
def import_activations(
    src: str, dst: str, cfg: ImportConfig | None = None, *, progress: Callable[[int, int], None] | None = None
) -> ImportReport:
    """Read SRC (see ImportConfig.format) and write it, rows in order, as a dataset at the URL DST."""
    from writers.shard_writer import ShardWriter

    cfg = cfg or ImportConfig()
    source = Source.of(src)
    src = source.url
    if not source.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    fmt = _detect(source) if cfg.format == "auto" else cfg.format
    if cfg.companions and fmt != "npy":
        raise ValueError(f"companion arrays are for .npy input; {src} is {fmt}")
    report = ImportReport(url=dst, format=fmt, column=cfg.column or "")
    if fmt == "npy":
        if source.isdir():
            raise ValueError(f"{src}: a folder; npy import takes one .npy file (plus --companion arrays)")
        pieces = _npy_pieces(source, cfg, report)
    elif fmt == "saelens":
        if not source.isdir():
            raise ValueError(f"{src}: a SAELens cache is a folder (state.json + data-*.arrow), not a file")
        pieces = _arrow_pieces(_saelens_files(source), "saelens", cfg, report)
    elif fmt in ("activault", "llamascopium"):
        from writers import tensor_caches

        if not source.isdir():
            raise ValueError(f"{src}: an {fmt} cache is a hook's folder of tensor files, not a file")
        read = tensor_caches.activault_pieces if fmt == "activault" else tensor_caches.llamascopium_pieces
        pieces = (Piece(*p) for p in read(source, cfg.batch_bytes, report))
    else:
        pieces = _arrow_pieces(files(source, EXTS[fmt]), fmt, cfg, report)
    first = next(pieces, None)
    if first is None:
        raise ValueError(f"{src}: holds no rows to import")
    dtype = cfg.dtype or report.source_dtype
    if cfg.dtype is None and fmt == "saelens":
        dtype = exported_dtype(source, DTYPES) or dtype
    if dtype == "float64":
        raise SchemaError(f"{src}: activations are float64, which is not stored; pass --dtype float32 (or float16, bfloat16)")
    ctx = first.per
    names = list(first.columns)
    # Records of [context, d_model] (SAELens) carry no position column: the index inside the record is the
    # position the model saw (SAELens caches whole contexts in order: docs/interop.md), so it is filled in,
    # shifted by position_offset/step where the cache was made with a seqpos_slice (which it does not record).
    derive_pos = first.nested and "position" not in names
    if derive_pos:
        names.append("position")
        report.derived.append("position")
    order = [n for n in STANDARD_COLUMNS if n in names] + [n for n in names if n not in STANDARD_COLUMNS]
    columns = tuple((n, STANDARD_COLUMNS.get(n) or str(first.columns[n].dtype)) for n in order)
    schema = Schema(dtype=dtype, d_model=int(first.acts.shape[1]), columns=columns)
    report.d_model, report.dtype, report.columns, report.context_size = schema.d_model, dtype, list(order), ctx
    meta = {"imported_from": os.path.abspath(src) if source.local else src, "import_format": fmt, "import_column": report.column,
            "source_dtype": report.source_dtype}
    if first.nested:
        meta["context_size"] = ctx
        if derive_pos and (cfg.position_offset, cfg.position_step) != (0, 1):
            meta["position_offset"], meta["position_step"] = cfg.position_offset, cfg.position_step
    if fmt in ("saelens", "activault", "llamascopium"):
        meta["hook_name"] = report.column  # the hook column; for the tensor caches, the hook's folder name
    if (cfg.position_offset, cfg.position_step) != (0, 1) and not derive_pos:
        raise ValueError(f"{src}: position_offset/position_step apply to [records, context, d_model] input without a "
                         "position column (a SAELens cache); this input has none to shift")
    positions = cfg.position_offset + cfg.position_step * np.arange(ctx, dtype=np.int64)
    if derive_pos and positions[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"position_offset={cfg.position_offset}, position_step={cfg.position_step}: positions up to "
                         f"{positions[-1]} do not fit the int32 position column")
    positions = positions.astype(np.int32)
    with ShardWriter(dst, d_model=schema.d_model, dtype=dtype, columns=columns, chunk_bytes=cfg.chunk_bytes,
                     shard_bytes=cfg.shard_bytes, level=cfg.level, metadata=meta,
                     allow_nonfinite=cfg.allow_nonfinite, overwrite=cfg.overwrite) as w:
        piece: Piece | None = first
        while piece is not None:
            n = piece.acts.shape[0]
            cols = piece.columns
            if derive_pos:
                cols = {**cols, "position": np.tile(positions, n // ctx)}
            w.write(to_dtype(piece.acts, report.source_dtype, dtype), **cols)
            report.rows += n
            if progress is not None:
                progress(n, piece.acts.nbytes)
            piece = next(pieces, None)
    return report


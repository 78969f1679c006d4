"""CLI commands that move activations between this tool and others: import and export (docs/interop.md)."""

from __future__ import annotations

import click

from shuffler.cli.options import option, options
from shuffler.interop.exporter import COMPRESSIONS, EXPORT_FORMATS, ExportConfig
from shuffler.interop.sources import FORMATS
from shuffler.progress import Progress, human_bytes
from writers.importers import DTYPES, ImportConfig


def _pairs(values: tuple[str, ...], *, option: str) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{v!r} must be NAME=PATH, e.g. token_id=tokens.npy", param_hint=option)
        out.append((name, path))
    return tuple(out)


@click.command("import")
@click.argument("src")
@click.argument("dst")
@option(ImportConfig, "format", "--format", "fmt", choices=FORMATS,
        extra="A SAELens cache is a folder with state.json.")
@option(ImportConfig, "column")
@option(ImportConfig, "dtype", choices=DTYPES, extra="Narrowing rounds to nearest, ties to even.")
@option(ImportConfig, "source_dtype", choices=DTYPES + ("float64",))
@option(ImportConfig, "companions", "--companion", "companions", multiple=True, metavar="NAME=PATH", show_default=False,
        extra="On the command line: NAME=PATH, a path or URL; repeatable.")
@option(ImportConfig, "drop_columns", "--drop-column", "drop", multiple=True, metavar="NAME", show_default=False,
        extra="Repeatable.")
@options(ImportConfig, "position_offset", "position_step")
@options(ImportConfig, "batch_bytes", "chunk_bytes", "shard_bytes", "level", "allow_nonfinite")
@option(ImportConfig, "overwrite", extra="Its shards are overwritten as rows arrive, so a failed import loses it.")
def import_cmd(src, dst, fmt, column, dtype, source_dtype, companions, drop, position_offset, position_step,
               batch_bytes, chunk_bytes, shard_bytes, level, allow_nonfinite, overwrite):
    """Import activations cached by another tool from SRC into a dataset at DST.

    SRC and DST are local paths or URLs (s3://bucket/prefix, memory://, any fsspec protocol). Remote
    sources are streamed like local ones: Parquet page by page, Arrow IPC one record batch at a time,
    .npy by ranged reads of --batch-bytes.

    \b
    SRC may be:
      a SAELens activation cache   a datasets folder (state.json, data-*.arrow): one row per context,
                                   the hook column [context, d_in] plus token_ids; each context becomes
                                   context rows, with position = index inside the context
      Parquet or Arrow IPC         a file or a folder of files; the activations are a fixed-size-list,
                                   list (one width) or fixed-size-binary column, the numeric columns
                                   become provenance columns (token_ids -> token_id)
      .npy                         [rows, d_model] or [records, context, d_model], memory-mapped;
                                   --companion NAME=PATH (a path or URL) adds provenance columns
      an Activault hook folder     *.saved.pt megabatches (torch.load(weights_only=True)): every token
      a Llamascopium hook folder   chunk-N.safetensors: the tokens whose mask is set

    Rows keep their order. Input is read --batch-bytes at a time. On any error (a ragged list, a wrong
    width, a non-numeric column) nothing is left at DST.

    \b
    Examples:
      shuffler import ./saelens_cache data/raw --dtype bfloat16
      shuffler import acts.parquet data/raw --column acts
      shuffler import s3://bucket/saelens_cache s3://bucket/raw
      shuffler import acts.npy data/raw --companion token_id=tokens.npy --companion doc_id=docs.npy
    """
    from writers.importers import import_activations

    cfg = ImportConfig(format=fmt, column=column, dtype=dtype, source_dtype=source_dtype,
                       companions=_pairs(companions, option="--companion"), drop_columns=tuple(drop),
                       position_offset=position_offset, position_step=position_step,
                       batch_bytes=batch_bytes, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes, level=level,
                       allow_nonfinite=allow_nonfinite, overwrite=overwrite)
    with Progress("import") as bar:
        r = import_activations(src, dst, cfg, progress=bar.update)
    conv = f" (converted from {r.source_dtype})" if r.source_dtype != r.dtype else ""
    click.echo(f"imported {r.rows:,} rows x {r.d_model} {r.dtype}{conv} from {src} ({r.format}, column "
               f"{r.column!r}) to {dst}")
    click.echo(f"columns: {', '.join(r.columns) or '(none)'}"
               + (f"; derived: {', '.join(r.derived)}" if r.derived else "")
               + (f"; skipped: {', '.join(r.skipped)}" if r.skipped else ""))


@click.command("export")
@click.argument("src")
@click.argument("dst")
@option(ExportConfig, "format", "--format", "fmt", choices=EXPORT_FORMATS,
        extra="Default: from DST's suffix (.arrow/.feather, .parquet).")
@option(ExportConfig, "column", extra="arrow and parquet: default acts.")
@option(ExportConfig, "compression", choices=COMPRESSIONS)
@options(ExportConfig, "context_size", "drop_remainder", "row_group_bytes", "file_bytes", "overwrite", "field")
def export_cmd(src, dst, fmt, column, compression, context_size, drop_remainder, row_group_bytes, file_bytes,
               overwrite, field):
    """Export the dataset at SRC to DST as Arrow IPC, Parquet, or a SAELens activation cache.

    \b
    arrow / parquet   one file (any URL): column acts is fixed_size_list<float>[d_model] (bfloat16 as
                      uint16 with shuffler.dtype=bfloat16 in the field metadata) beside the provenance
                      columns, so DuckDB or Polars query it in place
    saelens           a local datasets folder that SAELens trains from (use_cached_activations=True,
                      cached_activations_path=DST, hook_name=--column, context_size=--context-size);
                      bfloat16 is widened exactly to float32 (datasets has no bfloat16)

    Rows keep the dataset's order (globally shuffled, if SRC is a shuffle's output). DST appears only
    when complete. A dataset of several activation fields is exported one field at a time: --field NAME
    (refused without it, naming the fields).

    \b
    Examples:
      shuffler export data/shuffled shuffled.parquet
      shuffler export data/shuffled ./sae_cache --format saelens --column blocks.8.hook_resid_pre --context-size 128
    """
    from shuffler.interop.exporter import export_dataset

    if fmt is None:
        low = dst.lower().rstrip("/")
        fmt = next((f for s, f in ((".parquet", "parquet"), (".pq", "parquet"), (".arrow", "arrow"),
                                   (".feather", "arrow"), (".ipc", "arrow")) if low.endswith(s)), None)
        if fmt is None:
            raise click.UsageError(f"cannot tell the format from {dst!r}; pass --format arrow, parquet or saelens")
    cfg = ExportConfig(format=fmt, column=column, compression=compression, context_size=context_size,
                       drop_remainder=drop_remainder, row_group_bytes=row_group_bytes, file_bytes=file_bytes,
                       overwrite=overwrite, field=field)
    from shuffler.io.dataset import Dataset

    with Progress("export", Dataset.open(src).num_rows) as bar:
        r = export_dataset(src, dst, cfg, progress=bar.update)
    extra = ""
    if fmt == "saelens":
        extra = f" ({r.rows // r.context_size:,} contexts of {r.context_size}, hook {r.column!r}"
        extra += f", {r.dropped_rows} rows dropped)" if r.dropped_rows else ")"
    click.echo(f"exported {r.rows:,} rows from {src} to {dst} as {fmt}{extra} in {len(r.files)} file(s)"
               + (f", {human_bytes(bar.bytes)} of activations" if bar.bytes else ""))

"""CLI commands that move activations between this tool and others: import and export (docs/interop.md)."""

from __future__ import annotations

import click

from shuffler.cli import SIZE
from shuffler.progress import Progress, human_bytes


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
@click.option("--format", "fmt", type=click.Choice(["auto", "saelens", "parquet", "arrow", "npy"]), default="auto",
              show_default=True, help="Input format; auto looks at the folder (state.json), the suffix, then magic bytes.")
@click.option("--column", default=None, help="Activation column (SAELens: the hook name). Default: the only one.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Stored dtype. Default: keep the input's. Narrowing rounds to nearest, ties to even.")
@click.option("--source-dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]), default=None,
              help="Element type where the input cannot say (fixed-size binary; bfloat16 bits as uint16).")
@click.option("--companion", "companions", multiple=True, metavar="NAME=PATH",
              help=".npy input: a .npy (path or URL) with one value per row, stored as column NAME (repeatable).")
@click.option("--drop-column", "drop", multiple=True, metavar="NAME", help="Leave an input column out (repeatable).")
@click.option("--batch-bytes", type=SIZE, default="16MiB", show_default=True,
              help="Activation bytes read per step: bounds memory whatever the input size.")
@click.option("--chunk-bytes", type=SIZE, default="8MiB", show_default=True, help="Uncompressed bytes per chunk.")
@click.option("--shard-bytes", type=SIZE, default="256MiB", show_default=True, help="Uncompressed bytes per shard.")
@click.option("--level", type=int, default=1, show_default=True, help="zstd level of the stored chunks.")
@click.option("--allow-nonfinite", is_flag=True, help="Store NaN/inf values instead of refusing them.")
@click.option("--overwrite", is_flag=True,
              help="Replace a dataset already at DST; its shards are overwritten as rows arrive, so a failed import loses it.")
def import_cmd(src, dst, fmt, column, dtype, source_dtype, companions, drop, batch_bytes, chunk_bytes, shard_bytes,
               level, allow_nonfinite, overwrite):
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

    Rows keep their order. Input is read --batch-bytes at a time. On any error (a ragged list, a wrong
    width, a non-numeric column) nothing is left at DST.

    \b
    Examples:
      shuffler import ./saelens_cache data/raw --dtype bfloat16
      shuffler import acts.parquet data/raw --column acts
      shuffler import s3://bucket/saelens_cache s3://bucket/raw
      shuffler import acts.npy data/raw --companion token_id=tokens.npy --companion doc_id=docs.npy
    """
    from writers.importers import ImportConfig, import_activations

    cfg = ImportConfig(format=fmt, column=column, dtype=dtype, source_dtype=source_dtype,
                       companions=_pairs(companions, option="--companion"), drop_columns=tuple(drop),
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
@click.option("--format", "fmt", type=click.Choice(["arrow", "parquet", "saelens"]), default=None,
              help="Output format. Default: from DST's suffix (.arrow/.feather, .parquet).")
@click.option("--column", default=None,
              help="Activation column name (default acts); saelens: the hook name SAELens is configured with.")
@click.option("--compression", type=click.Choice(["none", "zstd", "lz4", "snappy"]), default=None,
              help="Default: zstd for parquet, none for arrow (readers then memory-map it without a copy).")
@click.option("--context-size", type=int, default=None,
              help="saelens: rows per context. Default: the dataset's (if imported from SAELens), else 128.")
@click.option("--drop-remainder", is_flag=True, help="saelens: leave out the last rows that do not fill a context.")
@click.option("--row-group-bytes", type=SIZE, default="64MiB", show_default=True,
              help="parquet: uncompressed bytes per row group.")
@click.option("--file-bytes", type=SIZE, default="500MB", show_default=True,
              help="saelens: uncompressed bytes per data-*.arrow file.")
@click.option("--overwrite", is_flag=True, help="Replace what is at DST.")
def export_cmd(src, dst, fmt, column, compression, context_size, drop_remainder, row_group_bytes, file_bytes,
               overwrite):
    """Export the dataset at SRC to DST as Arrow IPC, Parquet, or a SAELens activation cache.

    \b
    arrow / parquet   one file (any URL): column acts is fixed_size_list<float>[d_model] (bfloat16 as
                      uint16 with shuffler.dtype=bfloat16 in the field metadata) beside the provenance
                      columns, so DuckDB or Polars query it in place
    saelens           a local datasets folder that SAELens trains from (use_cached_activations=True,
                      cached_activations_path=DST, hook_name=--column, context_size=--context-size);
                      bfloat16 is widened exactly to float32 (datasets has no bfloat16)

    Rows keep the dataset's order (globally shuffled, if SRC is a shuffle's output). DST appears only
    when complete.

    \b
    Examples:
      shuffler export data/shuffled shuffled.parquet
      shuffler export data/shuffled ./sae_cache --format saelens --column blocks.8.hook_resid_pre --context-size 128
    """
    from shuffler.interop.exporter import ExportConfig, export_dataset

    if fmt is None:
        low = dst.lower().rstrip("/")
        fmt = next((f for s, f in ((".parquet", "parquet"), (".pq", "parquet"), (".arrow", "arrow"),
                                   (".feather", "arrow"), (".ipc", "arrow")) if low.endswith(s)), None)
        if fmt is None:
            raise click.UsageError(f"cannot tell the format from {dst!r}; pass --format arrow, parquet or saelens")
    cfg = ExportConfig(format=fmt, column=column, compression=compression, context_size=context_size,
                       drop_remainder=drop_remainder, row_group_bytes=row_group_bytes, file_bytes=file_bytes,
                       overwrite=overwrite)
    from shuffler.io.dataset import Dataset

    with Progress("export", Dataset.open(src).num_rows) as bar:
        r = export_dataset(src, dst, cfg, progress=bar.update)
    extra = ""
    if fmt == "saelens":
        extra = f" ({r.rows // r.context_size:,} contexts of {r.context_size}, hook {r.column!r}"
        extra += f", {r.dropped_rows} rows dropped)" if r.dropped_rows else ")"
    click.echo(f"exported {r.rows:,} rows from {src} to {dst} as {fmt}{extra} in {len(r.files)} file(s)"
               + (f", {human_bytes(bar.bytes)} of activations" if bar.bytes else ""))

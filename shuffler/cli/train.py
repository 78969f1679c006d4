"""`shuffler train`: train a TopK SAE on a dataset, on one process or under torchrun."""

from __future__ import annotations

import json

import click


@click.command("train", short_help="Train a TopK SAE on the activations at URL (CPU, GPU, torchrun).")
@click.argument("url")
@click.option("--latents", type=int, required=True, help="SAE latents (dictionary size, SAELens's d_sae).")
@click.option("--k", "k", type=int, required=True, help="Active latents per token (TopK's k).")
@click.option("--batch-size", type=int, default=4096, show_default=True,
              help="Tokens per optimizer step, summed over data-parallel ranks.")
@click.option("--tokens", type=float, required=True, help="Training tokens in total (1e9 is accepted).")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Run folder (local): log.jsonl, checkpoints, latest.json.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Default: cuda if torch sees a GPU, else cpu. Under torchrun each rank takes GPU LOCAL_RANK.")
@click.option("--resume", is_flag=True, help="Continue exactly from OUT's latest checkpoint (same options).")
@click.option("--overwrite", is_flag=True, help="Start again in an OUT that already holds a run (removes it).")
@click.option("--export-saelens", type=click.Path(file_okay=False), default=None,
              help="At the end, write cfg.json + sae_weights.safetensors here in SAELens's layout.")
@click.option("--lr", type=float, default=None, help="Adam learning rate [default: 2e-4 / sqrt(latents / 2^14)].")
@click.option("--lr-warmup-steps", type=int, default=0, show_default=True, help="Linear warm-up steps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Weight init and reader order.")
@click.option("--k-aux", type=int, default=0, help="Dead latents in the AuxK loss [default: d_in / 2].")
@click.option("--auxk-coef", type=float, default=1 / 32, show_default=True, help="AuxK loss weight (Gao et al.).")
@click.option("--dead-tokens", type=float, default=10_000_000, show_default=True,
              help="A latent is dead after this many tokens without firing.")
@click.option("--b-dec-init", type=click.Choice(["geometric_median", "mean", "zero"]), default="geometric_median",
              show_default=True, help="Initial pre-encoder bias.")
@click.option("--latent-shards", type=int, default=1, show_default=True,
              help="Split the latents over this many ranks (torchrun world must be a multiple).")
@click.option("--autocast/--no-autocast", default=None, help="bfloat16 autocast [default: on for cuda].")
@click.option("--log-every", type=int, default=100, show_default=True, help="Steps per log.jsonl record.")
@click.option("--checkpoint-every", type=int, default=1000, show_default=True,
              help="Steps between checkpoints (0: only at the end).")
@click.option("--prefetch", type=int, default=None, help="Reader batches decoded ahead [reader default].")
@click.option("--threads", type=int, default=None, help="Reader I/O + decode threads [reader default].")
def train_cmd(url, latents, k, batch_size, tokens, out, device, resume, overwrite, export_saelens, lr, lr_warmup_steps, seed,
              k_aux, auxk_coef, dead_tokens, b_dec_init, latent_shards, autocast, log_every, checkpoint_every,
              prefetch, threads):
    """Train a TopK sparse autoencoder (Gao et al. 2024) on the activations at URL.

    Streams URL with the reader (shuffled order per --seed, prefetch threads), trains with Adam,
    logs MSE, FVU, L0, dead fraction, tokens/s and the reader-wait fraction to OUT/log.jsonl, and
    checkpoints SAE + optimizer + reader position so --resume continues exactly.

    \b
    Examples:
      shuffler train data/shuffled --latents 24576 --k 32 --batch-size 4096 --tokens 1e8 --out runs/sae
      shuffler train data/shuffled --latents 24576 --k 32 --tokens 1e8 --out runs/sae --resume
      torchrun --nproc-per-node 8 -m shuffler train s3://b/acts --latents 262144 --k 32 \\
          --batch-size 131072 --tokens 1e9 --latent-shards 2 --out runs/big --export-saelens runs/big/sae
    """
    from trainer.config import TrainConfig
    from trainer.train import train

    def whole(name, v):
        if v != int(v) or v < 0:
            raise click.BadParameter(f"{v!r} must be a whole number of tokens", param_hint=name)
        return int(v)

    cfg = TrainConfig(
        n_latents=latents, k=k, batch_size=batch_size, tokens=whole("--tokens", tokens), lr=lr,
        lr_warmup_steps=lr_warmup_steps, seed=seed, k_aux=k_aux, auxk_coef=auxk_coef,
        dead_tokens=whole("--dead-tokens", dead_tokens), b_dec_init=b_dec_init, latent_shards=latent_shards,
        autocast=autocast, log_every=log_every, checkpoint_every=checkpoint_every, reader_prefetch=prefetch,
        reader_threads=threads,
    )
    if resume and overwrite:
        raise click.BadParameter("--resume continues a run and --overwrite removes it; pass one",
                                 param_hint="--resume/--overwrite")
    result = train(url, out, cfg, device=device, resume=resume, overwrite=overwrite, export_saelens=export_saelens)
    if not result.last and _is_main():
        click.echo(f"nothing to train: {out} is already at step {result.steps} of {cfg.steps}")
    if result.last and _is_main():
        keys = ("step", "tokens", "fvu", "mse", "l0", "dead_fraction", "tokens_per_s", "reader_wait_total")
        click.echo(json.dumps({k: result.last[k] for k in keys}))
        if export_saelens:
            click.echo(f"exported SAELens layout to {export_saelens}")


def _is_main() -> bool:
    from shuffler import env

    return env.torchrun_rank_world()[0] == 0

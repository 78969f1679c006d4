"""`shuffler train`: train a TopK SAE (or a TopK transcoder between two fields) on a dataset, on one process
or under torchrun."""

from __future__ import annotations

import json

import click


# The options that stand for TrainConfig fields are written out here, not derived with shuffler/cli/options.py:
# deriving them would import trainer (and so torch, seconds) to load this command, even for --help.
# tests/test_cli_options.py checks that each one's default and help equal the field's.
@click.command("train", short_help="Train a TopK SAE or transcoder on the activations at URL (CPU, GPU, torchrun).")
@click.argument("url")
@click.option("--input", "input_field", default=None,
              help="Activation field the encoder reads; unset means the dataset's first field.")
@click.option("--target", default=None,
              help="Activation field the decoder predicts, the one FVU is measured on; unset means the input (an "
              "SAE); another field trains a TopK transcoder from input to target.")
@click.option("--latents", type=int, required=True, help="Number of SAE latents (dictionary size, SAELens's d_sae).")
@click.option("--k", "k", type=int, required=True, help="Active latents per token (the TopK's k).")
@click.option("--batch-size", type=int, default=4096, show_default=True,
              help="Tokens per optimizer step, summed over data-parallel replicas (OpenAI's bs; 4096 in SAELens).")
@click.option("--tokens", type=float, required=True,
              help="Training tokens in total; the run takes tokens // batch_size steps. 1e9 is accepted.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Run folder (local): log.jsonl, checkpoints, latest.json.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Default: cuda if torch sees a GPU, else cpu. Under torchrun each rank takes GPU LOCAL_RANK.")
@click.option("--resume", is_flag=True, help="Continue exactly from OUT's latest checkpoint (same options).")
@click.option("--overwrite", is_flag=True, help="Start again in an OUT that already holds a run (removes it).")
@click.option("--export-saelens", type=click.Path(file_okay=False), default=None,
              help="At the end, write cfg.json + sae_weights.safetensors here in SAELens's layout.")
@click.option("--lr", type=float, default=None,
              help="Adam learning rate; unset means 2e-4 / sqrt(n_latents / 2**14) (Gao et al. 2024 scaling law, as in "
              "sparsify and dictionary_learning).")
@click.option("--lr-warmup-steps", type=int, default=0, show_default=True,
              help="Linear learning-rate warm-up over this many steps (sparsify uses 1000; 0 disables).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the weight init (counter-based, so each latent's init is the same however latents are "
              "sharded) and the reader's shuffle of shard order.")
@click.option("--k-aux", type=int, default=0, show_default=True,
              help="Dead latents used by the AuxK loss; 0 means d_in // 2 (Gao et al. appendix B.1, as in sparsify "
              "and SAELens).")
@click.option("--auxk-coef", type=float, default=1 / 32, show_default=True,
              help="Weight of the AuxK dead-latent loss (Gao et al. 2024 section A.2: alpha = 1/32).")
@click.option("--dead-tokens", type=float, default=10_000_000, show_default=True,
              help="A latent is dead when it has not fired in this many tokens (10M: OpenAI, sparsify, "
              "dictionary_learning).")
@click.option("--b-dec-init", type=click.Choice(["geometric_median", "mean", "zero"]), default="geometric_median",
              show_default=True, help='Pre-encoder bias init: "geometric_median" (Gao et al.; OpenAI), "mean" '
              '(sparsify) or "zero" (SAELens).')
@click.option("--latent-shards", type=int, default=1, show_default=True,
              help="Ranks that split each SAE's latents between them; the world size must be a multiple. The other "
              "factor is data parallelism (OpenAI's n_op_shards x n_replicas).")
@click.option("--autocast/--no-autocast", default=None,
              help="bfloat16 autocast for the encoder matmul; unset means on for CUDA, off for CPU.")
@click.option("--log-every", type=int, default=100, show_default=True,
              help="Steps between JSON-lines log records (metrics are averaged over those steps).")
@click.option("--checkpoint-every", type=int, default=1000, show_default=True,
              help="Steps between checkpoints; 0 writes one only at the end.")
@click.option("--prefetch", type=int, default=None, help="Batches the reader decodes ahead; unset keeps the reader's "
              "default.")
@click.option("--threads", type=int, default=None, help="Reader I/O and decode threads; unset keeps the reader's "
              "default.")
def train_cmd(url, input_field, target, latents, k, batch_size, tokens, out, device, resume, overwrite, export_saelens, lr, lr_warmup_steps, seed,
              k_aux, auxk_coef, dead_tokens, b_dec_init, latent_shards, autocast, log_every, checkpoint_every,
              prefetch, threads):
    """Train a TopK sparse autoencoder (Gao et al. 2024) on the activations at URL, or with --target a TopK
    transcoder that reads the --input field and predicts the --target field of the same tokens.

    Streams URL with the reader (shuffled order per --seed, prefetch threads), trains with Adam,
    logs MSE, FVU, L0, dead fraction, tokens/s and the reader-wait fraction to OUT/log.jsonl, and
    checkpoints SAE + optimizer + reader position so --resume continues exactly.

    \b
    Examples:
      shuffler train data/shuffled --latents 24576 --k 32 --batch-size 4096 --tokens 1e8 --out runs/sae
      shuffler train data/shuffled --latents 24576 --k 32 --tokens 1e8 --out runs/sae --resume
      torchrun --nproc-per-node 8 -m shuffler train s3://b/acts --latents 262144 --k 32 \\
          --batch-size 131072 --tokens 1e9 --latent-shards 2 --out runs/big --export-saelens runs/big/sae
      shuffler train data/two-layers --input layer.2 --target layer.4 --latents 4096 --k 32 \
          --tokens 1e8 --out runs/tc --export-saelens runs/tc/saelens
    """
    from trainer.config import TrainConfig
    from trainer.train import train

    def whole(name, v):
        if v != int(v) or v < 0:
            raise click.BadParameter(f"{v!r} must be a whole number of tokens", param_hint=name)
        return int(v)

    cfg = TrainConfig(
        n_latents=latents, k=k, batch_size=batch_size, tokens=whole("--tokens", tokens), input=input_field,
        target=target, lr=lr,
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

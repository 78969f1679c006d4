"""TrainConfig: every knob of a TopK SAE training run, with its default and the source of that default.

Defaults follow Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv:2406.04093) and the
reference trainers that implement it (openai/sparse_autoencoder, EleutherAI/sparsify, saprmarks/
dictionary_learning); docs/trainer.md compares the defaults with theirs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

B_DEC_INITS = ("geometric_median", "mean", "zero")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What to train and how. Sizes count tokens (activation rows), summed over all data-parallel ranks."""

    n_latents: int
    """Number of SAE latents (dictionary size, SAELens's d_sae)."""
    k: int
    """Active latents per token (the TopK's k)."""
    batch_size: int
    """Tokens per optimizer step, summed over data-parallel replicas (OpenAI's bs; 4096 in SAELens)."""
    tokens: int
    """Training tokens in total; the run takes tokens // batch_size steps."""
    input: str | None = None
    """Activation field the encoder reads; None means the dataset's first field."""
    target: str | None = None
    """Activation field the decoder predicts, the one FVU is measured on; None means the input (an SAE); another
    field trains a TopK transcoder from input to target."""
    lr: float | None = None
    """Adam learning rate; None means 2e-4 / sqrt(n_latents / 2**14) (Gao et al. 2024 scaling law, as in
    sparsify and dictionary_learning)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam (beta1, beta2); torch's defaults, used by every peer."""
    adam_eps: float = 6.25e-10
    """Adam epsilon; 6.25e-10 as in openai/sparse_autoencoder train.py (small, since gradients are small)."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up over this many steps (sparsify uses 1000; 0 disables)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK dead-latent loss (Gao et al. 2024 section A.2: alpha = 1/32)."""
    k_aux: int = 0
    """Dead latents used by the AuxK loss; 0 means d_in // 2 (Gao et al. appendix B.1, as in sparsify and SAELens)."""
    dead_tokens: int = 10_000_000
    """A latent is dead when it has not fired in this many tokens (10M: OpenAI, sparsify, dictionary_learning)."""
    b_dec_init: str = "geometric_median"
    """Pre-encoder bias init: "geometric_median" (Gao et al.; OpenAI), "mean" (sparsify) or "zero" (SAELens)."""
    init_tokens: int = 32_768
    """Tokens sampled to initialise b_dec (OpenAI uses 32,768)."""
    seed: int = 0
    """Seeds the weight init (counter-based, so each latent's init is the same however latents are sharded)
    and the reader's shuffle of shard order."""
    latent_shards: int = 1
    """Ranks that split each SAE's latents between them; the world size must be a multiple. The other factor
    is data parallelism (OpenAI's n_op_shards x n_replicas)."""
    autocast: bool | None = None
    """bfloat16 autocast for the encoder matmul; None means on for CUDA, off for CPU."""
    log_every: int = 100
    """Steps between JSON-lines log records (metrics are averaged over those steps)."""
    checkpoint_every: int = 1000
    """Steps between checkpoints; 0 writes one only at the end."""
    reader_prefetch: int | None = None
    """Batches the reader decodes ahead; None keeps the reader's default."""
    reader_threads: int | None = None
    """Reader I/O and decode threads; None keeps the reader's default."""

    def __post_init__(self) -> None:
        for name in ("n_latents", "k", "batch_size", "tokens", "latent_shards", "log_every", "init_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("lr_warmup_steps", "k_aux", "dead_tokens", "checkpoint_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative integer")
        if self.k > self.n_latents:
            raise ValueError(f"k={self.k} must be <= n_latents={self.n_latents}: TopK keeps k of the latents")
        if self.tokens < self.batch_size:
            raise ValueError(f"tokens={self.tokens} is less than one batch (batch_size={self.batch_size})")
        if self.n_latents % self.latent_shards:
            raise ValueError(
                f"n_latents={self.n_latents} must be divisible by latent_shards={self.latent_shards} "
                "(every shard holds the same number of latents)"
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} must be a positive finite number (or None for the default)")
        b1, b2 = self.adam_betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"adam_betas={self.adam_betas!r} must both lie in [0, 1)")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps={self.adam_eps!r} must be > 0")
        if not (math.isfinite(self.auxk_coef) and self.auxk_coef >= 0):
            raise ValueError(f"auxk_coef={self.auxk_coef!r} must be >= 0")
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"b_dec_init={self.b_dec_init!r}; expected one of {B_DEC_INITS}")
        for name in ("input", "target"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name}={v!r} must be a field name (a non-empty string) or None")
        for name in ("reader_prefetch", "reader_threads"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r} must be a positive integer or None")

    @property
    def learning_rate(self) -> float:
        """lr, or Gao et al.'s default 2e-4 / sqrt(n_latents / 2**14)."""
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def resolved_k_aux(self, d_out: int) -> int:
        """k_aux, or d_out // 2 (d_in for an SAE: the width of what the decoder predicts), never more than the
        latents there are."""
        return min(self.k_aux or max(d_out // 2, 1), self.n_latents)

    def to_json(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)

    def differs_from(self, other: TrainConfig, *, ignore: tuple[str, ...] = ()) -> list[str]:
        """Names of fields whose values differ (to refuse resuming a checkpoint under a changed config)."""
        return [f.name for f in fields(self) if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)]

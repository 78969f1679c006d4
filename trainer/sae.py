"""The TopK sparse autoencoder of Gao et al. 2024 ("Scaling and evaluating sparse autoencoders").

    pre   = (x - b_dec) @ W_enc + b_enc          [B, n_latents]
    z     = ReLU(TopK_k(pre))                    k non-zeros per row
    x_hat = z @ W_dec + b_dec                    [B, d_in]

W_dec has unit-norm rows, kept so by removing the gradient component parallel to each row before the
optimizer step and renormalising after it (Gao et al. section 2.1; openai/sparse_autoencoder
`unit_norm_decoder_grad_adjustment_`). W_enc starts as W_dec's transpose; b_dec starts at the geometric median
of a sample of activations. Dead latents are revived by the AuxK loss: the k_aux dead latents with the largest
pre-activations reconstruct the residual x - x_hat (coefficient 1/32).

The same module is a TopK transcoder when `d_out` is given (Dunefsky et al. 2024, "Transcoders find
interpretable LLM feature circuits", arXiv:2406.11944): the encoder reads one activation x [B, d_in], the
decoder predicts another, y [B, d_out], and the loss is measured on y. An SAE is the transcoder whose input is
its target, so both share every code path here; the transcoder differs only where the two spaces differ:

    pre   = x @ W_enc + b_enc                    no b_dec on the input (it lives in the target's space;
    z     = ReLU(TopK_k(pre))                    SAELens's Transcoder refuses apply_b_dec_to_input too,
    y_hat = z @ W_dec + b_dec                    sae_lens/saes/transcoder.py)

W_enc then starts from its own random unit directions rather than W_dec's transpose, the input is centred
at init by folding its geometric median (or mean) into b_enc, and each decoder row starts at the mean target
of the sample rows its latent fires on (init_b_dec, init_decoder).

The same module is one shard of a latent-sharded SAE when `latent_group` is set: it then holds latents
[lo, lo + n_local) (columns of W_enc, rows of W_dec), the global top-k is chosen from each shard's local top-k
candidates, and the decoder's partial sums are added across shards (trainer/distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shuffler.keys import normals, splitmix64
from trainer import distributed as D

INIT_BLOCK_ROWS = 4096  # latents initialised per numpy step: bounded memory for any n_latents


def init_directions(seed: int, lo: int, hi: int, d_in: int, *, stream: int = 0) -> np.ndarray:
    """Unit-norm random directions for latents [lo, hi): [hi - lo, d_in] float32; `stream` 1 draws a second,
    independent set from the same seed (a transcoder's encoder).

    Counter-based (splitmix64 of (seed, latent, dim)) then Box-Muller, so latent i gets the same direction
    whether the SAE is whole or split into any number of shards, and no rank builds the full matrix.
    """
    out = np.empty((hi - lo, d_in), dtype=np.float32)
    key = int(splitmix64(np.array([seed + 0x5AE0_0000 + (stream << 40)], dtype=np.uint64))[0])
    cols = np.arange(d_in, dtype=np.uint64)
    for a in range(lo, hi, INIT_BLOCK_ROWS):
        b = min(a + INIT_BLOCK_ROWS, hi)
        g = normals(key, np.arange(a, b, dtype=np.uint64)[:, None] * np.uint64(d_in) + cols)  # [rows, d_in]
        out[a - lo : b - lo] = g / np.linalg.norm(g, axis=1, keepdims=True)
    return out


def geometric_median(x: torch.Tensor, *, iters: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm on [N, d] rows, in float64: the point minimising the sum of distances.

    100 iterations and tolerance 1e-5 as in dictionary_learning's TopK trainer; OpenAI's trainer uses the
    geom_median package on 32,768 samples to the same end.
    """
    x = x.to(torch.float64)
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)  # [N]
        y_new = (w[:, None] * x).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * max(float(y.norm()), 1e-12)
        y = y_new
        if done:
            break
    return y


@dataclass
class SAEOutput:
    """One forward pass. acts/idx are this shard's (local latent indices; zeros where a local candidate lost
    the global top-k); `active` counts the non-zero latents of the whole batch, over all shards."""

    recon: torch.Tensor  # [B, d_out]
    acts: torch.Tensor  # [B, kk]
    idx: torch.Tensor  # [B, kk] int64, local latent ids
    active: torch.Tensor  # [] int64
    aux_recon: torch.Tensor | None = None  # [B, d_out], no b_dec: the dead latents' estimate of the residual


class TopKSAE(nn.Module):
    """A TopK SAE, or a TopK transcoder when `d_out` is given (or one latent shard of either). Parameters use
    SAELens's names and layout: W_enc [d_in, n_local], b_enc [n_local], W_dec [n_local, d_out], b_dec [d_out]
    (d_out = d_in for an SAE)."""

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        *,
        d_out: int | None = None,
        k_aux: int = 0,
        seed: int = 0,
        shard: int = 0,
        n_shards: int = 1,
        latent_group=None,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if not 1 <= k <= n_latents:
            raise ValueError(f"k={k} must be between 1 and n_latents={n_latents}")
        if d_in < 1 or (d_out is not None and d_out < 1):
            raise ValueError(f"d_in={d_in}, d_out={d_out} must be >= 1")
        if n_latents % n_shards or not 0 <= shard < n_shards:
            raise ValueError(f"shard {shard} of {n_shards}: n_latents={n_latents} must split evenly")
        if n_shards > 1 and latent_group is None:
            raise ValueError(f"n_shards={n_shards} needs a latent_group (a torch.distributed process group)")
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.transcoder = d_out is not None
        self.d_out = d_in if d_out is None else d_out
        self.k_aux = min(k_aux or max(self.d_out // 2, 1), n_latents)
        self.shard, self.n_shards, self.latent_group = shard, n_shards, latent_group
        self.n_local = n_latents // n_shards
        self.lo = shard * self.n_local
        hi = self.lo + self.n_local
        w = torch.from_numpy(init_directions(seed, self.lo, hi, self.d_out)).to(device)
        self.W_dec = nn.Parameter(w)  # [n_local, d_out], unit rows
        if self.transcoder:  # input and target are different spaces: no tied init
            w = torch.from_numpy(init_directions(seed, self.lo, hi, d_in, stream=1)).to(device)
        self.W_enc = nn.Parameter(w.T.contiguous())  # [d_in, n_local], tied init (Gao et al. 2024 section 2.1)
        self.b_enc = nn.Parameter(torch.zeros(self.n_local, device=device))  # [n_local]
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, device=device))  # [d_out]

    @property
    def sharded(self) -> bool:
        return self.latent_group is not None

    # -- the forward pass --------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] -> pre-activations of this shard's latents [B, n_local].

        addmm, not `@` then `+`: under autocast the whole affine map runs in bfloat16, where `+ b_enc` would
        promote the [B, n_local] result back to float32.
        """
        xc = x if self.transcoder else x - self.b_dec
        if self.sharded and not self.transcoder:
            xc = D.copy_to_shards(xc, self.latent_group)  # each shard's encoder grad on b_dec is summed
        return torch.addmm(self.b_enc, xc, self.W_enc)

    def select(self, pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ReLU(TopK_k): (acts [B, kk], local idx [B, kk], number of non-zero acts over all shards)."""
        if self.sharded:
            return D.sharded_topk(pre, k, self.latent_group)
        vals, idx = pre.topk(k, dim=1, sorted=False)
        acts = F.relu(vals)
        return acts, idx, (acts > 0).sum()

    def decode(self, acts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """sum_j acts[:, j] * W_dec[idx[:, j]] over all shards, without b_dec: [B, d_out].

        embedding_bag gathers only the k chosen rows (Gao et al. use a sparse decoder kernel for the same
        reason): B*k*d_in work instead of the dense B*n_latents*d_in matmul.
        """
        out = F.embedding_bag(idx, self.W_dec, per_sample_weights=acts.to(self.W_dec.dtype), mode="sum")
        return D.sum_over_shards(out, self.latent_group) if self.sharded else out

    def forward(self, x: torch.Tensor, *, dead: torch.Tensor | None = None) -> SAEOutput:
        """x [B, d_in] -> an estimate of the target [B, d_out] (x itself for an SAE); `dead` [n_local] bool
        marks dead latents and turns on the AuxK branch."""
        pre = self.pre_acts(x)
        acts, idx, active = self.select(pre, self.k)
        recon = self.decode(acts, idx) + self.b_dec
        aux = None
        if dead is not None:
            # Living latents get -inf so they are never chosen; ReLU(-inf) = 0 keeps them out of the sum.
            aacts, aidx, _ = self.select(pre.masked_fill(~dead, float("-inf")), self.k_aux)
            aux = self.decode(aacts, aidx)
        return SAEOutput(recon, acts, idx, active, aux)

    @torch.no_grad()
    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations as a dense [B, n_local] tensor (for analysis; training never builds it)."""
        acts, idx, _ = self.select(self.pre_acts(x), self.k)
        return torch.zeros(x.shape[0], self.n_local, device=x.device, dtype=acts.dtype).scatter_(1, idx, acts)

    # -- the unit-norm decoder constraint ------------------------------------------------------------------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder row, so a step moves along the
        sphere (Gao et al. 2024; OpenAI's unit_norm_decoder_grad_adjustment_)."""
        g = self.W_dec.grad
        if g is not None:
            g.sub_((g * self.W_dec).sum(dim=1, keepdim=True) * self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor, method: str, *, inputs: torch.Tensor | None = None) -> None:
        """Set b_dec from a sample of targets [N, d_out]: geometric median, mean, or zero. A transcoder given
        a sample of its `inputs` [N, d_in] also centres them at init: b_enc = -centre(inputs) @ W_enc, the
        same pre-activations an SAE's x - b_dec gives at its first step."""
        self.b_dec.copy_(centre(sample, method).to(self.b_dec.dtype))
        if self.transcoder and inputs is not None:
            c = centre(inputs, method).to(self.W_enc.device)
            self.b_enc.copy_(-(c @ self.W_enc.double()).to(self.b_enc.dtype))
            self.init_decoder(inputs, sample)

    @torch.no_grad()
    def init_decoder(self, inputs: torch.Tensor, targets: torch.Tensor, *, block: int = 4096) -> None:
        """A transcoder's decoder rows start where its encoder points: row j is the unit direction of the
        activation-weighted mean of (target - b_dec) over the sample rows whose top-k holds latent j; a latent
        no row selects keeps its random direction. An SAE's tied init (W_enc = W_dec^T) pairs each latent's
        encoder and decoder from the first step; without it a transcoder's random decoder rows first have to
        find their encoder's targets, and on planted data (tests/test_transcoder.py) most latents died and
        FVU stalled near 0.6 where this init reaches 0.2. Sharded: every shard sees the same sample and the
        global top-k (select), so each fills its own rows. Rows are taken `block` at a time (bounded memory)."""
        w = torch.zeros_like(self.W_dec, dtype=torch.float64)  # [n_local, d_out]
        for a in range(0, inputs.shape[0], block):
            x = inputs[a : a + block].to(self.W_enc.device, torch.float32)
            r = targets[a : a + block].to(self.W_dec.device, torch.float64) - self.b_dec.double()  # [b, d_out]
            acts, idx, _ = self.select(self.pre_acts(x), self.k)  # [b, kk]
            kk = idx.shape[1]
            w.index_add_(0, idx.reshape(-1), acts.reshape(-1, 1).double() * r.repeat_interleave(kk, 0))
        norm = w.norm(dim=1, keepdim=True)  # [n_local, 1]
        chosen = norm[:, 0] > 0
        self.W_dec[chosen] = (w[chosen] / norm[chosen]).to(self.W_dec.dtype)


def centre(sample: torch.Tensor, method: str) -> torch.Tensor:
    """The centre of rows [N, d] in float64: geometric median, mean, or zero."""
    if method == "geometric_median":
        return geometric_median(sample)
    if method == "mean":
        return sample.to(torch.float64).mean(0)
    if method == "zero":
        return torch.zeros(sample.shape[1], dtype=torch.float64, device=sample.device)
    raise ValueError(f"b_dec init {method!r}; expected geometric_median, mean or zero")


def loss_and_stats(
    sae: TopKSAE, x: torch.Tensor, out: SAEOutput, *, auxk_coef: float, aux_scale: float = 1.0, data_group=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss and detached statistics, summed over the data-parallel group. `x` [B, d_out] is what
    the model predicts: its input for an SAE, the target field for a transcoder (so FVU is the target's).

    loss = SSE / SST  +  auxk_coef * aux_scale * SSE_aux / SSE, where SST is the batch's total variance
    about its mean (so SSE / SST is the FVU, sparsify's loss) and the AuxK term is normalised by the energy
    of the residual it predicts (openai/sparse_autoencoder normalises the same way). The denominators are
    detached and summed over every data-parallel rank, and each rank's numerator holds only its own rows,
    so the sum of the ranks' gradients is exactly the gradient on the whole global batch.
    """
    x = x.float()
    e = x - out.recon  # [B, d_out]
    sse = e.pow(2).sum()
    with torch.no_grad():
        x64 = x.double()
        rows = torch.full((1,), float(x.shape[0]), dtype=torch.float64, device=x.device)  # a fill, not a H2D copy
        parts = [x64.sum(0), x64.pow(2).sum().view(1), rows, sse.double().view(1)]
        s = torch.cat(parts)  # [d_out + 3]: sum x, sum x^2, rows, SSE
        s = D.all_reduce_sum(s, data_group)
        d = x.shape[1]
        n = s[d + 1]
        sst = (s[d] - s[:d].pow(2).sum() / n).clamp_min(1e-30)
        sse_all = s[d + 2]
    loss = sse / sst.to(sse.dtype)
    stats = {"sse": sse_all, "sst": sst, "rows": n, "active": out.active.double()}
    if out.aux_recon is not None:
        aux_sse = (out.aux_recon - e.detach()).pow(2).sum()
        loss = loss + (auxk_coef * aux_scale) * aux_sse / sse_all.clamp_min(1e-30).to(aux_sse.dtype)
        stats["aux_sse"] = aux_sse.detach().double()
    return loss, stats

"""Evaluate an SAE on a dataset: FVU, MSE and L0 over the stream, for ours or SAELens's architectures.

    from trainer.evaluate import evaluate, load_sae
    sae = load_sae("runs/sae")                     # ours, or a SAELens topk / standard / jumprelu folder
    print(evaluate(sae, "data/shuffled", rows=1 << 20))   # {"fvu": ..., "mse": ..., "l0": ..., "rows": ...}

FVU is the training log's (trainer/train.py Meter): summed squared error over the total variance of the rows
about their mean, both over every row evaluated. A SAELens "standard" or "jumprelu" SAE is evaluated with the
forward SAELens gives it (sae_lens/saes/standard_sae.py, jumprelu_sae.py): z = ReLU(pre), zeroed where
pre <= threshold for JumpReLU, x_hat = z @ W_dec + b_dec, with pre = (x - b_dec) @ W_enc + b_enc after
trainer.export's folding of apply_b_dec_to_input.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.export import load_saelens, saelens_config, saelens_weights
from trainer.sae import SAEOutput, TopKSAE

ARCHITECTURES = ("topk", "standard", "jumprelu")


class ReluSAE(nn.Module):
    """SAELens's StandardSAE (threshold None) or JumpReLUSAE forward pass, for evaluation only."""

    def __init__(self, weights: dict[str, torch.Tensor], *, device: str | torch.device | None = None):
        super().__init__()
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            self.register_buffer(key, weights[key].to(device))
        self.threshold = weights["threshold"].to(device) if "threshold" in weights else None
        self.d_in, self.n_latents = self.W_enc.shape

    def forward(self, x: torch.Tensor) -> SAEOutput:
        pre = torch.addmm(self.b_enc, x.float() - self.b_dec, self.W_enc)  # [B, d_sae]
        z = F.relu(pre)
        if self.threshold is not None:
            z = z * (pre > self.threshold)
        recon = z @ self.W_dec + self.b_dec
        return SAEOutput(recon, z, torch.empty(0, dtype=torch.int64), (z > 0).sum())


def load_sae(path: str | Path, *, device: str | torch.device | None = None) -> TopKSAE | ReluSAE:
    """A SAELens-layout folder as a model evaluate() takes: TopKSAE for "topk" (ours, or trained by SAELens),
    ReluSAE for "standard" and "jumprelu"."""
    path = Path(path)
    c = saelens_config(path, ARCHITECTURES)
    if c["architecture"] == "topk":
        return load_saelens(path, device=device)
    extra = {}
    if c["architecture"] == "jumprelu":
        extra["threshold"] = (c["d_sae"],)
    return ReluSAE(saelens_weights(path, c, extra), device=device)


@torch.no_grad()
def evaluate(sae: TopKSAE | ReluSAE, url: str, *, rows: int | None = None, batch_size: int = 4096,
             device: str | torch.device | None = None, **stream_options) -> dict:
    """FVU, MSE (per element) and L0 (non-zero latents per row) of `sae` on the first `rows` rows of the
    dataset at `url` (all of them if None), read by readers.ActivationStream with `stream_options`."""
    from readers import ActivationStream

    dev = torch.device(device) if device is not None else next(itertools.chain(sae.parameters(), sae.buffers())).device
    stream = ActivationStream(url, batch_size=batch_size, device=dev, rank=0, world_size=1, **stream_options)
    d = None
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # SSE, sum of squares, non-zeros, rows
    sum_x = None
    it = iter(stream)
    try:
        for batch in it:
            x = batch.acts.float()
            if rows is not None:
                x = x[: rows - int(sums[3])]
            out = sae(x)
            x64 = x.double()
            sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
            sums += torch.stack([(x - out.recon).double().pow(2).sum(), x64.pow(2).sum(),
                                 out.active.double(), torch.tensor(float(len(x)), dtype=torch.float64, device=dev)])
            d = x.shape[1]
            if rows is not None and int(sums[3]) >= rows:
                break
    finally:
        it.close()
    if d is None:
        raise ValueError(f"{url}: no rows to evaluate on")
    sse, ss, active, n = (float(v) for v in sums)
    sst = ss - float(sum_x.pow(2).sum()) / n
    return {"fvu": sse / sst if sst > 0 else float("nan"), "mse": sse / (n * d), "l0": active / n, "rows": int(n)}

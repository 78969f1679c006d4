"""Evaluate an SAE or transcoder on a dataset: FVU, MSE and L0 over the stream, ours or SAELens's.

    from trainer.evaluate import evaluate, load_sae
    sae = load_sae("runs/sae")                     # ours, or a SAELens topk / standard / jumprelu folder
    print(evaluate(sae, "data/shuffled", rows=1 << 20))   # {"fvu": ..., "mse": ..., "l0": ..., "rows": ...}

FVU is the training log's (trainer/train.py Meter): summed squared error over the total variance of the rows
about their mean, both over every row evaluated. A SAELens "standard" or "jumprelu" SAE is evaluated with the
forward SAELens gives it (sae_lens/saes/standard_sae.py, jumprelu_sae.py): z = ReLU(pre), zeroed where
pre <= threshold for JumpReLU, x_hat = z @ W_dec + b_dec, with pre = (x - b_dec) @ W_enc + b_enc after
trainer.export's folding of apply_b_dec_to_input.

A transcoder (ours, "topk_transcoder", or SAELens's "transcoder" and "jumprelu_transcoder", whose input is
never shifted by b_dec) reads the `input` field and is measured on the `target` field: FVU is the target's.

    tc = load_sae("runs/tc/saelens")
    print(evaluate(tc, "data/two-layers", input="layer.2", target="layer.4"))
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.export import TRANSCODER, is_transcoder, load_saelens, saelens_config, saelens_weights
from trainer.fields import resolve_fields
from trainer.sae import SAEOutput, TopKSAE

ARCHITECTURES = ("topk", "standard", "jumprelu", TRANSCODER, "transcoder", "jumprelu_transcoder")


class ReluSAE(nn.Module):
    """SAELens's StandardSAE (threshold None) or JumpReLUSAE forward pass, or with `transcoder` its
    Transcoder or JumpReLUTranscoder (no b_dec on the input), for evaluation only."""

    def __init__(self, weights: dict[str, torch.Tensor], *, device: str | torch.device | None = None,
                 transcoder: bool = False):
        super().__init__()
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            self.register_buffer(key, weights[key].to(device))
        self.threshold = weights["threshold"].to(device) if "threshold" in weights else None
        self.d_in, self.n_latents = self.W_enc.shape
        self.d_out = self.W_dec.shape[1]
        self.transcoder = transcoder

    def forward(self, x: torch.Tensor) -> SAEOutput:
        x = x.float()
        pre = torch.addmm(self.b_enc, x if self.transcoder else x - self.b_dec, self.W_enc)  # [B, d_sae]
        z = F.relu(pre)
        if self.threshold is not None:
            z = z * (pre > self.threshold)
        recon = z @ self.W_dec + self.b_dec
        return SAEOutput(recon, z, torch.empty(0, dtype=torch.int64), (z > 0).sum())


def load_sae(path: str | Path, *, device: str | torch.device | None = None) -> TopKSAE | ReluSAE:
    """A SAELens-layout folder as a model evaluate() takes: TopKSAE for "topk" (ours, or trained by SAELens)
    and "topk_transcoder", ReluSAE for "standard", "jumprelu", "transcoder" and "jumprelu_transcoder"."""
    path = Path(path)
    c = saelens_config(path, ARCHITECTURES)
    if c["architecture"] in ("topk", TRANSCODER):
        return load_saelens(path, device=device)
    extra = {}
    if c["architecture"].startswith("jumprelu"):
        extra["threshold"] = (c["d_sae"],)
    return ReluSAE(saelens_weights(path, c, extra), device=device, transcoder=is_transcoder(c))


@torch.no_grad()
def evaluate(sae: TopKSAE | ReluSAE, url: str, *, rows: int | None = None, batch_size: int = 4096,
             device: str | torch.device | None = None, input: str | None = None, target: str | None = None,
             **stream_options) -> dict:
    """FVU, MSE (per element) and L0 (non-zero latents per row) of `sae` on the first `rows` rows of the
    dataset at `url` (all of them if None), read by readers.ActivationStream with `stream_options`.
    `input`: the field the model reads (None: the first); `target`: the field a transcoder predicts, on which
    FVU and MSE are measured (required for a transcoder; None for an SAE, measured on its input)."""
    from readers import ActivationStream
    from shuffler.io.dataset import Dataset

    if sae.transcoder and target is None:
        raise ValueError(f"a transcoder ({sae.d_in} -> {sae.d_out}) is measured on its target: name the target "
                         "field (target=...), and its input field (input=...) unless it is the first")
    fields = resolve_fields(Dataset.open(url), input, target)
    if (fields.d_in, fields.d_out) != (sae.d_in, sae.d_out if sae.transcoder else sae.d_in):
        raise ValueError(f"{url}: input {fields.input or 'acts'} is {fields.d_in} wide and target "
                         f"{fields.target or fields.input or 'acts'} {fields.d_out}; the model maps {sae.d_in} -> "
                         f"{sae.d_out}")
    if fields.stream_fields is not None:
        stream_options = {**stream_options, "fields": fields.stream_fields}
    dev = torch.device(device) if device is not None else next(itertools.chain(sae.parameters(), sae.buffers())).device
    stream = ActivationStream(url, batch_size=batch_size, device=dev, rank=0, world_size=1, **stream_options)
    d = None
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # SSE, sum of squares, non-zeros, rows
    sum_x = None
    it = iter(stream)
    try:
        for batch in it:
            x, y = fields.read(batch)
            if rows is not None:
                x, y = x[: rows - int(sums[3])], y[: rows - int(sums[3])]
            out = sae(x)
            x64 = y.double()  # the target: x itself for an SAE
            sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
            sums += torch.stack([(y - out.recon).double().pow(2).sum(), x64.pow(2).sum(),
                                 out.active.double(), torch.tensor(float(len(x)), dtype=torch.float64, device=dev)])
            d = y.shape[1]
            if rows is not None and int(sums[3]) >= rows:
                break
    finally:
        it.close()
    if d is None:
        raise ValueError(f"{url}: no rows to evaluate on")
    sse, ss, active, n = (float(v) for v in sums)
    sst = ss - float(sum_x.pow(2).sum()) / n
    return {"fvu": sse / sst if sst > 0 else float("nan"), "mse": sse / (n * d), "l0": active / n, "rows": int(n)}

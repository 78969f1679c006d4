"""Transcoders against the real sae-lens package (the `saelens` extra), not against our reading of it.

- Our transcoder export loads with SAELens's `SAE.load_from_disk` (once trainer.saelens_transcoder has
  registered "topk_transcoder") as a Transcoder with our weights, our outputs and both hook names.
- What SAELens saves of that class loads back with trainer.load_saelens.
- SAELens's own ReLU and JumpReLU transcoder folders load in trainer.evaluate with the outputs SAELens gives.
"""

from __future__ import annotations

import pytest
import torch

from trainer import TopKSAE, TrainConfig, export_saelens, load_saelens
from trainer.evaluate import load_sae

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import (  # noqa: E402
    SAE,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)

from trainer import saelens_transcoder  # noqa: E402  (registers "topk_transcoder")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

D_IN, D_OUT, N, K = 12, 10, 40, 4


def trained_looking(seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    tc = TopKSAE(D_IN, N, K, d_out=D_OUT, k_aux=6, seed=seed)
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return tc


def test_export_loads_in_saelens_with_the_same_outputs(tmp_path):
    ours = trained_looking()
    cfg = TrainConfig(n_latents=N, k=K, batch_size=8, tokens=8, input="layer.2", target="layer.4")
    source = {"model": "m", "hook_names": {"layer.2": "blocks.2.hook_resid_pre", "layer.4": "blocks.4.hook_resid_pre"}}
    export_saelens(ours, tmp_path / "tc", cfg=cfg, dataset="memory://x", source=source)
    lens = SAE.load_from_disk(str(tmp_path / "tc"))
    assert isinstance(lens, saelens_transcoder.TopKTranscoder) and isinstance(lens, Transcoder)
    assert (lens.cfg.d_in, lens.cfg.d_sae, lens.cfg.d_out, lens.cfg.k) == (D_IN, N, D_OUT, K)
    assert lens.cfg.apply_b_dec_to_input is False
    meta = lens.cfg.metadata
    assert (meta.hook_name, meta.hook_name_out, meta.model_name) == ("blocks.2.hook_resid_pre",
                                                                    "blocks.4.hook_resid_pre", "m")
    for name, p in ours.state_dict().items():
        assert torch.equal(p, getattr(lens, name).detach()), name
    x = torch.randn(64, D_IN) * 2 + 0.5
    with torch.no_grad():
        assert lens(x).shape == (64, D_OUT)
        torch.testing.assert_close(lens(x), ours(x).recon, rtol=1e-5, atol=1e-5)
        assert torch.equal(lens.encode(x) != 0, ours.encode_dense(x) != 0)  # the same k latents chosen
        torch.testing.assert_close(lens.encode(x), ours.encode_dense(x), rtol=1e-5, atol=1e-5)


def test_what_saelens_saves_loads_back_in_ours(tmp_path):
    export_saelens(trained_looking(1), tmp_path / "a")
    lens = SAE.load_from_disk(str(tmp_path / "a"))
    lens.save_model(str(tmp_path / "b"))  # SAELens's own writer: its cfg.json, its safetensors
    back = load_saelens(tmp_path / "b")
    assert back.transcoder and (back.d_in, back.d_out, back.k) == (D_IN, D_OUT, K)
    x = torch.randn(20, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(back(x).recon, lens(x), rtol=1e-5, atol=1e-5)
    saelens_transcoder.register()  # registering again is a no-op, not SAELens's "already registered" error


@pytest.mark.parametrize("jumprelu", [False, True])
def test_saelens_relu_transcoders_evaluate_with_saelens_outputs(tmp_path, jumprelu):
    torch.manual_seed(2)
    if jumprelu:
        lens = JumpReLUTranscoder(JumpReLUTranscoderConfig(d_in=D_IN, d_sae=N, d_out=D_OUT,
                                                           apply_b_dec_to_input=False))
    else:
        lens = Transcoder(TranscoderConfig(d_in=D_IN, d_sae=N, d_out=D_OUT, apply_b_dec_to_input=False))
    with torch.no_grad():
        lens.b_enc.copy_(torch.randn(N) * 0.3)
        lens.b_dec.copy_(torch.randn(D_OUT))
        if jumprelu:
            lens.threshold.copy_(torch.rand(N) * 0.5)
    lens.save_model(str(tmp_path / "t"))
    ours = load_sae(tmp_path / "t")
    assert ours.transcoder and (ours.d_in, ours.d_out) == (D_IN, D_OUT)
    x = torch.randn(50, D_IN) + 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x).recon, lens(x), rtol=1e-4, atol=1e-4)
        assert int(ours(x).active) == int((lens.encode(x) != 0).sum())

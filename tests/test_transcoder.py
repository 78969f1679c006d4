"""The TopK transcoder: the SAE's model with the encoder on one field and the decoder predicting another.

In memory (two-field datasets are tested end to end in tests/test_transcoder_e2e.py): the forward pass against
a dense reference, the init, learning a planted sparse map (FVU on the target falls well below 1, and a model
that only sees its input's own reconstruction target cannot), the SAELens-layout export and reload, and the
evaluation of SAELens's own ReLU transcoder folders.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from trainer import TopKSAE, TrainConfig, export_saelens, load_saelens
from trainer import distributed as D
from trainer.evaluate import ReluSAE, load_sae
from trainer.export import saelens_cfg
from trainer.sae import init_directions
from trainer.train import TrainState, make_optimizer, make_sae, train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

D_IN, D_OUT, FEATURES, K = 24, 16, 64, 3
FVU_BAR = 0.3


def planted_pair(rows: int, seed: int, rows_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Rows x = z @ A + 1.5 and y = z @ B - 0.5, z K-sparse non-negative over FEATURES planted features with
    unit directions A [FEATURES, D_IN] (input side) and B [FEATURES, D_OUT] (target side), drawn from `seed`;
    the rows from `rows_seed`. Returns x, y, B."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((FEATURES, D_IN))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = rng.standard_normal((FEATURES, D_OUT))
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, rows_seed])
    z = np.zeros((rows, FEATURES))
    idx = np.argsort(rng.random((rows, FEATURES)), axis=1)[:, :K]
    np.put_along_axis(z, idx, rng.uniform(0.5, 2.0, (rows, K)), axis=1)
    x = z @ a + 1.5 + 0.01 * rng.standard_normal((rows, D_IN))
    y = z @ b - 0.5
    return torch.from_numpy(x).float(), torch.from_numpy(y).float(), b


def random_transcoder(seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    tc = TopKSAE(D_IN, 48, 4, d_out=D_OUT, k_aux=5, seed=seed)
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return tc


def test_forward_is_topk_of_the_unshifted_input_decoded_to_d_out():
    tc = random_transcoder()
    assert tc.transcoder and (tc.d_in, tc.d_out) == (D_IN, D_OUT)
    assert tc.W_enc.shape == (D_IN, 48) and tc.W_dec.shape == (48, D_OUT) and tc.b_dec.shape == (D_OUT,)
    x = torch.randn(30, D_IN)
    out = tc(x)
    pre = x @ tc.W_enc + tc.b_enc  # no b_dec on the input: it lives in the target's space
    vals, idx = pre.topk(4, dim=1)
    dense = torch.zeros_like(pre).scatter_(1, idx, vals.relu())
    torch.testing.assert_close(out.recon, dense @ tc.W_dec + tc.b_dec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tc.encode_dense(x), dense, rtol=1e-5, atol=1e-6)
    assert out.recon.shape == (30, D_OUT)


def test_init_is_unit_norm_untied_and_shard_invariant():
    tc = TopKSAE(D_IN, 64, 4, d_out=D_OUT, seed=3)
    assert torch.allclose(tc.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.allclose(tc.W_enc.norm(dim=0), torch.ones(64), atol=1e-6)
    # The encoder's directions are their own draw (input and target are different spaces), and latent i's
    # are the same whether the model is whole or sharded: shard 1 of 2 holds latents 32..63.
    assert np.array_equal(init_directions(3, 32, 64, D_IN, stream=1), tc.W_enc.detach().numpy().T[32:])
    assert np.array_equal(init_directions(3, 32, 64, D_OUT), tc.W_dec.detach().numpy()[32:])
    same = TopKSAE(D_OUT, 64, 4, d_out=D_OUT, seed=3)  # equal widths: still not tied
    assert not torch.allclose(same.W_enc, same.W_dec.T)
    assert TopKSAE(D_OUT, 64, 4, seed=3).k_aux == D_OUT // 2 and tc.k_aux == D_OUT // 2


def test_bias_init_centres_the_input_through_b_enc():
    x, y, _ = planted_pair(4096, 0)
    for method in ("mean", "geometric_median"):
        tc = TopKSAE(D_IN, 32, 4, d_out=D_OUT)
        tc.init_b_dec(y, method, inputs=x)
        sae = TopKSAE(D_IN, 32, 4)
        sae.init_b_dec(x, method)
        # The transcoder's first pre-activations are what an SAE with the same encoder computes on x - b_dec.
        with torch.no_grad():
            sae.W_enc.copy_(tc.W_enc)
        torch.testing.assert_close(tc.pre_acts(x), sae.pre_acts(x), rtol=1e-4, atol=1e-4)
        want = y.double().mean(0) if method == "mean" else None
        if want is not None:
            torch.testing.assert_close(tc.b_dec.double(), want, rtol=1e-5, atol=1e-5)
    tc = TopKSAE(D_IN, 32, 4, d_out=D_OUT)
    tc.init_b_dec(y, "zero", inputs=x)
    assert not tc.b_dec.any() and not tc.b_enc.any()


def train_in_memory(x, y, steps=300, batch=512, **cfg_kw):
    cfg = TrainConfig(n_latents=128, k=K, batch_size=batch, tokens=batch * steps, lr=4e-3, **cfg_kw)
    tc = make_sae(cfg, x.shape[1], D.Layout(), torch.device("cpu"), d_out=y.shape[1] if y is not x else None)
    tc.init_b_dec(y, cfg.b_dec_init, inputs=x)
    opt = make_optimizer(cfg, tc)
    state = TrainState(since_fired=torch.zeros(tc.n_local, dtype=torch.int64))
    for s in range(steps):
        i = slice((s * batch) % len(x), (s * batch) % len(x) + batch)
        train_step(tc, opt, x[i], state, cfg, D.Layout(), y=None if y is x else y[i])
    return tc


def fvu(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_learns_a_planted_sparse_map(monkeypatch):
    x, y, b = planted_pair(40_960, 1)
    tc = train_in_memory(x, y, steps=600, dead_tokens=5000)  # AuxK on from step 10
    xt, yt, _ = planted_pair(4096, 1, rows_seed=1)  # same features, fresh rows
    with torch.no_grad():
        score = fvu(tc(xt).recon, yt)
    assert score < FVU_BAR, score
    untrained = TopKSAE(D_IN, 128, K, d_out=D_OUT)
    untrained.init_b_dec(y, "geometric_median", inputs=x)
    with torch.no_grad():
        assert fvu(untrained(xt).recon, yt) > 0.8  # the bar is far below where training starts
    # The decoder found the target-side features (unit rows; cosine of each planted feature's best match).
    w = tc.W_dec.detach().numpy()
    assert float((b @ w.T).max(axis=1).mean()) > 0.85
    # Without the decoder init (random decoder rows, as an untied SAE would start) the same run falls short.
    monkeypatch.setattr(TopKSAE, "init_decoder", lambda self, inputs, targets: None)
    random_start = train_in_memory(x, y, steps=600, dead_tokens=5000)
    with torch.no_grad():
        assert fvu(random_start(xt).recon, yt) > FVU_BAR


def test_step_measures_fvu_on_the_target_not_the_input():
    x, y, _ = planted_pair(2048, 2)
    cfg = TrainConfig(n_latents=64, k=K, batch_size=512, tokens=512)
    tc = make_sae(cfg, D_IN, D.Layout(), torch.device("cpu"), d_out=D_OUT)
    opt = make_optimizer(cfg, tc)
    state = TrainState(since_fired=torch.zeros(64, dtype=torch.int64))
    with torch.no_grad():
        pred = tc(x[:512]).recon
    stats = train_step(tc, opt, x[:512], state, cfg, D.Layout(), y=y[:512])
    torch.testing.assert_close(float(stats["sse"]), float((y[:512] - pred).double().pow(2).sum()), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(float(stats["sst"]), float((y[:512] - y[:512].mean(0)).double().pow(2).sum()),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError):  # an SAE step on a transcoder: the shapes disagree, nothing silent
        train_step(tc, opt, x[:512], state, cfg, D.Layout())


# -- export --------------------------------------------------------------------------------------------------
def test_export_writes_saelens_transcoder_layout_and_loads_back(tmp_path):
    tc = random_transcoder(4)
    cfg = TrainConfig(n_latents=48, k=4, batch_size=8, tokens=8, input="layer.2", target="layer.4")
    source = {"hook_name": "blocks.2.hook_resid_pre",
              "hook_names": {"layer.2": "blocks.2.hook_resid_pre", "layer.4": "blocks.4.hook_resid_pre"}}
    export_saelens(tc, tmp_path / "tc", cfg=cfg, dataset="memory://x", source=source)
    c = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert (c["architecture"], c["d_in"], c["d_out"], c["d_sae"], c["k"]) == ("topk_transcoder", D_IN, D_OUT, 48, 4)
    assert c["apply_b_dec_to_input"] is False
    assert (c["metadata"]["hook_name"], c["metadata"]["hook_name_out"]) == ("blocks.2.hook_resid_pre",
                                                                          "blocks.4.hook_resid_pre")
    assert c["activation_shuffler"]["train_config"]["target"] == "layer.4"
    with safe_open(str(tmp_path / "tc" / "sae_weights.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"W_enc": (D_IN, 48), "W_dec": (48, D_OUT), "b_enc": (48,), "b_dec": (D_OUT,)}
    back = load_saelens(tmp_path / "tc")
    assert back.transcoder and back.k_aux == 5
    for name, p in tc.state_dict().items():
        assert torch.equal(p, back.state_dict()[name]), name
    x = torch.randn(9, D_IN)
    assert torch.equal(tc(x).recon, back(x).recon)
    assert torch.equal(load_sae(tmp_path / "tc")(x).recon, tc(x).recon)  # evaluate's loader too


def test_an_sae_export_is_unchanged():
    sae = TopKSAE(D_IN, 48, 4)
    c = saelens_cfg(sae, dataset="memory://x", source={"hook_name": "h"})
    assert c["architecture"] == "topk" and c["apply_b_dec_to_input"] is True and "d_out" not in c
    assert "hook_name_out" not in c["metadata"] and c["metadata"]["hook_name"] == "h"


def test_loader_refuses_a_transcoder_that_shifts_its_input(tmp_path):
    export_saelens(random_transcoder(), tmp_path / "tc")
    c = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps({**c, "apply_b_dec_to_input": True}))
    with pytest.raises(ValueError, match="apply_b_dec_to_input is true, which a transcoder cannot honour"):
        load_saelens(tmp_path / "tc")
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps({**c, "d_out": D_OUT + 1}))
    with pytest.raises(ValueError, match=r"W_dec has shape \(48, 16\); cfg.json implies \(48, 17\)"):
        load_saelens(tmp_path / "tc")


def test_relu_transcoder_forward_does_not_shift_the_input():
    torch.manual_seed(5)
    w = {"W_enc": torch.randn(D_IN, 32), "b_enc": torch.randn(32), "W_dec": torch.randn(32, D_OUT),
         "b_dec": torch.randn(D_OUT)}
    m = ReluSAE(w, transcoder=True)
    x = torch.randn(7, D_IN)
    want = torch.relu(x @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(m(x).recon, want, rtol=1e-5, atol=1e-5)

"""The TopK SAE trainer on one process: the model's invariants, learning on planted features, resume, export.

The learning test trains on a `writers.synth` dataset whose rows are sparse combinations (4 of 128) of planted
unit directions in 32 dimensions, and asks the trained decoder to recover them: the mean over planted
features of the best cosine similarity to a decoder row. An untrained SAE scores about 0.48 on this data; a
trainer without the decoder-norm constraint or with a broken gradient cannot reach the bar either
(test_broken_trainers_fail_the_bar).
"""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from trainer import TopKSAE, TrainConfig, export_saelens, load_saelens, train
from trainer import distributed as D
from trainer.sae import geometric_median, init_directions, loss_and_stats
from writers.synth import SynthConfig, load_planted, synth

train_mod = importlib.import_module("trainer.train")  # the module; trainer.train is the function

D_MODEL, FEATURES, LATENTS, K = 32, 128, 256, 4
RECOVERY_BAR, FVU_BAR = 0.9, 0.2


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """150k rows of planted-feature data (every row its own document: no order effects)."""
    url = str(tmp_path_factory.mktemp("synth") / "ds")
    synth(url, SynthConfig(rows=150_000, d_model=D_MODEL, docs=150_000, seed=1, k=K, features=FEATURES))
    return url


def recovery(planted_dict: np.ndarray, sae: TopKSAE) -> float:
    """Mean over planted features of the max cosine similarity to a decoder row (rows are unit norm)."""
    w = sae.W_dec.detach().float().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    return float((planted_dict @ w.T).max(axis=1).mean())


def small_cfg(**kw) -> TrainConfig:
    base = dict(n_latents=LATENTS, k=K, batch_size=512, tokens=150_000, lr=4e-3, log_every=50)
    return TrainConfig(**{**base, **kw})


# -- the model --------------------------------------------------------------------------------------------
def test_init_is_tied_unit_norm_and_shard_invariant():
    sae = TopKSAE(16, 64, 4, seed=3)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert sae.W_enc.shape == (16, 64) and sae.b_enc.shape == (64,) and sae.b_dec.shape == (16,)
    # Latent i's direction does not depend on how latents are split: shard 1 of 2 holds rows 32..63.
    assert np.array_equal(init_directions(3, 32, 64, 16), sae.W_dec.detach().numpy()[32:])
    assert not np.allclose(init_directions(4, 0, 64, 16), sae.W_dec.detach().numpy())  # the seed matters
    # Near-orthogonal random directions: no two latents start alike.
    g = sae.W_dec.detach() @ sae.W_dec.detach().T
    assert (g - torch.eye(64)).abs().max() < 0.9


def test_forward_is_topk_relu_and_matches_dense_reference():
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, 3)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(50, 8)
    out = sae(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(3, dim=1)
    dense = torch.zeros_like(pre).scatter_(1, idx, vals.relu())
    assert torch.allclose(out.recon, dense @ sae.W_dec + sae.b_dec, atol=1e-5)
    assert torch.allclose(sae.encode_dense(x), dense, atol=1e-6)
    assert int(out.active) == int((dense > 0).sum())
    assert ((sae.encode_dense(x) != 0).sum(1) <= 3).all()


def test_decoder_grad_projection_keeps_rows_on_the_sphere():
    torch.manual_seed(1)
    sae = TopKSAE(8, 16, 2)
    sae.W_dec.grad = torch.randn(16, 8)
    sae.project_decoder_grad()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(16), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-6)


def test_geometric_median_resists_outliers_unlike_the_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 4, generator=g) * 0.1 + 2.0
    x[:100] = 1000.0  # 10% wild outliers
    gm = geometric_median(x)
    assert (gm - 2.0).abs().max() < 0.1
    assert (x.double().mean(0) - 2.0).abs().min() > 50
    sae = TopKSAE(4, 8, 2)
    sae.init_b_dec(x, "mean")
    assert torch.allclose(sae.b_dec.double(), x.double().mean(0), atol=1e-3)
    sae.init_b_dec(x, "zero")
    assert not sae.b_dec.any()


def test_auxk_uses_only_dead_latents_and_trains_them():
    torch.manual_seed(2)
    sae = TopKSAE(8, 32, 2, k_aux=4)
    x = torch.randn(64, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:5] = True
    out = sae(x, dead=dead)
    loss, _ = loss_and_stats(sae, x, out, auxk_coef=1 / 32)
    plain, _ = loss_and_stats(sae, x, sae(x), auxk_coef=1 / 32)
    assert loss > plain  # the AuxK term is there
    g = torch.autograd.grad(loss - plain, sae.W_dec, allow_unused=True)[0]
    assert (g[~dead] == 0).all() and g[dead].abs().sum() > 0  # only dead latents learn from AuxK


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 5), R=st.integers(1, 4), n_local=st.integers(1, 9), k_frac=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_global_topk_from_local_candidates_is_exact(B, R, n_local, k_frac, seed):
    """The latent-sharding invariant, without processes: the global top-k of the shards' local top-k
    candidates picks exactly the latents the whole SAE's top-k picks."""
    k = 1 + int(k_frac * (R * n_local - 1))
    pre = torch.randn(B, R * n_local, generator=torch.Generator().manual_seed(seed))  # distinct a.s.
    kk = min(k, n_local)
    local = [pre[:, q * n_local : (q + 1) * n_local].topk(kk, dim=1) for q in range(R)]
    cand = torch.stack([v for v, _ in local], dim=1)  # [B, R, kk]
    chosen = torch.zeros_like(pre, dtype=torch.bool)
    for q, (_, idx) in enumerate(local):
        mine, active = D.winners(cand, k, q)
        chosen.scatter_(1, idx + q * n_local, mine | chosen.gather(1, idx + q * n_local))
    want = torch.zeros_like(chosen).scatter_(1, pre.topk(k, dim=1).indices, True)
    assert torch.equal(chosen, want)
    assert int(active) == int((pre.topk(k, dim=1).values > 0).sum())


def test_auxk_gradient_grows_a_dead_latent_toward_the_residual():
    """x = 3 e0 + 2 e1, k = 1: latent 0 fires, the residual is 2 e1; dead latent 1 (pre-activation 1)
    reconstructs part of it, so AuxK must push its activation up (and leave latent 0 alone)."""
    sae = TopKSAE(4, 4, 1, k_aux=1)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(4))
        sae.W_enc.copy_(torch.diag(torch.tensor([1.0, 0.5, 1.0, 1.0])))
    x = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    dead = torch.tensor([False, True, False, False])
    out = sae(x, dead=dead)
    assert torch.allclose(out.aux_recon, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    aux = ((out.aux_recon - (x - out.recon).detach()) ** 2).sum()
    g = torch.autograd.grad(aux, sae.b_enc)[0]
    assert g[1] < 0 and g[0] == 0 and g[2] == 0


def test_bf16_autocast_logic_on_cpu():
    """The GPU path runs the encoder under bfloat16 autocast; CPU autocast exercises the same code."""
    torch.manual_seed(3)
    sae = TopKSAE(16, 64, 4)
    x = torch.randn(256, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre = sae.pre_acts(x)
        out = sae(x)
    assert pre.dtype == torch.bfloat16  # addmm keeps the [B, n] pre-activations in bf16
    assert out.recon.dtype == torch.float32  # the decoder sums in float32
    ref = sae(x).recon
    assert (out.recon - ref).norm() / ref.norm() < 0.05
    cfg = small_cfg(n_latents=64, batch_size=256, tokens=256 * 20, lr=3e-3)
    opt = train_mod.make_optimizer(cfg, sae)
    state = train_mod.TrainState(since_fired=torch.zeros(64, dtype=torch.int64))
    first = train_mod.train_step(sae, opt, x, state, cfg, D.Layout(), amp=True)["loss"]
    for _ in range(20):
        last = train_mod.train_step(sae, opt, x, state, cfg, D.Layout(), amp=True)["loss"]
    assert math.isfinite(last) and last < 0.9 * first
    assert train_mod.use_autocast(TrainConfig(n_latents=8, k=1, batch_size=1, tokens=1), torch.device("cuda"))
    assert not train_mod.use_autocast(TrainConfig(n_latents=8, k=1, batch_size=1, tokens=1), torch.device("cpu"))


def test_step_fence_waits_for_the_previous_step_only():
    """The GPU-only fence's logic: after launching step t it waits for step t-1's event, never step t's."""
    log = []

    class Event:
        def __init__(self, n):
            self.n = n

        def synchronize(self):
            log.append(self.n)

    made = iter(range(100))
    fence = train_mod.StepFence(torch.device("cpu"), make_event=lambda: Event(next(made)))
    for _ in range(4):
        fence.step_launched()
    assert log == [0, 1, 2]  # steps 0..3 launched; step 3 still in flight
    cpu = train_mod.StepFence(torch.device("cpu"))
    cpu.step_launched()
    assert cpu.pending == []  # no events on CPU: work there is synchronous anyway


def test_dead_latents_are_counted_over_tokens():
    sae = TopKSAE(4, 16, 1)
    cfg = small_cfg(n_latents=16, k=1, batch_size=8, tokens=64, dead_tokens=16)
    opt = train_mod.make_optimizer(cfg, sae)
    state = train_mod.TrainState(since_fired=torch.zeros(16, dtype=torch.int64))
    x = torch.randn(8, 4)
    train_mod.train_step(sae, opt, x, state, cfg, D.Layout())
    fired = state.since_fired == 0
    assert 1 <= int(fired.sum()) <= 8 and (state.since_fired[~fired] == 8).all()
    train_mod.train_step(sae, opt, x, state, cfg, D.Layout())
    assert state.tokens == 16 and int((state.since_fired >= 16).sum()) >= 16 - 8


# -- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(k=300), "k=300 must be <= n_latents=256"),
        (dict(k=0), "k=0"),
        (dict(tokens=100), "less than one batch"),
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(b_dec_init="median"), "b_dec_init='median'"),
        (dict(latent_shards=3), "divisible by latent_shards=3"),
        (dict(adam_betas=(0.9, 1.0)), "adam_betas"),
        (dict(batch_size=True), "batch_size=True"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        small_cfg(**kw)


def test_config_defaults_follow_gao_et_al():
    c = TrainConfig(n_latents=2**14, k=32, batch_size=4096, tokens=4096)
    assert c.learning_rate == pytest.approx(2e-4)
    assert TrainConfig(n_latents=4 * 2**14, k=32, batch_size=4096, tokens=4096).learning_rate == pytest.approx(1e-4)
    assert c.auxk_coef == 1 / 32 and c.resolved_k_aux(768) == 384 and c.b_dec_init == "geometric_median"
    assert TrainConfig.from_json(json.loads(json.dumps(c.to_json()))) == c
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_json({**c.to_json(), "colour": 1})


# -- training ----------------------------------------------------------------------------------------------
def test_training_recovers_planted_features(planted, tmp_path):
    res = train(planted, tmp_path / "run", small_cfg(), device="cpu", progress=False)
    dictionary = load_planted(planted)
    assert res.steps == 292 and res.tokens == 292 * 512
    assert res.last["fvu"] < FVU_BAR, res.last
    assert res.last["l0"] == pytest.approx(K)
    score = recovery(dictionary, res.sae)
    assert score > RECOVERY_BAR, score
    untrained = TopKSAE(D_MODEL, LATENTS, K)
    assert recovery(dictionary, untrained) < 0.6  # the bar is far above chance
    records = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [50, 100, 150, 200, 250, 292]
    assert records[-1]["fvu"] < records[0]["fvu"]
    for r in records:
        assert 0 <= r["reader_wait"] <= 1 and r["tokens_per_s"] > 0 and r["dead_fraction"] == 0.0


def test_broken_trainers_fail_the_bar(planted, tmp_path, monkeypatch):
    """Two plausible bugs: no gradient reaches the encoder; the decoder's gradient is lost."""
    dictionary = load_planted(planted)
    cfg = small_cfg()
    monkeypatch.setattr(TopKSAE, "pre_acts", lambda self, x: torch.addmm(self.b_enc, x - self.b_dec,
                                                                          self.W_enc.detach()))
    frozen_encoder = train(planted, tmp_path / "a", cfg, device="cpu", progress=False)
    assert recovery(dictionary, frozen_encoder.sae) < RECOVERY_BAR
    monkeypatch.undo()
    monkeypatch.setattr(TopKSAE, "project_decoder_grad", lambda self: self.W_dec.grad.zero_())
    frozen_decoder = train(planted, tmp_path / "b", cfg, device="cpu", progress=False)
    assert recovery(dictionary, frozen_decoder.sae) < RECOVERY_BAR


@pytest.mark.parametrize("reader_state", ["current", "version 1"])
def test_resume_equals_uninterrupted(planted, tmp_path, reader_state):
    cfg = small_cfg(tokens=20 * 512, checkpoint_every=6, log_every=4)
    whole = train(planted, tmp_path / "whole", cfg, device="cpu", progress=False)

    class Crash(Exception):
        pass

    def crash_at_14(step):
        if step == 14:
            raise Crash

    with pytest.raises(Crash):
        train(planted, tmp_path / "cut", cfg, device="cpu", progress=False, on_step=crash_at_14)
    assert json.loads((tmp_path / "cut" / "latest.json").read_text())["step"] == 12
    if reader_state == "version 1":  # a checkpoint written before elastic resume (readers/state.py) still resumes
        f = tmp_path / "cut" / "checkpoints" / "step-000000012" / "reader-00000.json"
        state = json.loads(f.read_text())
        assert state.pop("start_epoch") == 0 and state.pop("pending") == []
        f.write_text(json.dumps(dict(state, version=1)))
    resumed = train(planted, tmp_path / "cut", cfg, device="cpu", resume=True, progress=False)
    assert resumed.steps == whole.steps == 20
    for name, p in whole.sae.state_dict().items():
        assert torch.equal(p, resumed.sae.state_dict()[name]), name
    drop = ("tokens_per_s", "reader_wait", "reader_wait_total", "elapsed_s")
    logs = [[{k: v for k, v in json.loads(ln).items() if k not in drop}
             for ln in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("whole", "cut")]
    assert logs[0] == logs[1]  # records after the crash's last checkpoint were cut, then rewritten identically
    # Only the newest checkpoint is kept.
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-000000020"]


def test_resume_refuses_a_changed_config(planted, tmp_path):
    cfg = small_cfg(tokens=4 * 512)
    train(planted, tmp_path / "r", cfg, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"changed \['k'\]"):
        train(planted, tmp_path / "r", small_cfg(tokens=4 * 512, k=5), device="cpu", resume=True, progress=False)
    # More tokens is allowed: the run continues where it stopped.
    more = train(planted, tmp_path / "r", small_cfg(tokens=6 * 512), device="cpu", resume=True, progress=False)
    assert more.steps == 6


def test_an_existing_run_is_kept_unless_overwrite(planted, tmp_path):
    cfg = small_cfg(tokens=4 * 512, log_every=2)
    first = train(planted, tmp_path / "r", cfg, device="cpu", progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(planted, tmp_path / "r", small_cfg(tokens=4 * 512, seed=9), device="cpu", progress=False)
    assert json.loads((tmp_path / "r" / "latest.json").read_text())["step"] == 4  # untouched
    again = train(planted, tmp_path / "r", small_cfg(tokens=4 * 512, seed=9, log_every=2), device="cpu",
                  progress=False, overwrite=True)
    assert not torch.equal(first.sae.W_dec, again.sae.W_dec)
    assert [json.loads(ln)["step"] for ln in (tmp_path / "r" / "log.jsonl").read_text().splitlines()] == [2, 4]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_trains_on_16_bit_datasets(tmp_path, dtype):
    url = str(tmp_path / dtype)
    synth(url, SynthConfig(rows=4096, d_model=16, dtype=dtype, docs=4096, seed=2, k=2, features=32))
    res = train(url, tmp_path / "run", small_cfg(n_latents=64, k=2, tokens=8 * 512, log_every=4), device="cpu",
                progress=False)
    assert res.steps == 8 and math.isfinite(res.last["fvu"]) and res.last["fvu"] < 1.0
    assert res.sae.W_dec.dtype == torch.float32


def test_train_rejects_bad_data(planted, tmp_path):
    with pytest.raises(FileNotFoundError):
        train(str(tmp_path / "nothing"), tmp_path / "o", small_cfg(), device="cpu", progress=False)
    with pytest.raises(ValueError, match="too few for 1 data-parallel rank"):
        train(planted, tmp_path / "o", small_cfg(batch_size=200_000, tokens=200_000), device="cpu", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device 'cuda' requested"):
            train(planted, tmp_path / "o", small_cfg(), device="cuda", progress=False)


# -- export --------------------------------------------------------------------------------------------------
def test_saelens_export_loads_back_identically(tmp_path):
    torch.manual_seed(4)
    sae = TopKSAE(12, 48, 5, k_aux=7)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    export_saelens(sae, tmp_path / "sae", dataset="memory://x")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == ("topk", 12, 48, 5)
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    with safe_open(str(tmp_path / "sae" / "sae_weights.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"W_enc": (12, 48), "W_dec": (48, 12), "b_enc": (48,), "b_dec": (12,)}
    back = load_saelens(tmp_path / "sae")
    for name, p in sae.state_dict().items():
        assert torch.equal(p, back.state_dict()[name]), name
    assert back.k == 5 and back.k_aux == 7
    x = torch.randn(9, 12)
    assert torch.equal(sae(x).recon, back(x).recon)


def test_load_saelens_rejects_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAELens cfg.json"):
        load_saelens(tmp_path)
    export_saelens(TopKSAE(4, 8, 2), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(ValueError, match="architecture 'jumprelu'"):
        load_saelens(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 16}))
    with pytest.raises(ValueError, match=r"W_enc has shape \(4, 8\); cfg.json implies \(4, 16\)"):
        load_saelens(tmp_path / "s")

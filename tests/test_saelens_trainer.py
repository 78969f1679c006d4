"""SAELens's own trainer (the real sae-lens package, the `saelens` extra) fed by our stream through
readers.saelens: a TopK, a JumpReLU and a standard SAE train for a few hundred steps on a shuffled planted-feature dataset,
their FVU falls, and the SAEs SAELens saves load back in trainer.evaluate with the outputs SAELens gives them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import shuffler
from readers import ActivationStream
from readers.saelens import StreamProvider, data_provider
from trainer.evaluate import evaluate, load_sae
from writers.synth import SynthConfig, synth

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import (  # noqa: E402
    SAE,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

D_MODEL, FEATURES, K, LATENTS = 32, 64, 4, 128
BATCH, STEPS = 256, 300


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    """20k rows of sparse combinations (4 of 64) of planted directions, globally shuffled."""
    tmp = tmp_path_factory.mktemp("lens-train")
    synth(str(tmp / "raw"), SynthConfig(rows=20_000, d_model=D_MODEL, docs=200, seed=3, k=K, features=FEATURES))
    shuffler.shuffle(str(tmp / "raw"), str(tmp / "shuffled"), seed=1, workers=1)
    return str(tmp / "shuffled")


ARCHS = {
    "topk": lambda: TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=LATENTS, k=K)),
    "jumprelu": lambda: JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D_MODEL, d_sae=LATENTS,
                                                                      l0_coefficient=0.05)),
    "standard": lambda: StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=LATENTS,
                                                                      l1_coefficient=0.5)),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_saelens_trains_from_the_stream(shuffled, tmp_path, arch):
    torch.manual_seed(0)
    # what a SAELens user writes (docs/trainer.md)
    cfg = SAETrainerConfig(total_training_samples=STEPS * BATCH, train_batch_size_samples=BATCH, lr=3e-3,
                           lr_end=3e-3, device="cpu")
    provider = data_provider(shuffled, batch_size=BATCH, total_training_samples=cfg.total_training_samples,
                             seed=5)
    sae = ARCHS[arch]()
    assert provider.d_in == D_MODEL == sae.cfg.d_in
    sae.save_inference_model(str(tmp_path / "before"))
    trained = SAETrainer(cfg, sae, provider).fit()
    provider.close()
    trained.save_inference_model(str(tmp_path / "after"))

    ours_before, ours_after = load_sae(tmp_path / "before"), load_sae(tmp_path / "after")
    before = evaluate(ours_before, shuffled, rows=8192)
    after = evaluate(ours_after, shuffled, rows=8192)
    print(f"SAELens {arch} from the stream: FVU {before['fvu']:.3f} -> {after['fvu']:.3f}, L0 {after['l0']:.1f}")
    assert after["rows"] == 8192
    assert after["fvu"] < 0.3 and after["fvu"] < before["fvu"] / 3
    if arch == "topk":
        assert after["l0"] <= K

    # our evaluation computes what SAELens's own inference SAE computes from the saved folder
    lens = SAE.load_from_disk(str(tmp_path / "after"))
    x = next(iter(ActivationStream(shuffled, batch_size=512, device="cpu"))).acts.float()
    with torch.no_grad():
        assert torch.allclose(ours_after(x).recon, lens(x), rtol=1e-4, atol=1e-4)


def test_provider_takes_the_stream_in_order_and_resumes(shuffled):
    stream = ActivationStream(shuffled, batch_size=1000, device="cpu", drop_last=True, seed=2, epochs=2)
    want = [b.acts.clone() for b in stream]
    p = StreamProvider(ActivationStream(shuffled, batch_size=1000, device="cpu", drop_last=True, seed=2, epochs=2))
    got = [next(p).clone() for _ in range(7)]
    state = p.state_dict()
    p.close()
    q = StreamProvider(ActivationStream(shuffled, batch_size=1000, device="cpu", drop_last=True, seed=2, epochs=2))
    q.load_state_dict(state)
    got += [next(q).clone() for _ in range(len(want) - 7)]
    assert len(got) == len(want) == 40 and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(RuntimeError, match=r"ended after 2 epoch\(s\) of 20 batches of 1000 rows .* more epochs"):
        next(q)


def test_data_provider_opens_enough_epochs(shuffled):
    p = data_provider(shuffled, batch_size=3000, total_training_samples=50_000)
    assert p.stream.config.epochs == 3 and p.stream.config.drop_last  # 17 steps, 6 whole batches per epoch
    n = sum(len(next(p)) for _ in range(17))
    assert n == 17 * 3000
    p.close()
    with pytest.raises(ValueError, match="device=None"):
        StreamProvider(ActivationStream(shuffled, batch_size=10))
    with pytest.raises(ValueError, match="do not fill one batch"):
        data_provider(shuffled, batch_size=50_000, total_training_samples=10)
    assert np.isfinite(evaluate(load_sae_like_ours(), shuffled, rows=100)["fvu"])


def load_sae_like_ours():
    from trainer import TopKSAE

    return TopKSAE(D_MODEL, 16, 2)

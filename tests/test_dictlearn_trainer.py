"""dictionary_learning's `trainSAE` (PyPI `dictionary-learning`, the `dictlearn` extra plus the Makefile's
--no-deps line; see pyproject.toml for why) consumes our stream: `trainSAE(data, ...)` iterates `data` for
`[batch, d]` tensors (dictionary_learning/training.py), which is what readers.saelens.StreamProvider yields.
A TopK SAE trains 300 steps on a shuffled planted-feature dataset and its FVU falls.
"""

from __future__ import annotations

import pytest
import torch

import shuffler
from readers import ActivationStream
from readers.saelens import data_provider
from writers.synth import SynthConfig, synth

pytest.importorskip("dictionary_learning")
from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer  # noqa: E402
from dictionary_learning.training import trainSAE  # noqa: E402

D_MODEL, FEATURES, K, LATENTS, BATCH, STEPS = 32, 64, 4, 128, 256, 300


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def fvu(ae, x: torch.Tensor) -> float:
    with torch.no_grad():
        e = x - ae(x)
    return float(e.pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_trainsae_consumes_the_stream(tmp_path):
    synth(str(tmp_path / "raw"), SynthConfig(rows=20_000, d_model=D_MODEL, docs=200, seed=3, k=K, features=FEATURES))
    shuffler.shuffle(str(tmp_path / "raw"), str(tmp_path / "shuffled"), seed=1, workers=1)
    url = str(tmp_path / "shuffled")
    x = next(iter(ActivationStream(url, batch_size=8192, device="cpu", seed=9))).acts.float().clone()

    torch.manual_seed(0)
    provider = data_provider(url, batch_size=BATCH, total_training_samples=(STEPS + 1) * BATCH, seed=5)  # trainSAE takes one more
    cfg = dict(trainer=TopKTrainer, dict_class=AutoEncoderTopK, activation_dim=D_MODEL, dict_size=LATENTS, k=K,
               steps=STEPS, lr=3e-3, warmup_steps=10, layer=0, lm_name="synth", device="cpu", seed=0)
    untrained = AutoEncoderTopK(D_MODEL, LATENTS, K)
    trainSAE(data=provider, trainer_configs=[cfg], steps=STEPS, device="cpu", save_dir=str(tmp_path / "dl"))
    provider.close()
    before = fvu(untrained, x)
    ae = AutoEncoderTopK.from_pretrained(str(tmp_path / "dl" / "trainer_0" / "ae.pt"), k=K, device="cpu")
    after = fvu(ae, x)
    print(f"dictionary_learning TopK from the stream: FVU {before:.3f} -> {after:.3f}")
    assert after < 0.3 and after < before / 3
    assert provider.stream.stats.batches >= STEPS  # every step's batch came from the stream

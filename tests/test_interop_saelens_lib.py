"""Round trips checked against the real sae-lens package (the `saelens` extra), not against our reading of it.

- Our SAE export loads with SAELens's `SAE.load_from_disk` as a TopKSAE with our weights and outputs, and its
  metadata carries the hook name, so `HookedSAETransformer.add_sae` attaches it where the data came from.
- SAELens TopK folders with apply_b_dec_to_input false or rescale_acts_by_decoder_norm true load with
  `trainer.load_saelens` computing what SAELens computes from them.
- A SAELens cache imported, then shuffled, exports back with its hook name and context size.
- A cache made with SAELens's seqpos_slice imports with the positions the model saw, given the offset.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

try:  # tests/ may or may not be a package (tests/__init__.py); work either way
    from .test_interop_saelens import HOOK, saelens_cache, saelens_load
except ImportError:
    from test_interop_saelens import HOOK, saelens_cache, saelens_load

import shuffler
from shuffler.interop.exporter import ExportConfig, export_dataset
from shuffler.io.dataset import Dataset
from trainer import TopKSAE, TrainConfig, export_saelens, load_saelens, train
from writers.importers import ImportConfig, import_activations

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import (  # noqa: E402
    SAE,
    HookedSAETransformer,
    TopKSAEConfig,  # noqa: E402
)
from sae_lens import TopKSAE as LensTopKSAE  # noqa: E402
from sae_lens.cache_activations_runner import CacheActivationsRunner  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402

CTX, D = 16, 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shuffled_import(tmp_path_factory):
    """A SAELens cache (context 16, hook blocks.3.hook_resid_post) imported and shuffled."""
    tmp = tmp_path_factory.mktemp("lens")
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((64, CTX, D)).astype(np.float32)
    tok = rng.integers(0, 50, (64, CTX)).astype(np.int32)
    saelens_cache(tmp / "cache", acts, tok)
    import_activations(str(tmp / "cache"), str(tmp / "raw"))
    shuffler.shuffle(str(tmp / "raw"), str(tmp / "shuffled"), seed=0, workers=1)
    return tmp, acts


def test_exported_sae_loads_in_saelens_with_its_hook(shuffled_import):
    tmp, _ = shuffled_import
    url = str(tmp / "shuffled")
    cfg = TrainConfig(n_latents=48, k=4, batch_size=64, tokens=64 * 8, log_every=4, init_tokens=256)
    ours = train(url, tmp / "run", cfg, device="cpu", export_saelens=tmp / "sae", overwrite=True).sae
    raw = json.loads((tmp / "sae" / "cfg.json").read_text())
    assert "meta" not in raw and raw["metadata"]["sae_lens_version"].startswith("6.")

    lens = SAE.load_from_disk(str(tmp / "sae"))
    assert isinstance(lens, LensTopKSAE) and lens.cfg.k == 4 and lens.cfg.d_sae == 48
    assert lens.cfg.metadata.hook_name == HOOK  # found through the shuffle's source_metadata
    assert lens.cfg.metadata.context_size == CTX and lens.cfg.metadata.dataset_path == url
    for name, p in ours.state_dict().items():
        assert torch.equal(p, getattr(lens, name).detach()), name
    x = torch.randn(50, D)
    assert torch.allclose(lens(x), ours(x).recon, atol=1e-5)
    assert torch.equal(lens.encode(x) != 0, ours.encode_dense(x) != 0)

    model = HookedSAETransformer(HookedTransformerConfig(n_layers=4, d_model=D, n_ctx=CTX, d_head=4, d_vocab=50,
                                                         act_fn="relu"))
    model.add_sae(lens)
    assert list(model.acts_to_saes) == [HOOK]  # attached where the activations came from
    _, cache = model.run_with_cache_with_saes(torch.randint(0, 50, (2, CTX)), saes=[lens])
    assert f"{HOOK}.hook_sae_acts_post" in cache


def test_metadata_without_provenance(tmp_path):
    export_saelens(TopKSAE(4, 8, 2), tmp_path / "s", dataset="memory://x")
    lens = SAE.load_from_disk(str(tmp_path / "s"))
    assert lens.cfg.metadata.hook_name is None and lens.cfg.metadata.dataset_path == "memory://x"


@pytest.mark.parametrize("apply_b_dec, rescale", [(False, False), (True, True), (False, True)])
def test_load_saelens_honours_b_dec_and_rescale(tmp_path, apply_b_dec, rescale):
    torch.manual_seed(1)
    d, n, k = 16, 64, 4
    lens = LensTopKSAE(TopKSAEConfig(d_in=d, d_sae=n, k=k, apply_b_dec_to_input=apply_b_dec,
                                     rescale_acts_by_decoder_norm=rescale))
    with torch.no_grad():
        lens.W_enc.copy_(torch.randn(d, n) * 0.3)
        lens.W_dec.copy_(torch.randn(n, d) * torch.rand(n, 1) * 2)  # rows of unequal norms
        lens.b_enc.copy_(torch.randn(n) * 0.1)
        lens.b_dec.copy_(torch.randn(d) * 3)
    lens.save_model(str(tmp_path / "s"))
    ours = load_saelens(tmp_path / "s")
    x = torch.randn(500, d) * 2 + 1
    with torch.no_grad():
        want_z, want = lens.encode(x), lens(x)
    assert torch.equal(ours.encode_dense(x) != 0, want_z != 0)  # the same latents chosen
    assert torch.allclose(ours.encode_dense(x), want_z, rtol=1e-4, atol=1e-4)
    assert torch.allclose(ours(x).recon, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field, value", [("normalize_activations", "layer_norm"), ("reshape_activations", "hook_z"),
                                          ("apply_b_dec_to_input", "no")])
def test_load_saelens_refuses_what_it_cannot_honour(tmp_path, field, value):
    export_saelens(TopKSAE(4, 8, 2), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ValueError, match=f"{field}"):
        load_saelens(tmp_path / "s")


def test_shuffled_import_exports_with_its_hook_and_context(shuffled_import, tmp_path):
    tmp, acts = shuffled_import
    r = export_dataset(str(tmp / "shuffled"), str(tmp_path / "out"), ExportConfig(format="saelens"))
    assert (r.column, r.context_size, r.dropped_rows) == (HOOK, CTX, 0)
    back, toks = saelens_load(tmp_path / "out", HOOK, CTX, D, 8, "float32")
    assert back.shape == (64 * CTX, D)
    got = np.sort(back.numpy().view(np.int32).reshape(len(back), -1).sum(1))  # a permutation of the rows
    assert np.array_equal(got, np.sort(acts.reshape(-1, D).view(np.int32).sum(1)))


@pytest.mark.parametrize("seqpos", [(2, None), (3, 15, 2)])
def test_seqpos_slice_cache_imports_true_positions(tmp_path, seqpos):
    ctx = CacheActivationsRunner._get_sliced_context_size(CTX, seqpos)  # what SAELens stores per record
    seen = list(range(CTX))[slice(*seqpos)]  # the model positions those rows came from
    assert ctx == len(seen)
    rng = np.random.default_rng(1)
    saelens_cache(tmp_path / "cache", rng.standard_normal((5, ctx, D)).astype(np.float32), None)
    start, step = seqpos[0], (seqpos[2] if len(seqpos) > 2 else 1)
    import_activations(str(tmp_path / "cache"), str(tmp_path / "ds"),
                       ImportConfig(position_offset=start, position_step=step))
    ds = Dataset.open(str(tmp_path / "ds"))
    pos = np.concatenate([ds.read_shard(i).columns["position"] for i in range(len(ds.shards))])
    assert pos.tolist() == seen * 5
    assert (ds.metadata["position_offset"], ds.metadata["position_step"]) == (start, step)


def test_position_offset_refused_where_positions_are_not_derived(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="position_offset/position_step apply to"):
        import_activations(str(tmp_path / "a.npy"), str(tmp_path / "ds"), ImportConfig(position_offset=2))
    assert not (tmp_path / "ds").exists()
    with pytest.raises(ValueError, match="position_step=0 must be an integer >= 1"):
        ImportConfig(position_step=0)

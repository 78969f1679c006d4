"""Several layers in one capture (issue 19): real all-MiniLM-L6-v2 on CPU, each layer a field of the same rows.

The fields equal what a one-layer capture of each layer stores (same windows, same arithmetic: bit-identical),
they come from one forward pass that stops after the deepest layer, and `shuffler capture --layer 2 --layer 4`
then `shuffler train --input layer.2 --target layer.4` trains a transcoder on the real capture whose export
SAELens loads with both hook names.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shuffler.cli import main
from shuffler.io.dataset import Batch, Dataset
from writers import ShardWriter, capture
from writers.capture import resolve_layers

try:  # tests/ may or may not be a package (tests/__init__.py); work either way
    from .test_capture import batches, docs, minilm, run  # noqa: F401  (fixtures)
except ImportError:
    from test_capture import batches, docs, minilm, run  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def run_fields(minilm, docs, url, layers, fields, *, forward=None, **kw):
    with ShardWriter(url, fields=fields, chunk_bytes=1 << 18) as w:
        extra = {} if forward is None else {"forward": forward}
        stats = capture(minilm.model, batches(minilm, docs, **kw), w, layer=layers, **extra)
    ds = Dataset.open(url)
    return stats, ds, Batch.concat([b for _, _, b in ds.iter_chunks()])


def test_fields_equal_one_layer_captures_from_one_forward_pass(minilm, docs, tmp_path):
    calls = []
    ran_last_block = []

    def forward(model, input_ids, attention_mask, **kw):
        calls.append(input_ids.shape)
        return model(input_ids=input_ids, attention_mask=attention_mask, **kw)

    h = minilm.model.encoder.layer[5].register_forward_hook(lambda *a: ran_last_block.append(1))
    try:
        stats, ds, got = run_fields(minilm, docs[:12], str(tmp_path / "two"), (2, "encoder.layer.3.output"),
                                    {"layer.2": (384, "float32"), "encoder.layer.3.output": (384, "bfloat16")},
                                    forward=forward)
    finally:
        h.remove()
    assert len(calls) == stats.batches  # one forward pass per batch for both layers
    assert not ran_last_block  # the pass stopped after the deepest hooked layer (block 3 of 6)
    assert ds.fields == ("layer.2", "encoder.layer.3.output")
    _, _, two = run(minilm, docs[:12], str(tmp_path / "l2"), layer=2)
    _, _, four = run(minilm, docs[:12], str(tmp_path / "m3"), layer="encoder.layer.3.output", dtype="bfloat16")
    assert np.array_equal(got.field("layer.2"), two.acts)  # bit-identical, row for row
    assert np.array_equal(got.field("encoder.layer.3.output"), four.acts)
    for c in ("token_id", "doc_id", "position"):
        assert np.array_equal(got.columns[c], two.columns[c])


def test_the_last_hidden_state_with_another_layer(minilm, docs, tmp_path):
    _, _, got = run_fields(minilm, docs[:4], str(tmp_path / "x"), (-1, 1),
                           {"layer.6": (384, "float32"), "layer.1": (384, "float32")})
    _, _, last = run(minilm, docs[:4], str(tmp_path / "l"), layer=6)
    _, _, first = run(minilm, docs[:4], str(tmp_path / "f"), layer=1)
    assert np.array_equal(got.field("layer.6"), last.acts) and np.array_equal(got.field("layer.1"), first.acts)


def test_layer_and_field_errors(minilm, docs, tmp_path):
    with pytest.raises(ValueError, match=r"name \['layer.3'\] more than once"):
        resolve_layers(minilm.model, (3, "3"))
    with pytest.raises(Exception, match=r"2 layer\(s\) \['2', '4'\] need as many activation fields"):
        with ShardWriter(str(tmp_path / "w"), d_model=384, dtype="float32") as w:
            capture(minilm.model, batches(minilm, docs[:2]), w, layer=("2", "4"))
    assert not (tmp_path / "w").exists()
    with pytest.raises(Exception, match=r"field 'layer.4' of d_model=16"):
        with ShardWriter(str(tmp_path / "v"), fields={"layer.2": (384, "float32"), "layer.4": (16, "float32")}) as w:
            capture(minilm.model, batches(minilm, docs[:2]), w, layer=(2, 4))


def test_cli_capture_two_layers_then_train_a_transcoder(tmp_path):
    pytest.importorskip("sae_lens")
    from sae_lens import SAE

    import trainer.saelens_transcoder  # noqa: F401  (registers "topk_transcoder" with SAELens)
    from trainer.evaluate import evaluate, load_sae

    out, run_dir = tmp_path / "two", tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(main, ["capture", str(out), "--model", "all-MiniLM-L6-v2", "--layer", "2", "--layer", "4",
                             "--max-tokens", "4096", "--context", "64", "--device", "cpu", "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    assert "captured 4,096 tokens x layer.2 384 bfloat16, layer.4 384 bfloat16" in r.output
    ds = Dataset.open(str(out))
    assert ds.fields == ("layer.2", "layer.4") and ds.num_rows == 4096
    assert ds.metadata["hook_names"] == {"layer.2": "blocks.2.hook_resid_pre", "layer.4": "blocks.4.hook_resid_pre"}
    r = runner.invoke(main, ["shuffle", str(out), str(tmp_path / "shuf"), "--seed", "1", "--workers", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["train", str(tmp_path / "shuf"), "--input", "layer.2", "--target", "layer.4",
                             "--latents", "512", "--k", "16", "--batch-size", "256", "--tokens", str(256 * 48),
                             "--lr", "2e-3", "--log-every", "16", "--out", str(run_dir), "--device", "cpu",
                             "--export-saelens", str(run_dir / "saelens")])
    assert r.exit_code == 0, r.output
    log = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines()]
    assert log[-1]["fvu"] < 0.6 and log[-1]["fvu"] < log[0]["fvu"], log  # layer 4 predicted from layer 2
    lens = SAE.load_from_disk(str(run_dir / "saelens"))
    assert (lens.cfg.metadata.hook_name, lens.cfg.metadata.hook_name_out) == ("blocks.2.hook_resid_pre",
                                                                              "blocks.4.hook_resid_pre")
    assert lens.cfg.metadata.model_name == "all-MiniLM-L6-v2"
    b = next(iter(Dataset.open(str(tmp_path / "shuf")).iter_chunks()))[2].to_torch()
    x = b.field("layer.2")[:64].float()
    ours = load_sae(run_dir / "saelens")
    with torch.no_grad():
        torch.testing.assert_close(lens(x), ours(x).recon, rtol=1e-4, atol=1e-4)
    m = evaluate(ours, str(tmp_path / "shuf"), input="layer.2", target="layer.4")
    assert m["rows"] == 4096 and m["fvu"] < 0.6

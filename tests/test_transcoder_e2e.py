"""A TopK transcoder trained end to end on a two-field dataset: train(), `shuffler train --input --target`,
resume, export, evaluate. The data is tests/test_transcoder.py's planted sparse map (x = z A + noise in
field "layer.2", y = z B in field "layer.4", z sparse), written with ShardWriter(fields=...)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shuffler.cli import main
from trainer import TrainConfig, load_saelens, train
from trainer.evaluate import evaluate, load_sae
from writers import ShardWriter

try:  # tests/ may or may not be a package (tests/__init__.py); work either way
    from .test_transcoder import D_IN, D_OUT, FVU_BAR, K, planted_pair
except ImportError:
    from test_transcoder import D_IN, D_OUT, FVU_BAR, K, planted_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

ROWS = 40_960
HOOKS = {"layer.2": "blocks.2.hook_resid_pre", "layer.4": "blocks.4.hook_resid_pre"}


@pytest.fixture(scope="module")
def two_fields(tmp_path_factory):
    """The planted pair as fields layer.2 (float32, 24 wide) and layer.4 (bfloat16, 16 wide) of one dataset."""
    url = str(tmp_path_factory.mktemp("tc") / "ds")
    x, y, _ = planted_pair(ROWS, 1)
    ids = np.arange(ROWS)
    with ShardWriter(url, fields={"layer.2": (D_IN, "float32"), "layer.4": (D_OUT, "bfloat16")},
                     metadata={"hook_name": HOOKS["layer.2"], "hook_names": HOOKS}, chunk_bytes=1 << 18,
                     shard_bytes=1 << 20) as w:
        for a in range(0, ROWS, 8192):
            s = slice(a, a + 8192)
            w.write({"layer.2": x[s], "layer.4": y[s]}, token_id=ids[s], doc_id=ids[s], position=ids[s] * 0)
    return url


def cfg(**kw) -> TrainConfig:
    base = dict(n_latents=128, k=K, batch_size=512, tokens=512 * 600, lr=4e-3, dead_tokens=5000, log_every=100,
                input="layer.2", target="layer.4")
    return TrainConfig(**{**base, **kw})


def test_train_learns_the_planted_map_and_exports_it(two_fields, tmp_path):
    res = train(two_fields, tmp_path / "run", cfg(), device="cpu", progress=False,
                export_saelens=tmp_path / "saelens")
    assert res.sae.transcoder and (res.sae.d_in, res.sae.d_out) == (D_IN, D_OUT)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert records[0]["fvu"] > 0.5 and res.last["fvu"] < FVU_BAR, (records[0], res.last)  # FVU of the target
    assert res.last["l0"] <= K
    # The export carries both hooks; evaluated on the target field it gives the log's FVU (same rows, same model).
    c = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert (c["architecture"], c["d_out"]) == ("topk_transcoder", D_OUT)
    assert (c["metadata"]["hook_name"], c["metadata"]["hook_name_out"]) == (HOOKS["layer.2"], HOOKS["layer.4"])
    tc = load_sae(tmp_path / "saelens")
    m = evaluate(tc, two_fields, input="layer.2", target="layer.4", rows=8192)
    assert m["rows"] == 8192 and m["fvu"] < FVU_BAR and m["l0"] <= K
    with pytest.raises(ValueError, match="name the target field"):
        evaluate(tc, two_fields)
    with pytest.raises(ValueError, match="the model maps 24 -> 16"):
        evaluate(tc, two_fields, input="layer.4", target="layer.2")


def test_resume_equals_uninterrupted(two_fields, tmp_path):
    c = cfg(tokens=512 * 20, checkpoint_every=6, log_every=4)
    whole = train(two_fields, tmp_path / "whole", c, device="cpu", progress=False)

    class Crash(Exception):
        pass

    def crash_at_14(step):
        if step == 14:
            raise Crash

    with pytest.raises(Crash):
        train(two_fields, tmp_path / "cut", c, device="cpu", progress=False, on_step=crash_at_14)
    resumed = train(two_fields, tmp_path / "cut", c, device="cpu", progress=False, resume=True)
    for name, p in whole.sae.state_dict().items():
        assert torch.equal(p, resumed.sae.state_dict()[name]), name
    meta = json.loads((tmp_path / "cut" / "checkpoints" / "step-000000020" / "meta.json").read_text())
    assert (meta["d_in"], meta["d_out"], meta["config"]["target"]) == (D_IN, D_OUT, "layer.4")
    with pytest.raises(ValueError, match=r"changed \['target'\]"):  # an SAE cannot resume a transcoder's run
        train(two_fields, tmp_path / "cut", cfg(tokens=512 * 20, checkpoint_every=6, log_every=4, target=None),
              device="cpu", progress=False, resume=True)


def test_an_sae_on_a_named_field_and_bad_names(two_fields, tmp_path):
    res = train(two_fields, tmp_path / "sae", cfg(tokens=512 * 4, input="layer.4", target=None), device="cpu",
                progress=False)
    assert not res.sae.transcoder and res.sae.d_in == D_OUT
    first = train(two_fields, tmp_path / "first", cfg(tokens=512 * 4, input=None, target=None), device="cpu",
                  progress=False)
    assert not first.sae.transcoder and first.sae.d_in == D_IN  # no names: the dataset's first field
    with pytest.raises(ValueError, match=r"no activation field 'layer.9' \(the target\); its fields are "
                                         r"\['layer.2', 'layer.4'\]"):
        train(two_fields, tmp_path / "bad", cfg(target="layer.9"), device="cpu", progress=False)
    assert not (tmp_path / "bad").exists()  # nothing written for a refused run


def test_cli_trains_a_transcoder(two_fields, tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(main, ["train", two_fields, "--input", "layer.2", "--target", "layer.4", "--latents", "128",
                                  "--k", str(K), "--batch-size", "512", "--tokens", "4096", "--out", str(out),
                                  "--device", "cpu", "--export-saelens", str(out / "saelens")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-2])["step"] == 8
    assert load_saelens(out / "saelens").d_out == D_OUT
    r = CliRunner().invoke(main, ["train", two_fields, "--input", "layer.2", "--target", "nope", "--latents", "128",
                                  "--k", "4", "--tokens", "4096", "--batch-size", "512", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "no activation field 'nope'" in r.output

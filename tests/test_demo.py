"""The main job end to end on a real transformer, at a tiny size: capture, shuffle, verify, train, features."""

from __future__ import annotations

import json

from shuffler import Dataset
from shuffler.cli.demo import DemoConfig, join_wordpieces, run


def test_demo_end_to_end_small(tmp_path):
    out = tmp_path / "demo"
    res = run(DemoConfig(out=str(out), capture_tokens=3000, train_tokens=24_000, latents=256, k=16,
                         batch_size=512, dead_tokens=20_000, features=4, examples=3))
    s = res["summary"]
    assert s["rows"] == 3000 and s["d_model"] == 384
    assert 0 < s["fvu"] < 1.0 and abs(s["l0"] - 16) < 1e-6
    # The transcoder section: layer 3 -> layer 4 of the same capture, FVU measured on layer 4.
    tc = res["transcoder"]
    assert (tc["input"], tc["target"]) == ("layer.3", "layer.4") and 0 < tc["fvu"] < 1.0 and tc["l0"] <= 16
    assert 1 <= len(tc["features"]) <= 2 and all(len(f["examples"]) == 3 for f in tc["features"])
    # The shuffle really mixed documents: capture order is almost all same-document neighbours.
    assert s["adjacent_same_doc"]["capture"] > 0.9 > 0.2 > s["adjacent_same_doc"]["shuffled"]
    assert set(s["stages"]) == {"capture", "shuffle", "verify", "train", "features", "transcoder"}
    assert 1 <= len(res["features"]) <= 4
    for f in res["features"]:
        assert len(f["examples"]) == 3
        for e in f["examples"]:
            assert "[[" in e["text"] and "]]" in e["text"] and e["activation"] > 0
    report = (out / "report.md").read_text()
    assert "training_curve.png" in report and "### feature" in report
    assert "## Transcoder: layer.3 -> layer.4" in report
    assert (out / "training_curve.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["summary"]["rows"] == 3000


def test_demo_without_the_transcoder_captures_one_layer(tmp_path):
    res = run(DemoConfig(out=str(tmp_path / "d"), capture_tokens=1500, train_tokens=4096, latents=64, k=8,
                         batch_size=512, features=2, examples=2, transcoder=False))
    assert res["transcoder"] is None and "transcoder" not in res["summary"]["stages"]
    assert Dataset.open(str(tmp_path / "d" / "raw")).fields == ("acts",)  # today's one-field dataset
    assert "Transcoder" not in (tmp_path / "d" / "report.md").read_text()


def test_join_wordpieces():
    assert join_wordpieces(["sub", "[[##nor]]", "##mal", "result"]) == "sub[[nor]]mal result"
    assert join_wordpieces(["[[if]]", "given"]) == "[[if]] given"

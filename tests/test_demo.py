"""The main job end to end on a real transformer, at a tiny size: capture, shuffle, verify, train, features."""

from __future__ import annotations

import json

from shuffler.cli.demo import DemoConfig, join_wordpieces, run


def test_demo_end_to_end_small(tmp_path):
    out = tmp_path / "demo"
    res = run(DemoConfig(out=str(out), capture_tokens=3000, train_tokens=24_000, latents=256, k=16,
                         batch_size=512, dead_tokens=20_000, features=4, examples=3))
    s = res["summary"]
    assert s["rows"] == 3000 and s["d_model"] == 384
    assert 0 < s["fvu"] < 1.0 and abs(s["l0"] - 16) < 1e-6
    # The shuffle really mixed documents: capture order is almost all same-document neighbours.
    assert s["adjacent_same_doc"]["capture"] > 0.9 > 0.2 > s["adjacent_same_doc"]["shuffled"]
    assert set(s["stages"]) == {"capture", "shuffle", "verify", "train", "features"}
    assert 1 <= len(res["features"]) <= 4
    for f in res["features"]:
        assert len(f["examples"]) == 3
        for e in f["examples"]:
            assert "[[" in e["text"] and "]]" in e["text"] and e["activation"] > 0
    report = (out / "report.md").read_text()
    assert "training_curve.png" in report and "### feature" in report
    assert (out / "training_curve.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["summary"]["rows"] == 3000


def test_join_wordpieces():
    assert join_wordpieces(["sub", "[[##nor]]", "##mal", "result"]) == "sub[[nor]]mal result"
    assert join_wordpieces(["[[if]]", "given"]) == "[[if]] given"

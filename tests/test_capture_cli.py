"""`shuffler capture` through click's CliRunner and one real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from shuffler.cli import main
from shuffler.io.dataset import Batch, Dataset

ROOT = Path(__file__).resolve().parents[1]


def _text(tmp_path: Path) -> Path:
    d = tmp_path / "text"
    d.mkdir()
    (d / "a.txt").write_text("Activations are captured in document order, so they must be shuffled. " * 12)
    (d / "b.md").write_text("# Notes\n\nA sparse autoencoder learns features from shuffled activations. " * 12)
    return d


def test_cli_capture_text_folder(tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["capture", str(out), "--layer", "encoder.layer.1", "--max-tokens", "300",
                                  "--context", "48", "--text", str(_text(tmp_path)), "--batch-size", "3",
                                  "--dtype", "float16", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "captured 300 tokens x 384 float16" in r.output
    ds = Dataset.open(str(out))
    assert ds.num_rows == 300 and ds.dtype == "float16"
    m = ds.metadata
    assert (m["model"], m["layer"], m["context"], m["tokens"]) == ("all-MiniLM-L6-v2", "encoder.layer.1", 48, 300)
    assert str(tmp_path / "text") in m["text"] and "captured_at" in m
    b = Batch.concat([b for _, _, b in ds.iter_chunks()])
    assert set(np.unique(b.columns["doc_id"])) == {0, 1}  # both files, a.txt first
    assert b.columns["doc_id"][0] == 0 and b.columns["position"][0] == 0
    damaged, fp = ds.check()
    assert not damaged and fp == ds.manifest.fingerprint


def test_cli_errors_exit_1_and_leave_nothing(tmp_path):
    text = str(_text(tmp_path))
    runner = CliRunner()
    cases = [
        (["--layer", "encoder.layer.9"], "layer 'encoder.layer.9' is not a module of BertModel"),
        (["--layer", "9"], "layer 9: hidden_states index out of range; BertModel has 6 layers"),
        (["--layer", "2", "--model", "nobody/nothing"], "model 'nobody/nothing' not found offline; searched"),
        (["--layer", "2", "--text", str(tmp_path / "missing")], "no such folder"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        argv = ["capture", str(out), "--max-tokens", "100", "--context", "32", "--device", "cpu"]
        argv += args if "--text" in args else args + ["--text", text]
        r = runner.invoke(main, argv)
        assert r.exit_code == 1, (args, r.output)
        assert message in r.output, (args, r.output)
        assert not out.exists() or not any(out.iterdir()), args
    r = runner.invoke(main, ["capture", "x", "--layer", "1", "--max-tokens", "10", "--dtype", "int8"])
    assert r.exit_code == 2 and "int8" in r.output


def test_cli_refuses_to_overwrite(tmp_path):
    text = str(_text(tmp_path))
    argv = ["capture", str(tmp_path / "o"), "--layer", "1", "--max-tokens", "40", "--context", "16", "--text", text]
    runner = CliRunner()
    assert runner.invoke(main, argv).exit_code == 0
    r = runner.invoke(main, argv)
    assert r.exit_code == 1 and "already holds a dataset" in r.output
    assert runner.invoke(main, argv + ["--overwrite", "--max-tokens", "30"]).exit_code == 0
    assert Dataset.open(str(tmp_path / "o")).num_rows == 30


def test_cli_subprocess_default_stdlib_text(tmp_path):
    """A real process: default text (stdlib docstrings), hidden_states index, nothing downloaded."""
    out = tmp_path / "raw"
    env = dict(os.environ, SHUFFLER_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "shuffler", "capture", str(out), "--layer", "3",
                        "--max-tokens", "500", "--context", "64", "--dtype", "bfloat16"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "captured 500 tokens x 384 bfloat16" in r.stdout
    ds = Dataset.open(str(out))
    assert ds.num_rows == 500 and ds.metadata["layer_is"] == "hidden_states[3]"
    assert "stdlib docstrings" in ds.metadata["text"]
    help_ = subprocess.run([sys.executable, "-m", "shuffler", "capture", "--help"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert help_.returncode == 0 and "--max-tokens" in help_.stdout and "hidden_states index" in help_.stdout

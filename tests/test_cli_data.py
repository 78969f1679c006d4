"""synth, inspect and seal through click's CliRunner and through a real `shuffler` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from shuffler import Dataset
from shuffler.cli import main, parse_size
from writers import ShardWriter
from writers.synth import SynthConfig, load_planted, synth


def test_synth_inspect_json(tmp_path):
    url = str(tmp_path / "raw")
    r = CliRunner().invoke(main, ["synth", url, "--rows", "5000", "--d-model", "16", "--dtype", "bfloat16",
                                  "--docs", "10", "--chunk-bytes", "16KiB"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["inspect", url, "--json", "--check"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["rows"] == 5000 and info["d_model"] == 16 and info["dtype"] == "bfloat16"
    assert info["check"]["fingerprint_ok"] and info["check"]["damaged"] == []
    assert info["compression_ratio"] > 1.0
    assert info["metadata"]["synth"]["docs"] == 10
    assert [c[0] for c in info["columns"]] == ["token_id", "doc_id", "position"]


def test_synth_is_deterministic_and_document_ordered(tmp_path):
    cfg = SynthConfig(rows=3000, d_model=12, docs=6, seed=4)
    synth(str(tmp_path / "a"), cfg)
    synth(str(tmp_path / "b"), cfg)
    a, b = Dataset.open(str(tmp_path / "a")), Dataset.open(str(tmp_path / "b"))
    assert a.manifest.fingerprint == b.manifest.fingerprint
    batch = a.read_shard(0)
    doc = batch.columns["doc_id"]
    assert (np.diff(doc) >= 0).all() and len(np.unique(doc)) == 6  # document order
    pos = batch.columns["position"]
    assert (pos[doc != np.roll(doc, 1)] == 0).all()  # positions restart per document
    # Order is measurably non-random: adjacent rows are more alike than random pairs.
    x = batch.float32()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    adjacent = (x[1:] * x[:-1]).sum(1).mean()
    perm = np.random.default_rng(0).permutation(len(x))
    shuffled = (x[perm][1:] * x[perm][:-1]).sum(1).mean()
    assert adjacent > shuffled + 0.1
    d = load_planted(str(tmp_path / "a"))
    assert d.shape == (48, 12) and np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-5)


def test_inspect_missing_dataset_exits_nonzero(tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "nothing")])
    assert r.exit_code == 1
    assert "no manifest.json" in r.output


def test_seal_cli_and_unfinished(tmp_path):
    url = str(tmp_path / "d")
    for p in ("a", "b"):
        with ShardWriter(url, d_model=4, dtype="float32", producer=p) as w:
            w.write(np.ones((10, 4), np.float32), token_id=np.zeros(10, np.int32), doc_id=np.zeros(10, np.int64),
                    position=np.zeros(10, np.int32))
    ShardWriter(url, d_model=4, dtype="float32", producer="c")  # started, never finished
    r = CliRunner().invoke(main, ["seal", url])
    assert r.exit_code == 1 and "parts/c (no parts/c.json)" in r.output
    os.remove(tmp_path / "d" / "parts" / "c.started")
    r = CliRunner().invoke(main, ["seal", url])
    assert r.exit_code == 0, r.output
    assert Dataset.open(url).num_rows == 20


def test_bad_option_values(tmp_path):
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "x"), "--rows", "10", "--d-model", "4",
                                  "--chunk-bytes", "lots"])
    assert r.exit_code == 2 and "'lots' is not a size" in r.output
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "x"), "--rows", "10", "--d-model", "4", "--docs", "0"])
    assert r.exit_code == 1 and "docs=0" in r.output
    assert not (tmp_path / "x").exists() or not os.listdir(tmp_path / "x")
    assert parse_size("8GiB") == 8 << 30 and parse_size("1e9") == 10**9 and parse_size("512MiB") == 512 << 20


def test_real_subprocess(tmp_path):
    url = str(tmp_path / "raw")
    exe = [sys.executable, "-m", "shuffler"]
    env = dict(os.environ, SHUFFLER_NO_PROGRESS="1")
    out = subprocess.run(exe + ["synth", url, "--rows", "2000", "--d-model", "8"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(exe + ["inspect", url, "--check"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "OK: every chunk" in out.stdout
    out = subprocess.run(exe + ["inspect", str(tmp_path / "none")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 1 and "no manifest.json" in out.stderr
    help_out = subprocess.run(exe + ["--help"], capture_output=True, text=True, env=env, timeout=120)
    assert "synth" in help_out.stdout and "inspect" in help_out.stdout


def test_every_command_has_help_and_loads():
    from shuffler.cli import COMMANDS, LazyGroup

    group = LazyGroup()
    for name, (target, line) in COMMANDS.items():
        assert ":" in target and line.strip() and "\n" not in line, name
        cmd = group.get_command(None, name)
        assert cmd is not None and cmd.help, name
        r = CliRunner().invoke(main, [name, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output, (name, r.output)


def test_help_lists_commands_without_importing_them():
    code = ("import sys\nfrom shuffler.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = ('torch', 'ray', 'transformers', 'pyarrow', 'shuffler.cli.data', 'shuffler.cli.shuffle',"
            " 'shuffler.cli.train', 'shuffler.cli.capture', 'shuffler.cli.interop', 'shuffler.cli.demo')\n"
            "print('IMPORTED', [m for m in heavy if m in sys.modules])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout, out.stdout
    assert "capture" in out.stdout and "Capture a model layer's activations" in out.stdout

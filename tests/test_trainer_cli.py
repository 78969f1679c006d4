"""`shuffler train` through click's CliRunner, and as two real processes under torchrun's environment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from shuffler.cli import main
from trainer import load_saelens
from writers.synth import SynthConfig, synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("cli") / "ds")
    synth(url, SynthConfig(rows=16_384, d_model=16, docs=16_384, seed=5, k=3, features=48))
    return url


def run(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)], catch_exceptions=False)


def test_cli_trains_logs_checkpoints_and_exports(data, tmp_path):
    out, sae_dir = tmp_path / "run", tmp_path / "sae"
    r = run(data, "--latents", 64, "--k", 3, "--batch-size", 512, "--tokens", "8192", "--out", out,
            "--device", "cpu", "--lr", "4e-3", "--log-every", 8, "--export-saelens", sae_dir, "--seed", 1)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.splitlines()[0])
    assert summary["step"] == 16 and summary["tokens"] == 8192 and summary["l0"] <= 3
    assert [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()] == [8, 16]
    assert json.loads((out / "latest.json").read_text())["step"] == 16
    sae = load_saelens(sae_dir)
    assert (sae.d_in, sae.n_latents, sae.k) == (16, 64, 3)
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert cfg["activation_shuffler"]["train_config"]["seed"] == 1
    # --resume after the end: nothing left to do, same weights.
    r = run(data, "--latents", 64, "--k", 3, "--batch-size", 512, "--tokens", "8192", "--out", out,
            "--device", "cpu", "--lr", "4e-3", "--log-every", 8, "--seed", 1, "--resume")
    assert r.exit_code == 0, r.output
    assert "already at step 16 of 16" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--latents", "8", "--k", "16"], "k=16 must be <= n_latents=8"),
        (["--latents", "64", "--k", "4", "--tokens", "10"], "less than one batch"),
        (["--latents", "64", "--k", "4", "--tokens", "1.5"], "must be a whole number of tokens"),
        (["--latents", "64", "--k", "4", "--latent-shards", "2"], "latent_shards=2 needs that many processes"),
        (["--latents", "64", "--k", "4", "--batch-size", "100000", "--tokens", "100000"], "too few for 1"),
    ],
)
def test_cli_rejects_bad_input(data, tmp_path, args, message):
    base = {"--tokens": "4096", "--batch-size": "512"}
    for i in range(0, len(args), 2):
        base.pop(args[i], None)
    extra = [x for kv in base.items() for x in kv]
    r = CliRunner().invoke(main, ["train", data, "--out", str(tmp_path / "o"), "--device", "cpu", *args, *extra])
    assert r.exit_code != 0
    assert message in r.output, r.output
    assert not (tmp_path / "o" / "latest.json").exists()  # nothing half-written


def test_cli_missing_dataset_exits_1(tmp_path):
    r = CliRunner().invoke(main, ["train", str(tmp_path / "none"), "--latents", "8", "--k", "2", "--tokens",
                                  "64", "--batch-size", "8", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert r.exit_code == 1 and "Error" in r.output


def test_data_parallel_under_torchrun_env(data, tmp_path):
    """Two real `python -m shuffler train` processes with the variables torchrun sets: each reads its half of
    every global batch, gradients are summed, and the replicas end with identical weights."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dp"
    cmd = [sys.executable, "-m", "shuffler", "train", data, "--latents", "64", "--k", "3", "--batch-size", "512",
           "--tokens", "6144", "--out", str(out), "--device", "cpu", "--lr", "4e-3", "--log-every", "4",
           "--export-saelens", str(tmp_path / "sae")]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", SHUFFLER_NO_PROGRESS="1")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert json.loads(outs[0].splitlines()[0])["tokens"] == 6144  # rank 0 reports the global count
    ck = out / "checkpoints" / "step-000000012"
    # Replicas are checked bit-identical at every checkpoint (the run would have failed otherwise), so one
    # copy of the weights is written.
    assert sorted(p.name for p in ck.iterdir()) == ["meta.json", "reader-00000.json", "reader-00001.json",
                                                   "shard-00000.pt"]
    a = torch.load(ck / "shard-00000.pt", weights_only=True)
    ra, rb = (json.loads((ck / f"reader-0000{r}.json").read_text()) for r in range(2))
    assert (ra["rank"], rb["rank"], ra["world_size"], ra["batch_size"]) == (0, 1, 2, 256)
    assert torch.equal(load_saelens(tmp_path / "sae").W_dec, a["sae"]["W_dec"])
    records = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12] and records[-1]["l0"] <= 3

"""Every command on s3:// URLs, end to end: synth, seal, inspect, shuffle (one machine and array stages),
plan, verify, the readers and train, against a real S3 endpoint on 127.0.0.1 (moto). One test starts its
own `moto_server` process and points real CLI processes at it only through AWS_ENDPOINT_URL_S3, the way a
user points the tools at MinIO or S3."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
from click.testing import CliRunner

from shuffler import Dataset
from shuffler.cli import main
from shuffler.storage.storage import Storage
from writers.shard_writer import ShardWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--chunk-bytes", "16KiB", "--shard-bytes", "64KiB"]


def cli(*args: str) -> str:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, f"shuffler {' '.join(args)}:\n{r.output}"
    return r.output


def shard_bytes(url: str) -> dict[str, bytes]:
    ds = Dataset.open(url)
    return {s.name: ds.store.read(s.name) for s in ds.shards}


def test_every_command_on_s3(s3_url, tmp_path):
    raw, out, staged = f"{s3_url}/raw", f"{s3_url}/shuffled", f"{s3_url}/staged"
    cli("synth", raw, "--rows", "3000", "--d-model", "32", "--dtype", "bfloat16", "--docs", "30", *TINY)
    assert "3,000" in cli("inspect", raw, "--check") or "3000" in cli("inspect", raw, "--check")
    assert json.loads(cli("plan", raw, "--json", "--dst", out))["rows"] == 3000
    cli("shuffle", raw, out, "--seed", "5", "--buckets", "3", *TINY)
    cli("verify", raw, out, "--full")
    # array stages on S3 (markers, plan.json, first-writer-wins through If-None-Match) give the same bytes
    for stage, tasks in (("plan", []), *[(s, ["--task-index", str(i), "--num-tasks", "2"])
                                         for s in ("scatter", "permute") for i in (1, 0)], ("finalize", [])):
        cli("shuffle", raw, staged, "--seed", "5", "--buckets", "3", "--workers", "1", *TINY, "--stage", stage, *tasks)
    assert shard_bytes(staged) == shard_bytes(out)
    assert not [n for n in Storage(staged).list("") if n.startswith(".shuffle")], "state left behind on S3"

    # seal: two producers write parts on S3, seal joins them
    parts = f"{s3_url}/parts"
    rng = np.random.default_rng(0)
    for p in ("p0", "p1"):
        with ShardWriter(parts, d_model=8, dtype="float16", columns=(), producer=p, chunk_bytes=4096,
                         shard_bytes=16384) as w:
            w.write(rng.standard_normal((500, 8)).astype(np.float16))
    cli("seal", parts)
    assert Dataset.open(parts).num_rows == 1000

    # the readers
    from readers.stream import ActivationStream

    rows = sum(len(b) for b in ActivationStream(out, batch_size=256, columns=("doc_id",), seed=1))
    assert rows == 3000
    from readers.torch import ActivationDataset

    ds = ActivationDataset(out, batch_size=500, rank=1, world_size=2)
    assert sum(len(b) for b in ds) == 1500

    # train, reading S3
    run = tmp_path / "run"
    cli("train", out, "--latents", "64", "--k", "4", "--batch-size", "256", "--tokens", "1024", "--out", str(run),
        "--device", "cpu")
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert log and any("mse" in e or "fvu" in e for e in log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_processes_find_a_separate_moto_server_through_the_environment(tmp_path):
    """No fixture, no endpoint flag: moto_server runs as its own process, the CLI finds it through
    AWS_ENDPOINT_URL_S3 with dummy credentials (and no instance-metadata lookups)."""
    port = free_port()
    server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {open(tmp_path / 'moto.log').read()}") from None
                time.sleep(0.05)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3"))}
        env.update(AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="dummy", AWS_SECRET_ACCESS_KEY="dummy",
                   AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", SHUFFLER_NO_PROGRESS="1")
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="dummy",
                     aws_secret_access_key="dummy").create_bucket(Bucket="e2e")

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "shuffler", *args], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=180)

        for args in (("synth", "s3://e2e/raw", "--rows", "2000", "--d-model", "16", "--dtype", "float16", *TINY),
                     ("shuffle", "s3://e2e/raw", "s3://e2e/out", "--seed", "1", "--buckets", "2", *TINY),
                     ("verify", "s3://e2e/raw", "s3://e2e/out")):
            p = run(*args)
            assert p.returncode == 0, f"{args}: {p.stderr}"
        p = run("verify", "s3://e2e/raw", "s3://e2e/missing")
        assert p.returncode == 1 and "s3://e2e/missing" in p.stderr  # errors name the S3 URL
        log.flush()
        assert "PUT /e2e/out/manifest.json" in open(tmp_path / "moto.log").read(), "requests went elsewhere"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()

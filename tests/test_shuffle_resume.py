"""Resume and safety: kill -9 in each pass (real subprocesses), locks, refusal of another run's state, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from shuffler import Dataset
from shuffler.cli import main
from shuffler.shuffling.run import LOCK, RUN, ShuffleLockedError, shuffle

from .test_shuffle import SMALL, assert_permutation, make_dataset, output_bytes, read_all

ARGS = ["--seed", "1", "--buckets", "4", "--chunk-bytes", "4KiB", "--shard-bytes", "32KiB", "--map-rows", "1000"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("raw") / "raw")
    make_dataset(url, 5000)
    return url


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory) -> dict[str, bytes]:
    """The output of an uninterrupted run with the same options."""
    dst = str(tmp_path_factory.mktemp("ref") / "out")
    shuffle(raw, dst, seed=1, buckets=4, workers=1, map_rows=1000, **SMALL)
    return output_bytes(dst)


def run_cli(*args: str, fault: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, SHUFFLER_TEST_FAULT=fault, SHUFFLER_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "shuffler", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(("fault", "workers"), [
    ("kill-after-map=2", "1"),       # pass 1: two intermediates committed, three to go
    ("kill-after-map=1", "2"),       # the same on a process pool
    ("kill-after-reduce=2", "1"),    # pass 2: two buckets committed
    ("kill-in-reduce=2", "1"),       # inside a reduce task: shards 0-1 of bucket 0 written, no marker
])
def test_resume_after_kill_9_is_byte_identical(raw, reference, tmp_path, fault, workers):
    dst = str(tmp_path / "out")
    p = run_cli("shuffle", raw, dst, *ARGS, "--workers", workers, fault=fault)
    assert p.returncode == -9, p.stderr
    assert not os.path.exists(os.path.join(dst, "manifest.json")), "a half-finished run must not look finished"
    assert os.path.exists(os.path.join(dst, LOCK)), "kill -9 leaves the lock behind"
    if fault == "kill-in-reduce=2":
        assert os.path.exists(os.path.join(dst, "shard-000000-0001.shard"))
    p = run_cli("shuffle", raw, dst, *ARGS, "--workers", workers)
    assert p.returncode == 0, p.stderr
    assert "shuffled 5,000 rows" in p.stdout
    assert output_bytes(dst) == reference
    assert sorted(os.listdir(dst)) == sorted([*reference, "manifest.json"]), "no state, scratch or temp files left"


def test_resume_skips_committed_tasks(raw, reference, tmp_path):
    dst = str(tmp_path / "out")
    assert run_cli("shuffle", raw, dst, *ARGS, "--workers", "1", fault="kill-after-map=3").returncode == -9
    scratch = os.path.join(dst, ".shuffle", "scratch")
    (run,) = os.listdir(scratch)
    before = {n: os.stat(os.path.join(scratch, run, n)).st_mtime_ns for n in os.listdir(os.path.join(scratch, run))}
    assert sum(n.endswith(".idx") for n in before) == 3
    assert run_cli("shuffle", raw, dst, *ARGS, "--workers", "1", "--keep-intermediate").returncode == 0
    after = {n: os.stat(os.path.join(scratch, run, n)).st_mtime_ns for n in os.listdir(os.path.join(scratch, run))}
    assert all(after[n] == t for n, t in before.items()), "committed intermediates were rewritten"
    assert sum(n.endswith(".idx") for n in after) == 5
    assert output_bytes(dst) == reference


def test_concurrent_shuffle_is_refused(raw, tmp_path):
    dst = str(tmp_path / "out")
    env = dict(os.environ, SHUFFLER_TEST_FAULT="pause-after-lock=60", SHUFFLER_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-m", "shuffler", "shuffle", raw, dst, *ARGS, "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(dst, LOCK)):
            assert time.time() < deadline and proc.poll() is None, "the first shuffle never took the lock"
            time.sleep(0.05)
        with pytest.raises(ShuffleLockedError, match=f"pid {proc.pid}"):
            shuffle(raw, dst, seed=1, buckets=4, workers=1, map_rows=1000, **SMALL)
        r = CliRunner().invoke(main, ["shuffle", raw, dst, *ARGS])
        assert r.exit_code == 1 and "another shuffle is writing here" in r.output
    finally:
        proc.kill()
        proc.wait()
    # Once its holder is dead, the lock is stale and the next run takes it over.
    shuffle(raw, dst, seed=1, buckets=4, workers=1, map_rows=1000, **SMALL)
    assert not os.path.exists(os.path.join(dst, LOCK))


def test_other_runs_state_refused_unless_overwrite(raw, tmp_path):
    dst = str(tmp_path / "out")
    assert run_cli("shuffle", raw, dst, *ARGS, "--workers", "1", fault="kill-after-map=1").returncode == -9
    with pytest.raises(FileExistsError, match="unfinished state of another shuffle.*seed: 1 there, 2 now"):
        shuffle(raw, dst, seed=2, buckets=4, workers=1, **SMALL)
    assert json.load(open(os.path.join(dst, RUN)))["identity"]["seed"] == 1, "refusal must not touch the state"
    m = shuffle(raw, dst, seed=2, buckets=4, workers=1, overwrite=True, **SMALL)
    clean = str(tmp_path / "clean")
    shuffle(raw, clean, seed=2, buckets=4, workers=1, **SMALL)
    assert output_bytes(dst) == output_bytes(clean)
    assert m.metadata["shuffle"]["seed"] == 2


def test_existing_dataset_refused_and_rerun_is_a_no_op(raw, tmp_path):
    dst = str(tmp_path / "out")
    make_dataset(dst, 300)  # some other dataset
    with pytest.raises(FileExistsError, match="not this shuffle's output"):
        shuffle(raw, dst, seed=0, buckets=2, workers=1, **SMALL)
    assert Dataset.open(dst).num_rows == 300
    shuffle(raw, dst, seed=0, buckets=2, workers=1, overwrite=True, **SMALL)
    assert_permutation(read_all(raw), read_all(dst))
    stamp = {n: os.stat(os.path.join(dst, n)).st_mtime_ns for n in os.listdir(dst)}
    again = shuffle(raw, dst, seed=0, buckets=2, workers=1, **SMALL)  # the same command: already done
    assert again.num_rows == 5000
    assert {n: os.stat(os.path.join(dst, n)).st_mtime_ns for n in os.listdir(dst)} == stamp
    with pytest.raises(FileExistsError):
        shuffle(raw, dst, seed=1, buckets=2, workers=1, **SMALL)


def test_cli_shuffle_verify_plan(raw, tmp_path):
    dst = str(tmp_path / "out")
    runner = CliRunner()
    r = runner.invoke(main, ["shuffle", raw, dst, *ARGS, "--workers", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["verify", raw, dst, "--full"])
    assert r.exit_code == 0 and r.output.startswith("OK:"), r.output
    r = runner.invoke(main, ["plan", raw, "--memory", "1GiB", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.output)["rows"] == 5000
    # errors: missing SRC, mismatched SRC, bad sizes, missing DST
    r = runner.invoke(main, ["shuffle", str(tmp_path / "nope"), str(tmp_path / "o"), "--seed", "0"])
    assert r.exit_code == 1 and "nope" in r.output and "no manifest.json" in r.output
    other = str(tmp_path / "wide")
    make_dataset(other, 50, d_model=8)
    r = runner.invoke(main, ["shuffle", raw, other, str(tmp_path / "o"), "--seed", "0"])
    assert r.exit_code == 1 and "d_model" in r.output
    r = runner.invoke(main, ["shuffle", raw, str(tmp_path / "o"), "--seed", "0", "--memory", "a lot"])
    assert r.exit_code == 2 and "--memory" in r.output
    r = runner.invoke(main, ["shuffle", raw, str(tmp_path / "o"), "--seed", "0", "--memory", "1MiB"])
    assert r.exit_code == 1 and "memory=1.0 MiB is below" in r.output
    r = runner.invoke(main, ["shuffle", raw, "--seed", "0"])
    assert r.exit_code == 2 and "SRC and a DST" in r.output
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_cli_verify_names_damage(raw, tmp_path):
    dst = str(tmp_path / "out")
    shuffle(raw, dst, seed=4, buckets=3, workers=1, **SMALL)
    ds = Dataset.open(dst)
    victim = ds.shards[1].name
    path = os.path.join(dst, victim)
    blob = bytearray(open(path, "rb").read())
    off = int(ds.index(1).entries[2]["offset"]) + 40
    blob[off] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    r = CliRunner().invoke(main, ["verify", raw, dst])
    assert r.exit_code == 1
    assert f"DST damaged: {victim} chunk 2" in r.output

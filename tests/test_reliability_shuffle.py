"""kill -9 the shuffle at many points of both passes and of the commits; the re-run gives byte-identical output.

How the kill points are chosen: a driver process (DRIVER below) runs the shuffle with Storage's mutating
calls traced. Every write is three events (`open`: its temporary object exists and is empty; `written`: every
byte is in the temporary object, nothing renamed yet; `commit`: the object is visible), every delete one
(`delete`, before it), the lock one (`create`). The driver SIGKILLs itself at the k-th event, so a kill
point names a storage state: "map-000002.idx written, not committed". An uninterrupted traced run lists
every event (about 100 on the small dataset here); the default run kills at 26 of them chosen to cover each
kind of object in each pass and each commit, plus the existing coordinator and worker hooks of
SHUFFLER_TEST_FAULT on a process pool (2, and 2 more with --slow); `--slow` kills at every event of two configurations (one with
recursive re-shuffles of oversize buckets) and twice in a row at some.

After each kill: no manifest (no dataset), the re-run succeeds, its shards are byte-identical to an
uninterrupted run's, verify passes, and DST holds nothing but the dataset (no lock, state, scratch or temp).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from shuffler.shuffling.run import shuffle
from shuffler.shuffling.verify import verify

from .test_shuffle import SMALL, make_dataset, output_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 5000
OPTS = dict(seed=1, buckets=4, workers=1, map_rows=1000, **SMALL)
# A budget so small every bucket is re-shuffled recursively (sub-intermediates, sub-buckets): as in
# tests/test_shuffle.py::test_recursion_on_tiny_memory_is_exact.
RECURSE = dict(seed=5, buckets=2, workers=1, memory="recursive", **SMALL)

DRIVER = r"""
import contextlib, json, os, re, signal, sys
from shuffler.storage.storage import Storage
from shuffler.shuffling.run import shuffle

src, dst, kill_at, opts, log = sys.argv[1], sys.argv[2].rstrip("/"), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
events = []

def event(kind, store, name):
    url = store.url_of(name)
    label = url[len(dst) + 1:] if url.startswith(dst + "/") else url
    events.append(kind + " " + re.sub(r"run-[0-9a-f]{16}", "run-*", label))
    if len(events) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

open_atomic = Storage.open_atomic
put_if_absent = Storage.put_if_absent
delete = Storage.delete

@contextlib.contextmanager
def traced_open_atomic(self, name, **options):
    with open_atomic(self, name, **options) as f:
        event("open", self, name)
        yield f
        event("written", self, name)
    event("commit", self, name)

def traced_put_if_absent(self, name, data):
    ok = put_if_absent(self, name, data)
    event("create", self, name)
    return ok

def traced_delete(self, name):
    event("delete", self, name)
    delete(self, name)

Storage.open_atomic, Storage.put_if_absent, Storage.delete = traced_open_atomic, traced_put_if_absent, traced_delete
shuffle(src, dst, **opts)
with open(log, "w") as f:
    json.dump(events, f)
"""


def recursive_memory() -> int:
    from shuffler.shuffling.plan import fixed_overhead

    return fixed_overhead(SMALL["chunk_bytes"]) + (128 << 10)  # ~1,400 rows of a bucket of ~2,500


def resolve(opts: dict) -> dict:
    return dict(opts, memory=recursive_memory()) if opts.get("memory") == "recursive" else dict(opts)


def drive(src: str, dst: str, opts: dict, kill_at: int, log: str, env: dict | None = None) -> int:
    p = subprocess.run([sys.executable, "-c", DRIVER, src, dst, str(kill_at), json.dumps(resolve(opts)), log],
                       cwd=ROOT, env=dict(os.environ, SHUFFLER_NO_PROGRESS="1", **(env or {})), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode in (0, -signal.SIGKILL), p.stderr
    return p.returncode


class Case:
    """A source, the events of an uninterrupted traced run, and that run's output bytes."""

    def __init__(self, base, opts: dict):
        self.opts = opts
        self.src = str(base / "raw")
        make_dataset(self.src, ROWS)
        ref = str(base / "ref")
        shuffle(self.src, ref, **resolve(opts))
        self.reference = output_bytes(ref)
        self.listing = sorted([*self.reference, "manifest.json"])
        traced = str(base / "traced")
        assert drive(self.src, traced, opts, 0, str(base / "events.json")) == 0
        self.events: list[str] = json.load(open(base / "events.json"))
        assert output_bytes(traced) == self.reference, "tracing must not change the output"

    def index(self, label: str) -> int:
        """1-based position of the first event called `label` (what the driver's kill_at counts)."""
        return self.events.index(label) + 1

    def check_finished(self, dst: str) -> None:
        assert output_bytes(dst) == self.reference
        rep = verify(self.src, dst)
        assert rep.ok, rep.report()
        assert sorted(os.listdir(dst)) == self.listing, "no lock, state, scratch or temporary object may be left"

    def kill_and_resume(self, dst: str, kills: list[int], log: str) -> None:
        """Run with a kill at each of `kills` in turn (each counted in its own run), then run to the end."""
        for k in kills:
            assert drive(self.src, dst, self.opts, k, log) == -signal.SIGKILL, f"event {k} never happened"
            # A kill before the manifest's commit leaves no dataset; after it, the dataset is complete.
            if os.path.exists(os.path.join(dst, "manifest.json")):
                assert output_bytes(dst) == self.reference
        shuffle(self.src, dst, **resolve(self.opts))
        self.check_finished(dst)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    return Case(tmp_path_factory.mktemp("crash"), OPTS)


@pytest.fixture(scope="module")
def recursive_case(tmp_path_factory) -> Case:
    return Case(tmp_path_factory.mktemp("crash-rec"), RECURSE)


S = ".shuffle/scratch/run-*"
# Each kind of object in each pass, at each of its three states, and the commits: the lock, run.json, the
# manifest and the cleanup after it.
POINTS = [
    "create .shuffle/lock",
    "open .shuffle/run.json", "written .shuffle/run.json", "commit .shuffle/run.json",
    f"open {S}/map-000000.shard", f"written {S}/map-000000.shard", f"commit {S}/map-000000.shard",
    f"open {S}/map-000002.idx", f"written {S}/map-000002.idx", f"commit {S}/map-000002.idx",
    f"written {S}/map-000004.shard", f"commit {S}/map-000004.idx",  # the last map task, pass 1 complete
    "open shard-000000-0000.shard", "written shard-000001-0001.shard", "commit shard-000001-0001.shard",
    "open .shuffle/reduce/b-000002.json", "written .shuffle/reduce/b-000002.json",
    "commit .shuffle/reduce/b-000002.json",
    "commit .shuffle/reduce/b-000003.json",  # every bucket committed, no manifest
    "open manifest.json", "written manifest.json", "commit manifest.json",
    f"delete {S}/map-000000.idx", f"delete {S}/map-000004.shard", "delete .shuffle/run.json", "delete .shuffle/lock",
]


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_a_storage_event_then_rerun_is_byte_identical(case, tmp_path, point):
    case.kill_and_resume(str(tmp_path / "out"), [case.index(point)], str(tmp_path / "log.json"))


def test_points_cover_both_passes_and_every_commit(case):
    """The 26 default points are spread over the whole run: first and last few events, both passes."""
    idx = sorted(case.index(p) for p in POINTS)
    n = len(case.events)
    assert len(set(idx)) == len(POINTS) >= 20
    assert idx[0] == 1 and idx[-1] == n, "the first and the last event of the run are kill points"
    assert max(b - a for a, b in zip(idx, idx[1:], strict=False)) <= n // 5, "no long stretch without a kill point"


# The existing hooks of shuffler.shuffle (SHUFFLER_TEST_FAULT): the coordinator killed after N tasks of a pass
# commit, on a process pool; a worker killed inside its reduce task (the coordinator sees it die and stops).
HOOKS = [("kill-after-map=2", -signal.SIGKILL), ("kill-in-reduce=1", 1),
         pytest.param("kill-after-reduce=1", -signal.SIGKILL, marks=pytest.mark.slow),
         pytest.param("kill-after-reduce=3", -signal.SIGKILL, marks=pytest.mark.slow)]


def shuffle_cli(src: str, dst: str, fault: str, workers: int) -> subprocess.CompletedProcess:
    args = ["--seed", "1", "--buckets", "4", "--chunk-bytes", "4KiB", "--shard-bytes", "32KiB", "--map-rows", "1000",
            "--workers", str(workers)]
    # A new session: after the coordinator dies, its orphaned pool workers (which exit within 0.5 s of
    # noticing, shuffle._init_worker) are waited for as a group before the re-run.
    p = subprocess.Popen([sys.executable, "-m", "shuffler", "shuffle", src, dst, *args], cwd=ROOT,
                         env=dict(os.environ, SHUFFLER_TEST_FAULT=fault, SHUFFLER_NO_PROGRESS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = p.communicate(timeout=180)
    wait_group_gone(p.pid)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def wait_group_gone(pgid: int, timeout: float = 30) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of group {pgid} still alive {timeout} s after their coordinator ended")


@pytest.mark.parametrize(("fault", "status"), HOOKS)
def test_kill_on_a_process_pool_then_rerun_is_byte_identical(case, tmp_path, fault, status):
    dst = str(tmp_path / "out")
    p = shuffle_cli(case.src, dst, fault, workers=2)
    assert p.returncode == status, p.stderr
    if status == 1:
        assert "a worker process died" in p.stderr and "re-run the same command to resume" in p.stderr
    assert not os.path.exists(os.path.join(dst, "manifest.json"))
    shuffle(case.src, dst, **dict(OPTS, workers=2))
    case.check_finished(dst)


def test_kill_inside_a_recursive_reshuffle(recursive_case, tmp_path):
    """An oversize bucket re-shuffled on its own: killed between its sub-buckets, and inside the second one."""
    c = recursive_case
    sub = [i + 1 for i, e in enumerate(c.events) if re.match(r"commit shard-000000\.0000-0001", e)][0]
    second = [i + 1 for i, e in enumerate(c.events) if e.startswith("written shard-000001.0001-0000")][0]
    c.kill_and_resume(str(tmp_path / "a"), [sub], str(tmp_path / "log.json"))
    c.kill_and_resume(str(tmp_path / "b"), [second], str(tmp_path / "log.json"))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["flat", "recursive"])
def test_kill_9_at_every_storage_event(case, recursive_case, tmp_path, which):
    c = case if which == "flat" else recursive_case
    for k in range(1, len(c.events) + 1):
        c.kill_and_resume(str(tmp_path / f"out-{k}"), [k], str(tmp_path / "log.json"))


@pytest.mark.slow
def test_killed_again_while_resuming(case, tmp_path):
    """Two crashes in a row: at event k of the first run, then at event j of the re-run (counted afresh)."""
    n = len(case.events)
    for k in range(5, n, 9):
        case.kill_and_resume(str(tmp_path / f"out-{k}"), [k, max(2, (n - k) // 2)], str(tmp_path / "log.json"))


# -- the trainer: kill -9 at a step, and inside a checkpoint's commits ---------------------------------------

TRAIN_DRIVER = r"""
import os, signal, sys
import trainer.checkpoint as ck
from trainer import TrainConfig, train
url, out, kill_replace, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
n = [0]
real = os.replace

def replace(a, b):  # every checkpoint file (weights, reader state, meta, latest.json) commits by a rename
    real(a, b)
    n[0] += 1
    if n[0] == kill_replace:
        os.kill(os.getpid(), signal.SIGKILL)

ck.os.replace = replace

def on_step(step):
    if step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)

train(url, out, TrainConfig(n_latents=32, k=4, batch_size=256, tokens=12 * 256, lr=4e-3, checkpoint_every=4,
                            log_every=2, seed=0), device="cpu", progress=False, on_step=on_step)
"""
TRAIN_CFG = dict(n_latents=32, k=4, batch_size=256, tokens=12 * 256, lr=4e-3, checkpoint_every=4, log_every=2, seed=0)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    import torch

    from trainer import TrainConfig, train
    from writers.synth import SynthConfig, synth

    base = tmp_path_factory.mktemp("train")
    url = str(base / "ds")
    synth(url, SynthConfig(rows=4096, d_model=16, docs=4096, seed=1, k=3, features=48))
    whole = train(url, base / "whole", TrainConfig(**TRAIN_CFG), device="cpu", progress=False)
    return url, {k: v.clone() for k, v in whole.sae.state_dict().items()}, torch


# (kill at the n-th checkpoint file commit, kill at step): the step-4 checkpoint's four commits are renames
# 1-4 (weights, reader state, meta.json, latest.json), step 8's are 5-8; and plain kills between steps.
TRAIN_KILLS = [(7, 0)] + [pytest.param(*k, marks=pytest.mark.slow) for k in [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0),
                                                                             (0, 6), (0, 11)]]


@pytest.mark.parametrize(("kill_replace", "kill_step"), TRAIN_KILLS)
def test_trainer_killed_then_resumed_equals_uninterrupted(train_data, tmp_path, kill_replace, kill_step):
    from trainer import TrainConfig, train

    url, whole, torch = train_data
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", TRAIN_DRIVER, url, str(out), str(kill_replace), str(kill_step)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    resumed = train(url, out, TrainConfig(**TRAIN_CFG), device="cpu", progress=False,
                    resume=(out / "latest.json").exists())
    assert resumed.steps == 12
    for name, t in resumed.sae.state_dict().items():
        assert torch.equal(t, whole[name]), name

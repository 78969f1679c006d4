"""Concurrency: two shuffles into one DST, readers of a dataset still being written, a producer racing `seal`,
two producers with one name. Each is refused or consistent; nothing is ever left damaged."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from readers import ActivationStream
from shuffler import Dataset, DatasetNotFoundError
from shuffler.format.seal import UnfinishedPartError, seal
from shuffler.shuffling.lock import Lock, ShuffleLockedError
from shuffler.shuffling.run import LOCK, shuffle
from shuffler.shuffling.verify import verify
from shuffler.storage.storage import Storage
from writers import ShardWriter

from .test_reliability_shuffle import OPTS, ROOT
from .test_shuffle import make_dataset, output_bytes

lock_mod = importlib.import_module("shuffler.shuffling.lock")
ARGS = ["--buckets", "4", "--chunk-bytes", "4KiB", "--shard-bytes", "32KiB", "--map-rows", "1000", "--workers", "1"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    base = tmp_path_factory.mktemp("conc")
    src = str(base / "raw")
    make_dataset(src, 5000)
    refs = {}
    for seed in (1, 2):
        shuffle(src, str(base / f"ref{seed}"), **dict(OPTS, seed=seed))
        refs[seed] = output_bytes(str(base / f"ref{seed}"))
    return src, refs


def start_shuffle(src: str, dst: str, seed: int, fault: str = "") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shuffler", "shuffle", src, dst, "--seed", str(seed), *ARGS],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, SHUFFLER_NO_PROGRESS="1", SHUFFLER_TEST_FAULT=fault))


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# -- two shuffles into one DST -----------------------------------------------------------------------------


@pytest.mark.parametrize("seeds", [(1, 1), (1, 2)], ids=["same-command", "other-seed"])
def test_two_shuffles_into_one_dst_at_once(raw, tmp_path, seeds):
    """Started together (real processes). The loser is refused with a clear error: the lock (while the winner
    runs), or the winner's finished dataset (the same command: a no-op; another seed: FileExistsError).
    DST ends as exactly one run's output, and verifies."""
    src, refs = raw
    for trial in range(2):
        dst = str(tmp_path / f"out{trial}")
        procs = [start_shuffle(src, dst, s) for s in seeds]
        outs = [p.communicate(timeout=180) for p in procs]
        codes = [p.returncode for p in procs]
        assert 0 in codes, outs
        for code, (_, err) in zip(codes, outs, strict=True):
            if code:
                assert code == 1 and ("another shuffle is writing here" in err or "already holds a dataset" in err
                                      or "unfinished state of another shuffle" in err), err
        assert output_bytes(dst) in (refs[seeds[0]], refs[seeds[1]])
        assert verify(src, dst).ok
        assert not os.path.exists(os.path.join(dst, LOCK))


def test_shuffles_in_threads_of_one_process_on_s3(raw, s3_url):
    """Three shuffles of one command into one S3 DST from threads: first-writer-wins on the lock (If-None-Match)."""
    src, refs = raw
    dst = s3_url + "/out"
    results: list = []

    def run():
        try:
            shuffle(src, dst, **OPTS)
            results.append("ok")
        except ShuffleLockedError as e:
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results.count("ok") >= 1 and len(results) == 3
    assert all(r == "ok" or "another shuffle is writing here" in str(r) for r in results)
    assert output_bytes(dst) == refs[1] and verify(src, dst).ok


def test_stale_lock_is_broken_by_one_taker_only(tmp_path, monkeypatch):
    """After a crash, two re-runs both find the dead holder's lock. Only one may take it over: the other
    must not delete the new holder's lock (a check-then-delete race; widened here by holding the slower
    taker between its verdict and its delete)."""
    store = Storage(str(tmp_path / "dst"))
    store.put_if_absent(LOCK, json.dumps({"token": "dead", "host": socket.gethostname(), "pid": dead_pid(),
                                          "pid_start": "1"}).encode())
    real = lock_mod.holder_dead
    gate = threading.Barrier(2)

    def slow_verdict(other):
        dead = real(other)
        if dead and other.get("token") == "dead":
            if gate.wait(timeout=10) == 0:
                time.sleep(0.3)  # this taker deletes only after the other has taken the lock
        return dead

    monkeypatch.setattr(lock_mod, "holder_dead", slow_verdict)
    taken, refused = [], []

    def take():
        lock = Lock(store, break_lock=False)
        try:
            lock.acquire()
            taken.append(lock)
        except ShuffleLockedError as e:
            refused.append(e)

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(taken) == 1 and len(refused) == 1, f"{len(taken)} shuffles hold the lock at once"
    assert json.loads(store.read(LOCK))["token"] == taken[0].token


def test_lock_object_is_created_whole_or_not_at_all(tmp_path):
    """put_if_absent on local disk writes a temporary file and links it to the name, so a kill can never leave
    an empty lock (an O_EXCL create, then a write, could: and an empty lock names no holder to check)."""
    store = Storage(str(tmp_path / "lk"))
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(store.put_if_absent("lock", b"%d" % i)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert store.read("lock") == b"%d" % [i for i, r in enumerate(results) if r][0] or len(store.read("lock")) == 1
    assert os.listdir(tmp_path / "lk") == ["lock"], "no temporary object stays beside it"


# -- readers of a dataset still being written --------------------------------------------------------------


def test_reader_of_a_dataset_being_written_gets_dataset_not_found(tmp_path):
    url = str(tmp_path / "d")
    w = ShardWriter(url, d_model=8, dtype="float16", chunk_bytes=512, shard_bytes=2048)
    w.write(np.ones((500, 8), np.float32), token_id=np.zeros(500, np.int32), doc_id=np.zeros(500, np.int64),
            position=np.zeros(500, np.int32))
    assert any(n.endswith(".shard") for n in os.listdir(url)), "shards are already committed ..."
    for opener in (Dataset.open, lambda u: ActivationStream(u, batch_size=10)):
        with pytest.raises(DatasetNotFoundError, match="no manifest.json"):  # ... but no dataset is visible
            opener(url)
    w.close()
    assert Dataset.open(url).num_rows == 500


def test_reader_polling_a_running_shuffle_sees_nothing_or_everything(raw, tmp_path):
    src, refs = raw
    dst = str(tmp_path / "out")
    p = start_shuffle(src, dst, 1)
    seen = {"missing": 0, "complete": 0}
    while True:
        running = p.poll() is None
        try:
            ds = Dataset.open(dst)
        except DatasetNotFoundError:
            seen["missing"] += 1
        else:
            assert ds.num_rows == 5000 and ds.check()[0] == []
            seen["complete"] += 1
        if not running:
            break
        time.sleep(0.01)
    assert p.returncode == 0, p.stderr.read()
    assert seen["missing"] >= 1 and seen["complete"] >= 1


def test_reader_during_an_overwrite_reads_old_rows_or_fails_naming_the_shard(tmp_path):
    """A reader that opened the old dataset keeps reading its shards until the new manifest commits; after,
    the old shards are gone and reads fail naming them. Never rows of the new dataset under the old manifest."""
    url = str(tmp_path / "d")

    def write(value: float, n: int) -> None:
        with ShardWriter(url, d_model=8, dtype="float16", chunk_bytes=512, shard_bytes=2048, overwrite=True) as w:
            w.write(np.full((n, 8), value, np.float32), token_id=np.zeros(n, np.int32),
                    doc_id=np.zeros(n, np.int64), position=np.zeros(n, np.int32))

    write(1.0, 400)
    old = Dataset.open(url)
    first = old.read_chunk(0, 0)
    write(2.0, 300)
    assert np.all(first.float32() == 1.0)
    with pytest.raises(FileNotFoundError, match=old.shards[1].name):
        old.read_chunk(1, 0)
    assert np.all(Dataset.open(url).read_shard(0).float32() == 2.0)


# -- producers and seal -----------------------------------------------------------------------------------


def produce(url: str, name: str, n: int, *, slow: float = 0.0, overwrite: bool = False) -> None:
    with ShardWriter(url, d_model=8, dtype="float16", producer=name, chunk_bytes=512, shard_bytes=2048,
                     overwrite=overwrite) as w:
        for s in range(0, n, 50):
            w.write(np.full((50, 8), float(s), np.float32), token_id=np.zeros(50, np.int32),
                    doc_id=np.full(50, hash(name) % 1000, np.int64), position=np.arange(s, s + 50, dtype=np.int32))
            time.sleep(slow)


def test_seal_racing_a_producer_refuses_or_is_complete(tmp_path):
    """`seal` called again and again while a producer writes: refused (UnfinishedPartError naming the part)
    until the part is finished; then the dataset holds every row of every part."""
    url = str(tmp_path / "d")
    produce(url, "a", 300)
    t = threading.Thread(target=produce, args=(url, "b", 1000), kwargs={"slow": 0.005})
    t.start()
    while not os.path.exists(os.path.join(url, "parts", "b.started")):
        time.sleep(0.001)
    refused = 0
    while True:
        try:
            m = seal(url)
            break
        except UnfinishedPartError as e:
            assert "parts/b (no parts/b.json)" in str(e)
            refused += 1
            time.sleep(0.01)
    t.join()
    assert refused >= 1 and m.num_rows == 1300 and m.metadata["producers"] == ["a", "b"]
    damage, fp = Dataset.open(url).check()
    assert damage == [] and fp == m.fingerprint


@pytest.mark.parametrize("trial", range(4))
def test_seal_and_producer_started_together(tmp_path, trial):
    """No head start: either seal waits for the part, or it seals without it and the producer (or seal) is
    told so. A part's rows are never left out silently."""
    url = str(tmp_path / "d")
    produce(url, "a", 100)
    outcome: dict = {}

    def producer():
        try:
            produce(url, "b", 200 * trial + 50)
            outcome["producer"] = "ok"
        except FileExistsError as e:
            outcome["producer"] = str(e)

    t = threading.Thread(target=producer)
    t.start()
    try:
        m = seal(url)
        outcome["seal"] = m.metadata["producers"]
    except UnfinishedPartError as e:
        outcome["seal"] = str(e)
    t.join()
    sealed = Dataset.open(url) if os.path.exists(os.path.join(url, "manifest.json")) else None
    if sealed is not None:
        assert sealed.check()[0] == []
        if "b" not in sealed.metadata["producers"]:
            told = any(isinstance(v, str) and ("not in the dataset" in v or "already sealed" in v)
                       for v in outcome.values())
            assert told, f"part b left out silently: {outcome}"
        else:
            assert sealed.num_rows == 100 + 200 * trial + 50


def test_producer_starting_after_seal_is_refused(tmp_path):
    url = str(tmp_path / "d")
    produce(url, "a", 100)
    seal(url)
    with pytest.raises(FileExistsError, match="already sealed"):
        produce(url, "late", 100)
    assert Dataset.open(url).num_rows == 100


def test_producer_finishing_after_a_seal_that_missed_it_is_told(tmp_path, monkeypatch):
    """seal lists the parts before a producer starts and commits after it finished: the producer's close
    says its part is not in the dataset, instead of succeeding silently."""
    url = str(tmp_path / "d")
    produce(url, "a", 100)
    import shuffler.format.seal as seal_mod

    real = seal_mod.write_manifest

    def late_write(store, manifest, *a, **k):
        produce(url, "b", 100)  # starts and finishes between seal's listing and its commit ...
        real(store, manifest, *a, **k)

    monkeypatch.setattr(seal_mod, "write_manifest", late_write)
    with pytest.raises(UnfinishedPartError, match="parts/b"):  # ... and seal says so after committing
        seal(url)
    assert Dataset.open(url).num_rows == 100


def test_two_producers_with_one_name_are_refused(tmp_path):
    """The second producer to start a part name is refused while the first is writing it; shards of one can
    never be mixed into the other's part manifest."""
    url = str(tmp_path / "d")
    w = ShardWriter(url, d_model=8, dtype="float16", producer="gpu0", chunk_bytes=512, shard_bytes=2048)
    with pytest.raises(FileExistsError, match="producer 'gpu0' already started"):
        ShardWriter(url, d_model=8, dtype="float16", producer="gpu0")
    w.write(np.ones((200, 8), np.float32), token_id=np.zeros(200, np.int32), doc_id=np.zeros(200, np.int64),
            position=np.zeros(200, np.int32))
    w.close()
    m = seal(url)
    assert m.num_rows == 200 and Dataset.open(url).check()[0] == []


def test_two_producers_with_one_name_at_once(tmp_path):
    """Both started at the same moment from threads: exactly one writes the part; the dataset is whole."""
    url = str(tmp_path / "d")
    errors, done = [], []
    gate = threading.Barrier(2)

    def run():
        gate.wait()
        try:
            produce(url, "gpu0", 400)
            done.append(1)
        except FileExistsError as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(done) == 1 and len(errors) == 1
    m = seal(url)
    assert m.num_rows == 400 and Dataset.open(url).check() == ([], m.fingerprint)


def test_a_producer_restarted_after_a_crash_replaces_its_part_with_overwrite(tmp_path):
    url = str(tmp_path / "d")
    ShardWriter(url, d_model=8, dtype="float16", producer="gpu0")  # started, then "killed"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        produce(url, "gpu0", 100)
    produce(url, "gpu0", 100, overwrite=True)
    assert seal(url).num_rows == 100

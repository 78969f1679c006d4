"""The bucket index (shuffler/shuffling/bucket_index.py): written once after pass 1 by the last scatter task, so
a permute task's metadata reads scale with its own buckets, not with map tasks x buckets; a damaged index
costs time, never rows or bytes."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from shuffler import Dataset
from shuffler.errors import FormatError
from shuffler.shuffling import bucket_index
from shuffler.shuffling.array_job import TaskSlot, run_stage
from shuffler.shuffling.bucket_index import DONE, BucketIndex, DamagedIndex, decode, encode, index_name
from shuffler.shuffling.plan import fixed_overhead
from shuffler.shuffling.run import shuffle
from shuffler.storage.storage import Storage
from tests.test_shuffle import SMALL, make_dataset, output_bytes

M, B, N = 64, 64, 16  # map tasks, buckets, array tasks (the case)
ROWS = M * 100
CONFIG = dict(memory=fixed_overhead(SMALL["chunk_bytes"]) + (256 << 10), buckets=B, map_rows=ROWS // M,
              chunk_bytes=SMALL["chunk_bytes"], shard_bytes=SMALL["shard_bytes"])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    base = tmp_path_factory.mktemp("index")
    src = str(base / "raw")
    make_dataset(src, ROWS)
    ref = str(base / "ref")
    shuffle(src, ref, seed=5, workers=1, **CONFIG)
    return src, output_bytes(ref)


class Reads:
    """Counts every Storage.read / read_range by object name (local files: chunk data is memory-mapped, so what
    passes through here is metadata: markers, footers, index objects, plan.json)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, int]] = []
        real_read, real_range = Storage.read, Storage.read_range

        def read(store, name):
            data = real_read(store, name)
            self.calls.append((name, len(data)))
            return data

        def read_range(store, name, start, end):
            data = real_range(store, name, start, end)
            self.calls.append((name, len(data)))
            return data

        monkeypatch.setattr(Storage, "read", read)
        monkeypatch.setattr(Storage, "read_range", read_range)

    @staticmethod
    def kinds(calls: list[tuple[str, int]]) -> collections.Counter:
        """Reads by kind: a bucket's index object, an intermediate's footer or marker, else the object's name."""
        out: collections.Counter = collections.Counter()
        for name, _ in calls:
            base = name.rsplit("/", 1)[-1]
            kind = ("index" if "index/b-" in name else "footer" if base.startswith("map-") and base.endswith(".shard")
                    else "map marker" if base.startswith("map-") else base)
            out[kind] += 1
        return out


def _scatter_all(src: str, dst: str) -> list[dict]:
    run_stage("plan", [src], dst, seed=5, config=CONFIG, workers=1)
    return [run_stage("scatter", [src], dst, seed=5, slot=TaskSlot(index=i, count=N), workers=1) for i in range(N)]


def test_permute_reads_scale_with_the_tasks_own_buckets(case, tmp_path, monkeypatch):
    src, ref = case
    dst = str(tmp_path / "dst")
    outs = _scatter_all(src, dst)
    assert [o["indexed"] for o in outs] == [False] * (N - 1) + [True]  # only the last scatter task sees all M
    assert outs[0]["of"] == M
    reads = Reads(monkeypatch)
    per_task = []
    for i in range(N):
        before = len(reads.calls)
        out = run_stage("permute", [src], dst, seed=5, slot=TaskSlot(index=i, count=N), workers=1)
        assert out["indexed"] is True
        mine = reads.calls[before:]
        per_task.append(mine)
        kinds = Reads.kinds(mine)
        assert kinds["index"] == B // N  # one index object per bucket this task owns, nothing per map task
        assert not any(n.endswith(".shard") or n.rsplit("/", 1)[-1].startswith("map-") for n, _ in mine), kinds
        # Bytes: its buckets' entries (M x 24 B at most each, plus a header), plan.json and done.json.
        assert sum(n for _, n in mine) <= (B // N) * (M * 2 * 24 + 64) + 4096
    assert len({len(t) for t in per_task}) == 1  # the first and the last task read the same: no O(B) marker scan
    run_stage("finalize", [src], dst, seed=5, workers=1)
    assert output_bytes(dst) == ref

    # The same permute stage without the index reads every intermediate's marker and footer in every task.
    other = str(tmp_path / "noindex")
    _scatter_all(src, other)
    bucket_index.discard(json.loads(Storage(other).read(".shuffle/plan.json"))["scratch"])
    reads.calls.clear()
    out = run_stage("permute", [src], other, seed=5, slot=TaskSlot(index=0, count=N), workers=1)
    assert out["indexed"] is False
    kinds = Reads.kinds(reads.calls)
    assert kinds["footer"] == M and kinds["map marker"] == M
    assert sum(n for _, n in reads.calls) > M * B * 8  # the markers alone hold M x (B + 1) int64


def test_a_damaged_index_costs_time_not_rows(case, tmp_path):
    src, ref = case
    dst = str(tmp_path / "dst")
    _scatter_all(src, dst)
    scratch = json.loads(Storage(dst).read(".shuffle/plan.json"))["scratch"]
    store = Storage(scratch)
    good = store.read(index_name(3))
    store.write(index_name(3), good[:-5] + bytes([good[-5] ^ 1]) + good[-4:])  # one flipped bit
    with pytest.warns(UserWarning, match=r"b-00000003.idx: checksum mismatch"):
        out = run_stage("permute", [src], dst, seed=5, slot=TaskSlot(index=3, count=N), workers=1)
    assert out["indexed"] is False and not store.exists(DONE)  # dropped: every later task reads footers
    for i in range(N):
        run_stage("permute", [src], dst, seed=5, slot=TaskSlot(index=i, count=N), workers=1)
    run_stage("finalize", [src], dst, seed=5, workers=1)
    assert output_bytes(dst) == ref


def test_index_objects_refuse_what_encode_could_not_write():
    rng = np.random.default_rng(0)
    entries = np.zeros(5, dtype=bucket_index.CHUNK)
    entries["obj"] = [0, 0, 2, 3, 3]
    entries["offset"] = rng.integers(0, 1 << 40, 5)
    entries["rows"] = rng.integers(1, 100, 5)
    data = encode(7, entries)
    np.testing.assert_array_equal(decode(data, 7, where="x", maps=4), entries)
    for bad, words in [
        (data[:10], "too short"),
        (data[:-1], "entries need"),
        (data[:-4] + b"\0\0\0\0", "checksum mismatch"),
        (b"XXXX" + data[4:], "not the version-1 index of bucket 7"),
    ]:
        with pytest.raises(DamagedIndex, match=words):
            decode(bad, 7, where="x", maps=4)
    with pytest.raises(DamagedIndex, match="bucket 7"):
        decode(data, 8, where="x", maps=4)
    with pytest.raises(DamagedIndex, match="outside 0..2"):
        decode(data, 7, where="x", maps=3)
    assert issubclass(DamagedIndex, FormatError)


def test_a_damaged_footer_is_redone_by_the_indexing_scatter_task(case, tmp_path):
    src, ref = case
    dst = str(tmp_path / "dst")
    run_stage("plan", [src], dst, seed=5, config=CONFIG, workers=1)
    for i in range(N - 1):
        run_stage("scatter", [src], dst, seed=5, slot=TaskSlot(index=i, count=N), workers=1)
    scratch = json.loads(Storage(dst).read(".shuffle/plan.json"))["scratch"]
    store = Storage(scratch)
    data = bytearray(store.read("map-000000.shard"))
    data[-12] ^= 0xFF  # in the footer: reading it fails, so the index cannot be built from it
    store.write("map-000000.shard", bytes(data))
    with pytest.warns(UserWarning, match=r"map-000000.shard.*redoing it before writing the bucket index"):
        out = run_stage("scatter", [src], dst, seed=5, slot=TaskSlot(index=N - 1, count=N), workers=1)
    assert out["indexed"] is True and store.read("map-000000.shard") != bytes(data)
    # A re-run of the finished scatter stage neither redoes nor re-indexes anything.
    before = store.read(DONE)
    again = [run_stage("scatter", [src], dst, seed=5, slot=TaskSlot(index=i, count=N), workers=1) for i in range(N)]
    assert not any(o["indexed"] for o in again) and store.read(DONE) == before
    for i in range(N):
        assert run_stage("permute", [src], dst, seed=5, slot=TaskSlot(index=i, count=N), workers=1)["indexed"]
    run_stage("finalize", [src], dst, seed=5, workers=1)
    assert output_bytes(dst) == ref


def test_an_index_of_another_split_or_run_is_not_used(case, tmp_path):
    src, _ = case
    dst = str(tmp_path / "dst")
    _scatter_all(src, dst)
    plan = json.loads(Storage(dst).read(".shuffle/plan.json"))
    schema = Dataset.open(src).schema
    key = dict(run_id=plan["run_id"], maps=M, map_rows=plan["map_rows"], buckets=B)
    assert BucketIndex.open(plan["scratch"], schema, **key) is not None
    for change in (dict(map_rows=plan["map_rows"] + 1), dict(run_id="0" * 16), dict(maps=M - 1), dict(buckets=B + 1)):
        assert BucketIndex.open(plan["scratch"], schema, **{**key, **change}) is None
    store = Storage(plan["scratch"])
    doc = json.loads(store.read(DONE))
    store.write(DONE, json.dumps({**doc, "maps": M - 1}).encode())  # the CRC no longer matches
    assert BucketIndex.open(plan["scratch"], schema, **key) is None


def test_on_s3_with_worker_processes_the_last_scatter_task_indexes(case, s3_url):
    # Pool workers write the markers the indexing task then lists and reads: s3fs's listing cache once answered
    # those reads with FileNotFoundError (shuffler/storage/storage.py turns that cache off).
    src, ref = case
    dst = s3_url + "/dst"
    n = 4
    run_stage("plan", [src], dst, seed=5, config=CONFIG, workers=2)
    outs = [run_stage("scatter", [src], dst, seed=5, slot=TaskSlot(index=i, count=n), workers=2) for i in range(n)]
    assert [o["indexed"] for o in outs] == [False] * (n - 1) + [True]
    for i in range(n):
        assert run_stage("permute", [src], dst, seed=5, slot=TaskSlot(index=i, count=n), workers=2)["indexed"]
    run_stage("finalize", [src], dst, seed=5, workers=1)
    assert output_bytes(dst) == ref

"""Writes and reads past the page cache (shuffler/storage/direct.py) and the memory helpers beside them
(shuffler/io/pages.py): the bytes are exactly what buffered I/O gives, on filesystems with and without O_DIRECT;
the shuffle's pool workers start with the malloc tunables io/pages.py names."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shuffler import env
from shuffler.io.chunks import ChunkTable, iter_decoded
from shuffler.io.dataset import Dataset
from shuffler.io.pages import HUGE_MIN, WORKER_TUNABLES, huge_empty, keep_freed_memory
from shuffler.progress import Progress
from shuffler.shuffling.executor import LocalExecutor
from shuffler.storage import direct
from shuffler.storage.direct import ALIGN, BUFFER_BYTES, DirectReads, DirectWriter, open_direct
from shuffler.storage.storage import Storage
from writers import ShardWriter

SHM = "/dev/shm"  # tmpfs: takes O_DIRECT on recent kernels, refused it (EINVAL) on older ones


def pieces(seed: int) -> list[bytes]:
    """Writes of awkward sizes: empty, tiny, unaligned, one block, and larger than the O_DIRECT buffer."""
    rng = np.random.default_rng(seed)
    sizes = [0, 1, 17, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 5, BUFFER_BYTES - 100, 200, BUFFER_BYTES + 333, 7]
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_direct_writes_give_the_bytes_written(tmp_path, where):
    if where == "tmpfs" and not os.path.isdir(SHM):
        pytest.skip("no /dev/shm here")
    folder = tmp_path if where == "disk" else os.path.join(SHM, f"direct-test-{os.getpid()}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "obj")
    try:
        data = pieces(1)
        f = open_direct(path)
        if where == "disk":
            assert isinstance(f, DirectWriter)  # ext4/xfs take O_DIRECT; this test would not cover it otherwise
        for p in data:
            assert f.write(p) == len(p)
        assert f.tell() == sum(map(len, data))
        f.close()
        f.close()  # twice is harmless
        with open(path, "rb") as g:
            assert g.read() == b"".join(data)
    finally:
        if where == "tmpfs":
            for n in os.listdir(folder):
                os.unlink(os.path.join(folder, n))
            os.rmdir(folder)


def refuse_direct(monkeypatch, call: str) -> list[int]:
    """Make os.open (at open) or os.write (at the first write) fail with EINVAL for O_DIRECT, as filesystems
    without O_DIRECT do (some FUSE and network mounts; tmpfs before Linux 6.6). Returns the refusals seen."""
    import errno
    import fcntl

    real, seen = getattr(os, call), []

    def fake(fd_or_path, *args):
        direct_on = (args[0] & os.O_DIRECT) if call == "open" else fcntl.fcntl(fd_or_path, fcntl.F_GETFL) & os.O_DIRECT
        if direct_on:
            seen.append(1)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd_or_path, *args)

    monkeypatch.setattr(os, call, fake)
    return seen


@pytest.mark.parametrize("call", ["open", "write"])
def test_filesystems_refusing_o_direct_get_buffered_writes(tmp_path, monkeypatch, call):
    data = pieces(5)
    seen = refuse_direct(monkeypatch, call)
    f = open_direct(str(tmp_path / "obj"))
    for p in data:
        f.write(p)
    f.close()
    monkeypatch.undo()
    assert seen and (tmp_path / "obj").read_bytes() == b"".join(data)


def test_filesystems_refusing_o_direct_get_buffered_reads(tmp_path, monkeypatch):
    blob = os.urandom(3 * ALIGN + 7)
    (tmp_path / "a").write_bytes(blob)
    seen = refuse_direct(monkeypatch, "open")
    reads = DirectReads(lambda name: str(tmp_path / name))
    got = reads.frames(["a"], [5], [3 * ALIGN + 7])
    assert seen and bytes(got[0]) == blob[5:]
    reads.close()


def test_open_atomic_direct_commits_whole_or_leaves_nothing(tmp_path):
    store = Storage(str(tmp_path))
    data = pieces(2)
    with store.open_atomic("a.shard", direct=True) as f:
        for p in data:
            f.write(p)
    assert store.read("a.shard") == b"".join(data)
    with pytest.raises(RuntimeError, match="boom"), store.open_atomic("b.shard", direct=True) as f:
        f.write(data[-2])
        raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["a.shard"]  # no b.shard, no temporary left behind


def test_direct_writer_buffers_are_reused(tmp_path):
    direct._write_pool.free.clear()
    f = open_direct(str(tmp_path / "x"))
    bufs = {id(b) for b in f.bufs}
    f.write(b"x" * 10)
    f.close()
    g = open_direct(str(tmp_path / "y"))
    assert {id(b) for b in g.bufs} == bufs  # the same pages: no fresh first-touch faults per file
    g.close()


def test_direct_reads_match_buffered_reads(tmp_path):
    blob = np.random.default_rng(3).integers(0, 256, 3 * ALIGN * 7 + 123, dtype=np.uint8).tobytes()
    for n in ("a", "b"):
        (tmp_path / n).write_bytes(blob)
    direct._read_pool.free.clear()  # earlier tests' buffers: the reuse checked below is of this test's own
    reads = DirectReads(lambda name: str(tmp_path / name))
    names = ["a", "a", "b", "a", "b", "a"]
    starts = [5, 100, 0, 9000, 40000, len(blob) - 10]
    ends = [100, 9000, 7, 9001, len(blob), len(blob) + 50]  # touching ranges, one past the end of the file
    got = reads.frames(names, starts, ends)
    assert [bytes(g) for g in got] == [blob[s:e] for s, e in zip(starts, ends, strict=True)]
    for g in got:
        reads.release(g)
    again = reads.frames(["b"], [1], [2])  # the released buffer is reused
    assert bytes(again[0]) == blob[1:2] and again[0].obj is got[0].obj
    reads.release(again[0])
    with pytest.raises(FileNotFoundError):
        reads.frames(["missing"], [0], [10])
    reads.close()


def test_iter_decoded_direct_gives_the_same_rows(tmp_path):
    url = str(tmp_path / "ds")
    rng = np.random.default_rng(4)
    acts = rng.standard_normal((3000, 64)).astype(np.float16)
    with ShardWriter(url, d_model=64, dtype="float16", chunk_bytes=40_000, shard_bytes=200_000) as w:
        w.write(acts, token_id=np.arange(3000, dtype=np.int32), doc_id=np.arange(3000), position=np.zeros(3000, np.int32))
    table = ChunkTable.of_datasets([Dataset.open(url)])
    for start, stop in [(0, 3000), (17, 2017), (2999, 3000)]:
        sel, skip = table.select(start, stop)
        plain = list(iter_decoded(sel, skip, stop - start, batch_bytes=50_000))
        past = list(iter_decoded(sel, skip, stop - start, batch_bytes=50_000, direct=True))
        assert [p for p, _, _ in plain] == [p for p, _, _ in past]
        assert np.array_equal(np.concatenate([a for _, a, _ in past]), acts[start:stop])
        for (_, _, c1), (_, _, c2) in zip(plain, past, strict=True):
            assert all(np.array_equal(x, y) for x, y in zip(c1, c2, strict=True))
    os.remove(os.path.join(url, Dataset.open(url).shards[1].name))
    with pytest.raises(FileNotFoundError, match="missing"):
        list(iter_decoded(table, 0, 3000, direct=True))


def test_memory_helpers():
    assert keep_freed_memory() in (True, False)  # True on glibc; never raises elsewhere
    a = huge_empty((HUGE_MIN // 2 + 3, 2), np.uint16)
    a[:] = 7
    assert a.shape == (HUGE_MIN // 2 + 3, 2) and a.dtype == np.uint16 and a.flags.writeable and (a == 7).all()
    small = huge_empty((3, 4), np.float32)
    assert small.shape == (3, 4) and small.flags.writeable


def test_glibc_tunables_reach_children_and_keep_the_users(monkeypatch):
    import subprocess
    import sys

    show = [sys.executable, "-c", "import os; print(os.environ.get('GLIBC_TUNABLES', '<unset>'))"]
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with env.glibc_tunables_for_children(WORKER_TUNABLES):
        assert subprocess.run(show, capture_output=True, text=True).stdout.strip() == WORKER_TUNABLES
    assert "GLIBC_TUNABLES" not in os.environ
    # A tunable the user set keeps the user's value; the others are added after it.
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    with env.glibc_tunables_for_children(WORKER_TUNABLES):
        seen = subprocess.run(show, capture_output=True, text=True).stdout.strip()
    assert seen == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"


def test_pool_workers_start_with_the_worker_tunables(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with LocalExecutor(2, in_process=False) as ex, Progress("t", enabled=False) as bar:
        seen = ex.run(os.getenv, [("GLIBC_TUNABLES",), ("GLIBC_TUNABLES",), ("GLIBC_TUNABLES",)], bar, lambda _: None)
    assert seen == [WORKER_TUNABLES] * 3
    assert "GLIBC_TUNABLES" not in os.environ  # the coordinator's own environment is as it was

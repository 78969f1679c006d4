"""Local shards are read through memory maps (shuffler/storage/mapped.py): the bytes are those of a ranged read, a
shard missing or truncated is named, a shard replaced by rename under an open dataset still reads as the
dataset's manifest says, and decoded pages are dropped from the mapping."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shuffler import Dataset
from shuffler.errors import ChecksumError, FormatError
from shuffler.format.schema import standard_columns
from writers.shard_writer import ShardWriter


def write(url: str, rows: int = 3000, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, 24)).astype(np.float16)
    r = np.arange(rows)
    with ShardWriter(url, d_model=24, dtype="float16", columns=standard_columns(), chunk_bytes=16 << 10,
                     shard_bytes=64 << 10) as w:
        w.write(x, token_id=(r % 97).astype(np.int32), doc_id=r // 50, position=(r % 50).astype(np.int32))
    return x


def test_mapped_reads_equal_ranged_reads(tmp_path):
    url = str(tmp_path / "d")
    x = write(url)
    ds = Dataset.open(url)
    assert ds.reader.maps is not None and len(ds.shards) > 1
    got = [ds.read_chunk(i, j) for i in range(len(ds.shards)) for j in range(ds.index(i).n_chunks)]
    assert ds.reader.maps.maps  # the chunks came from maps
    # the same bytes through the ranged-read path
    for i in range(len(ds.shards)):
        for j in range(ds.index(i).n_chunks):
            a, b = ds.chunk_range(i, j)
            ref = ds.decode(i, j, ds.store.read_range(ds.shards[i].name, a, b))
            batch = got.pop(0)
            assert np.array_equal(batch.acts, ref.acts)
            assert all(np.array_equal(batch.columns[k], ref.columns[k]) for k in ref.columns)
    whole = np.concatenate([ds.read_shard(i).acts for i in range(len(ds.shards))])
    assert np.array_equal(whole.view(np.uint16), x.view(np.uint16))
    ds.close()
    assert not ds.reader.maps.maps


def test_missing_and_truncated_shards_are_named(tmp_path):
    url = str(tmp_path / "d")
    write(url)
    ds = Dataset.open(url)
    ds.index(0), ds.index(1)  # footers cached, files not mapped yet
    name0, name1 = ds.shards[0].name, ds.shards[1].name
    os.remove(os.path.join(url, name0))
    with pytest.raises(FileNotFoundError, match=f"{name0}.*missing"):
        ds.read_chunk(0, 0)
    p = os.path.join(url, name1)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    last = ds.index(1).n_chunks - 1
    with pytest.raises((FormatError, ChecksumError), match=f"{name1}"):
        ds.read_chunk(1, last)
    with pytest.raises(FormatError, match=f"{name1}.*truncated"):
        ds.read_shard(1)


def test_a_shard_replaced_by_rename_reads_as_the_open_manifest_says(tmp_path):
    url = str(tmp_path / "d")
    x = write(url)
    ds = Dataset.open(url)
    first = ds.read_chunk(0, 0).acts.copy()  # shard 0 is mapped now
    # another writer replaces the file the way every writer here does: a new file renamed over it
    p = os.path.join(url, ds.shards[0].name)
    with open(p + ".tmp", "wb") as f:
        f.write(os.urandom(os.path.getsize(p)))
    os.replace(p + ".tmp", p)
    assert np.array_equal(ds.read_chunk(0, 0).acts, first)  # the mapped inode is the one the index describes
    assert np.array_equal(ds.read_chunk(0, 1).acts.view(np.uint16), x[len(first): 2 * len(first)].view(np.uint16))
    ds.close()
    with pytest.raises(ChecksumError, match="chunk 0"):  # a fresh map sees the new (foreign) bytes, refused
        ds.read_chunk(0, 0)


def test_threads_reading_more_shards_than_stay_mapped(tmp_path):
    # 4 threads read chunks of more shards than LocalMaps keeps mapped, so maps are evicted while others read.
    from concurrent.futures import ThreadPoolExecutor

    url = str(tmp_path / "d")
    write(url, rows=6000)
    ds = Dataset.open(url)
    ds.reader.maps.keep = 2
    assert len(ds.shards) > 4
    jobs = [(i, j) for i in range(len(ds.shards)) for j in range(ds.index(i).n_chunks)] * 3
    want = {(i, j): ds.decode(i, j, ds.store.read_range(ds.shards[i].name, *ds.chunk_range(i, j))).acts
            for i, j in set(jobs)}
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda ij: ds.read_chunk(*ij).acts, jobs))
    assert all(np.array_equal(g, want[ij]) for g, ij in zip(got, jobs, strict=True))
    assert len(ds.reader.maps.maps) <= 2


def _mapped_rss_kib(path: str) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = line.rstrip("\n").endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_decoded_chunks_pages_leave_the_mapping(tmp_path):
    # RSS must not grow with the bytes read: each decoded chunk's pages are dropped from the mapping
    # (MADV_DONTNEED; the page cache keeps them). Without that, reading a whole shard maps all of it.
    url = str(tmp_path / "d")
    x = np.random.default_rng(2).standard_normal((16384, 256)).astype(np.float16)  # 8 MiB, incompressible-ish
    with ShardWriter(url, d_model=256, dtype="float16", columns=(), chunk_bytes=256 << 10, shard_bytes=64 << 20) as w:
        w.write(x)
    ds = Dataset.open(url)
    assert len(ds.shards) == 1 and ds.index(0).n_chunks >= 16
    path = os.path.join(url, ds.shards[0].name)
    for j in range(ds.index(0).n_chunks):
        ds.read_chunk(0, j)
    assert ds.reader.maps.maps  # still mapped
    assert _mapped_rss_kib(path) <= 128, _mapped_rss_kib(path)  # at most a fault-around window or two
    # the same reads with the release step disabled keep the whole file resident: the check can fail
    ds2 = Dataset.open(url)
    from shuffler.storage.mapped import LocalMaps
    keep = LocalMaps.release
    LocalMaps.release = staticmethod(lambda frame, start: None)
    try:
        for j in range(ds2.index(0).n_chunks):
            ds2.read_chunk(0, j)
        assert _mapped_rss_kib(path) > os.path.getsize(path) // 1024 // 2
    finally:
        LocalMaps.release = staticmethod(keep)
        ds.close(), ds2.close()


def test_dataset_as_context_manager_unmaps_and_stays_usable(tmp_path):
    url = str(tmp_path / "d")
    write(url)
    with Dataset.open(url) as ds:
        a = ds.read_chunk(0, 0).acts.copy()
        assert ds.reader.maps.maps
    assert not ds.reader.maps.maps
    assert np.array_equal(ds.read_chunk(0, 0).acts, a)  # maps again on demand



def test_a_cold_frame_of_a_file_renamed_over_an_existing_map_is_read_from_the_map(tmp_path):
    """A cold frame of a file renamed over its map (zeros here) is read from the map, the file the index
    describes: the reader never reads past the map (a trial O_DIRECT path for cold frames did, through a stale
    identity; docs/benchmarks.md, "What was left")."""
    from shuffler import Dataset
    from writers import ShardWriter

    url = str(tmp_path / "d")
    x = np.random.default_rng(0).standard_normal((4000, 64)).astype(np.float16)
    with ShardWriter(url, d_model=64, dtype="float16", columns=(), chunk_bytes=64 << 10, shard_bytes=1 << 20) as w:
        w.write(x)
    ds = Dataset.open(url)
    want = ds.read_chunk(0, 1).acts.copy()
    ds = Dataset.open(url)
    ds.index(0)
    name = ds.shards[0].name
    ds.reader.frame(name, 0, 16)  # the map exists before any read() of this name
    path = os.path.join(url, name)
    old = os.open(path, os.O_RDONLY)
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(bytes(os.path.getsize(path)))
        os.replace(path + ".tmp", path)
        for fd in (old, os.open(path, os.O_RDONLY)):  # both files out of the page cache: the frame is cold
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if fd != old:
                os.close(fd)
        assert np.array_equal(ds.read_chunk(0, 1).acts.view(np.uint16), want.view(np.uint16))
    finally:
        os.close(old)

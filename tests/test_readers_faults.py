"""ActivationStream under bad input and slow consumers: damaged chunks, missing shards, bad states, memory."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from readers import ActivationStream
from readers.order import EpochPlan
from shuffler import Dataset
from shuffler.errors import ChecksumError, DatasetNotFoundError

from .readers_data import make_dataset, rids


@pytest.fixture
def local_ds(tmp_path):
    url = str(tmp_path / "ds")
    make_dataset(url, rows=2000)
    return url


def damage(url: str, shard: int, chunk: int) -> tuple[str, int]:
    """Flip bytes in the middle of one chunk's frame. Returns (shard name, chunk rows)."""
    ds = Dataset.open(url)
    e = ds.index(shard).entries[chunk]
    name = ds.shards[shard].name
    path = os.path.join(url, name)
    with open(path, "r+b") as f:
        f.seek(int(e["offset"]) + int(e["comp_len"]) // 2)
        f.write(b"\xff\x00\xff\x00")
    return name, int(e["rows"])


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("activation-read")]


# -- damaged chunks ----------------------------------------------------------------------------------------
def test_damaged_chunk_raises_naming_shard_and_chunk(local_ds):
    name, _ = damage(local_ds, 2, 3)
    with pytest.raises(ChecksumError, match=rf"{name} chunk 3") as info:
        list(ActivationStream(local_ds, batch_size=100))
    assert info.value.obj == name and info.value.chunk == 3
    assert not reader_threads(), "the pool must be shut down after an error"


def test_first_error_in_plan_order_is_raised(local_ds):
    damaged = {(1, 2), (5, 4)}
    for s, c in damaged:
        damage(local_ds, s, c)
    ds = Dataset.open(local_ds)
    plan = EpochPlan(dataset=ds, seed=9, epoch=0, spans=((0, ds.num_rows),), batch_size=50)
    first = next((u.shard, u.chunk) for u in plan.units() if (u.shard, u.chunk) in damaged)
    name = Dataset.open(local_ds).shards[first[0]].name
    with pytest.raises(ChecksumError, match=rf"{name} chunk {first[1]}\b"):
        list(ActivationStream(local_ds, batch_size=50, seed=9, threads=3))


def test_damaged_chunk_skipped_and_counted_when_asked(local_ds):
    name, lost = damage(local_ds, 4, 1)
    s = ActivationStream(local_ds, batch_size=64, columns=("rid",), on_damaged="skip")
    batches = list(s)
    got = rids(batches)
    assert len(got) == 2000 - lost and len(np.unique(got)) == len(got)
    assert s.stats.skipped_chunks == 1 and s.stats.skipped_rows == lost
    assert f"{name} chunk 1" in s.stats.damaged[0]
    assert sum(1 for b in batches if len(b) < 64) <= 3, "only the batches the chunk fell in (and the last) are short"
    # Positions do not move: a resumed skipping stream continues with the same batches.
    head = ActivationStream(local_ds, batch_size=64, columns=("rid",), on_damaged="skip")
    it = iter(head)
    part = [next(it) for _ in range(10)]
    tail = ActivationStream(local_ds, batch_size=64, columns=("rid",), on_damaged="skip")
    tail.load_state_dict(head.state_dict())
    assert np.array_equal(rids(part + list(tail)), got)


def test_missing_shard_is_a_clear_error(local_ds):
    name = Dataset.open(local_ds).shards[3].name
    os.remove(os.path.join(local_ds, name))
    with pytest.raises(FileNotFoundError, match=rf"{name}: shard named in the manifest is missing"):
        list(ActivationStream(local_ds, batch_size=100, on_damaged="skip"))


def test_no_manifest_is_a_clear_error(local_ds, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no manifest.json"):
        ActivationStream(str(tmp_path / "nothing-here"), batch_size=10)
    os.remove(os.path.join(local_ds, "manifest.json"))  # as while a writer is still running
    with pytest.raises(DatasetNotFoundError, match="still being written"):
        ActivationStream(local_ds, batch_size=10)


# -- configuration and resume states --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(batch_size=0), "batch_size=0 must be an integer >= 1"),
        (dict(batch_size=8, rank=2, world_size=2), r"rank=2 must be in 0..1"),
        (dict(batch_size=8, on_damaged="ignore"), "on_damaged='ignore' must be 'raise' or 'skip'"),
        (dict(batch_size=8, columns=("doc_id",)), r"columns \['doc_id'\] are not in the dataset"),
        (dict(batch_size=8, buffer_shuffle=-1), "buffer_shuffle=-1"),
        (dict(batch_size=8, prefetch=0), "prefetch=0"),
        (dict(batch_size=8, threads=0), "threads=0"),
    ],
)
def test_bad_options_are_refused(local_ds, kw, message):
    with pytest.raises(ValueError, match=message):
        ActivationStream(local_ds, **kw)


def test_cuda_device_without_cuda_is_refused(local_ds):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        ActivationStream(local_ds, batch_size=8, device="cuda")


def test_bad_states_are_refused(local_ds, tmp_path):
    other = str(tmp_path / "other")
    make_dataset(other, rows=2000, random=False)  # same shape and rows, other content
    s = ActivationStream(local_ds, batch_size=50, world_size=2, rank=0, epochs=2)
    next(iter(s))
    state = s.state_dict()
    with pytest.raises(ValueError, match="belongs to another dataset"):
        ActivationStream(other, batch_size=50, world_size=2, rank=0, epochs=2).load_state_dict(state)
    # another world size or batch size resumes elastically (tests/test_readers_elastic.py)
    ActivationStream(local_ds, batch_size=50, world_size=4, rank=0, epochs=2).load_state_dict(state)
    ActivationStream(local_ds, batch_size=64, world_size=2, rank=0, epochs=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0, this stream has seed=1"):
        ActivationStream(local_ds, batch_size=50, world_size=2, rank=0, epochs=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="not a stream state"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="past this stream's end"):
        s.load_state_dict(dict(state, positions=[[1, 10_000]]))
    with pytest.raises(ValueError, match="one \\[epoch, batch\\] per worker"):
        s.load_state_dict(dict(state, positions=[[0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="rank=2 is outside its world_size=2"):
        s.load_state_dict(dict(state, rank=2))
    with pytest.raises(ValueError, match="world_size=0 must be an integer >= 1"):
        s.load_state_dict(dict(state, world_size=0))
    with pytest.raises(ValueError, match="version 3; this code reads versions 1, 2"):
        s.load_state_dict(dict(state, version=3))
    s.load_state_dict(state)  # the good one still loads
    assert s.state_dict() == state


# -- bounded memory ---------------------------------------------------------------------------------------------
def test_stalled_consumer_stops_the_readers(any_url):
    make_dataset(any_url, rows=3000, d_model=16, chunk_rows=20, shard_chunks=10)
    ds = Dataset.open(any_url)
    chunk_bytes = max(int(ds.index(i).entries["comp_len"].max()) for i in range(len(ds.shards)))
    s = ActivationStream(any_url, batch_size=50, prefetch=3, threads=2)
    it = iter(s)
    next(it)
    time.sleep(0.3)  # a producer without a bound would keep decoding while we wait
    # Work is issued only for the next `prefetch` batches: 4 batches of 50 rows span at most 11 chunks of 20.
    assert s.stats.bytes_read <= 11 * chunk_bytes
    assert s.stats.peak_buffered_batches <= 3 + 1
    list(it)
    assert s.stats.peak_buffered_batches <= 3 + 1 and s.stats.rows == 3000


def test_stalled_consumer_rss_stays_flat(tmp_path):
    psutil = pytest.importorskip("psutil")
    url = str(tmp_path / "big")
    make_dataset(url, rows=24_000, d_model=512, chunk_rows=64, shard_chunks=64)  # 48 MiB of float32
    s = ActivationStream(url, batch_size=256, prefetch=2, threads=2)  # 0.5 MiB batches
    proc = psutil.Process()
    it = iter(s)
    next(it)
    before = proc.memory_info().rss
    time.sleep(0.5)
    for _ in range(5):
        next(it)
    time.sleep(0.5)
    grown = proc.memory_info().rss - before
    assert grown < 16 << 20, f"RSS grew {grown >> 20} MiB while the consumer stalled (dataset is 48 MiB)"
    del it
    assert not reader_threads() or all(not t.is_alive() for t in reader_threads())


def test_breaking_out_shuts_the_pool_down(local_ds):
    s = ActivationStream(local_ds, batch_size=10, threads=3)
    for i, _ in enumerate(s):
        if i == 3:
            break
    import gc

    gc.collect()
    assert not reader_threads()


def test_rss_does_not_grow_with_bytes_read(tmp_path):
    """Local shards are memory-mapped; decoded chunks' pages are dropped, so a full pass keeps RSS flat."""
    psutil = pytest.importorskip("psutil")
    url = str(tmp_path / "big")
    make_dataset(url, rows=24_000, d_model=512, chunk_rows=64, shard_chunks=64)  # 48 MiB, incompressible
    proc = psutil.Process()
    base, peak = proc.memory_info().rss, 0
    for _ in ActivationStream(url, batch_size=256, prefetch=2, threads=2):
        peak = max(peak, proc.memory_info().rss - base)
    assert peak < 24 << 20, f"RSS grew {peak >> 20} MiB over a pass of a 48 MiB dataset"

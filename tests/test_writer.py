"""ShardWriter: bad input is refused with a clear message, and nothing half-written becomes visible."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shuffler import Dataset, DatasetNotFoundError, SchemaError
from shuffler.storage.storage import Storage
from writers import ShardWriter

COLS = (("token_id", "int32"), ("doc_id", "int64"), ("position", "int32"))


def cols(n, start=0):
    r = np.arange(start, start + n)
    return {"token_id": r.astype(np.int32), "doc_id": (r // 10).astype(np.int64), "position": (r % 10).astype(np.int32)}


def test_rejects_wrong_d_model(tmp_path):
    with pytest.raises(SchemaError, match=r"shape \(5, 9\); expected \[rows, d_model=8\]"):
        with ShardWriter(str(tmp_path / "d"), d_model=8, dtype="float32") as w:
            w.write(np.zeros((5, 9), np.float32), **cols(5))
    assert Storage(str(tmp_path / "d")).list() == []


def test_rejects_bad_dtype_and_params(tmp_path):
    with pytest.raises(SchemaError, match="dtype 'int8' is not supported"):
        ShardWriter(str(tmp_path / "d"), d_model=8, dtype="int8")
    with pytest.raises(SchemaError, match="d_model 0"):
        ShardWriter(str(tmp_path / "d"), d_model=0, dtype="float32")
    with pytest.raises(ValueError, match="chunk_bytes=3"):
        ShardWriter(str(tmp_path / "d"), d_model=8, dtype="float32", chunk_bytes=3)
    with pytest.raises(ValueError, match="level=99"):
        ShardWriter(str(tmp_path / "d"), d_model=8, dtype="float32", level=99)
    with pytest.raises(SchemaError, match="column 'doc_id' must be int64"):
        ShardWriter(str(tmp_path / "d"), d_model=8, dtype="float32", columns=(("doc_id", "int32"),))


def test_rejects_mismatched_column_lengths_and_names(tmp_path):
    url = str(tmp_path / "d")
    with pytest.raises(SchemaError, match=r"column 'doc_id' has shape \(4,\); expected \[5\]"):
        with ShardWriter(url, d_model=4, dtype="float16") as w:
            c = cols(5)
            c["doc_id"] = c["doc_id"][:4]
            w.write(np.zeros((5, 4), np.float32), **c)
    with pytest.raises(SchemaError, match=r"missing \['position'\]"):
        with ShardWriter(url, d_model=4, dtype="float16") as w:
            c = cols(5)
            del c["position"]
            w.write(np.zeros((5, 4), np.float32), **c)
    with pytest.raises(SchemaError, match="outside int32's range"):
        with ShardWriter(url, d_model=4, dtype="float16") as w:
            c = cols(5)
            c["token_id"] = np.full(5, 2**40, dtype=np.int64)
            w.write(np.zeros((5, 4), np.float32), **c)
    assert Storage(url).list() == []


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_nonfinite_refused_by_default_allowed_by_option(tmp_path, dtype):
    x = np.ones((6, 4), np.float32)
    x[3, 2] = np.nan
    x[1, 0] = np.inf
    with pytest.raises(ValueError, match="holds 2 NaN/inf values; pass allow_nonfinite=True"):
        with ShardWriter(str(tmp_path / "a"), d_model=4, dtype=dtype) as w:
            w.write(x, **cols(6))
    assert not Storage(str(tmp_path / "a")).list()
    with ShardWriter(str(tmp_path / "b"), d_model=4, dtype=dtype, allow_nonfinite=True) as w:
        w.write(x, **cols(6))
    got = Dataset.open(str(tmp_path / "b")).read_shard(0).float32()
    assert np.isnan(got[3, 2]) and np.isinf(got[1, 0])


def test_exception_mid_write_leaves_nothing_visible(any_url):
    # Enough rows for several committed shards before the failure.
    with pytest.raises(RuntimeError, match="producer crashed"):
        with ShardWriter(any_url, d_model=16, dtype="float32", chunk_bytes=4096, shard_bytes=8192) as w:
            for k in range(10):
                w.write(np.ones((100, 16), np.float32), **cols(100, 100 * k))
            assert len(Storage(any_url).list()) >= 3  # shards were committed along the way
            raise RuntimeError("producer crashed")
    assert Storage(any_url).list() == []
    with pytest.raises(DatasetNotFoundError, match="no manifest.json"):
        Dataset.open(any_url)


def test_refuses_to_overwrite_existing_dataset(tmp_path):
    url = str(tmp_path / "d")
    with ShardWriter(url, d_model=2, dtype="float32") as w:
        w.write(np.ones((3, 2), np.float32), **cols(3))
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        ShardWriter(url, d_model=2, dtype="float32")
    with ShardWriter(url, d_model=2, dtype="float32", overwrite=True) as w:
        w.write(np.zeros((4, 2), np.float32), **cols(4))
    assert Dataset.open(url).num_rows == 4


def test_torch_input_any_layout(tmp_path):
    torch = pytest.importorskip("torch")
    x = torch.randn(8, 50).T  # non-contiguous [50, 8]
    with ShardWriter(str(tmp_path / "d"), d_model=8, dtype="float32") as w:
        w.write(x, token_id=torch.arange(50, dtype=torch.int32), doc_id=torch.zeros(50, dtype=torch.int64),
                position=torch.arange(50, dtype=torch.int32))
    b = Dataset.open(str(tmp_path / "d")).read_shard(0)
    assert np.array_equal(b.acts, x.numpy())
    assert np.array_equal(b.columns["token_id"], np.arange(50))


def test_metadata_and_writes_after_close(tmp_path):
    url = str(tmp_path / "d")
    w = ShardWriter(url, d_model=2, dtype="float32", metadata={"model": "m", "layer": 3})
    w.write(np.ones((3, 2), np.float32), **cols(3))
    m = w.close()
    assert m.metadata == {"model": "m", "layer": 3}
    with pytest.raises(ValueError, match="closed"):
        w.write(np.ones((3, 2), np.float32), **cols(3))
    with pytest.raises(TypeError, match="JSON-serialisable"):
        ShardWriter(str(tmp_path / "e"), d_model=2, dtype="float32", metadata={"x": object()})


def test_failed_overwrite_keeps_the_old_dataset(any_url):
    with ShardWriter(any_url, d_model=4, dtype="float32", chunk_bytes=4 * 4 * 10 + 160, shard_bytes=2000) as w:
        w.write(np.full((100, 4), 1, np.float32), **cols(100))
    old = Dataset.open(any_url).manifest
    with pytest.raises(RuntimeError, match="crash"):
        with ShardWriter(any_url, d_model=4, dtype="float32", overwrite=True, chunk_bytes=4 * 4 * 10 + 160,
                         shard_bytes=2000) as w:
            w.write(np.full((300, 4), 2, np.float32), **cols(300))
            raise RuntimeError("crash")
    ds = Dataset.open(any_url)
    assert ds.manifest == old and ds.check()[0] == []  # the old dataset is whole
    with ShardWriter(any_url, d_model=4, dtype="float32", overwrite=True, chunk_bytes=4 * 4 * 10 + 160,
                     shard_bytes=2000) as w:
        w.write(np.full((30, 4), 3, np.float32), **cols(30))
    ds = Dataset.open(any_url)
    assert ds.num_rows == 30 and ds.check()[0] == []
    shard_objects = [n for n in Storage(any_url).list() if n.endswith(".shard")]
    assert sorted(shard_objects) == sorted(s.name for s in ds.shards)  # the old shards were removed


def _shard_bytes(url: str) -> dict[str, bytes]:
    st = Storage(url)
    return {name: st.read(name) for name in sorted(st.list())}


def _batches(n_rows: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_rows, 8)).astype(np.float32), cols(n_rows, 1000 * seed)


@pytest.mark.parametrize("threads", [1, 2])
def test_large_batches_encoded_in_place_give_the_bytes_of_copied_small_ones(tmp_path, threads):
    """A batch of several chunks is encoded from the caller's arrays in place (writers/shard_writer.py: borrow);
    the shards are the same bytes as the same rows written in small batches, which are copied into chunk buffers.
    Changing the caller's array after write() returns changes nothing written."""
    x, c = _batches(1000, 1)
    kw = dict(d_model=8, dtype="float16", chunk_bytes=32 * 30, shard_bytes=32 * 30 * 3, threads=threads)
    with ShardWriter(str(tmp_path / "big"), **kw) as w:
        w.write(x[:10], **{k: v[:10] for k, v in c.items()})  # a partial chunk first: this batch copies
        w.write(x[10:30], **{k: v[10:30] for k, v in c.items()})  # completes a chunk: fill is 0 again
        big, big_cols = x[30:].copy(), {k: v[30:].copy() for k, v in c.items()}
        w.write(big, **big_cols)  # 970 rows: 32 whole chunks in place and a 10-row tail
        big[:] = 7.0  # the caller reuses its buffers at once
        for v in big_cols.values():
            v[:] = 0
    with ShardWriter(str(tmp_path / "small"), **kw) as w:
        for s in range(0, 1000, 7):
            w.write(x[s : s + 7], **{k: v[s : s + 7] for k, v in c.items()})
    assert _shard_bytes(str(tmp_path / "big")) == _shard_bytes(str(tmp_path / "small"))
    got = Dataset.open(str(tmp_path / "big"))
    assert np.array_equal(np.concatenate([got.read_shard(i).float32() for i in range(len(got.shards))]),
                          x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("bad_chunk", [0, 5, 31])
def test_a_refused_large_batch_leaves_the_writer_as_it_was(tmp_path, bad_chunk):
    """A NaN anywhere in a batch of many chunks refuses the whole batch, though its first chunks are encoded
    while the batch is checked: the writer goes on as if the batch had never come (same bytes as a writer that
    never saw it), keeping the rows written before it, some of them still being encoded."""
    x, c = _batches(600, 2)
    bad, bad_cols = _batches(970, 3)
    bad[bad_chunk * 30 + 3, 5] = np.nan
    kw = dict(d_model=8, dtype="bfloat16", chunk_bytes=32 * 30, shard_bytes=32 * 30 * 4, threads=2)
    with ShardWriter(str(tmp_path / "a"), **kw) as w:
        w.write(x[:300], **{k: v[:300] for k, v in c.items()})  # 10 chunks, the last ones in flight
        with pytest.raises(ValueError, match=r"batch after row 300 holds 1 NaN/inf values.*nothing of this batch"):
            w.write(bad, **bad_cols)
        w.write(x[300:], **{k: v[300:] for k, v in c.items()})
        assert w.rows_written == 600
    with ShardWriter(str(tmp_path / "b"), **kw) as w:
        w.write(x, **c)
    assert _shard_bytes(str(tmp_path / "a")) == _shard_bytes(str(tmp_path / "b"))
    assert Dataset.open(str(tmp_path / "a")).manifest.fingerprint == Dataset.open(str(tmp_path / "b")).manifest.fingerprint


@pytest.mark.parametrize("threads,bad_rows", [(2, 45), (3, 45), (3, 75)])
def test_a_refused_batch_of_one_or_two_chunks_keeps_the_chunks_in_flight_before_it(tmp_path, threads, bad_rows):
    """A refused batch too short to push the earlier chunks out of the pipeline is checked at the end of write();
    taking it back must take only its own chunks, not the earlier batch's still in flight (found in review)."""
    x, c = _batches(600, 4)
    bad, bad_cols = _batches(bad_rows, 5)
    bad[3, 5] = np.nan
    kw = dict(d_model=8, dtype="float16", chunk_bytes=32 * 30, shard_bytes=32 * 30 * 4, threads=threads)
    with ShardWriter(str(tmp_path / "a"), **kw) as w:
        w.write(x[:300], **{k: v[:300] for k, v in c.items()})  # whole chunks only: the last ones still in flight
        with pytest.raises(ValueError, match="NaN"):
            w.write(bad, **bad_cols)
        w.write(x[300:], **{k: v[300:] for k, v in c.items()})
    with ShardWriter(str(tmp_path / "b"), **kw) as w:
        w.write(x, **c)
    assert Dataset.open(str(tmp_path / "a")).num_rows == 600
    assert _shard_bytes(str(tmp_path / "a")) == _shard_bytes(str(tmp_path / "b"))


def test_large_batches_are_lent_to_the_encode_threads_not_copied(tmp_path, monkeypatch):
    """The in-place path is the one taken: whole chunks of a batch that starts a chunk go to the encoder as the
    caller's rows (borrow=), the tail and batches after a partial chunk through chunk buffers."""
    import shuffler.io.rolling as rolling

    lent = []
    real = rolling.EncodePipeline.encode

    def spy(self, buf, rows, **kw):
        lent.append(kw.get("borrow") is not None)
        return real(self, buf, rows, **kw)

    monkeypatch.setattr(rolling.EncodePipeline, "encode", spy)
    x, c = _batches(100, 6)
    with ShardWriter(str(tmp_path / "d"), d_model=8, dtype="float16", chunk_bytes=32 * 30) as w:
        w.write(x[:95], **{k: v[:95] for k, v in c.items()})  # 3 chunks lent, 5 rows copied
        w.write(x[95:], **{k: v[95:] for k, v in c.items()})  # completes the partial chunk by copying
    assert lent == [True, True, True, False]


def test_after_a_failed_storage_write_the_writer_refuses_to_go_on_and_leaves_nothing(tmp_path, monkeypatch):
    """An error other than a refusal (here the storage failing once under a frame) may have lost rows: the
    writer refuses further writes and close() removes everything, rather than commit a dataset with holes."""
    import shuffler.io.rolling as rolling

    real, calls = rolling.RollingShardWriter._add, []

    def flaky(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk went away")
        return real(self, *a)

    monkeypatch.setattr(rolling.RollingShardWriter, "_add", flaky)
    x, c = _batches(300, 7)
    url = str(tmp_path / "d")
    w = ShardWriter(url, d_model=8, dtype="float16", chunk_bytes=32 * 30, shard_bytes=32 * 30 * 2, threads=1)
    with pytest.raises(OSError, match="disk went away"):
        for s in range(0, 300, 10):
            w.write(x[s : s + 10], **{k: v[s : s + 10] for k, v in c.items()})
    with pytest.raises(RuntimeError, match="an earlier write failed .*disk went away"):
        w.write(x[:10], **{k: v[:10] for k, v in c.items()})
    with pytest.raises(RuntimeError, match="an earlier write failed"):
        w.close()
    assert Storage(url).list() == []


def test_an_interrupt_while_a_refused_batch_is_taken_back_stops_the_writer(tmp_path, monkeypatch):
    """Ctrl-C while a refused batch is being taken back (drop() waits for the threads) may leave some of it in
    the pipeline: that is not a refusal, so the writer refuses to go on rather than commit NaN rows (review)."""
    import shuffler.io.rolling as rolling

    real_wait, real_drop = rolling.wait, rolling.EncodePipeline.drop
    fired = []

    def interrupted_drop(self, gate=None):
        if fired:  # once: the writer's own abort() later drops as usual
            return real_drop(self, gate)
        fired.append(True)
        real_wait([f for e in self.inflight for f in e[:2] if f is not None])

        def wait(fs, *a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(rolling, "wait", wait)
        try:
            return real_drop(self, gate)
        finally:
            monkeypatch.setattr(rolling, "wait", real_wait)

    monkeypatch.setattr(rolling.EncodePipeline, "drop", interrupted_drop)
    x, c = _batches(90, 8)
    bad, bad_cols = _batches(30, 9)
    bad[5, 3] = np.nan
    url = str(tmp_path / "d")
    w = ShardWriter(url, d_model=8, dtype="float16", chunk_bytes=32 * 30, threads=2)
    w.write(x, **c)
    with pytest.raises(KeyboardInterrupt):
        w.write(bad, **bad_cols)
    with pytest.raises(RuntimeError, match="an earlier write failed"):
        w.write(x, **c)
    with pytest.raises(RuntimeError, match="an earlier write failed"):
        w.close()
    assert Storage(url).list() == []


@pytest.mark.parametrize("where", ["last frame", "part manifest"])
def test_a_failed_close_leaves_nothing_not_even_the_producers_start_marker(tmp_path, monkeypatch, where):
    """close() failing under its last frame or its part manifest removes the shards and the part's start
    marker, so `shuffler seal` is not left refusing a part that will never finish (review)."""
    import shuffler.io.rolling as rolling
    import writers.shard_writer as sw

    if where == "last frame":
        real_close = rolling.RollingShardWriter.close

        def close(self):
            def add(*a):
                raise OSError("disk went away in close")

            self._add = add
            self.encoder.emit = add
            return real_close(self)

        monkeypatch.setattr(rolling.RollingShardWriter, "close", close)
    else:
        def write_manifest(*a, **k):
            raise OSError("part manifest put failed")

        monkeypatch.setattr(sw, "write_manifest", write_manifest)
    x, c = _batches(45, 10)
    url = str(tmp_path / "d")
    with pytest.raises(OSError, match="went away in close|put failed"):
        with ShardWriter(url, d_model=8, dtype="float16", chunk_bytes=32 * 30, threads=2, producer="p") as w:
            w.write(x, **c)
    assert Storage(url).list() == []


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupt_around_a_shards_commit_leaves_nothing(tmp_path, monkeypatch, when):
    """Ctrl-C just before or just after a shard's rename: the writer's abort still finds the temporary object
    or the committed shard, so nothing is left behind (review: the shard used to be recorded only after)."""
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if dst.endswith("shard-000000.shard"):
            if when == "after":
                real_replace(src, dst, *a, **k)
            raise KeyboardInterrupt
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    x, c = _batches(200, 11)
    url = str(tmp_path / "d")
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(url, d_model=8, dtype="float16", chunk_bytes=32 * 30, shard_bytes=32 * 30 * 2) as w:
            w.write(x, **c)
    monkeypatch.setattr(os, "replace", real_replace)
    assert Storage(url).list() == [] and not [p for p in os.listdir(url) if not os.path.isdir(os.path.join(url, p))]

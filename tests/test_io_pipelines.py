"""The one encode pipeline (shuffler/io/rolling.py) and the one chunk reader (shuffler/io/chunks.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shuffler.errors import ChecksumError, FormatError
from shuffler.format.codec import encode_chunk, fingerprint_sum, row_hashes, unsplit
from shuffler.format.schema import Schema, standard_columns
from shuffler.io.chunks import ChunkReader
from shuffler.io.rolling import EncodePipeline
from shuffler.storage.storage import Storage

SCHEMA = Schema(dtype="float16", d_model=16, columns=standard_columns())


def rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((n, 16)).astype(np.float16)
    r = np.arange(n)
    return acts, [(r % 97).astype(np.int32), r.astype(np.int64), (r % 50).astype(np.int32)]


@pytest.mark.parametrize("hash_thread", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_encode_pipeline_emits_in_order_what_serial_encoding_gives(threads, hash_thread):
    acts, cols = rows(1000)
    order = np.random.default_rng(1).permutation(1000)
    spans = [(0, 64), (64, 128), (128, 130), (130, 194), (194, 1000 - 6), (1000 - 6, 1000)]
    got = []
    enc = EncodePipeline(SCHEMA, 806, level=1, threads=threads, emit=lambda *a: got.append(a), hashes=True,
                         hash_thread=hash_thread)
    for k, (s, e) in enumerate(spans):
        if k % 2:  # rows the caller copies in
            b = enc.buffer()
            b.acts[: e - s] = acts[order[s:e]]
            for d, c in zip(b.cols, cols, strict=True):
                d[: e - s] = c[order[s:e]]
            enc.encode(b, e - s)
        else:  # rows gathered on a worker thread
            enc.encode(enc.buffer(), e - s, gather=(acts, cols, order[s:e]))
    enc.close()
    assert enc.made <= threads + 1  # bounded, reused buffers
    want = []
    for s, e in spans:
        a, c = acts[order[s:e]], [x[order[s:e]] for x in cols]
        frame, crc = encode_chunk(SCHEMA, a, c, 1)
        want.append((frame, e - s, crc, fingerprint_sum(row_hashes(SCHEMA, a, c))))
    assert got == want


def test_encode_pipeline_reraises_a_workers_first_error():
    acts, cols = rows(100)
    got = []
    enc = EncodePipeline(SCHEMA, 10, level=1, threads=2, emit=lambda *a: got.append(a))
    enc.encode(enc.buffer(), 10, gather=(acts, cols, np.arange(10)))
    enc.encode(enc.buffer(), 10, gather=(acts, cols[:2], np.arange(10)))  # a column short: fails on the thread
    enc.encode(enc.buffer(), 10, gather=(acts, cols, np.arange(10, 20)))
    with pytest.raises(ValueError, match="zip"):
        enc.close()
    enc.abort()
    assert len(got) == 1  # the chunk before the failure, and nothing after it


def test_encode_pipeline_reraises_a_hash_threads_error(monkeypatch):
    """With hash_thread, a chunk's hash runs apart from its encode: an error there reaches the caller like an
    encode error, after the chunks before it."""
    import shuffler.io.rolling as rolling

    acts, cols = rows(40)
    calls = []
    real = rolling.row_hashes

    def hashes(schema, a, c):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("hash failed on chunk 1")
        return real(schema, a, c)

    monkeypatch.setattr(rolling, "row_hashes", hashes)
    got = []
    enc = EncodePipeline(SCHEMA, 10, level=1, threads=2, emit=lambda *a: got.append(a), hashes=True, hash_thread=True)
    with pytest.raises(RuntimeError, match="chunk 1"):
        for k in range(4):
            b = enc.buffer()
            b.acts[:10] = acts[10 * k : 10 * k + 10]
            for d, c in zip(b.cols, cols, strict=True):
                d[:10] = c[10 * k : 10 * k + 10]
            enc.encode(b, 10)
        enc.close()
    enc.abort()
    assert [g[1] for g in got] == [10]  # chunk 0 only
    assert got[0][3] == fingerprint_sum(real(SCHEMA, acts[:10], [c[:10] for c in cols]))


def test_chunk_reader_reads_mapped_and_ranged_frames_alike_and_names_damage(tmp_path):
    acts, cols = rows(300)
    frame, crc = encode_chunk(SCHEMA, acts, cols, 1)
    for url in (str(tmp_path / "d"), "memory://test-io-pipelines"):
        store = Storage(url)
        store.write("obj", b"head" + frame)
        reader = ChunkReader(store)
        assert (reader.maps is not None) == store.is_local
        end = 4 + len(frame)
        raw = reader.read(SCHEMA, "obj", 4, end, 300, crc, where="here")
        a, c = unsplit(SCHEMA, raw, 300)
        assert np.array_equal(a, acts) and all(np.array_equal(c[n], x) for n, x in zip(SCHEMA.column_names, cols, strict=True))
        frames = reader.frames(["obj", "obj"], [4, 4], [end, end])
        assert [bytes(f) for f in frames] == [frame, frame]
        with pytest.raises(ChecksumError, match="here: frame checksum"):
            reader.read(SCHEMA, "obj", 4, end, 300, crc ^ 1, where="here")
        with pytest.raises(FormatError, match=r"there: read \d+ bytes, index says \d+ \(object truncated\?\)"):
            reader.read(SCHEMA, "obj", 4, end + 10, 300, crc, where="there")
        with pytest.raises(FileNotFoundError, match=f"{url}/gone: shard named in the manifest is missing"):
            reader.read(SCHEMA, "gone", 0, 10, 1, 0, where="x")
        reader.close()
        store.delete("obj")
    assert not os.path.exists(tmp_path / "d" / "obj")


def test_a_failed_chunk_is_raised_only_once_its_hash_stopped_reading_the_rows(monkeypatch):
    """With the hash apart, a chunk whose encode fails is reported only after its hash is done too: the caller
    may then reuse rows it lent (borrow=) or the pipeline a buffer."""
    import time

    import shuffler.io.rolling as rolling

    acts, cols = rows(20)
    events = []
    real = rolling.row_hashes

    def slow_hash(schema, a, c):
        time.sleep(0.3)
        events.append("hash done")
        return real(schema, a, c)

    def failing_encode(schema, a, c, level):
        raise RuntimeError("encode failed")

    monkeypatch.setattr(rolling, "row_hashes", slow_hash)
    monkeypatch.setattr(rolling, "encode_chunk", failing_encode)
    enc = EncodePipeline(SCHEMA, 10, level=1, threads=1, emit=lambda *a: None, hashes=True, hash_thread=True)
    enc.encode(None, 10, borrow=(acts[:10], [c[:10] for c in cols]))
    with pytest.raises(RuntimeError, match="encode failed"):
        enc.close()
    events.append("raised")
    assert events == ["hash done", "raised"]
    enc.abort()

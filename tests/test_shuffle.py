"""The two-pass shuffle, tested by invariants: a permutation, deterministic per seed whatever the split,
different across seeds, exact under recursion, and clear errors for bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shuffler import Dataset
from shuffler.errors import DatasetNotFoundError, SchemaError
from shuffler.format.schema import standard_columns
from shuffler.io.dataset import Batch
from shuffler.shuffling.plan import fixed_overhead, usable_cores
from shuffler.shuffling.run import shuffle
from writers.shard_writer import ShardWriter

CHUNK = 4 << 10  # tiny chunks and shards so small data still has many of each
SHARD = 32 << 10
SMALL = dict(chunk_bytes=CHUNK, shard_bytes=SHARD)
COLUMNS = standard_columns(row_id="int64")


def make_dataset(url: str, rows: int, *, d_model: int = 16, dtype: str = "float16", start: int = 0,
                 docs: int = 10, seed: int = 0, columns=COLUMNS) -> None:
    """Rows in document order with a unique row_id, so every output row can be traced to its input."""
    rng = np.random.default_rng(seed)
    row = np.arange(start, start + rows, dtype=np.int64)
    doc = row * docs // max(rows + start, 1)
    acts = rng.standard_normal((rows, d_model)).astype(np.float32) + doc[:, None].astype(np.float32)
    cols = {"token_id": (row % 1000).astype(np.int32), "doc_id": doc, "position": (row % 97).astype(np.int32)}
    if any(n == "row_id" for n, _ in columns):
        cols["row_id"] = row
    with ShardWriter(url, d_model=d_model, dtype=dtype, columns=columns, chunk_bytes=CHUNK, shard_bytes=SHARD) as w:
        for s in range(0, rows, 777):  # odd batch size: chunk boundaries fall mid-batch
            w.write(acts[s : s + 777], **{k: v[s : s + 777] for k, v in cols.items()})


def read_all(url: str) -> Batch:
    ds = Dataset.open(url)
    parts = [ds.read_shard(i) for i in range(len(ds.shards))]
    return Batch.concat(parts) if parts else Batch(np.empty((0, ds.d_model)), {}, ds.dtype)


def output_bytes(url: str) -> dict[str, bytes]:
    ds = Dataset.open(url)
    return {s.name: ds.store.read(s.name) for s in ds.shards}


def assert_permutation(src: Batch, out: Batch) -> None:
    """Every input row, activations and provenance columns, appears exactly once in the output."""
    assert len(src) == len(out)
    i, o = np.argsort(src.columns["row_id"]), np.argsort(out.columns["row_id"])
    np.testing.assert_array_equal(src.columns["row_id"][i], out.columns["row_id"][o])
    assert len(np.unique(out.columns["row_id"])) == len(out)
    np.testing.assert_array_equal(src.acts[i], out.acts[o])
    for k in src.columns:
        np.testing.assert_array_equal(src.columns[k][i], out.columns[k][o])


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("raw") / "raw")
    make_dataset(url, 5000)
    return url


def test_output_is_a_permutation_with_provenance(raw, tmp_path):
    m = shuffle(raw, str(tmp_path / "out"), seed=3, workers=1, buckets=5, **SMALL)
    src, out = read_all(raw), read_all(str(tmp_path / "out"))
    assert_permutation(src, out)
    assert not np.array_equal(src.columns["row_id"], out.columns["row_id"])
    assert m.num_rows == 5000 and m.fingerprint == Dataset.open(raw).manifest.fingerprint
    assert m.metadata["shuffle"]["seed"] == 3 and m.metadata["shuffle"]["buckets"] == 5
    # manifest lists shards bucket by bucket; nothing but the dataset is left in DST
    assert [s.name for s in m.shards] == sorted(s.name for s in m.shards)
    assert sorted(os.listdir(tmp_path / "out")) == sorted([*(s.name for s in m.shards), "manifest.json"])


def test_same_seed_identical_bytes_whatever_workers_and_split(raw, tmp_path):
    a = shuffle(raw, str(tmp_path / "a"), seed=11, workers=1, buckets=4, **SMALL)
    b = shuffle(raw, str(tmp_path / "b"), seed=11, workers=2, buckets=4, map_rows=700, **SMALL)
    c = shuffle(raw, str(tmp_path / "c"), seed=11, workers=1, buckets=4, map_rows=1234, scratch_level=5,
                scratch=str(tmp_path / "elsewhere"), **SMALL)
    assert [s.name for s in a.shards] == [s.name for s in b.shards] == [s.name for s in c.shards]
    ref = output_bytes(str(tmp_path / "a"))
    assert output_bytes(str(tmp_path / "b")) == ref
    assert output_bytes(str(tmp_path / "c")) == ref
    assert not os.path.exists(tmp_path / "elsewhere") or not os.listdir(tmp_path / "elsewhere")


def test_threads_never_change_the_bytes_and_size_nothing_but_the_peak(raw, tmp_path):
    # --threads is a task's codec threads (issue: one task must be able to use every core of a node).
    ref = shuffle(raw, str(tmp_path / "a"), seed=11, workers=1, threads=1, buckets=4, **SMALL)
    stats: dict = {}
    m = shuffle(raw, str(tmp_path / "b"), seed=11, workers=1, threads=5, buckets=4, map_rows=900, stats=stats, **SMALL)
    assert stats["plan"]["request"]["threads"] == 5
    assert [s.name for s in m.shards] == [s.name for s in ref.shards]
    assert output_bytes(str(tmp_path / "b")) == output_bytes(str(tmp_path / "a"))
    # The default shares this machine's cores among the workers, rounded up.
    stats = {}
    shuffle(raw, str(tmp_path / "c"), seed=11, workers=2, buckets=4, stats=stats, **SMALL)
    assert stats["plan"]["request"]["threads"] == -(-usable_cores() // 2)
    assert output_bytes(str(tmp_path / "c")) == output_bytes(str(tmp_path / "a"))
    with pytest.raises(ValueError, match="threads=0 must be an integer >= 1"):
        shuffle(raw, str(tmp_path / "d"), seed=11, threads=0)
    assert not os.path.exists(tmp_path / "d")


def test_other_seed_other_order(raw, tmp_path):
    shuffle(raw, str(tmp_path / "a"), seed=1, workers=1, buckets=4, **SMALL)
    shuffle(raw, str(tmp_path / "b"), seed=2, workers=1, buckets=4, **SMALL)
    a, b = read_all(str(tmp_path / "a")), read_all(str(tmp_path / "b"))
    assert_permutation(a, b)
    # Two independent uniform orders of 5000 rows agree at ~1 position on average.
    assert np.sum(a.columns["row_id"] == b.columns["row_id"]) < 20


def test_recursion_on_tiny_memory_is_exact(raw, tmp_path):
    memory = fixed_overhead(CHUNK) + (128 << 10)  # room for ~1,400 rows of 92 B: far below 5000 / 2
    m = shuffle(raw, str(tmp_path / "out"), seed=5, workers=1, buckets=2, memory=memory, **SMALL)
    assert any("." in s.name.split("-")[1] for s in m.shards), "expected re-shuffled sub-buckets"
    assert_permutation(read_all(raw), read_all(str(tmp_path / "out")))
    # still deterministic: the recursion draws from keys derived from (seed, bucket path)
    shuffle(raw, str(tmp_path / "again"), seed=5, workers=1, buckets=2, memory=memory, map_rows=999, **SMALL)
    assert output_bytes(str(tmp_path / "again")) == output_bytes(str(tmp_path / "out"))


def test_auto_buckets_from_memory(raw, tmp_path):
    memory = fixed_overhead(CHUNK) + (300 << 10)
    m = shuffle(raw, str(tmp_path / "out"), seed=0, workers=1, memory=memory, **SMALL)
    assert m.metadata["shuffle"]["buckets"] >= 2
    assert not any("." in s.name.split("-")[1] for s in m.shards), "6-sigma headroom should avoid recursion"
    assert_permutation(read_all(raw), read_all(str(tmp_path / "out")))


def test_several_sources_are_shuffled_together(tmp_path):
    make_dataset(str(tmp_path / "a"), 1500, start=0)
    make_dataset(str(tmp_path / "b"), 900, start=1500, seed=1)
    m = shuffle([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"), seed=0, workers=1, buckets=3,
                **SMALL)
    src = Batch.concat([read_all(str(tmp_path / "a")), read_all(str(tmp_path / "b"))])
    out = read_all(str(tmp_path / "out"))
    assert_permutation(src, out)
    # Appended sources would put 300 rows of `a` first; shuffled together, the count is hypergeometric with mean
    # 300 x 1500/2400 = 187.5 and standard deviation 7.8, so (150, 225) is +-4.8 standard deviations.
    from_a = int((out.columns["row_id"][:300] < 1500).sum())
    assert 150 < from_a < 225, f"{from_a} of the first 300 rows come from the first source: not interleaved"
    assert len(m.metadata["shuffle"]["sources"]) == 2


def test_bfloat16_float32_and_no_columns(tmp_path):
    for dtype, cols in (("bfloat16", COLUMNS), ("float32", ())):
        src = str(tmp_path / f"raw-{dtype}")
        with ShardWriter(src, d_model=8, dtype=dtype, columns=cols, chunk_bytes=CHUNK, shard_bytes=SHARD) as w:
            acts = np.arange(3000 * 8, dtype=np.float32).reshape(3000, 8)
            extra = {} if not cols else {"token_id": np.zeros(3000, np.int32), "doc_id": np.zeros(3000, np.int64),
                                         "position": np.zeros(3000, np.int32), "row_id": np.arange(3000)}
            w.write(acts, **extra)
        shuffle(src, str(tmp_path / f"out-{dtype}"), seed=0, workers=1, buckets=3, **SMALL)
        a, b = read_all(src), read_all(str(tmp_path / f"out-{dtype}"))
        order = np.lexsort(a.acts.T[::-1]), np.lexsort(b.acts.T[::-1])
        np.testing.assert_array_equal(a.acts[order[0]], b.acts[order[1]])
        assert not np.array_equal(a.acts, b.acts)


def test_memory_and_s3_end_to_end(tmp_path, memory_url, s3_url):
    src = str(tmp_path / "raw")
    make_dataset(src, 2000)
    m1 = shuffle(src, memory_url, seed=9, workers=2, buckets=3, **SMALL)  # memory:// runs in-process
    m2 = shuffle(src, s3_url + "/out", seed=9, workers=1, buckets=3, scratch=s3_url + "/scratch", **SMALL)
    assert [s.name for s in m1.shards] == [s.name for s in m2.shards]
    assert output_bytes(memory_url) == output_bytes(s3_url + "/out")
    assert_permutation(read_all(src), read_all(s3_url + "/out"))
    from shuffler.storage.storage import Storage

    assert Storage(s3_url).list("scratch") == []
    assert not any(n.startswith(".shuffle") for n in Storage(s3_url + "/out").list(""))


def test_bad_input_errors(raw, tmp_path):
    other = str(tmp_path / "wide")
    make_dataset(other, 100, d_model=24)
    with pytest.raises(SchemaError, match="d_model"):
        shuffle([raw, other], str(tmp_path / "o1"), seed=0, workers=1)
    with pytest.raises(DatasetNotFoundError, match="nothing-here"):
        shuffle([raw, str(tmp_path / "nothing-here")], str(tmp_path / "o2"), seed=0, workers=1)
    with pytest.raises(ValueError, match="memory"):
        shuffle(raw, str(tmp_path / "o3"), seed=0, memory="10MiB")
    with pytest.raises(ValueError, match="memory"):
        shuffle(raw, str(tmp_path / "o3"), seed=0, memory="lots")
    with pytest.raises(ValueError, match="seed"):
        shuffle(raw, str(tmp_path / "o4"), seed=-1)
    with pytest.raises(ValueError, match="also a SRC"):
        shuffle(raw, raw, seed=0)
    for d in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / d / "manifest.json").exists()


def test_options_are_shuffle_config_fields(raw, tmp_path):
    """shuffle() takes exactly ShuffleConfig's fields as options: an unknown one is named, with the valid ones,
    before anything is written; memory takes bytes or a size string, normalised to bytes."""
    import dataclasses

    from shuffler.shuffling.run import ShuffleConfig

    with pytest.raises(TypeError, match=r"unknown option\(s\) bucket, memroy;.* buckets, workers"):
        shuffle(raw, str(tmp_path / "o"), seed=0, memroy="4GiB", bucket=3)
    assert not (tmp_path / "o").exists()
    with pytest.raises(TypeError, match="seed"):
        shuffle(raw, str(tmp_path / "o"), workers=1)
    assert ShuffleConfig(seed=0, memory="4GiB").memory == 4 << 30 == ShuffleConfig(seed=0, memory=4 << 30).memory
    assert ShuffleConfig(seed=0, memory=None).memory == ShuffleConfig(seed=0).memory
    with pytest.raises(ValueError, match="memory 'lots'"):
        ShuffleConfig(seed=0, memory="lots")
    fields = {f.name for f in dataclasses.fields(ShuffleConfig)}
    assert fields >= {"seed", "memory", "buckets", "workers", "scratch", "map_rows", "executor", "ray_address"}
    # the same bytes whichever way memory is spelled
    kib = fixed_overhead(CHUNK) // 1024 + 64
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ma = shuffle(raw, a, seed=3, workers=1, memory=kib * 1024, **SMALL)
    mb = shuffle(raw, b, seed=3, workers=1, memory=f"{kib}KiB", **SMALL)
    assert ma.metadata["shuffle"]["buckets"] == mb.metadata["shuffle"]["buckets"] > 1
    assert output_bytes(a) == output_bytes(b)


def test_empty_source(memory_url):
    with ShardWriter(memory_url + "/src", d_model=4, dtype="float16", columns=COLUMNS):
        pass
    m = shuffle(memory_url + "/src", memory_url + "/dst", seed=0)
    assert m.num_rows == 0 and m.shards == () and Dataset.open(memory_url + "/dst").num_rows == 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 400), buckets=st.integers(1, 9), split=st.integers(1, 500), seed=st.integers(0, 2**64 - 1))
def test_any_split_same_permutation(tmp_path_factory, rows, buckets, split, seed):
    base = tmp_path_factory.mktemp("h")
    make_dataset(str(base / "raw"), rows)
    shuffle(str(base / "raw"), str(base / "a"), seed=seed, workers=1, buckets=buckets, **SMALL)
    shuffle(str(base / "raw"), str(base / "b"), seed=seed, workers=1, buckets=buckets, map_rows=split, **SMALL)
    a = read_all(str(base / "a"))
    assert_permutation(read_all(str(base / "raw")), a)
    assert output_bytes(str(base / "a")) == output_bytes(str(base / "b"))

"""Round trips are exact for every dtype and column set, on every backend (Hypothesis)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shuffler import Batch, Dataset
from shuffler.format.codec import fingerprint_sum, row_hashes
from shuffler.format.manifest import Fingerprint
from shuffler.format.schema import Schema
from writers import ShardWriter

EXTRA_COLUMNS = [("token_id", "int32"), ("doc_id", "int64"), ("position", "int32"), ("score", "float32"),
                 ("layer", "uint8"), ("big", "uint64")]


def make_rows(rng, n, d, dtype, columns):
    if dtype == "bfloat16":
        acts = rng.integers(0, 1 << 16, size=(n, d), dtype=np.uint16)
        acts[(acts & 0x7F80) == 0x7F80] &= 0x3FFF  # keep them finite: writers refuse NaN/inf by default
    else:
        acts = rng.standard_normal((n, d)).astype(dtype)
    cols = {}
    for name, dt in columns:
        if np.dtype(dt).kind == "f":
            cols[name] = rng.standard_normal(n).astype(dt)
        else:
            info = np.iinfo(dt)
            cols[name] = rng.integers(info.min, info.max, size=n, dtype=dt, endpoint=True)
    return acts, cols


def read_all(url) -> Batch:
    ds = Dataset.open(url)
    return Batch.concat([ds.read_shard(i) for i in range(len(ds.shards))]) if ds.shards else None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    d=st.integers(1, 40),
    batches=st.lists(st.integers(0, 700), min_size=1, max_size=4),
    columns=st.lists(st.sampled_from(EXTRA_COLUMNS), unique_by=lambda c: c[0], max_size=4),
    chunk_rows=st.integers(1, 300),
    chunks_per_shard=st.integers(1, 4),
    backend=st.sampled_from(["file", "memory"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_roundtrip_exact(tmp_path_factory, dtype, d, batches, columns, chunk_rows, chunks_per_shard, backend, seed):
    rng = np.random.default_rng(seed)
    schema = Schema(dtype=dtype, d_model=d, columns=tuple(columns))
    url = str(tmp_path_factory.mktemp("rt")) if backend == "file" else f"memory://rt-{uuid.uuid4().hex}"
    chunk_bytes = chunk_rows * schema.row_bytes
    written = []
    with ShardWriter(url, d_model=d, dtype=dtype, columns=tuple(columns), chunk_bytes=chunk_bytes,
                     shard_bytes=chunk_bytes * chunks_per_shard) as w:
        for n in batches:
            acts, cols = make_rows(rng, n, d, dtype, columns)
            w.write(acts, **cols)
            written.append(Batch(acts, cols, dtype))
    expected = Batch.concat(written)
    ds = Dataset.open(url)
    assert ds.num_rows == len(expected) and ds.dtype == dtype and ds.d_model == d
    got = read_all(url)
    if len(expected) == 0:
        assert got is None or len(got) == 0
        return
    assert got.acts.dtype == schema.storage_dtype
    assert np.array_equal(got.acts.view(np.uint8), expected.acts.view(np.uint8))  # bit-exact, NaN-safe
    for name, _ in columns:
        assert np.array_equal(got.columns[name].view(np.uint8), expected.columns[name].view(np.uint8))
    # Every chunk holds at most chunk_rows rows; the fingerprint matches the rows.
    assert all(ds.index(i).entries["rows"].max() <= chunk_rows for i in range(len(ds.shards)))
    h = row_hashes(schema, expected.acts, [expected.columns[n] for n, _ in columns])
    assert ds.manifest.fingerprint.hash_sum == fingerprint_sum(h)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_s3_and_read_chunk(s3_url, dtype):
    rng = np.random.default_rng(3)
    schema = Schema(dtype=dtype, d_model=24, columns=tuple(EXTRA_COLUMNS[:3]))
    acts, cols = make_rows(rng, 2500, 24, dtype, EXTRA_COLUMNS[:3])
    with ShardWriter(s3_url, d_model=24, dtype=dtype, chunk_bytes=200 * schema.row_bytes,
                     shard_bytes=1000 * schema.row_bytes) as w:
        w.write(acts, **cols)
    ds = Dataset.open(s3_url)
    assert [s.rows for s in ds.shards] == [1000, 1000, 500]
    b = ds.read_chunk(1, 2)  # rows 1400..1600
    assert np.array_equal(b.acts, acts[1400:1600])
    assert np.array_equal(b.columns["doc_id"], cols["doc_id"][1400:1600])
    assert np.array_equal(read_all(s3_url).acts, acts)


def test_row_hash_independent_of_chunking_and_order():
    rng = np.random.default_rng(0)
    schema = Schema(dtype="float16", d_model=7, columns=(("token_id", "int32"),))
    acts, cols = make_rows(rng, 500, 7, "float16", [("token_id", "int32")])
    h = row_hashes(schema, acts, [cols["token_id"]])
    perm = rng.permutation(500)
    h2 = row_hashes(schema, acts[perm], [cols["token_id"][perm]])
    assert np.array_equal(h[perm], h2)
    # Additive lane by lane (each lane mod 2^64), as Fingerprint adds them.
    parts = Fingerprint(123, fingerprint_sum(h[:123])) + Fingerprint(377, fingerprint_sum(h[123:]))
    assert parts == Fingerprint(500, fingerprint_sum(h))
    # A single changed bit, in activations or columns, changes that row's hash.
    a2 = acts.copy()
    a2.view(np.uint16)[17, 3] ^= 1
    assert row_hashes(schema, a2, [cols["token_id"]])[17] != h[17]
    t2 = cols["token_id"].copy()
    t2[5] += 1
    assert row_hashes(schema, acts, [t2])[5] != h[5]
    assert len(np.unique(h)) == 500


def test_torch_handoff_keeps_true_dtype(tmp_path):
    torch = pytest.importorskip("torch")
    x = torch.randn(300, 8, dtype=torch.bfloat16)
    with ShardWriter(str(tmp_path / "d"), d_model=8, dtype="bfloat16", columns=()) as w:
        w.write(x)  # a bfloat16 tensor is stored as its bits, not via float32 rounding
    b = Dataset.open(str(tmp_path / "d")).read_shard(0)
    t = b.torch_acts()
    assert t.dtype == torch.bfloat16
    assert torch.equal(t, x)
    assert t.data_ptr() == b.acts.ctypes.data  # a view: no copy, no float32 round trip


def test_float32_to_bfloat16_rounds_to_nearest_even(tmp_path):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(5).standard_normal((400, 16)).astype(np.float32) * 100
    with ShardWriter(str(tmp_path / "d"), d_model=16, dtype="bfloat16", columns=()) as w:
        w.write(x)
    t = Dataset.open(str(tmp_path / "d")).read_shard(0).torch_acts()
    assert torch.equal(t, torch.from_numpy(x).to(torch.bfloat16))

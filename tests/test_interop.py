"""Interop round trips (import -> export -> import is bit-exact for every dtype), Batch.to_arrow zero copy,
and the documented float32 -> bfloat16 / float16 rounding."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

try:  # tests/ may or may not be a package (tests/__init__.py); work either way
    from .test_interop_helpers import read_all, same_rows, write_dataset
except ImportError:
    from test_interop_helpers import read_all, same_rows, write_dataset

from shuffler.interop.exporter import ExportConfig, export_dataset
from shuffler.io.dataset import Batch, Dataset
from writers.importers import ImportConfig, import_activations, to_dtype

DTYPES = ["float32", "float16", "bfloat16"]


def finite_acts(dtype: str, rows: int, d: int):
    """Activations in storage form with every finite bit pattern possible: -0.0, subnormals, extremes."""
    if dtype == "bfloat16":
        el = st.integers(0, 0xFFFF).filter(lambda x: (x & 0x7F80) != 0x7F80)
        return hnp.arrays(np.uint16, (rows, d), elements=el)
    width = 32 if dtype == "float32" else 16
    return hnp.arrays(np.dtype(dtype), (rows, d), elements=st.floats(width=width, allow_nan=False,
                                                                       allow_infinity=False))


@st.composite
def datasets_(draw):
    dtype = draw(st.sampled_from(DTYPES))
    ctx = draw(st.integers(1, 4))
    rows = ctx * draw(st.integers(1, 12))
    d = draw(st.integers(1, 9))
    acts = draw(finite_acts(dtype, rows, d))
    cols = {}
    if draw(st.booleans()):
        cols["token_id"] = draw(hnp.arrays(np.int32, rows))
    if draw(st.booleans()):
        cols["doc_id"] = draw(hnp.arrays(np.int64, rows))
    if draw(st.booleans()):
        cols["score"] = draw(hnp.arrays(np.float32, rows, elements=st.floats(width=32, allow_nan=False)))
    return dtype, ctx, acts, cols


def _roundtrip(tmp: str, fmt: str, dtype: str, ctx: int, acts: np.ndarray, cols: dict) -> None:
    src = os.path.join(tmp, "src")
    write_dataset(src, acts, dtype, cols, chunk_bytes=max(256, acts.shape[1] * 64))
    out = os.path.join(tmp, {"arrow": "x.arrow", "parquet": "x.parquet", "saelens": "cache"}[fmt])
    kw = {"context_size": ctx, "column": "blocks.0.hook_resid_pre"} if fmt == "saelens" else {}
    export_dataset(src, out, ExportConfig(format=fmt, **kw))
    back = os.path.join(tmp, "back")
    r = import_activations(out, back, ImportConfig(batch_bytes=97))  # tiny pieces: many batches per file
    assert r.rows == len(acts)
    a, b = read_all(src), read_all(back)
    if fmt == "saelens":
        # a SAELens cache has no position column; import fills it in from the index inside each context
        np.testing.assert_array_equal(b.columns.pop("position"), np.tile(np.arange(ctx, dtype=np.int32),
                                                                         len(acts) // ctx))
    same_rows(a, b)
    # ... and once more: exporting the re-imported dataset gives the same file contents again
    again = os.path.join(tmp, "again")
    export_dataset(back, out, ExportConfig(format=fmt, overwrite=True, **kw))
    import_activations(out, again, ImportConfig())
    same_rows(read_all(back), read_all(again))


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "saelens"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=datasets_())
def test_roundtrip_exact_every_dtype(fmt, data):
    dtype, ctx, acts, cols = data
    with tempfile.TemporaryDirectory() as tmp:
        _roundtrip(tmp, fmt, dtype, ctx, acts, cols)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["arrow", "parquet", "saelens"])
def test_roundtrip_each_dtype_and_format(tmp_path, fmt, dtype):
    """The same, deterministically, so every (format, dtype) pair runs whatever Hypothesis draws."""
    rng = np.random.default_rng(1)
    acts = rng.standard_normal((96, 7)).astype(np.float32)
    acts = to_dtype(acts, "float32", dtype)
    cols = {"token_id": rng.integers(0, 50000, 96).astype(np.int32), "doc_id": np.arange(96, dtype=np.int64) // 9}
    _roundtrip(str(tmp_path), fmt, dtype, 8, acts, cols)


@pytest.mark.parametrize("dtype", DTYPES)
def test_import_files_written_by_pyarrow_keep_order_and_columns(tmp_path, dtype):
    """Files not written by us: parquet with a plain list column, a folder of two arrow files, .npy."""
    rng = np.random.default_rng(2)
    acts = to_dtype(rng.standard_normal((300, 5)).astype(np.float32), "float32", dtype)
    tok = np.arange(300, dtype=np.int64) * 3
    vt = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}[dtype]
    meta = {b"shuffler.dtype": b"bfloat16"} if dtype == "bfloat16" else None
    values = pa.array(acts.reshape(-1), type=vt)
    lst = pa.ListArray.from_arrays(pa.array(np.arange(301, dtype=np.int32) * 5), values)  # variable-size list
    table = pa.table({"x": lst, "token_ids": tok}, schema=pa.schema([pa.field("x", lst.type, metadata=meta),
                                                                    pa.field("token_ids", pa.int64())]))
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=70)
    os.mkdir(tmp_path / "folder")
    fixed = pa.FixedSizeListArray.from_arrays(values, 5)
    t2 = pa.table({"x": fixed, "token_ids": tok}, schema=pa.schema([pa.field("x", fixed.type, metadata=meta),
                                                                    pa.field("token_ids", pa.int64())]))
    for k, (s, e) in enumerate([(0, 120), (120, 300)]):
        with pa.OSFile(str(tmp_path / "folder" / f"part-{k}.arrow"), "wb") as f, pa.ipc.new_file(f, t2.schema) as w:
            w.write_table(t2.slice(s, e - s), max_chunksize=50)
    np.save(tmp_path / "in.npy", acts)
    np.save(tmp_path / "tok.npy", tok)
    want = Batch(acts, {"token_id": tok.astype(np.int32)}, dtype)
    sd = "bfloat16" if dtype == "bfloat16" else None
    for src, cfg in [
        (tmp_path / "in.parquet", ImportConfig(batch_bytes=256)),
        (tmp_path / "folder", ImportConfig(batch_bytes=300)),
        (tmp_path / "in.npy", ImportConfig(companions=(("token_ids", str(tmp_path / "tok.npy")),), source_dtype=sd,
                                           batch_bytes=100)),
    ]:
        dst = str(tmp_path / f"ds-{os.path.basename(src)}")
        r = import_activations(str(src), dst, cfg)
        assert (r.rows, r.d_model, r.dtype) == (300, 5, dtype)
        same_rows(read_all(dst), want)


@pytest.mark.parametrize("src_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dst_dtype", DTYPES)
def test_dtype_conversion_matches_torch_rounding(tmp_path, src_dtype, dst_dtype):
    """--dtype rounds to nearest, ties to even: the same bits torch's .to() gives (an independent oracle)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    f32 = (rng.standard_normal((64, 16)) * np.exp2(rng.integers(-20, 12, (64, 16)))).astype(np.float32)
    # exact ties for bfloat16: the low 16 bits are 0x8000 (round half to even decides)
    f32.view(np.uint32)[0] = (f32.view(np.uint32)[0] & 0xFFFF0000) | 0x8000
    src = to_dtype(f32, "float32", src_dtype)
    np.save(tmp_path / "a.npy", src)
    dst = str(tmp_path / "ds")
    import_activations(str(tmp_path / "a.npy"), dst, ImportConfig(dtype=dst_dtype, source_dtype=src_dtype
                                                                   if src_dtype == "bfloat16" else None))
    got = read_all(dst)
    t = torch.from_numpy(src.astype(np.int16) if src_dtype == "bfloat16" else src)
    t = t.view(torch.bfloat16) if src_dtype == "bfloat16" else t
    ref = t.to(getattr(torch, dst_dtype))
    ref_bits = ref.view(torch.int16).numpy().view(np.uint16) if dst_dtype == "bfloat16" else ref.numpy()
    same_rows(got, Batch(ref_bits, {}, dst_dtype))


# -- Batch.to_arrow ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_to_arrow_is_zero_copy(tmp_path, dtype):
    rng = np.random.default_rng(4)
    acts = to_dtype(rng.standard_normal((500, 12)).astype(np.float32), "float32", dtype)
    cols = {"token_id": np.arange(500, dtype=np.int32), "doc_id": np.arange(500, dtype=np.int64) // 7}
    write_dataset(str(tmp_path / "ds"), acts, dtype, cols, chunk_bytes=8192)
    ds = Dataset.open(str(tmp_path / "ds"))
    b = ds.read_chunk(0, 1)  # a chunk as the readers decode it
    rb = b.to_arrow()
    assert isinstance(rb, pa.RecordBatch)
    col = rb.column("acts")
    assert col.type == pa.list_({"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}[dtype], 12)
    assert col.values.buffers()[1].address == b.acts.ctypes.data  # the same memory: no copy
    for n in cols:
        assert rb.column(n).buffers()[1].address == b.columns[n].ctypes.data
    assert rb.schema.field("acts").metadata[b"shuffler.dtype"] == dtype.encode()
    # the values seen through Arrow are the batch's, bit for bit
    view = np.frombuffer(col.values.buffers()[1], dtype=b.acts.dtype, count=b.acts.size).reshape(b.acts.shape)
    np.testing.assert_array_equal(view, b.acts)
    # writing through the numpy array shows up in Arrow: proof of sharing, not a coincidence of values
    b.acts[0, 0] = b.acts[1, 1]
    assert col.values[0].as_py() == pa.array(b.acts[1, 1:2], type=col.type.value_type)[0].as_py()


def test_to_arrow_torch_batch_and_table_queries(tmp_path):
    torch = pytest.importorskip("torch")
    acts = torch.randn(40, 6).to(torch.bfloat16)
    b = Batch(acts, {"token_id": np.arange(40, dtype=np.int32)}, "bfloat16")
    rb = b.to_arrow()
    assert rb.column("acts").values.buffers()[1].address == acts.data_ptr()
    # provenance columns are queryable with plain Arrow compute, activations stay in place
    import pyarrow.compute as pc

    sel = rb.filter(pc.less(rb.column("token_id"), 5))
    assert sel.num_rows == 5
    got = np.asarray(sel.column("acts").flatten()).reshape(5, 6)
    np.testing.assert_array_equal(got, acts[:5].view(torch.int16).numpy().view(np.uint16))

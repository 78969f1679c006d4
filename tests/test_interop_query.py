"""DuckDB and Polars query what we hand them: `Batch.to_arrow()` in place, and `shuffler export` files.

Every expected value is computed with numpy from the arrays the test wrote, never from our own readers.
The SQL and Polars calls are the ones docs/interop.md shows ("Querying with DuckDB and Polars").

Measured with duckdb 2.0.1 and polars 2.1.0 (the versions on the build machines):
- DuckDB scans Arrow float32 and uint16 (bfloat16 bits) lists, but not float16: scanning an Arrow
  `halffloat` column raises NotImplementedException "Unsupported Internal Arrow Type e". Parquet float16
  (the Float16 logical type) it reads, as FLOAT. `test_duckdb_arrow_float16` pins both behaviours.
- DuckDB reads Arrow IPC files only through its `arrow` community extension, which it downloads at run
  time; nothing may download here, so DuckDB queries the memory-mapped IPC file as a pyarrow Table.
- Polars reads and scans all three dtypes from Arrow, IPC and Parquet (float16 as Float16). It drops Arrow
  field metadata, so there a bfloat16 column is plain UInt16; the dtype stays in the file's metadata.
"""

from __future__ import annotations

import os
import subprocess
import sys

import duckdb  # in the dev extra: a missing install fails here, it does not skip
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from shuffler.cli import main
from shuffler.format.schema import standard_columns
from shuffler.io.dataset import Batch, Dataset
from writers.shard_writer import ShardWriter

DTYPES = ["float32", "float16", "bfloat16"]
ROWS, D = 700, 16
STORE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
# What a DuckDB / Polars value of each dtype is compared against: float32 and float16 as float32 (a
# float16 widens exactly), bfloat16 as its raw uint16 bits.
AS = {"float32": np.float32, "float16": np.float32, "bfloat16": np.uint16}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The provenance query of docs/interop.md: rows per document past its first three tokens.
BY_DOC = """
    SELECT doc_id, count(*) AS n, sum(token_id)::BIGINT AS tok, max(position) AS last
    FROM {src} WHERE position >= 3 GROUP BY doc_id ORDER BY doc_id
"""


class Data:
    """One dataset as written: storage-form activations [ROWS, D] and the provenance columns."""

    def __init__(self, url: str, acts: np.ndarray, cols: dict[str, np.ndarray], dtype: str):
        self.url, self.acts, self.cols, self.dtype = url, acts, cols, dtype

    def by_doc(self) -> list[tuple[int, int, int, int]]:
        """BY_DOC computed with numpy."""
        m = self.cols["position"] >= 3
        doc = self.cols["doc_id"][m]
        docs, inv, n = np.unique(doc, return_inverse=True, return_counts=True)
        tok = np.zeros(len(docs), np.int64)
        np.add.at(tok, inv, self.cols["token_id"][m].astype(np.int64))
        last = np.zeros(len(docs), np.int64)
        np.maximum.at(last, inv, self.cols["position"][m].astype(np.int64))
        return [(int(a), int(b), int(c), int(e)) for a, b, c, e in zip(docs, n, tok, last, strict=True)]

    def expect(self) -> np.ndarray:
        return self.acts.astype(AS[self.dtype])

    def row(self, doc: int, pos: int) -> np.ndarray:
        (i,) = np.flatnonzero((self.cols["doc_id"] == doc) & (self.cols["position"] == pos))
        return self.expect()[i]


def _acts(dtype: str, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((ROWS, D), dtype=np.float32) * 3
    if dtype == "bfloat16":
        return (a.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits by truncation: always finite
    return a.astype(STORE[dtype])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Data]:
    """One dataset per dtype, several chunks and shards, documents of uneven length."""
    rng = np.random.default_rng(11)
    lens = rng.integers(1, 60, size=ROWS)
    lens = lens[: int(np.searchsorted(np.cumsum(lens), ROWS)) + 1]
    lens[-1] -= lens.sum() - ROWS  # documents cover exactly ROWS rows
    doc = np.repeat(rng.permutation(10_000)[: len(lens)].astype(np.int64), lens)  # not in sorted order
    pos = (np.arange(ROWS) - np.repeat(np.cumsum(lens) - lens, lens)).astype(np.int32)
    tok = rng.integers(0, 30_000, ROWS).astype(np.int32)
    cols = {"token_id": tok, "doc_id": doc, "position": pos}
    out = {}
    for dtype in DTYPES:
        acts = _acts(dtype, rng)
        url = str(tmp_path_factory.mktemp("q") / dtype)
        with ShardWriter(url, d_model=D, dtype=dtype, columns=standard_columns(), chunk_bytes=4096,
                         shard_bytes=16384) as w:
            w.write(acts, **cols)
        out[dtype] = Data(url, acts, cols, dtype)
    return out


def _whole(url: str) -> Batch:
    ds = Dataset.open(url)
    assert len(ds.shards) > 1
    return Batch.concat([b for _, _, b in ds.iter_chunks()])


def _ordered_acts(con, src: str) -> np.ndarray:
    rows = con.sql(f"SELECT acts FROM {src} ORDER BY doc_id, position").fetchall()
    return np.asarray([r[0] for r in rows])


def _order(d: Data) -> np.ndarray:
    return np.lexsort((d.cols["position"], d.cols["doc_id"]))


def _check_duckdb(con, src: str, d: Data, *, acts: bool = True) -> None:
    assert con.sql(f"SELECT count(*) FROM {src}").fetchall()[0][0] == ROWS
    assert con.sql(BY_DOC.format(src=src)).fetchall() == d.by_doc()
    if not acts:
        return
    got = _ordered_acts(con, src)
    np.testing.assert_array_equal(got.astype(AS[d.dtype]), d.expect()[_order(d)])
    doc, pos = int(d.cols["doc_id"][ROWS // 2]), int(d.cols["position"][ROWS // 2])
    one = con.execute(f"SELECT acts FROM {src} WHERE doc_id = ? AND position = ?", [doc, pos]).fetchall()
    assert len(one) == 1
    np.testing.assert_array_equal(np.asarray(one[0][0]).astype(AS[d.dtype]), d.row(doc, pos))


# -- Batch.to_arrow() queried in place ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_duckdb_queries_to_arrow_in_place(data, dtype):
    d = data[dtype]
    batch = _whole(d.url)
    rb = batch.to_arrow()
    assert rb.column("acts").values.buffers()[1].address == batch.acts.ctypes.data  # no copy
    assert rb.schema.field("acts").metadata[b"shuffler.dtype"] == dtype.encode()
    con = duckdb.connect()
    con.register("chunk", rb)
    want_type = {"float32": f"FLOAT[{D}]", "bfloat16": f"USMALLINT[{D}]"}[dtype]
    assert con.sql("SELECT typeof(acts) FROM chunk LIMIT 1").fetchall()[0][0] == want_type
    _check_duckdb(con, "chunk", d)


def test_duckdb_arrow_float16(data):
    """DuckDB cannot scan Arrow halffloat; the provenance columns alone (a zero-copy projection) it can,
    and a float32 widening of acts (a copy) it can. If DuckDB learns halffloat, the values are checked."""
    d = data["float16"]
    batch = _whole(d.url)
    rb = batch.to_arrow()
    con = duckdb.connect()
    try:
        con.register("chunk", rb)  # DuckDB converts the Arrow schema here: this is where halffloat fails
        _check_duckdb(con, "chunk", d)
    except duckdb.NotImplementedException as e:
        assert "Arrow Type" in str(e)
    prov = rb.select(["token_id", "doc_id", "position"])
    assert prov.column("doc_id").buffers()[1].address == batch.columns["doc_id"].ctypes.data
    con.register("prov", prov)
    _check_duckdb(con, "prov", d, acts=False)
    t = pa.Table.from_batches([rb])
    wide = t.set_column(0, "acts", t["acts"].cast(pa.list_(pa.float32(), D)))
    con.register("wide", wide)
    _check_duckdb(con, "wide", d)


@pytest.mark.parametrize("dtype", DTYPES)
def test_polars_from_arrow_zero_copy(data, dtype):
    d = data[dtype]
    batch = _whole(d.url)
    df = pl.from_arrow(batch.to_arrow())
    assert df.columns == ["acts", "token_id", "doc_id", "position"]
    assert df.schema["acts"] == pl.Array({"float32": pl.Float32, "float16": pl.Float16, "bfloat16": pl.UInt16}[dtype], D)
    # Polars wraps the same buffers: handing them back to Arrow shows batch.acts' address.
    assert df["acts"].to_arrow().values.buffers()[1].address == batch.acts.ctypes.data
    assert df["doc_id"].to_arrow().buffers()[1].address == batch.columns["doc_id"].ctypes.data
    np.testing.assert_array_equal(df["acts"].to_numpy().astype(AS[dtype]), d.expect())
    for k, v in d.cols.items():
        np.testing.assert_array_equal(df[k].to_numpy(), v)
    agg = (df.filter(pl.col("position") >= 3)
             .group_by("doc_id")
             .agg(pl.len().alias("n"), pl.col("token_id").cast(pl.Int64).sum().alias("tok"),
                  pl.col("position").max().alias("last"))
             .sort("doc_id"))
    assert [tuple(int(x) for x in r) for r in agg.iter_rows()] == d.by_doc()


# -- shuffler export files ---------------------------------------------------------------------------------
def _export(src: str, dst: str, fmt: str) -> None:
    r = CliRunner().invoke(main, ["export", src, dst, "--format", fmt])
    assert r.exit_code == 0, r.output
    assert f"exported {ROWS:,} rows" in r.output and "in 1 file(s)" in r.output


@pytest.mark.parametrize("dtype", DTYPES)
def test_duckdb_reads_parquet_export(data, dtype, tmp_path):
    d = data[dtype]
    dst = str(tmp_path / "shuffled.parquet")
    _export(d.url, dst, "parquet")
    assert os.listdir(tmp_path) == ["shuffled.parquet"]  # one file at DST, no temporary left beside it
    con = duckdb.connect()
    src = f"read_parquet('{dst}')"
    # Parquet has no fixed-size list: DuckDB sees a plain list; float16 (Float16 logical type) as FLOAT.
    want = {"float32": "FLOAT[]", "float16": "FLOAT[]", "bfloat16": "USMALLINT[]"}[dtype]
    assert con.sql(f"SELECT typeof(acts) FROM {src} LIMIT 1").fetchall()[0][0] == want
    _check_duckdb(con, src, d)
    # the docs' slice: the first 8 values of the first token of each document
    first = con.sql(f"SELECT doc_id, acts[1:8] FROM {src} WHERE position = 0 ORDER BY doc_id").fetchall()
    assert [r[0] for r in first] == sorted(int(x) for x in d.cols["doc_id"][d.cols["position"] == 0])
    np.testing.assert_array_equal(np.asarray(first[0][1]).astype(AS[dtype]), d.row(first[0][0], 0)[:8])
    # the dtype travels in the file's key-value metadata, which DuckDB shows too
    kv = dict(con.sql(f"SELECT key, value FROM parquet_kv_metadata('{dst}')").fetchall())
    assert kv[b"shuffler.dtype"] == dtype.encode()
    assert pq.read_schema(dst).field("acts").metadata[b"shuffler.dtype"] == dtype.encode()
    # Polars reads the same file, fixed width restored from the stored Arrow schema
    df = pl.scan_parquet(dst).filter(pl.col("position") >= 3).select("doc_id").collect()
    assert df.height == sum(r[1] for r in d.by_doc())
    np.testing.assert_array_equal(pl.read_parquet(dst)["acts"].to_numpy().astype(AS[dtype]), d.expect())


def test_duckdb_reads_parquet_export_subprocess(data, tmp_path):
    d = data["bfloat16"]
    dst = str(tmp_path / "shuffled.parquet")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "shuffler", "export", d.url, dst, "--format", "parquet"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    con = duckdb.connect()
    _check_duckdb(con, f"read_parquet('{dst}')", d)


@pytest.mark.parametrize("dtype", DTYPES)
def test_arrow_ipc_export(data, dtype, tmp_path):
    d = data[dtype]
    dst = str(tmp_path / "shuffled.arrow")
    _export(d.url, dst, "arrow")
    assert os.listdir(tmp_path) == ["shuffled.arrow"]
    # Polars reads and scans the IPC file directly
    df = pl.read_ipc(dst)
    np.testing.assert_array_equal(df["acts"].to_numpy().astype(AS[dtype]), d.expect())
    for k, v in d.cols.items():
        np.testing.assert_array_equal(df[k].to_numpy(), v)
    first = pl.scan_ipc(dst).filter(pl.col("position") == 0).select("doc_id", "acts").collect()
    m = d.cols["position"] == 0
    np.testing.assert_array_equal(first["doc_id"].to_numpy(), d.cols["doc_id"][m])
    np.testing.assert_array_equal(first["acts"].to_numpy().astype(AS[dtype]), d.expect()[m])
    # DuckDB: the memory-mapped file as a pyarrow Table (its own IPC reader is a download-time extension)
    with pa.memory_map(dst) as f:
        table = pa.ipc.open_file(f).read_all()
    assert table.schema.field("acts").metadata[b"shuffler.dtype"] == dtype.encode()
    con = duckdb.connect()
    if dtype == "float16":  # DuckDB scans no Arrow halffloat (see test_duckdb_arrow_float16)
        con.register("shuffled", table.drop_columns(["acts"]))
        _check_duckdb(con, "shuffled", d, acts=False)
    else:
        con.register("shuffled", table)
        _check_duckdb(con, "shuffled", d)

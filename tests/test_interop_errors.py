"""Malformed inputs get errors naming the file, the column and what was expected, and leave nothing at DST."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

try:  # tests/ may or may not be a package (tests/__init__.py); work either way
    from .test_interop_helpers import leaves_nothing, read_all, write_dataset
except ImportError:
    from test_interop_helpers import leaves_nothing, read_all, write_dataset

from shuffler.errors import ChecksumError, SchemaError
from shuffler.interop.exporter import ExportConfig, export_dataset
from writers.importers import ImportConfig, import_activations

SMALL = {"batch_bytes": 512, "chunk_bytes": 1024, "shard_bytes": 2048}  # many shards committed before the error


def list_column(widths):
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ones(offsets[-1], np.float32)))


def test_ragged_list_late_in_file_names_row_and_leaves_nothing(tmp_path):
    widths = [8] * 3000
    widths[2900] = 7
    pq.write_table(pa.table({"acts": list_column(widths), "token_id": np.arange(3000, dtype=np.int32)}),
                   tmp_path / "in.parquet", row_group_size=500)
    dst = str(tmp_path / "ds")
    with pytest.raises(SchemaError) as e:
        import_activations(str(tmp_path / "in.parquet"), dst, ImportConfig(**SMALL))
    msg = str(e.value)
    assert "in.parquet" in msg and "'acts'" in msg and "row 2900 holds 7 values; expected 8" in msg
    assert leaves_nothing(dst)


def test_wrong_width_in_second_file(tmp_path):
    os.mkdir(tmp_path / "in")
    for k, d in enumerate([8, 9]):
        fx = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(100 * d, np.float32)), d)
        pq.write_table(pa.table({"acts": fx}), tmp_path / "in" / f"part-{k}.parquet")
    dst = str(tmp_path / "ds")
    with pytest.raises(SchemaError, match=r"part-1\.parquet column 'acts': rows hold 9 values; expected width 8"):
        import_activations(str(tmp_path / "in"), dst, ImportConfig(**SMALL))
    assert leaves_nothing(dst)


def test_fixed_size_binary(tmp_path):
    vals = np.arange(40, dtype=np.float32).reshape(10, 4)
    arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), 10, [None, pa.py_buffer(vals.tobytes())])
    with pa.OSFile(str(tmp_path / "in.arrow"), "wb") as f, pa.ipc.new_file(f, pa.schema([("a", arr.type)])) as w:
        w.write_batch(pa.record_batch([arr], names=["a"]))
    with pytest.raises(SchemaError, match=r"in\.arrow column 'a'.*does not say its element type.*--source-dtype"):
        import_activations(str(tmp_path / "in.arrow"), str(tmp_path / "x"))
    import_activations(str(tmp_path / "in.arrow"), str(tmp_path / "ok"), ImportConfig(source_dtype="float32"))
    np.testing.assert_array_equal(read_all(str(tmp_path / "ok")).acts, vals)
    arr12 = pa.FixedSizeBinaryArray.from_buffers(pa.binary(6), 10, [None, pa.py_buffer(bytes(60))])
    pq.write_table(pa.table({"a": arr12}), tmp_path / "odd.parquet")
    with pytest.raises(SchemaError, match=r"odd\.parquet column 'a': fixed-size binary of 6 bytes is not a whole "
                                          r"number of float32 values"):
        import_activations(str(tmp_path / "odd.parquet"), str(tmp_path / "z"), ImportConfig(source_dtype="float32"))


def test_non_numeric_column_named_and_droppable(tmp_path):
    fx = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(30, np.float32)), 3)
    pq.write_table(pa.table({"acts": fx, "text": pa.array(["a"] * 10), "flag": pa.array([True] * 10)}),
                   tmp_path / "in.parquet")
    dst = str(tmp_path / "ds")
    with pytest.raises(SchemaError) as e:
        import_activations(str(tmp_path / "in.parquet"), dst)
    assert "in.parquet column 'text': type string is not numeric" in str(e.value)
    assert "--drop-column text" in str(e.value)
    assert leaves_nothing(dst)
    r = import_activations(str(tmp_path / "in.parquet"), dst, ImportConfig(drop_columns=("text", "flag")))
    assert r.rows == 10 and r.columns == [] and r.skipped == ["text", "flag"]


def test_missing_or_unusable_activation_column(tmp_path):
    pq.write_table(pa.table({"token_id": np.arange(5, dtype=np.int32)}), tmp_path / "noacts.parquet")
    with pytest.raises(SchemaError, match=r"noacts\.parquet: found no activation columns .* among \['token_id'\]"):
        import_activations(str(tmp_path / "noacts.parquet"), str(tmp_path / "a"))
    fx = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(10, np.int32)), 2)
    pq.write_table(pa.table({"acts": fx}), tmp_path / "ints.parquet")
    with pytest.raises(SchemaError, match=r"ints\.parquet column 'acts'.*int32 values; expected float32"):
        import_activations(str(tmp_path / "ints.parquet"), str(tmp_path / "b"), ImportConfig(column="acts"))
    with pytest.raises(SchemaError, match=r"activation column 'nope' not found; columns are \['acts'\]"):
        import_activations(str(tmp_path / "ints.parquet"), str(tmp_path / "c"), ImportConfig(column="nope"))
    f64 = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(10, np.float64)), 2)
    pq.write_table(pa.table({"acts": f64}), tmp_path / "f64.parquet")
    with pytest.raises(SchemaError, match=r"float64, which is not stored; pass --dtype float32"):
        import_activations(str(tmp_path / "f64.parquet"), str(tmp_path / "d"))
    r = import_activations(str(tmp_path / "f64.parquet"), str(tmp_path / "e"), ImportConfig(dtype="float32"))
    assert r.dtype == "float32" and r.source_dtype == "float64"
    for name in "abcd":
        assert leaves_nothing(str(tmp_path / name))


def test_nulls_refused(tmp_path):
    arr = pa.array([[1.0, 2.0], None, [3.0, 4.0]], type=pa.list_(pa.float32(), 2))
    pq.write_table(pa.table({"acts": arr}), tmp_path / "n.parquet")
    with pytest.raises(SchemaError, match=r"n\.parquet column 'acts': row 1 is null"):
        import_activations(str(tmp_path / "n.parquet"), str(tmp_path / "ds"))
    fx = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6, np.float32)), 2)
    pq.write_table(pa.table({"acts": fx, "token_id": pa.array([1, None, 3], pa.int32())}), tmp_path / "m.parquet")
    with pytest.raises(SchemaError, match=r"m\.parquet column 'token_id': row 1 is null"):
        import_activations(str(tmp_path / "m.parquet"), str(tmp_path / "ds"))
    assert leaves_nothing(str(tmp_path / "ds"))


def test_unknown_format_and_undetectable_input(tmp_path):
    with pytest.raises(ValueError, match=r"format='csv' is not supported; expected one of auto, saelens"):
        ImportConfig(format="csv")
    with pytest.raises(ValueError, match=r"format='csv' is not supported; expected one of arrow, parquet, saelens"):
        ExportConfig(format="csv")
    (tmp_path / "junk.bin").write_bytes(b"hello world")
    with pytest.raises(ValueError, match=r"junk\.bin: unknown format .*pass --format"):
        import_activations(str(tmp_path / "junk.bin"), str(tmp_path / "ds"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable parquet file"):
        import_activations(str(tmp_path / "bad.parquet"), str(tmp_path / "ds"))
    os.mkdir(tmp_path / "dd")
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(ValueError, match=r"DatasetDict; point at one split's folder"):
        import_activations(str(tmp_path / "dd"), str(tmp_path / "ds"))
    os.mkdir(tmp_path / "st")
    (tmp_path / "st" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../evil.arrow"}]}))
    with pytest.raises(ValueError, match=r"state\.json: data file name '\.\./evil\.arrow' is not a plain file name"):
        import_activations(str(tmp_path / "st"), str(tmp_path / "ds"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        import_activations(str(tmp_path / "missing.parquet"), str(tmp_path / "ds"))
    assert leaves_nothing(str(tmp_path / "ds"))


def test_npy_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((10, 4), np.float32))
    np.save(tmp_path / "short.npy", np.zeros(9, np.int32))
    np.save(tmp_path / "u16.npy", np.zeros((10, 4), np.uint16))
    np.save(tmp_path / "s.npy", np.array(["x"] * 10))
    with pytest.raises(SchemaError, match=r"short\.npy \(column 'token_id'\): shape \(9,\); expected \[10\]"):
        import_activations(str(tmp_path / "a.npy"), str(tmp_path / "ds"),
                           ImportConfig(companions=(("token_id", str(tmp_path / "short.npy")),)))
    with pytest.raises(SchemaError, match=r"s\.npy \(column 'note'\): dtype <U1 is not numeric"):
        import_activations(str(tmp_path / "a.npy"), str(tmp_path / "ds"),
                           ImportConfig(companions=(("note", str(tmp_path / "s.npy")),)))
    with pytest.raises(SchemaError, match=r"u16\.npy: dtype uint16 is not float32.*--source-dtype bfloat16"):
        import_activations(str(tmp_path / "u16.npy"), str(tmp_path / "ds"))
    assert leaves_nothing(str(tmp_path / "ds"))


@pytest.mark.parametrize("fmt,name", [("arrow", "out.arrow"), ("parquet", "out.parquet"), ("saelens", "cache")])
def test_export_of_damaged_dataset_leaves_nothing(tmp_path, fmt, name):
    src = str(tmp_path / "ds")
    write_dataset(src, np.ones((400, 8), np.float32), "float32", {"token_id": np.arange(400, dtype=np.int32)},
                  chunk_bytes=1024)
    shards = sorted(p for p in os.listdir(src) if p.endswith(".shard"))
    last = os.path.join(src, shards[-1])
    blob = bytearray(open(last, "rb").read())
    blob[200] ^= 0xFF  # inside a chunk of the last shard: the export fails late
    open(last, "wb").write(bytes(blob))
    kw = {"column": "h", "context_size": 8} if fmt == "saelens" else {}
    with pytest.raises(ChecksumError):
        export_dataset(src, str(tmp_path / name), ExportConfig(format=fmt, threads=1, **kw))
    assert sorted(os.listdir(tmp_path)) == ["ds"]  # no file, no folder, no temporary


def test_export_refuses_to_replace_without_overwrite(tmp_path):
    src = str(tmp_path / "ds")
    write_dataset(src, np.ones((10, 2), np.float32), "float32", {})
    (tmp_path / "out.parquet").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"out\.parquet already exists; pass --overwrite"):
        export_dataset(src, str(tmp_path / "out.parquet"), ExportConfig(format="parquet"))
    assert (tmp_path / "out.parquet").read_bytes() == b"precious"
    export_dataset(src, str(tmp_path / "out.parquet"), ExportConfig(format="parquet", overwrite=True))
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 10


def test_truncated_arrow_stream_named_and_leaves_nothing(tmp_path):
    fx = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(8000 * 8, np.float32)), 8)
    t = pa.table({"acts": fx})
    with pa.OSFile(str(tmp_path / "in.arrow"), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
        w.write_table(t, max_chunksize=1000)
    blob = (tmp_path / "in.arrow").read_bytes()
    (tmp_path / "in.arrow").write_bytes(blob[: len(blob) // 2])  # cut in the middle of a record batch
    dst = str(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"in\.arrow: arrow file is damaged or truncated"):
        import_activations(str(tmp_path / "in.arrow"), dst, ImportConfig(**SMALL))
    assert leaves_nothing(dst)

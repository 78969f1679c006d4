"""`shuffler import` / `shuffler export` through click's CliRunner, one real subprocess, and every storage backend."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from shuffler.cli import main
from shuffler.io.dataset import Batch

try:  # tests/ may or may not be a package (tests/__init__.py); work either way
    from .test_interop_helpers import leaves_nothing, read_all, same_rows, write_dataset
except ImportError:
    from test_interop_helpers import leaves_nothing, read_all, same_rows, write_dataset


def _parquet(path, rows=64, d=6):
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((rows, d)).astype(np.float32)
    fx = pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), d)
    pq.write_table(pa.table({"acts": fx, "token_ids": np.arange(rows, dtype=np.int32),
                             "doc_id": np.arange(rows, dtype=np.int64) // 10}), path)
    return acts


def test_help_lists_commands():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "import" in r.output and "export" in r.output
    r = CliRunner().invoke(main, ["import", "--help"])
    assert r.exit_code == 0 and "SAELens" in r.output and "--companion" in r.output
    r = CliRunner().invoke(main, ["export", "--help"])
    assert r.exit_code == 0 and "saelens" in r.output and "--context-size" in r.output


def test_cli_import_export_roundtrip(tmp_path):
    acts = _parquet(tmp_path / "in.parquet")
    run = CliRunner().invoke
    r = run(main, ["import", str(tmp_path / "in.parquet"), str(tmp_path / "ds"), "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    assert "imported 64 rows x 6 bfloat16 (converted from float32)" in r.output
    assert "columns: token_id, doc_id" in r.output
    r = run(main, ["export", str(tmp_path / "ds"), str(tmp_path / "out.arrow")])  # format from the suffix
    assert r.exit_code == 0 and "as arrow" in r.output, r.output
    r = run(main, ["export", str(tmp_path / "ds"), str(tmp_path / "cache"), "--format", "saelens", "--column",
                   "blocks.1.hook_resid_pre", "--context-size", "16"])
    assert r.exit_code == 0, r.output
    assert "4 contexts of 16, hook 'blocks.1.hook_resid_pre'" in r.output
    for src in ("out.arrow", "cache"):
        r = run(main, ["import", str(tmp_path / src), str(tmp_path / f"back-{src}")])
        assert r.exit_code == 0, r.output
    a = read_all(str(tmp_path / "ds"))
    same_rows(a, read_all(str(tmp_path / "back-out.arrow")))
    b = read_all(str(tmp_path / "back-cache"))
    b.columns.pop("position")
    same_rows(a, b)  # bfloat16 -> float32 in the cache -> bfloat16 again, exactly
    from writers.importers import to_dtype

    np.testing.assert_array_equal(a.acts, to_dtype(acts, "float32", "bfloat16"))


def test_cli_errors_exit_1_and_leave_nothing(tmp_path):
    run = CliRunner().invoke
    widths = [4] * 20
    widths[13] = 5
    offs = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
    ragged = pa.ListArray.from_arrays(pa.array(offs), pa.array(np.zeros(offs[-1], np.float32)))
    pq.write_table(pa.table({"acts": ragged}), tmp_path / "ragged.parquet")
    r = run(main, ["import", str(tmp_path / "ragged.parquet"), str(tmp_path / "ds")])
    assert r.exit_code == 1
    assert "Error: SchemaError:" in r.output and "ragged.parquet column 'acts': row 13 holds 5 values; expected 4" in r.output
    assert leaves_nothing(str(tmp_path / "ds"))
    r = run(main, ["import", str(tmp_path / "ragged.parquet"), str(tmp_path / "ds"), "--format", "csv"])
    assert r.exit_code == 2 and "Invalid value for '--format': 'csv' is not one of" in r.output
    r = run(main, ["import", str(tmp_path / "ragged.parquet"), str(tmp_path / "ds"), "--companion", "token_id"])
    assert r.exit_code == 2 and "must be NAME=PATH" in r.output
    write_dataset(str(tmp_path / "src"), np.ones((10, 2), np.float32), "float32", {})
    r = run(main, ["export", str(tmp_path / "src"), str(tmp_path / "out.bin")])
    assert r.exit_code == 2 and "cannot tell the format from" in r.output and "--format" in r.output
    r = run(main, ["export", str(tmp_path / "src"), str(tmp_path / "c"), "--format", "saelens", "--context-size", "3"])
    assert r.exit_code == 1 and "--column" in r.output and not (tmp_path / "c").exists()
    r = run(main, ["export", str(tmp_path / "missing"), str(tmp_path / "o.parquet")])
    assert r.exit_code == 1 and "Error:" in r.output and not (tmp_path / "o.parquet").exists()


def test_real_subprocess(tmp_path):
    _parquet(tmp_path / "in.parquet", rows=40, d=3)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def shuffler(*args):
        return subprocess.run([sys.executable, "-m", "shuffler", *args], capture_output=True, text=True, env=env,
                              timeout=120)

    p = shuffler("import", str(tmp_path / "in.parquet"), str(tmp_path / "ds"), "--dtype", "float16")
    assert p.returncode == 0, p.stderr
    assert "imported 40 rows x 3 float16" in p.stdout
    p = shuffler("export", str(tmp_path / "ds"), str(tmp_path / "out.parquet"), "--compression", "zstd")
    assert p.returncode == 0, p.stderr
    t = pq.read_table(tmp_path / "out.parquet")
    assert t.num_rows == 40 and t.schema.field("acts").metadata[b"shuffler.dtype"] == b"float16"
    assert t.column("token_id").to_pylist() == list(range(40))
    p = shuffler("import", str(tmp_path / "nope.parquet"), str(tmp_path / "x"))
    assert p.returncode == 1 and "nope.parquet" in p.stderr


def test_any_storage_backend(tmp_path, any_url):
    """DST of an import and SRC of an export may be any URL; arrow/parquet exports too."""
    import fsspec

    acts = _parquet(tmp_path / "in.parquet", rows=300, d=8)
    r = CliRunner().invoke(main, ["import", str(tmp_path / "in.parquet"), any_url, "--chunk-bytes", "2KiB"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(read_all(any_url).acts, acts)
    out = f"{any_url}-export/all.parquet"
    r = CliRunner().invoke(main, ["export", any_url, out])
    assert r.exit_code == 0, r.output
    from shuffler.storage.storage import Storage

    with fsspec.open(out, "rb", **({"endpoint_url": os.environ["AWS_ENDPOINT_URL_S3"]}
                                   if out.startswith("s3://") else {})) as f:
        t = pq.read_table(io.BytesIO(f.read()))
    assert t.num_rows == 300
    np.testing.assert_array_equal(np.asarray(t.column("acts").combine_chunks().flatten()).reshape(300, 8), acts)
    assert Storage(f"{any_url}-export").list() == ["all.parquet"]  # no temporary left beside it
    b = Batch(acts, {}, "float32")
    assert b.to_arrow().num_rows == 300
    with pytest.raises(FileExistsError):
        from shuffler.interop.exporter import ExportConfig, export_dataset

        export_dataset(any_url, out, ExportConfig(format="parquet"))

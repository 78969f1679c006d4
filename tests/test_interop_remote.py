"""`shuffler import` from object storage: Parquet, Arrow IPC, a SAELens folder and .npy (with companions) on
s3:// (moto's server on 127.0.0.1) and memory:// import to the same shard bytes as the same files on local
disk; a missing or malformed remote source gets an error naming its URL and leaves nothing at DST."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

try:  # tests/ may or may not be a package (tests/__init__.py); work either way
    from .test_interop_helpers import leaves_nothing, read_all, same_rows
    from .test_interop_saelens import saelens_cache
except ImportError:
    from test_interop_helpers import leaves_nothing, read_all, same_rows
    from test_interop_saelens import saelens_cache

from shuffler.cli import main
from shuffler.io.dataset import Dataset
from shuffler.storage.storage import Storage
from writers.importers import ImportConfig, detect_format, import_activations, saelens_files, to_dtype

SMALL = {"chunk_bytes": 256, "shard_bytes": 1024}  # several chunks and shards per import


@pytest.fixture(params=["memory", "s3"])
def remote(request):
    """A fresh, empty prefix on memory:// or on S3 (moto)."""
    return request.getfixturevalue(f"{request.param}_url")


def upload(local: str, base: str) -> str:
    """Copy a local file, or a folder's files, to base/<its name> through Storage; returns that URL."""
    name = os.path.basename(local.rstrip("/"))
    st = Storage(base)
    if os.path.isdir(local):
        for n in sorted(os.listdir(local)):
            with open(os.path.join(local, n), "rb") as f:
                st.write(f"{name}/{n}", f.read())
    else:
        with open(local, "rb") as f:
            st.write(name, f.read())
    return f"{base}/{name}"


def stored(url: str) -> dict[str, bytes]:
    """Every shard of the dataset at url, by name: what must match byte for byte."""
    st = Storage(url)
    return {n: st.read(n) for n in st.list() if n.endswith(".shard")}


def assert_same_import(local_dst: str, remote_dst: str, remote_src: str) -> None:
    a, b = Dataset.open(local_dst), Dataset.open(remote_dst)
    assert a.num_rows == b.num_rows > 0
    assert a.manifest.fingerprint == b.manifest.fingerprint
    got, want = stored(remote_dst), stored(local_dst)
    assert len(want) > 1 and got == want  # several shards, the same bytes
    same_rows(read_all(remote_dst), read_all(local_dst))
    assert b.metadata["imported_from"] == remote_src
    assert {k: v for k, v in b.metadata.items() if k != "imported_from"} == \
           {k: v for k, v in a.metadata.items() if k != "imported_from"}


# -- sources, built locally with the writers other tools use -----------------------------------------------------
def parquet_source(tmp) -> tuple[str, ImportConfig]:
    rng = np.random.default_rng(0)
    rows, d = 400, 6
    acts = rng.standard_normal((rows, d)).astype(np.float32)
    fx = pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), d)
    pq.write_table(pa.table({"acts": fx, "token_ids": np.arange(rows, dtype=np.int32),
                             "doc_id": np.arange(rows, dtype=np.int64) // 10}), tmp / "in.parquet", row_group_size=90)
    return str(tmp / "in.parquet"), ImportConfig(batch_bytes=700, dtype="bfloat16", **SMALL)


def arrow_source(tmp) -> tuple[str, ImportConfig]:
    """A folder of two IPC files, one in the file format and one in the stream format; bfloat16 bits."""
    rng = np.random.default_rng(1)
    rows, d = 300, 5
    acts = to_dtype(rng.standard_normal((rows, d)).astype(np.float32), "float32", "bfloat16")
    fx = pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1), type=pa.uint16()), d)
    schema = pa.schema([pa.field("x", fx.type, metadata={b"shuffler.dtype": b"bfloat16"}),
                        pa.field("token_ids", pa.int64())])
    t = pa.table({"x": fx, "token_ids": np.arange(rows, dtype=np.int64) * 3}, schema=schema)
    os.mkdir(tmp / "folder")
    with pa.OSFile(str(tmp / "folder" / "part-0.arrow"), "wb") as f, pa.ipc.new_file(f, schema) as w:
        w.write_table(t.slice(0, 120), max_chunksize=50)
    with pa.OSFile(str(tmp / "folder" / "part-1.arrows"), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        w.write_table(t.slice(120), max_chunksize=70)
    return str(tmp / "folder"), ImportConfig(batch_bytes=300, **SMALL)


def saelens_source(tmp) -> tuple[str, ImportConfig]:
    rng = np.random.default_rng(2)
    acts = rng.standard_normal((40, 8, 6)).astype(np.float16)
    saelens_cache(tmp / "cache", acts, rng.integers(0, 50257, (40, 8)).astype(np.int32), dtype="float16")
    return str(tmp / "cache"), ImportConfig(batch_bytes=1000, **SMALL)


def npy_source(tmp) -> tuple[str, ImportConfig]:
    """[records, context, d] float16 with a [records, context] and a [rows] companion."""
    rng = np.random.default_rng(3)
    np.save(tmp / "acts.npy", rng.standard_normal((50, 4, 6)).astype(np.float16))
    np.save(tmp / "tok.npy", rng.integers(0, 1000, (50, 4)).astype(np.int64))
    np.save(tmp / "doc.npy", np.arange(200, dtype=np.int32) // 7)
    return str(tmp / "acts.npy"), ImportConfig(batch_bytes=100, **SMALL)  # 8 rows (2 records) per read


SOURCES = {"parquet": parquet_source, "arrow": arrow_source, "saelens": saelens_source, "npy": npy_source}


@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_remote_source_imports_like_local(tmp_path, remote, fmt):
    src, cfg = SOURCES[fmt](tmp_path)
    if fmt == "npy":
        local_cfg = replace(cfg, companions=(("token_ids", str(tmp_path / "tok.npy")),
                                             ("doc_id", str(tmp_path / "doc.npy"))))
        cfg = replace(cfg, companions=(("token_ids", upload(str(tmp_path / "tok.npy"), remote)),
                                       ("doc_id", upload(str(tmp_path / "doc.npy"), remote))))
    else:
        local_cfg = cfg
    r_local = import_activations(src, str(tmp_path / "local"), local_cfg)
    url = upload(src, remote)
    assert detect_format(url) == detect_format(src) == ("arrow" if fmt == "arrow" else fmt)
    if fmt == "saelens":
        assert saelens_files(url) == [f"{url}/{os.path.basename(p)}" for p in saelens_files(src)]
    r = import_activations(url, str(tmp_path / "remote"), cfg)
    assert (r.rows, r.d_model, r.dtype, r.format, r.column, r.columns, r.derived, r.context_size) == \
           (r_local.rows, r_local.d_model, r_local.dtype, r_local.format, r_local.column, r_local.columns,
            r_local.derived, r_local.context_size)
    assert_same_import(str(tmp_path / "local"), str(tmp_path / "remote"), url)


def test_cli_s3_to_s3(tmp_path, s3_url):
    """Through the CLI: a .npy and its companion on S3 into a dataset on S3, the same as from local disk."""
    src, _ = npy_source(tmp_path)
    run = CliRunner().invoke
    r = run(main, ["import", "--help"])
    assert r.exit_code == 0 and "s3://bucket/saelens_cache" in r.output and "(a path or URL)" in r.output
    r = run(main, ["import", src, str(tmp_path / "local"), "--companion", f"token_id={tmp_path / 'tok.npy'}",
                   "--batch-bytes", "100", "--chunk-bytes", "256", "--shard-bytes", "1KiB"])
    assert r.exit_code == 0, r.output
    url, tok = upload(src, s3_url), upload(str(tmp_path / "tok.npy"), s3_url)
    r = run(main, ["import", url, f"{s3_url}/ds", "--companion", f"token_id={tok}",
                   "--batch-bytes", "100", "--chunk-bytes", "256", "--shard-bytes", "1KiB"])
    assert r.exit_code == 0, r.output
    assert f"imported 200 rows x 6 float16 from {url} (npy, column 'acts.npy') to {s3_url}/ds" in r.output
    assert "columns: token_id" in r.output
    assert_same_import(str(tmp_path / "local"), f"{s3_url}/ds", url)


def test_remote_errors_name_the_url_and_leave_nothing(tmp_path, remote):
    dst = str(tmp_path / "ds")
    remote_re = re.escape(remote)
    with pytest.raises(FileNotFoundError, match=f"{remote_re}/nope.parquet: no such file or folder"):
        import_activations(f"{remote}/nope.parquet", dst)
    with pytest.raises(FileNotFoundError, match=f"{remote_re}/nothing: no such file or folder"):
        import_activations(f"{remote}/nothing", dst, ImportConfig(format="saelens"))
    r = CliRunner().invoke(main, ["import", f"{remote}/nope.npy", dst])
    assert r.exit_code == 1 and f"Error: FileNotFoundError: {remote}/nope.npy: no such file" in r.output, r.output
    st = Storage(remote)
    st.write("bad.parquet", b"not parquet at all")
    with pytest.raises(ValueError, match=f"{remote_re}/bad.parquet: not a readable parquet file"):
        import_activations(f"{remote}/bad.parquet", dst)
    st.write("junk.bin", b"hello world")
    with pytest.raises(ValueError, match=f"{remote_re}/junk.bin: unknown format .*pass --format"):
        import_activations(f"{remote}/junk.bin", dst)
    np.save(tmp_path / "a.npy", np.ones((100, 4), np.float32))
    blob = (tmp_path / "a.npy").read_bytes()
    st.write("cut.npy", blob[:-10])
    with pytest.raises(ValueError, match=f"{remote_re}/cut.npy: .npy file is truncated: its header says \\(100, 4\\)"):
        import_activations(f"{remote}/cut.npy", dst)
    st.write("a.npy", blob)
    with pytest.raises(FileNotFoundError, match=f"{remote_re}/tok.npy: no such file"):
        import_activations(f"{remote}/a.npy", dst, ImportConfig(companions=(("token_id", f"{remote}/tok.npy"),)))
    st.write("fortran.npy", _npy_bytes(tmp_path, np.asfortranarray(np.ones((10, 4), np.float32))))
    with pytest.raises(ValueError, match=f"{remote_re}/fortran.npy: Fortran-ordered.*copy it locally first"):
        import_activations(f"{remote}/fortran.npy", dst)
    st.write("cache/dataset_info.json", b"{}")  # a datasets folder whose state.json is missing
    with pytest.raises(ValueError, match=f"{remote_re}/cache/state.json: not a datasets state.json"):
        import_activations(f"{remote}/cache", dst, ImportConfig(format="saelens"))
    assert leaves_nothing(dst)
    # a ragged row late in a remote file: the shards committed before it are removed, at a remote DST too
    widths = [8] * 3000
    widths[2900] = 7
    offs = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
    ragged = pa.ListArray.from_arrays(pa.array(offs), pa.array(np.ones(offs[-1], np.float32)))
    pq.write_table(pa.table({"acts": ragged}), tmp_path / "ragged.parquet", row_group_size=500)
    url = upload(str(tmp_path / "ragged.parquet"), remote)
    with pytest.raises(ValueError, match=f"{re.escape(url)} column 'acts': row 2900 holds 7 values; expected 8"):
        import_activations(url, f"{remote}/ds", ImportConfig(batch_bytes=512, chunk_bytes=1024, shard_bytes=2048))
    assert leaves_nothing(f"{remote}/ds")


def _npy_bytes(tmp_path, a: np.ndarray) -> bytes:
    np.save(tmp_path / "tmp.npy", a)
    return (tmp_path / "tmp.npy").read_bytes()


# -- memory stays bounded by --batch-bytes on remote sources too (method of tests/test_interop_memory.py) --------
MEM_SCRIPT = """
import gc, io, json, sys, tracemalloc
import fsspec, numpy as np, pyarrow as pa, pyarrow.parquet as pq
import writers.shard_writer  # imported before measuring: module code is not data
from writers.importers import ImportConfig, import_activations

tmp, rows, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
acts = np.random.default_rng(0).standard_normal((rows, d), dtype=np.float32)
table = pa.table({"acts": pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), d),
                  "token_id": np.arange(rows, dtype=np.int32)})
fs = fsspec.filesystem("memory")
def put(name, write):
    buf = io.BytesIO()
    write(buf)
    fs.pipe_file("/mem/" + name, buf.getvalue())
put("in.npy", lambda f: np.save(f, acts))
put("small.npy", lambda f: np.save(f, acts[: rows // 4]))
put("in.parquet", lambda f: pq.write_table(table, f, row_group_size=512, compression="none"))
put("small.parquet", lambda f: pq.write_table(table.slice(0, rows // 4), f, row_group_size=512, compression="none"))
def ipc(f):
    with pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=512)  # remote IPC holds one stored record batch at a time
put("in.arrow", ipc)
del acts, table
gc.collect()
tracemalloc.start()
base = pa.default_memory_pool()
out = []
for k, (src, batch) in enumerate(json.loads(sys.argv[4])):
    pool = pa.proxy_memory_pool(base)
    pa.set_memory_pool(pool)
    tracemalloc.reset_peak()
    cfg = ImportConfig(batch_bytes=batch, chunk_bytes=256 << 10, shard_bytes=4 << 20, dtype="bfloat16")
    r = import_activations("memory://mem/" + src, f"{tmp}/out{k}", cfg)
    out.append({"src": src, "batch": batch, "rows": r.rows, "peak": tracemalloc.get_traced_memory()[1] + pool.max_memory()})
print(json.dumps(out))
"""


def test_remote_import_memory_bounded_by_batch(tmp_path):
    import json
    import subprocess
    import sys

    rows, d, mib = 24576, 256, 1 << 20  # 24 MiB of float32 activations
    size = rows * d * 4
    srcs = ["in.npy", "in.parquet", "in.arrow"]
    runs = [["small.npy", mib // 2]] + [[s, mib // 2] for s in srcs + ["small.npy", "small.parquet"]]
    runs += [[s, 2 * size] for s in ("in.npy", "in.parquet")]  # controls: one batch as big as the input
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", MEM_SCRIPT, str(tmp_path), str(rows), str(d), json.dumps(runs)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])[1:]  # the first run warms up one-time allocations
    peak = {r["src"]: r["peak"] for r in res[:5]}
    print("remote bounded peaks (bytes):", peak, "controls:", [r["peak"] for r in res[5:]])
    assert all(r["rows"] in (rows, rows // 4) for r in res)
    for s in srcs:
        assert peak[s] < size // 3, (s, peak)
    assert peak["in.npy"] < peak["small.npy"] + 2 * mib, peak  # four times the input, about the same peak
    assert peak["in.parquet"] < peak["small.parquet"] + 2 * mib, peak
    for r in res[5:]:
        assert r["peak"] > size, r  # the measure does see an input-sized read


def test_real_subprocess_from_s3(tmp_path, s3_url):
    """A real `python -m shuffler import` process reads s3:// (the endpoint comes from the environment)."""
    import subprocess
    import sys

    src, _ = parquet_source(tmp_path)
    url = upload(src, s3_url)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def shuffler(*args):
        return subprocess.run([sys.executable, "-m", "shuffler", *args], capture_output=True, text=True, env=env,
                              timeout=120)

    p = shuffler("import", url, str(tmp_path / "ds"), "--column", "acts")
    assert p.returncode == 0, p.stderr
    assert f"imported 400 rows x 6 float32 from {url} (parquet, column 'acts')" in p.stdout
    import_activations(src, str(tmp_path / "local"))
    assert stored(str(tmp_path / "ds")) == stored(str(tmp_path / "local"))
    p = shuffler("import", f"{s3_url}/nope.parquet", str(tmp_path / "x"))
    assert p.returncode == 1 and f"{s3_url}/nope.parquet: no such file or folder" in p.stderr, p.stderr
    assert leaves_nothing(str(tmp_path / "x"))


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_remote_npy_every_format_version(tmp_path, memory_url, version):
    # numpy writes 3.0 when a header needs UTF-8; a local import reads it through np.load, a remote one must too
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float16)
    local = str(tmp_path / f"v{version[0]}.npy")
    with open(local, "wb") as f:
        np.lib.format.write_array(f, x, version=version)
    import_activations(local, str(tmp_path / "local"), ImportConfig(**SMALL))
    url = upload(local, memory_url)
    import_activations(url, str(tmp_path / "remote"), ImportConfig(**SMALL))
    assert stored(str(tmp_path / "remote")) == stored(str(tmp_path / "local"))
    assert np.array_equal(read_all(str(tmp_path / "remote")).acts.view(np.uint16), x.view(np.uint16))

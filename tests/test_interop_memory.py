"""Import memory stays bounded by --batch-bytes, not by the input size.

A fresh Python process imports a 48 MiB input (Parquet, Arrow IPC, .npy, a SAELens folder) with 512 KiB
batches and reports two measures: tracemalloc's peak (numpy buffers: the conversion to bfloat16 is a new
array per piece) and pyarrow's memory-pool peak (Parquet pages decode into it). RSS is not used: jemalloc
keeps freed pages resident for a while, and mapped input pages count in it. Memory-mapped inputs (Arrow,
.npy, SAELens) are views of the page cache, not allocations. The bounded peak must not grow when the input
grows fourfold, and a control run with one batch as big as the input must exceed the input's size, so the
measures can see what they are asked to bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

MiB = 1 << 20
ROWS, D = 49152, 256  # 48 MiB of float32 activations
SCRIPT = textwrap.dedent(
    """
    import json, sys, tracemalloc
    import pyarrow as pa
    import pyarrow.parquet, writers.shard_writer  # imported before measuring: module code is not data
    from writers.importers import ImportConfig, import_activations

    tmp, runs = sys.argv[1], json.loads(sys.argv[2])
    tracemalloc.start()
    base = pa.default_memory_pool()
    out = []
    for k, (src, batch) in enumerate(runs):
        pool = pa.proxy_memory_pool(base)  # this run's own allocation statistics
        pa.set_memory_pool(pool)
        tracemalloc.reset_peak()
        cfg = ImportConfig(batch_bytes=batch, chunk_bytes=256 << 10, shard_bytes=4 << 20, dtype="bfloat16")
        r = import_activations(f"{tmp}/{src}", f"{tmp}/out{k}", cfg)
        out.append({"src": src, "batch": batch, "rows": r.rows, "tracemalloc": tracemalloc.get_traced_memory()[1],
                    "pool": pool.max_memory()})
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mem")
    acts = np.random.default_rng(0).standard_normal((ROWS, D), dtype=np.float32)
    tok = np.arange(ROWS, dtype=np.int32)
    fx = pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), D)
    table = pa.table({"acts": fx, "token_id": tok})
    pq.write_table(table, tmp / "in.parquet", row_group_size=512, compression="none")
    with pa.OSFile(str(tmp / "in.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)  # one 32 MiB record batch: the importer must slice it
    np.save(tmp / "in.npy", acts)
    small = table.slice(0, ROWS // 4)  # a quarter of the input: the bounded peak must not follow the size
    pq.write_table(small, tmp / "small.parquet", row_group_size=512, compression="none")
    np.save(tmp / "small.npy", acts[: ROWS // 4])
    datasets = pytest.importorskip("datasets")
    ctx = 128
    feats = datasets.Features({"h": datasets.Array2D(shape=(ctx, D), dtype="float32"),
                               "token_ids": datasets.Sequence(datasets.Value("int32"), length=ctx)})
    ds = datasets.Dataset.from_dict({"h": acts.reshape(-1, ctx, D), "token_ids": tok.reshape(-1, ctx)}, features=feats)
    ds.save_to_disk(str(tmp / "cache"), num_shards=1)
    return tmp


def _measure(tmp, runs):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp), json.dumps(runs)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_import_memory_bounded_by_batch_not_input(inputs):
    size = ROWS * D * 4
    srcs = ["in.parquet", "in.arrow", "in.npy", "cache"]
    # a warm-up run first: one-time allocations (thread pools, zstd contexts, caches) are not per-input
    runs = [[s, MiB // 2] for s in srcs] + [["small.parquet", MiB // 2], ["small.npy", MiB // 2]]
    res = _measure(inputs, [["small.npy", MiB // 2]] + runs + [[s, 2 * size] for s in srcs])[1:]
    bounded, small, control = res[: len(srcs)], res[len(srcs) : len(srcs) + 2], res[len(srcs) + 2 :]
    peak = {r["src"]: r["tracemalloc"] + r["pool"] for r in res[: len(srcs) + 2]}
    print("bounded peaks (bytes):", peak, "controls:", [r["tracemalloc"] + r["pool"] for r in control])
    for r in bounded + control:
        assert r["rows"] == ROWS
    for r in bounded:  # batch pieces, the conversion, chunk buffers and zstd frames: a few MiB, not the input
        assert r["tracemalloc"] + r["pool"] < size // 3, r
    # four times the input, the same peak: the bound follows --batch-bytes, not the input size
    assert peak["in.parquet"] < peak["small.parquet"] + 2 * MiB, peak
    assert peak["in.npy"] < peak["small.npy"] + 2 * MiB, peak
    assert small[0]["rows"] == ROWS // 4
    for r in control:  # the same measures do see an input-sized batch
        assert r["tracemalloc"] + r["pool"] > size, r

"""Import / export throughput for Parquet and Arrow IPC, as ratios to pyarrow alone on the same file.

    .venv/bin/python benchmarks/interop.py            # ~200 MB input (131072 rows x 384 float32)
    .venv/bin/python benchmarks/interop.py --quick    # ~20 MB

Measured in one run, on files in the page cache (each timing is the best of --repeat):
- read:   pyarrow alone reads the file into memory (pq.read_table / ipc read_all; for parquet also
          streamed with iter_batches, as the import reads it): the floor for an import;
- write:  ShardWriter alone stores the same in-memory array (zstd level 1, row hashes): the core's own cost;
- import: `shuffler import FILE DST` (read + checks + store), as a ratio to read and to read + write;
- export: `shuffler export DST FILE`, as a ratio to pyarrow alone writing the same in-memory table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shuffler.interop.exporter import ExportConfig, export_dataset  # noqa: E402
from writers.importers import ImportConfig, import_activations  # noqa: E402
from writers.shard_writer import ShardWriter  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~20 MB instead of ~200 MB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    rows, d = (13107, 384) if args.quick else (131072, 384)
    tmp = args.dir or tempfile.mkdtemp(prefix="bench-interop-")
    os.makedirs(tmp, exist_ok=True)
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((rows, d), dtype=np.float32)
    tok = rng.integers(0, 50000, rows).astype(np.int32)
    table = pa.table({"acts": pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), d), "token_id": tok})
    mb = acts.nbytes / 1e6
    paths = {"parquet": os.path.join(tmp, "in.parquet"), "arrow": os.path.join(tmp, "in.arrow")}
    pq.write_table(table, paths["parquet"], compression="none", row_group_size=1 << 16)
    with pa.OSFile(paths["arrow"], "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=1 << 14)
    print(f"input: {rows} rows x {d} float32 = {mb:.0f} MB of activations (+ token_id); {os.cpu_count()} CPUs; "
          f"load {os.getloadavg()[0]:.1f}")

    def store():
        dst = os.path.join(tmp, "w")
        shutil.rmtree(dst, ignore_errors=True)
        with ShardWriter(dst, d_model=d, dtype="float32", columns=(("token_id", "int32"),)) as w:
            for s in range(0, rows, 1 << 14):
                w.write(acts[s : s + (1 << 14)], token_id=tok[s : s + (1 << 14)])

    t_write = best(store, args.repeat)
    print(f"{'ShardWriter alone (in-memory array)':44s} {t_write:6.2f} s {mb / t_write:7.0f} MB/s")
    ds_url = os.path.join(tmp, "ds")
    for fmt, path in paths.items():
        if fmt == "parquet":
            t_read = best(lambda p=path: pq.read_table(p), args.repeat)
            t_stream = best(lambda p=path: [None for _ in pq.ParquetFile(p).iter_batches(batch_size=1 << 13)],
                            args.repeat)
            print(f"parquet: pyarrow streaming read (iter_batches of 8192 rows) {t_stream:6.2f} s "
                  f"({mb / t_stream:5.0f} MB/s)")
        else:
            t_read = best(lambda p=path: pa.ipc.open_file(pa.OSFile(p)).read_all(), args.repeat)

        def imp(p=path):
            shutil.rmtree(ds_url, ignore_errors=True)
            import_activations(p, ds_url, ImportConfig())

        t_imp = best(imp, args.repeat)
        out = os.path.join(tmp, f"out.{fmt}")

        def exp(f=fmt, o=out):
            export_dataset(ds_url, o, ExportConfig(format=f, overwrite=True, compression="none"))

        t_exp = best(exp, args.repeat)
        if fmt == "parquet":
            t_pw = best(lambda o=out: pq.write_table(table, o + ".pa", compression="none", row_group_size=1 << 16),
                        args.repeat)
        else:
            def ipc_write(o=out):
                with pa.OSFile(o + ".pa", "wb") as f, pa.ipc.new_file(f, table.schema) as w:
                    w.write_table(table)

            t_pw = best(ipc_write, args.repeat)
        print(f"{fmt}: pyarrow read {t_read:6.2f} s ({mb / t_read:5.0f} MB/s), pyarrow write {t_pw:6.2f} s "
              f"({mb / t_pw:5.0f} MB/s)")
        print(f"  import {t_imp:6.2f} s {mb / t_imp:6.0f} MB/s  = {t_imp / t_read:5.1f} x pyarrow read, "
              f"{t_imp / (t_read + t_write):4.2f} x (pyarrow read + ShardWriter), {t_imp / t_write:4.2f} x ShardWriter")
        print(f"  export {t_exp:6.2f} s {mb / t_exp:6.0f} MB/s  = {t_exp / t_read:5.1f} x pyarrow read, "
              f"{t_exp / t_pw:4.2f} x pyarrow write of the same table")
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

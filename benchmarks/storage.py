"""Storage: compression ratio and encode/decode speed per dtype, our format against plain zstd, Arrow IPC with
zstd, and Parquet with byte-stream split, on real and on synthetic d_model 4096 activations.

    .venv/bin/python benchmarks/storage.py           # real sample (26,041 x 384) + 16,384 x 4096 synthetic
    .venv/bin/python benchmarks/storage.py --quick   # 8,192 real rows + 2,048 x 4096 synthetic

Formats (all zstd level 1, all single-threaded, all in memory so disk speed does not enter; x only, no
provenance columns):
- ours: ShardWriter to memory:// (byte-plane split + zstd-1 per 8 MiB chunk, checksums, footer index); decode
  is Dataset.read_chunk for every chunk (checksum verified).
- zstd: the raw row-major bytes as 8 MiB zstd-1 frames.
- arrow-ipc: an Arrow IPC file, x as fixed_size_binary rows, record batches of 8 MiB, IPC zstd compression.
- parquet-bss (values): x flattened to one value per element (float32 -> FLOAT, float16 -> HALF_FLOAT,
  bfloat16 -> fixed_size_binary(2) raw bits), BYTE_STREAM_SPLIT encoding, zstd-1, row groups of 8 MiB.
- parquet-bss (values, 1 MiB pages): the same with pages of 1 MiB (max_rows_per_page); pyarrow's default
  caps a page at 20,000 values, too short for zstd to gain on the split streams.
- parquet-bss (rows): x as fixed_size_binary rows (the layout a row-oriented reader wants; FixedSizeList is
  pathological in pyarrow, docs/benchmarks.md) with BYTE_STREAM_SPLIT, zstd-1.
Ratio = uncompressed bytes of x / stored bytes. MB/s counts uncompressed bytes (1e6). Best of --repeat.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

from benchmarks.common import MiB, load_note, real_sample, synth_docs  # noqa: E402

PIECE = 8 * MiB
DTYPES = ("float32", "float16", "bfloat16")


def as_dtype(x32: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        from shuffler.format.convert import float32_to_bfloat16_bits

        return float32_to_bfloat16_bits(x32)  # raw uint16
    return x32.astype(dtype)


def pieces(x: np.ndarray):
    per = max(1, PIECE // x[0].nbytes)
    for s in range(0, len(x), per):
        yield x[s : s + per]


def ours(x: np.ndarray, dtype: str):
    from shuffler import Dataset
    from shuffler.storage.storage import Storage
    from writers.shard_writer import ShardWriter

    url = f"memory://bench-storage-{uuid.uuid4().hex}"
    t0 = time.perf_counter()
    with ShardWriter(url, d_model=x.shape[1], dtype=dtype, columns=(), threads=1, level=1) as w:
        for p in pieces(x):
            w.write(p)
    enc = time.perf_counter() - t0
    ds = Dataset.open(url)
    stored = ds.manifest.stored_bytes
    t0 = time.perf_counter()
    n = sum(len(b) for _, _, b in ds.iter_chunks())
    dec = time.perf_counter() - t0
    assert n == len(x)
    Storage(url).delete_prefix("")
    return stored, enc, dec


def plain_zstd(x: np.ndarray, dtype: str):
    import zstandard

    c, d = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    t0 = time.perf_counter()
    frames = [c.compress(p) for p in pieces(x)]
    enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f in frames:
        np.frombuffer(d.decompress(f), dtype=x.dtype)
    return sum(len(f) for f in frames), enc, time.perf_counter() - t0


def _flba_rows(p: np.ndarray):
    import pyarrow as pa

    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(p[0].nbytes), len(p), [None, pa.py_buffer(np.ascontiguousarray(p))])


def arrow_ipc(x: np.ndarray, dtype: str):
    import pyarrow as pa

    schema = pa.schema([("x", pa.binary(x[0].nbytes))])
    buf = io.BytesIO()
    t0 = time.perf_counter()
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=1), use_threads=False)
    with pa.ipc.new_file(buf, schema, options=opts) as w:
        for p in pieces(x):
            w.write_batch(pa.record_batch([_flba_rows(p)], schema=schema))
    enc = time.perf_counter() - t0
    data = buf.getvalue()
    t0 = time.perf_counter()
    t = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    np.frombuffer(t.column("x").combine_chunks().buffers()[1], dtype=x.dtype)
    return len(data), enc, time.perf_counter() - t0


def _flat_values(p: np.ndarray, dtype: str):
    import pyarrow as pa

    v = p.ravel()
    if dtype == "bfloat16":
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2), len(v), [None, pa.py_buffer(v)])
    return pa.array(v)


def parquet_bss(x: np.ndarray, dtype: str, *, layout: str, big_pages: bool = False):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    t0 = time.perf_counter()
    w = None
    for p in pieces(x):
        col = _flat_values(p, dtype) if layout == "values" else _flba_rows(p)
        t = pa.table({"x": col})
        if w is None:
            # pyarrow's default pages hold at most 20,000 values: zstd-1 over BSS streams that short gains
            # nothing on float16 (measured here: 1.07 at 20,000 values vs 1.18 at 262,144, synthetic float32)
            pages = dict(max_rows_per_page=max(1, MiB // x.itemsize), data_page_size=MiB) if big_pages else {}
            w = pq.ParquetWriter(buf, t.schema, compression="zstd", compression_level=1, use_dictionary=False,
                                 use_byte_stream_split=True, write_statistics=False, **pages)
        w.write_table(t, row_group_size=len(col))
    w.close()
    enc = time.perf_counter() - t0
    data = buf.getvalue()
    t0 = time.perf_counter()
    pq.read_table(pa.BufferReader(data), use_threads=False)
    return len(data), enc, time.perf_counter() - t0


FORMATS = {
    "ours": ours,
    "zstd": plain_zstd,
    "arrow-ipc": arrow_ipc,
    "parquet-bss (values)": lambda x, d: parquet_bss(x, d, layout="values"),
    "parquet-bss (values, 1 MiB pages)": lambda x, d: parquet_bss(x, d, layout="values", big_pages=True),
    "parquet-bss (rows)": lambda x, d: parquet_bss(x, d, layout="rows"),
}


def measure(name: str, x32: np.ndarray, repeat: int) -> list[dict]:
    out = []
    for dtype in DTYPES:
        x = as_dtype(x32, dtype)
        base = None
        for fmt, fn in FORMATS.items():
            best = None
            for _ in range(repeat):
                stored, enc, dec = fn(x, dtype)
                best = (stored, enc, dec) if best is None else (stored, min(best[1], enc), min(best[2], dec))
            stored, enc, dec = best
            r = {"data": name, "dtype": dtype, "format": fmt, "raw": x.nbytes, "stored": stored,
                 "ratio": x.nbytes / stored, "enc_mbs": x.nbytes / enc / 1e6, "dec_mbs": x.nbytes / dec / 1e6}
            base = base or r
            r["ratio_vs_ours"] = r["ratio"] / base["ratio"]
            out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small inputs, one run each")
    ap.add_argument("--synth-rows", type=int, default=16384, help="rows of synthetic d_model 4096 data")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best speed is kept")
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    print(f"machine: {load_note()} at start")
    sets = []
    real = real_sample()
    if real is not None:
        real = real.astype(np.float32)  # [26041, 384], captured as float32, stored float16
        if args.quick:
            real = real[:8192]
        sets.append((f"real: MiniLM-L6 layer 3, {len(real):,} x {real.shape[1]} (cached capture)", real))
    else:
        print("note: no real sample (the `capture` extra is not installed); synthetic data only")
    rows = 2048 if args.quick else args.synth_rows
    x, _ = synth_docs(rows, 4096)
    sets.append((f"synthetic: {rows:,} x 4096 (documents of 256 rows, heavy tails, per-dimension scale)", x))
    results = []
    for name, data in sets:
        res = measure(name, data, repeat)
        results += res
        print(f"\n### {name}\n")
        print("| dtype | format | ratio | x ours | encode MB/s | decode MB/s |")
        print("|---|---|---|---|---|---|")
        for r in res:
            print(f"| {r['dtype']} | {r['format']} | {r['ratio']:.3f} | {r['ratio_vs_ours']:.3f} | "
                  f"{r['enc_mbs']:.0f} | {r['dec_mbs']:.0f} |")
    print(f"\nmachine: {load_note()} at end")


if __name__ == "__main__":
    main()

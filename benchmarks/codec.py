"""Codec benchmark: ShardWriter and chunk-reader throughput as a ratio of raw zstd-1 byte-split speed.

Both sides run on the same bytes in one run, taking turns in each round, so the ratios hold on a noisy machine:
- raw encode: byte-plane split into a reused buffer + zstd level-1 compress, one thread, no container;
- writer: ShardWriter to local disk (header, index, row hashes for the fingerprint, atomic commit);
- raw decode: zstd decompress of the very frames the writer produced + per-plane unsplit, one thread;
- reader: Dataset.read_chunk for every chunk (ranged read, size and checksum checks, decode);
- disk: the writer's shard bytes written again to local disk the way it writes them (O_DIRECT), nothing encoded.
  No writer finishes before its first chunk is encoded and then every byte is on disk, so `ceil` = raw encode /
  (first chunk's raw encode + disk) bounds the writer's ratio: where the disk is about as fast as one encode
  thread (float16 here), a file of a few chunks cannot reach raw speed however many threads encode.
It also prints the compression ratio per dtype on real activations (MiniLM-L6 layer 3, captured once with the
`capture` extra and cached in bench-out/sample/, benchmarks/common.real_sample) and on synthetic activations. Usage:

    python benchmarks/codec.py            # ~256 MiB per dtype
    python benchmarks/codec.py --quick    # ~64 MiB per dtype, for `make bench`
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import zstandard

from shuffler import Dataset
from shuffler.format.codec import unsplit
from shuffler.format.convert import float32_to_bfloat16_bits
from shuffler.format.schema import Schema
from shuffler.storage.storage import Storage
from writers import ShardWriter

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

from benchmarks.common import real_sample  # noqa: E402


def tiled(base: np.ndarray, target_bytes: int, rng) -> np.ndarray:
    """Rows of `base`, each tile freshly permuted (shards hold shuffled rows), up to target_bytes."""
    reps = max(1, -(-target_bytes // base.nbytes))
    return np.concatenate([base[rng.permutation(len(base))] for _ in range(reps)])[: max(1, target_bytes // base[0].nbytes)]


def as_dtype(x32: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(x32)
    return x32.astype(dtype)


def best_of(runs: list[tuple], repeat: int) -> list[tuple[float, float]]:
    """Best (wall seconds, process CPU seconds) of each (fn, setup) in `runs` over `repeat` rounds; `setup` (or
    None) runs before its fn, untimed. The runs take turns within each round, so a change of load on a shared
    machine hits each alike and the ratios between them hold. CPU time is robust to a busy machine."""
    walls = [[] for _ in runs]
    cpus = [[] for _ in runs]
    for _ in range(repeat):
        for k, (fn, setup) in enumerate(runs):
            if setup is not None:
                setup()
            t, c = time.perf_counter(), time.process_time()
            fn()
            walls[k].append(time.perf_counter() - t)
            cpus[k].append(time.process_time() - c)
    return [(min(w), min(c)) for w, c in zip(walls, cpus, strict=True)]


def bench(name: str, acts: np.ndarray, dtype: str, chunk_bytes: int, workdir: str, repeat: int, threads: int) -> dict:
    schema = Schema(dtype=dtype, d_model=acts.shape[1], columns=())
    nbytes = acts.nbytes
    rows_per_chunk = chunk_bytes // schema.row_bytes
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
    dctx = zstandard.ZstdDecompressor()
    buf = np.empty(rows_per_chunk * schema.row_bytes, np.uint8)

    def raw_encode():
        for s in range(0, len(acts), rows_per_chunk):
            a = acts[s : s + rows_per_chunk]
            n = a.size
            planes = buf[: n * schema.itemsize].reshape(schema.itemsize, n)
            np.copyto(planes, a.view(np.uint8).reshape(n, schema.itemsize).T)
            cctx.compress(planes)

    url = os.path.join(workdir, f"{name}-{dtype}")

    def write(target):
        with ShardWriter(target, d_model=acts.shape[1], dtype=dtype, columns=(), chunk_bytes=chunk_bytes,
                         overwrite=True, threads=threads) as w:
            w.write(acts)

    # Each timed write starts from an empty target: deleting the previous run's shards (what overwrite=True
    # does, 15 ms per 256 MiB here) is not writing. One untimed write first gives the shard bytes for `disk`.
    mem = f"memory://codec-bench/{name}-{dtype}"
    write(url)
    ds = Dataset.open(url)
    frames, blobs = [], []
    for i, info in enumerate(ds.shards):
        blob = open(os.path.join(url, info.name), "rb").read()
        blobs.append(blob)
        for e in ds.index(i).entries:
            frames.append((blob[int(e["offset"]) : int(e["offset"] + e["comp_len"])], int(e["rows"])))
    # The disk's share: the writer's very shard bytes written again through the path it uses (Storage.open_atomic,
    # O_DIRECT, storage/direct.py), frame by frame, with nothing to encode.
    disk = Storage(os.path.join(workdir, f"disk-{name}-{dtype}"))

    def disk_write():
        for k, blob in enumerate(blobs):
            with disk.open_atomic(f"shard-{k}", direct=True) as f:
                mv = memoryview(blob)
                for s in range(0, len(mv), chunk_bytes):
                    f.write(mv[s : s + chunk_bytes])

    t_raw_enc, t_write_mem, t_write, t_disk = best_of([
        (raw_encode, None),
        (lambda: write(mem), lambda: Storage(mem).delete_prefix("")),
        (lambda: write(url), lambda: shutil.rmtree(url, ignore_errors=True)),
        (disk_write, lambda: disk.delete_prefix("")),
    ], repeat)
    Storage(mem).delete_prefix("")
    disk.delete_prefix("")
    ds = Dataset.open(url)  # the last timed write's shards: the same bytes

    def raw_decode():
        for f, rows in frames:
            unsplit(schema, dctx.decompress(f), rows)

    def read():
        for i in range(len(ds.shards)):
            for j in range(ds.index(i).n_chunks):
                ds.read_chunk(i, j)

    t_raw_dec, t_read = best_of([(raw_decode, None), (read, None)], repeat)
    shutil.rmtree(url)
    return {
        "data": name, "dtype": dtype, "MiB": nbytes / 2**20, "ratio": nbytes / ds.manifest.stored_bytes,
        "raw_enc": nbytes / t_raw_enc[0] / 1e6, "write": nbytes / t_write[0] / 1e6,
        "write_mem": nbytes / t_write_mem[0] / 1e6, "raw_dec": nbytes / t_raw_dec[0] / 1e6,
        "read": nbytes / t_read[0] / 1e6,
        # CPU-time efficiency: raw CPU seconds / our CPU seconds for the same bytes (1.0 = no overhead).
        "cpu_w": t_raw_enc[1] / t_write[1], "cpu_r": t_raw_dec[1] / t_read[1],
        # No writer can finish before its first chunk is encoded (one zstd call, one thread) and every byte is on
        # disk after that: raw / (the first chunk's raw encode + the disk write) bounds wd/raw from above.
        "chunks": len(frames), "disk": nbytes / t_disk[0] / 1e6,
        "ceiling": t_raw_enc[0] / (t_raw_enc[0] * min(1.0, rows_per_chunk / len(acts)) + t_disk[0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~64 MiB per dtype")
    ap.add_argument("--sample", default=None,
                    help="real activations .npy (default: MiniLM-L6 layer 3, captured once into bench-out/sample/)")
    ap.add_argument("--threads", type=int, default=1, help="writer encode threads (1 = same as the raw baseline)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    target = (64 if args.quick else 256) << 20
    rng = np.random.default_rng(0)
    datasets = []
    if args.sample:
        print(f"real sample: {args.sample} (--sample)")
    real = np.load(args.sample) if args.sample else real_sample()
    if real is not None:
        datasets.append(("real-minilm-L3", tiled(real.astype(np.float32), target // 2, rng)))  # sized for 2-byte dtypes
    else:
        print("(no real sample; synthetic only)")
    # Synthetic d_model 4096: a Gaussian scale mixture (per-row log-normal scale): heavy tails like real activations.
    rows = max(1, target // (4096 * 2))
    synth = (rng.standard_normal((rows, 4096), dtype=np.float32) * np.exp(0.5 * rng.standard_normal((rows, 1)))).astype(np.float32)
    datasets.append(("synthetic-d4096", synth))
    with tempfile.TemporaryDirectory(prefix="codec-bench-") as work:
        print(f"threads={args.threads}; MB/s of uncompressed data; raw = zstd-1 byte-split alone, one thread;"
              " wmem = ShardWriter to memory://, wdisk = ShardWriter to local disk")
        print(f"{'data':<17} {'dtype':<9} {'MiB':>6} {'ratio':>6} {'rawenc':>7} {'wmem':>6} {'wm/raw':>6} "
              f"{'wdisk':>6} {'wd/raw':>6} {'disk':>6} {'ceil':>5} {'rawdec':>7} {'read':>7} {'r/raw':>6} "
              f"{'cpu-w':>6} {'cpu-r':>6}")
        for name, x32 in datasets:
            for dtype in ("float32", "float16", "bfloat16"):
                r = bench(name, as_dtype(x32, dtype), dtype, 8 << 20, work, args.repeat, args.threads)
                print(f"{r['data']:<17} {dtype:<9} {r['MiB']:6.0f} {r['ratio']:6.3f} {r['raw_enc']:7.0f} "
                      f"{r['write_mem']:6.0f} {r['write_mem'] / r['raw_enc']:6.2f} "
                      f"{r['write']:6.0f} {r['write'] / r['raw_enc']:6.2f} {r['disk']:6.0f} {r['ceiling']:5.2f} "
                      f"{r['raw_dec']:7.0f} {r['read']:7.0f} "
                      f"{r['read'] / r['raw_dec']:6.2f} {r['cpu_w']:6.2f} {r['cpu_r']:6.2f}")
    print("cpu-w / cpu-r: raw CPU seconds over ours for the same bytes (writer to disk / reader), robust to load")
    print("disk: the shard bytes alone written again to local disk (O_DIRECT, as the writer does); ceil: the most"
          " wd/raw can be, raw encode / (its first chunk + that disk write)")
    print("note: float32 from the float16 real sample has 13 zero mantissa bits, so its ratio is optimistic;"
          " the synthetic float32 ratio is the realistic one.")


if __name__ == "__main__":
    main()

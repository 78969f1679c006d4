"""Streaming-reader benchmark: ActivationStream throughput as a ratio of raw zstd-1 byte-split decode speed.

All numbers come from one run on the same bytes, so the ratios hold on a noisy shared machine:
- raw decode: the dataset's very chunk frames, already in memory, decompressed and un-split by
  `codec.decode_chunk` on one thread (no reads, no batching, no checks beyond the codec's own);
- stream: ActivationStream over the same dataset on local disk (page cache warm), threads=1 and threads=2,
  every column requested (so it un-splits the same bytes the baseline does), batches of --batch rows;
- S3: the same dataset on a moto server on 127.0.0.1, streamed with several thread counts, next to the rate
  at which moto serves the same byte ranges with no decoding at all (moto is the bottleneck there).
Each figure is the best of --repeat runs, interleaved. GB/s counts uncompressed bytes (rows x row_bytes).
Process CPU seconds are printed too: on a loaded machine the wall-clock ratios sink with the share of the
cores we get, while CPU cost per byte (stream vs raw) stays comparable.

    python benchmarks/read.py            # ~512 MiB of bfloat16 activations, S3 part on 192 MiB
    python benchmarks/read.py --quick    # ~160 MiB, S3 part on 64 MiB
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from readers import ActivationStream
from shuffler import Dataset
from shuffler.format.codec import decode_chunk
from shuffler.format.convert import float32_to_bfloat16_bits
from writers import ShardWriter

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

from benchmarks.common import moto_bucket, real_sample  # noqa: E402


def activations(nbytes: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """bfloat16 activations (raw uint16) of about nbytes: the real sample (benchmarks/common.real_sample,
    captured once with the `capture` extra), tiled and permuted, when available; else Gaussian rows with a per-feature scale (compresses like real activations, about 1.3x)."""
    rng = np.random.default_rng(seed)
    base = real_sample()
    if base is not None:
        base = base.astype(np.float32)  # [26041, 384]
        rows = nbytes // (base.shape[1] * 2)
        idx = rng.integers(0, len(base), size=rows)
        return float32_to_bfloat16_bits(base[idx]), "minilm_l3 sample (tiled, permuted)"
    d = 768
    rows = nbytes // (d * 2)
    scale = np.exp(rng.normal(0, 1, size=d)).astype(np.float32)
    return float32_to_bfloat16_bits(rng.standard_normal((rows, d), dtype=np.float32) * scale), "synthetic Gaussian"


def write(url: str, acts: np.ndarray) -> None:
    n = len(acts)
    with ShardWriter(url, d_model=acts.shape[1], dtype="bfloat16", shard_bytes=128 << 20) as w:
        for s in range(0, n, 65536):
            r = np.arange(s, min(s + 65536, n))
            w.write(acts[s : s + 65536], token_id=(r % 30000).astype(np.int32), doc_id=r // 512,
                    position=(r % 512).astype(np.int32))


def frames(url: str) -> list[tuple[int, int, bytes, int, int]]:
    ds = Dataset.open(url)
    out = []
    for i, info in enumerate(ds.shards):
        blob = ds.store.read(info.name)
        for j, e in enumerate(ds.index(i).entries):
            out.append((i, j, blob[int(e["offset"]) : int(e["offset"] + e["comp_len"])], int(e["rows"]),
                        int(e["checksum"])))
    return out


def raw_decode(url: str, fr) -> tuple[float, float]:
    """(wall, process CPU) seconds to decode every frame once on this thread."""
    schema = Dataset.open(url).schema
    t, c = time.perf_counter(), time.process_time()
    for i, j, frame, rows, checksum in fr:
        decode_chunk(schema, frame, rows, checksum, where=f"{i}/{j}")
    return time.perf_counter() - t, time.process_time() - c


def stream_time(url: str, threads: int, batch: int, prefetch: int = 4) -> tuple[float, float, ActivationStream]:
    """(wall, process CPU) seconds for one pass of the stream, and the stream (for its stats)."""
    s = ActivationStream(url, batch_size=batch, threads=threads, prefetch=prefetch,
                         columns=("token_id", "doc_id", "position"), world_size=1, rank=0)
    t, c = time.perf_counter(), time.process_time()
    for _ in s:
        pass
    return time.perf_counter() - t, time.process_time() - c, s


def s3_get_time(url: str, threads: int) -> float:
    """Fetch every chunk's byte range with `threads` concurrent requests, no decoding."""
    from concurrent.futures import ThreadPoolExecutor

    ds = Dataset.open(url)
    ranges = [(ds.shards[i].name, *ds.chunk_range(i, j)) for i in range(len(ds.shards))
              for j in range(ds.index(i).n_chunks)]
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda r: ds.store.read_range(*r), ranges))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller data and fewer repeats")
    ap.add_argument("--mib", type=int, default=None, help="uncompressed MiB of activations on local disk")
    ap.add_argument("--batch", type=int, default=4096, help="rows per batch")
    ap.add_argument("--repeat", type=int, default=None, help="runs per figure; the best is kept")
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) part")
    args = ap.parse_args()
    mib = args.mib or (160 if args.quick else 512)
    repeat = args.repeat or (3 if args.quick else 5)
    work = tempfile.mkdtemp(prefix="bench-read-")
    try:
        acts, source = activations(mib << 20)
        url = os.path.join(work, "ds")
        write(url, acts)
        ds = Dataset.open(url)
        raw_bytes = ds.num_rows * ds.schema.row_bytes
        chunks = sum(s.chunks for s in ds.shards)
        print(f"data: {source}; {ds.num_rows} rows x {ds.d_model} bfloat16 + 3 columns = {raw_bytes / 2**20:.0f} MiB "
              f"uncompressed, {ds.manifest.stored_bytes / 2**20:.0f} MiB stored in {len(ds.shards)} shards, "
              f"{chunks} chunks; batch {args.batch} rows; cpus {os.cpu_count()}; load {os.getloadavg()[0]:.2f}")
        fr = frames(url)
        best = {"raw": 1e9, 1: 1e9, 2: 1e9}
        cpu = {"raw": 1e9, 1: 1e9, 2: 1e9}
        waits = {}
        for _ in range(repeat):  # interleaved, so a burst of load from elsewhere hits all three alike
            wall, c = raw_decode(url, fr)
            best["raw"], cpu["raw"] = min(best["raw"], wall), min(cpu["raw"], c)
            for t in (1, 2):
                wall, c, s = stream_time(url, t, args.batch)
                cpu[t] = min(cpu[t], c)
                if wall < best[t]:
                    best[t], waits[t] = wall, s.stats.wait_seconds
        gbs = {k: raw_bytes / v / 1e9 for k, v in best.items()}
        print(f"raw zstd-1 byte-split decode, 1 thread : {gbs['raw']:.2f} GB/s   (CPU {cpu['raw']:.2f} s)")
        for t in (1, 2):
            print(f"ActivationStream threads={t}            : {gbs[t]:.2f} GB/s = {gbs[t] / gbs['raw']:.2f} x raw "
                  f"= {gbs[t] / gbs['raw'] / t:.2f} per thread (CPU {cpu[t]:.2f} s = raw CPU x "
                  f"{cpu[t] / cpu['raw']:.2f}; loop waited {waits[t]:.2f} s)")
        print(f"2 threads / 1 thread                   : {gbs[2] / gbs[1]:.2f} x  (targets: >= 0.9 per thread, "
              f">= 1.7 x)  load now {os.getloadavg()[0]:.2f}")
        if not args.no_s3:
            s3_part(acts[: (64 if args.quick else 192) * (1 << 20) // (acts.shape[1] * 2)], args.batch, repeat,
                    gbs["raw"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def s3_part(acts: np.ndarray, batch: int, repeat: int, raw_gbs: float) -> None:
    with moto_bucket("bench") as bucket:
        url = f"{bucket}/read"
        write(url, acts)
        ds = Dataset.open(url)
        raw_bytes = ds.num_rows * ds.schema.row_bytes
        print(f"S3 (moto on 127.0.0.1): {raw_bytes / 2**20:.0f} MiB uncompressed, "
              f"{sum(s.chunks for s in ds.shards)} chunks")
        best_get = 0.0
        for t in (1, 2, 4, 8):
            get = min(s3_get_time(url, t) for _ in range(max(1, repeat // 2)))
            st = min(stream_time(url, t, batch)[0] for _ in range(max(1, repeat // 2)))
            best_get = max(best_get, raw_bytes / get / 1e9)
            print(f"  threads={t}: stream {raw_bytes / st / 1e9:.3f} GB/s; moto serving the same ranges, no decode: "
                  f"{raw_bytes / get / 1e9:.3f} GB/s; stream / GET = {get / st:.2f}")
        print(f"  moto serves at most {best_get:.3f} GB/s (uncompressed equivalent), {raw_gbs / best_get:.0f}x slower "
              f"than one thread decodes ({raw_gbs:.2f} GB/s): moto, a Python server on these same CPUs, is the "
              "bottleneck")


if __name__ == "__main__":
    main()

"""Check the cost model (shuffler/shuffling/costmodel.py) against measured shuffles on this machine.

    .venv/bin/python benchmarks/costmodel.py            # shuffles of 128, 384 and 768 MiB (bfloat16, d_model 1024)
    .venv/bin/python benchmarks/costmodel.py --quick    # 64 and 192 MiB
    .venv/bin/python benchmarks/costmodel.py --quick --save-rates rates.json   # then: shuffler plan ... --rates rates.json

1. Calibrates the model's per-core rates here, single-threaded, on 32 MiB of the same data: source decode,
   pass-1 scatter work (bucket draws, stable sort, gather), intermediate encode/decode at the scratch level,
   pass-2 permute work, output encode at level 1; the local disk's write+read bandwidth (wall) and its cost in
   CPU time (Rates.local_io), each the median of three; how fast a fresh process faults in new memory
   (Rates.first_touch, median of three processes); the fixed start-up per pass (from a 1 MiB shuffle).
2. Runs shuffles of several sizes (local disk, --workers 1 and 2) and prints the model's predicted wall time
   per pass and in all, the measured time, and predicted / measured (target 0.7 to 1.4).
The model is told this machine: 1 node, all its cores, its RAM, the measured disk bandwidth; the plan carries
the run's worker count. Each row also prints the cores the run kept busy ((user + sys) / wall).
The machine may be shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from shuffler import Dataset  # noqa: E402
from shuffler.format.codec import decode_chunk, encode_chunk, fingerprint_sum, row_hashes  # noqa: E402
from shuffler.format.convert import float32_to_bfloat16_bits  # noqa: E402
from shuffler.format.schema import standard_columns  # noqa: E402
from shuffler.io.chunks import ChunkReader  # noqa: E402
from shuffler.keys import bucket_ids, stream_key  # noqa: E402
from shuffler.shuffling.costmodel import Cluster, Rates, estimate  # noqa: E402
from shuffler.shuffling.plan import LOCAL_SCRATCH_LEVEL  # noqa: E402
from shuffler.shuffling.run import shuffle  # noqa: E402
from shuffler.storage.storage import Storage  # noqa: E402
from writers.shard_writer import ShardWriter  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
D_MODEL = 1024


def make_data(url: str, mib: int, seed: int = 7) -> None:
    """bfloat16 activations in document order (256-row documents with their own means), standard columns."""
    rng = np.random.default_rng(seed)
    row_bytes = 2 * D_MODEL + 20
    rows = mib * MiB // row_bytes
    with ShardWriter(url, d_model=D_MODEL, dtype="bfloat16", columns=standard_columns()) as w:
        for s in range(0, rows, 4096):
            n = min(4096, rows - s)
            row = np.arange(s, s + n)
            doc = row // 256
            x = rng.standard_normal((n, D_MODEL), dtype=np.float32) + (doc % 17)[:, None].astype(np.float32)
            w.write(float32_to_bfloat16_bits(x), token_id=(row % 50000).astype(np.int32), doc_id=doc,
                    position=(row % 256).astype(np.int32))


def _rate(fn, nbytes: int, repeat: int = 3) -> float:
    best = min(_timed(fn) for _ in range(repeat))
    return nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# A worker's peak is about half large buffers (run, read and chunk buffers: anonymous maps advised
# MADV_HUGEPAGE, shuffler/io/pages.py: huge_empty, faulted 2 MiB at a time where transparent huge pages allow)
# and half malloc arenas, faulted 4 KiB at a time: touch 128 MiB of each, as each pool worker does once.
_TOUCH = """
import mmap, time, numpy as np
from shuffler.io.pages import huge_empty
t = time.perf_counter()
a = huge_empty((128 << 20,), "u1"); a[::4096] = 1
b = np.frombuffer(mmap.mmap(-1, 128 << 20), np.uint8); b[::4096] = 1
print((a.nbytes + b.nbytes) / (time.perf_counter() - t))
"""


def first_touch() -> float:
    """Bytes/s at which a fresh process faults in new memory as a shuffle worker does: the median of three
    new processes touching 256 MiB each, half of it in huge-page buffers."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    runs = [float(subprocess.run([sys.executable, "-c", _TOUCH], capture_output=True, text=True, check=True,
                                 env=env).stdout) for _ in range(3)]
    return float(np.median(runs))


def _cpu_s() -> float:
    """User + sys seconds of this process and its finished children (the shuffle's worker pool)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _import_task(_: int) -> int:
    import shuffler.shuffling.executor  # noqa: F401  (what a worker imports before its first task)

    time.sleep(0.05)  # both workers hold one task at once, so both have started
    return os.getpid()


def codec_rates(src: str) -> dict[str, float]:
    """Per-core rates of each CPU stage, measured single-threaded in this process on the dataset `src`."""
    ds = Dataset.open(src)
    schema = ds.schema
    parts = [ds.read_shard(i) for i in range(len(ds.shards))]
    acts = np.concatenate([p.acts for p in parts])
    cols = [np.concatenate([p.columns[n] for p in parts]) for n, _ in schema.columns]
    n = len(acts)
    raw = n * schema.row_bytes
    chunk = 8 * MiB // schema.row_bytes
    spans = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]

    def enc(level):
        return [encode_chunk(schema, acts[a:b], [c[a:b] for c in cols], level) for a, b in spans]

    l1, fast = enc(1), enc(LOCAL_SCRATCH_LEVEL)

    def dec(frames):
        for (a, b), (f, cs) in zip(spans, frames, strict=True):
            decode_chunk(schema, f, b - a, cs, where="cal")

    key = stream_key(1)

    def hashes():  # output shards carry a fingerprint: RollingShardWriter hashes every row it encodes
        for a, b in spans:
            fingerprint_sum(row_hashes(schema, acts[a:b], [c[a:b] for c in cols]))

    def scatter():
        ids = bucket_ids(key, 0, n, 64)
        order = np.argsort(ids, kind="stable")
        np.take(acts, order, axis=0)
        for c in cols:
            np.take(c, order)

    def permute():
        p = np.random.default_rng(1).permutation(n)
        np.take(acts, p, axis=0)
        for c in cols:
            np.take(c, p)

    return dict(
        decode_input=_rate(lambda: dec(l1), raw), scatter=_rate(scatter, raw),
        encode_scratch=_rate(lambda: enc(LOCAL_SCRATCH_LEVEL), raw), decode_scratch=_rate(lambda: dec(fast), raw),
        permute=_rate(permute, raw), encode_output=_rate(lambda: (enc(1), hashes()), raw),
    )


def rates_with(src: str, processes: int, base: Rates) -> Rates:
    """Per-core rates when `processes` processes work at once (each measures its own; the mean is taken).
    Called with one process per core: a shuffle keeps all of this machine's cores busy (one worker 1.7 of 2,
    two workers 1.9), so on a machine shared with other work its threads get only a share of each core, and
    this sees that share. The rates not measured here (local I/O, first touch) are scaled by the same share."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        runs = list(pool.map(codec_rates, [src] * processes))
    now = {k: sum(r[k] for r in runs) / processes for k in runs[0]}
    share = float(np.mean([now[k] / getattr(base, k) for k in now]))
    return dataclasses.replace(base, **now, local_io=base.local_io * share, first_touch=base.first_touch * share)


def calibrate(work: str) -> tuple[Rates, float, str]:
    """Per-core rates of each CPU stage, the disk's bandwidth, and the fixed start-up per pass."""
    src = os.path.join(work, "cal")
    make_data(src, 32)
    rates = Rates(**codec_rates(src))
    # Disk: write then read back 1 GiB as the shuffle's objects go: written with O_DIRECT from a reused buffer
    # (Storage.open_atomic(direct=True)), read back with O_DIRECT into reused buffers (ChunkReader(direct=True),
    # pass 2's reads of the intermediates). Its wall time gives the disk bound; its CPU time (user + sys: the
    # copy into the aligned buffer, the system calls) gives Rates.local_io, the core-seconds local I/O takes
    # from the codec. One pass swings 2x here (519 vs 1,313 MB/s seconds apart, docs/scale.md), so take the
    # median of three.
    store = Storage(os.path.join(work, "disk"))
    blob = np.random.default_rng(0).integers(0, 255, 64 * MiB, dtype=np.uint8).tobytes()
    walls, cpus = [], []
    for _ in range(3):
        t, c = time.perf_counter(), time.process_time()
        for i in range(16):
            with store.open_atomic(f"b{i}", direct=True) as f:
                for j in range(0, len(blob), 8 * MiB):  # frames of a chunk's size, as ShardSink writes them
                    f.write(blob[j : j + 8 * MiB])
        reader = ChunkReader(store, direct=True)
        for i in range(16):
            for j in range(0, len(blob), 32 * MiB):  # batches of the plan's read size
                for frame in reader.frames([f"b{i}"] * 4, [j + k * 8 * MiB for k in range(4)],
                                           [j + (k + 1) * 8 * MiB for k in range(4)]):
                    reader.release(frame, 0)
        reader.close()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        store.delete_prefix("")
    disk = 2 * GiB / float(np.median(walls))
    local_io = 2 * GiB / float(np.median(cpus))
    # Start-up per pass: a shuffle of ~1 MiB is nothing but fixed costs.
    tiny = os.path.join(work, "tiny")
    make_data(tiny, 1)
    t = time.perf_counter()
    shuffle(tiny, os.path.join(work, "tiny-out"), seed=0, workers=1)
    startup = (time.perf_counter() - t) / 2
    # Worker start: spawn a pool of 2 like the shuffle's executor and wait until both have imported the
    # task code (one trivial task each).
    ctx = multiprocessing.get_context("spawn")
    t = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        list(pool.map(_import_task, range(2)))
    rates = dataclasses.replace(rates, startup_s=startup, process_start_s=time.perf_counter() - t, local_io=local_io,
                                first_touch=first_touch())
    return rates, disk, src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 and 192 MiB only")
    ap.add_argument("--dir", help="work folder (default: a temporary one, deleted at the end)")
    ap.add_argument("--save-rates", metavar="FILE",
                    help="write the calibrated rates as JSON for `shuffler plan --rates FILE` (on a cluster: run "
                         "this on one idle node)")
    args = ap.parse_args()
    sizes = [64, 192] if args.quick else [128, 384, 768]
    work = tempfile.mkdtemp(prefix="costmodel-", dir=args.dir)
    try:
        rates, disk, cal = calibrate(work)
        print(f"calibrated here (per core, uncompressed MB/s): decode source {rates.decode_input / 1e6:.0f}, "
              f"scatter {rates.scatter / 1e6:.0f}, encode scratch {rates.encode_scratch / 1e6:.0f}, decode "
              f"scratch {rates.decode_scratch / 1e6:.0f}, permute {rates.permute / 1e6:.0f}, encode output "
              f"{rates.encode_output / 1e6:.0f}, local I/O {rates.local_io / 1e6:.0f}, first touch "
              f"{rates.first_touch / 1e6:.0f}; disk {disk / 1e6:.0f} MB/s; start-up {rates.startup_s:.2f} s/pass, "
              f"worker processes {rates.process_start_s:.2f} s")
        if args.save_rates:
            with open(args.save_rates, "w") as f:
                json.dump(dataclasses.asdict(rates), f, indent=1)
            print(f"rates written to {args.save_rates}; use: shuffler plan ... --rates {args.save_rates}")
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cores = os.cpu_count() or 1
        print(f"{'data':>8} {'workers':>7} {'pass1 pred/meas':>17} {'pass2 pred/meas':>17} {'total pred':>10} "
              f"{'measured':>9} {'ratio':>6}")
        ratios = []
        for mib in sizes:
            src = os.path.join(work, f"src-{mib}")
            make_data(src, mib)
            for workers in (1, 2):
                # calibrated right before each run, with all cores busy, as the run keeps them
                wrates = rates_with(cal, cores, rates)
                dst = os.path.join(work, f"dst-{mib}-{workers}")
                stats: dict = {}
                t, used = time.perf_counter(), _cpu_s()
                m = shuffle(src, dst, seed=1, workers=workers, memory=512 * MiB, stats=stats)
                measured = time.perf_counter() - t
                cores_used = (_cpu_s() - used) / measured
                from shuffler.shuffling.run import plan_for, open_sources, ShuffleConfig  # noqa: I001

                plan = plan_for(open_sources([src]), ShuffleConfig(seed=1, memory=512 * MiB), workers=workers,
                                scratch_url=dst, dst_url=dst)
                assert plan.buckets == m.metadata["shuffle"]["buckets"]
                # The machine as it is: all its cores; the plan carries the worker count.
                est = estimate(plan, Cluster(nodes=1, cores=cores, memory=ram, disk=disk), rates=wrates)
                p1 = stats["pass2_start"] - stats["pass1_start"]
                p2 = stats["pass2_end"] - stats["pass2_start"]
                ratio = est.wall_s / measured
                ratios.append(ratio)
                print(f"{'':>8} {workers:>7} calibrated with {cores} process(es): decode source "
                      f"{wrates.decode_input / 1e6:.0f}, encode output {wrates.encode_output / 1e6:.0f} MB/s per core; "
                      f"predicted {est.passes[0].bound}/{est.passes[1].bound}-bound; the run kept {cores_used:.2f} "
                      "cores busy")
                print(f"{mib:>5}MiB {workers:>7} {est.passes[0].wall_s:>7.1f}/{p1:<7.1f}s  "
                      f"{est.passes[1].wall_s:>7.1f}/{p2:<7.1f}s  {est.wall_s:>9.1f}s {measured:>8.1f}s {ratio:>6.2f}")
                shutil.rmtree(dst)
            shutil.rmtree(src)
        print(f"predicted / measured: min {min(ratios):.2f}, max {max(ratios):.2f} (target 0.7 to 1.4); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

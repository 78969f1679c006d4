"""Benchmark of the two-pass shuffle against its floor and the in-memory bound, measured in one run.

    .venv/bin/python benchmarks/shuffle.py            # 2 GiB of float16 activations (d_model 768)
    .venv/bin/python benchmarks/shuffle.py --quick    # 256 MiB, for `make bench`

Prints:
- shuffle wall time / floor. The floor is two streaming re-encoding copies of the same data by the same
  code paths (scatter.iter_decoded to read and decode; the shuffle's encoders and atomic writes to write),
  the same task counts and the same worker pool: copy 1 at the scratch level, copy 2 at the output level.
  Target: 1.3 or less (issue 3).
- peak RSS per pass (largest single process, and the whole process tree) against the per-task budget.
- the ratio to an in-memory numpy permutation of the same rows (load .npy, permutation, gather, save .npy),
  the peers' "in-memory bound" (docs/benchmarks.md, "Measurements behind the design").
- the effect of --scratch-level: time and intermediate bytes at each level given.
Data goes under --dir (default: a temporary folder) and is deleted at the end.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from shuffler import Dataset  # noqa: E402
from shuffler.format.schema import standard_columns  # noqa: E402
from shuffler.io.chunks import ChunkTable, iter_decoded  # noqa: E402
from shuffler.io.rolling import RollingShardWriter  # noqa: E402
from shuffler.progress import human_bytes  # noqa: E402
from shuffler.shuffling.plan import ENCODE_THREADS, read_batch_bytes  # noqa: E402
from shuffler.shuffling.run import shuffle  # noqa: E402
from shuffler.storage.storage import Storage  # noqa: E402
from writers.shard_writer import ShardWriter  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


def make_data(url: str, rows: int, d_model: int, seed: int = 1234) -> None:
    """Activations in document order, like benchmarks/common.synth_docs: 256-row documents, each with its own mean,
    heavy-tailed noise, a per-dimension scale and a few massive dimensions."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0, 0.5, d_model)).astype(np.float32)
    scale[:4] *= 30
    block = 8192
    with ShardWriter(url, d_model=d_model, dtype="float16", columns=standard_columns()) as w:
        for s in range(0, rows, block):
            n = min(block, rows - s)
            row = np.arange(s, s + n)
            doc = row // 256
            means = np.random.default_rng([seed, int(doc[0])]).standard_normal((int(doc[-1] - doc[0]) + 1, d_model),
                                                                                 dtype=np.float32)
            x = rng.standard_normal((n, d_model), dtype=np.float32)
            x *= np.exp(0.8 * rng.standard_normal((n, 1), dtype=np.float32))
            x += means[doc - doc[0]]
            x *= scale
            w.write(x.astype(np.float16), token_id=(row % 50000).astype(np.int32), doc_id=doc,
                    position=(row % 256).astype(np.int32))


# ---------------------------------------------------------------------------------------------------
# The floor: streaming copies by the shuffle's own read and write paths, on the same kind of pool


def _copy_task(table: ChunkTable, skip: int, rows: int, dst: str, name: str, level: int, chunk_bytes: int,
               shard_bytes: int) -> int:
    w = RollingShardWriter(Storage(dst), table.schema, name_of=lambda k: f"{name}-{k:04d}.shard",
                           chunk_bytes=chunk_bytes, shard_bytes=shard_bytes, level=level, threads=ENCODE_THREADS)
    for _, a, c in iter_decoded(table, skip, rows, threads=ENCODE_THREADS, batch_bytes=read_batch_bytes(chunk_bytes)):
        w.append(a, c)
    return sum(s.bytes for s in w.close())


def _copy(pool, table: ChunkTable, tasks: int, dst: str, level: int, chunk_bytes: int) -> int:
    n = table.rows
    per = math.ceil(n / tasks)
    futures = []
    for t in range(tasks):
        lo, hi = t * per, min(n, (t + 1) * per)
        if lo >= hi:
            continue
        sel, skip = table.select(lo, hi)
        futures.append(pool.submit(_copy_task, sel, skip, hi - lo, dst, f"part-{t:06d}", level, chunk_bytes,
                                   1 << 40))
    return sum(f.result() for f in futures)


def floor(src: str, work: str, *, maps: int, buckets: int, workers: int, scratch_level: int, level: int,
          chunk_bytes: int) -> tuple[float, float]:
    """Two copies: src -> c1 in `maps` tasks at the scratch level, c1 -> c2 in `buckets` tasks at the output level."""
    ds = Dataset.open(src)
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()  # pool start-up is timed, as it is in the shuffle's pass 1
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        table = ChunkTable.of_datasets([ds])
        _copy(pool, table, maps, f"{work}/c1", scratch_level, chunk_bytes)
        t1 = time.perf_counter()
        c1 = [(f"{work}/c1", n) for n in sorted(os.listdir(f"{work}/c1"))]
        table1 = _table_of_objects(ds.schema, c1)
        _copy(pool, table1, buckets, f"{work}/c2", level, chunk_bytes)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _table_of_objects(schema, objects) -> ChunkTable:
    from shuffler.format.shard import decode_footer, tail_bytes
    from shuffler.io.chunks import CHUNK

    parts = []
    for k, (url, name) in enumerate(objects):
        st = Storage(url)
        size = st.size(name)
        trailer = st.read_range(name, size - 32, size)
        n = int.from_bytes(trailer[8:12], "little")
        idx = decode_footer(st.read_range(name, size - tail_bytes(n, schema), size), size, schema, where=name)
        c = np.empty(idx.n_chunks, dtype=CHUNK)
        c["obj"] = k
        for f in ("offset", "comp_len", "rows", "checksum"):
            c[f] = idx.entries[f]
        parts.append(c)
    return ChunkTable(schema, tuple(objects), np.concatenate(parts))


# ---------------------------------------------------------------------------------------------------
# Memory: sample the RSS of this process and its children


class RssSampler:
    def __init__(self, interval: float = 0.05):
        import psutil

        self.psutil, self.interval = psutil, interval
        self.samples: list[tuple[float, int, int, int]] = []  # (time, pid, rss, is_self)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        me = self.psutil.Process()
        while not self._stop.is_set():
            now = time.time()
            for p in [me, *me.children(recursive=True)]:
                try:
                    self.samples.append((now, p.pid, p.memory_info().rss, p.pid == me.pid))
                except self.psutil.Error:
                    pass
            time.sleep(self.interval)

    def peaks(self, t0: float, t1: float) -> tuple[int, int]:
        """(largest single process RSS, largest summed RSS of the tree) within [t0, t1]."""
        by_time: dict[float, int] = {}
        single = 0
        for t, _, rss, _ in self.samples:
            if t0 <= t <= t1:
                single = max(single, rss)
                by_time[t] = by_time.get(t, 0) + rss
        return single, max(by_time.values(), default=0)


def in_memory_numpy(src: str, work: str) -> tuple[float, int]:
    """The in-memory bound: rows saved as .npy beforehand; timed: load, permutation, gather, save. One process."""
    ds = Dataset.open(src)
    parts = [ds.read_shard(i) for i in range(len(ds.shards))]
    acts = np.concatenate([p.acts for p in parts])
    cols = {k: np.concatenate([p.columns[k] for p in parts]) for k in parts[0].columns}
    del parts
    np.save(f"{work}/x.npy", acts)
    for k, v in cols.items():
        np.save(f"{work}/{k}.npy", v)
    del acts, cols
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    x = np.load(f"{work}/x.npy")
    perm = np.random.default_rng(1).permutation(len(x))
    np.save(f"{work}/x_out.npy", x[perm])
    for k in ("token_id", "doc_id", "position"):
        np.save(f"{work}/{k}_out.npy", np.load(f"{work}/{k}.npy")[perm])
    dt = time.perf_counter() - t0
    del x
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dt, max(before, after) * 1024


def cpu_seconds() -> float:
    """User + system CPU of this process and of its reaped children (pool workers are reaped at shutdown).

    Less sensitive than wall time to other jobs on a shared machine: it counts the work, not the waiting.
    """
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB instead of 2 GiB")
    ap.add_argument("--gib", type=float, default=2.0, help="uncompressed data size in GiB")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--memory", default="2GiB", help="per-task budget passed to shuffle")
    ap.add_argument("--scratch-levels", default="-3,1", help="comma-separated; the first is the headline run")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary folder); deleted at the end")
    ap.add_argument("--skip-numpy", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement, interleaved; medians printed")
    args = ap.parse_args()
    gib = 0.25 if args.quick else args.gib
    levels = [int(v) for v in args.scratch_levels.split(",")]
    work = tempfile.mkdtemp(prefix="bench-shuffle-", dir=args.dir)
    try:
        row_bytes = args.d_model * 2 + 16
        rows = int(gib * GiB) // row_bytes
        src = f"{work}/raw"
        t = time.perf_counter()
        make_data(src, rows, args.d_model)
        ds = Dataset.open(src)
        print(f"data: {rows:,} rows x {args.d_model} float16 + token_id/doc_id/position = "
              f"{human_bytes(rows * row_bytes)} raw, {human_bytes(ds.manifest.stored_bytes)} stored, "
              f"{len(ds.shards)} shards (made in {time.perf_counter() - t:.1f} s)")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; "
              f"workers {args.workers}, memory {args.memory} per task")

        results: dict[int, list[dict]] = {lv: [] for lv in levels}
        floors: list[tuple[float, float]] = []
        plan = None
        for r in range(args.repeat):  # interleaved, so drifting machine load hits every measurement alike
            for lv in levels:
                stats: dict = {}
                dst = f"{work}/out{lv}"
                shutil.rmtree(dst, ignore_errors=True)
                with RssSampler() as rss:
                    t0, c0 = time.perf_counter(), cpu_seconds()
                    shuffle(src, dst, seed=0, memory=args.memory, workers=args.workers, scratch_level=lv,
                            keep_intermediate=True, stats=stats)
                    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
                scratch_bytes = du(f"{dst}/.shuffle")
                shutil.rmtree(dst)
                results[lv].append(dict(
                    wall=wall, cpu=cpu, pass1=stats["pass2_start"] - stats["pass1_start"],
                    pass2=stats["pass2_end"] - stats["pass2_start"], scratch=scratch_bytes,
                    rss1=rss.peaks(stats["pass1_start"], stats["pass2_start"]),
                    rss2=rss.peaks(stats["pass2_start"], stats["pass2_end"])))
                plan = plan or stats["plan"]
                if r == 0 and lv == levels[0]:
                    print(f"plan: B={plan['buckets']} buckets, {plan['map_tasks']} map tasks, capacity "
                          f"{plan['capacity_rows']:,} rows; predicted peak per task: pass 1 "
                          f"{human_bytes(plan['peak_map_bytes'])}, pass 2 {human_bytes(plan['peak_reduce_bytes'])}")
            with RssSampler():  # sampled too, so both sides pay the sampler's few CPU percent
                c0 = cpu_seconds()
                c1, c2 = floor(src, work, maps=plan["map_tasks"], buckets=plan["buckets"], workers=args.workers,
                               scratch_level=levels[0], level=1, chunk_bytes=8 * MiB)
                floors.append((c1, c2, cpu_seconds() - c0))
            shutil.rmtree(f"{work}/c1")
            shutil.rmtree(f"{work}/c2")

        def med(xs):
            return float(np.median(xs))

        fl = med([a + b for a, b, _ in floors])
        fl_cpu = med([c for _, _, c in floors])
        print(f"floor (2 streaming re-encoding copies, same code paths, {args.workers} workers): median {fl:.2f} s of "
              f"{', '.join(f'{a + b:.2f}' for a, b, _ in floors)} (copy 1 at level {levels[0]}: "
              f"{med([a for a, _, _ in floors]):.2f} s, copy 2 at level 1: {med([b for _, b, _ in floors]):.2f} s); "
              f"CPU {fl_cpu:.2f} s")
        for lv in levels:
            rs = results[lv]
            w = med([r["wall"] for r in rs])
            print(f"shuffle, scratch level {lv:>3}: median {w:.2f} s of {', '.join(f'{x:.2f}' for x in (r['wall'] for r in rs))} "
                  f"(pass 1 {med([r['pass1'] for r in rs]):.2f} s, pass 2 {med([r['pass2'] for r in rs]):.2f} s), "
                  f"intermediates {human_bytes(rs[0]['scratch'])}; x floor = {w / fl:.2f}; CPU "
                  f"{med([r['cpu'] for r in rs]):.2f} s, x floor CPU = {med([r['cpu'] for r in rs]) / fl_cpu:.2f}")
        head = {k: max(r[k] for r in results[levels[0]]) for k in ("rss1", "rss2")}
        head["wall"] = med([r["wall"] for r in results[levels[0]]])
        budget = plan["request"]["memory"]
        for k, name in (("rss1", "pass 1"), ("rss2", "pass 2")):
            single, tree = head[k]
            print(f"peak RSS {name}: largest process {human_bytes(single)} ({single / budget:.2f} x the "
                  f"{human_bytes(budget)} per-task budget), whole tree {human_bytes(tree)}")
        print(f"  pass 1 largest process vs the plan's predicted peak ({human_bytes(plan['peak_map_bytes'])}): "
              f"{head['rss1'][0] / plan['peak_map_bytes']:.2f}")
        bucket = plan["bucket_max_rows"] * plan["row_bytes"]
        over = head["rss2"][0] - plan["fixed_bytes"]
        print(f"  pass 2 largest process vs the plan's predicted peak ({human_bytes(plan['peak_reduce_bytes'])} = "
              f"{human_bytes(plan['fixed_bytes'])} fixed + max bucket {human_bytes(bucket)}): "
              f"{head['rss2'][0] / plan['peak_reduce_bytes']:.2f}; (RSS - fixed) / bucket = {over / bucket:.2f}")
        if not args.skip_numpy:
            dt, peak = in_memory_numpy(src, work)
            print(f"in-memory numpy permutation (load .npy, permute, gather, save .npy; 1 process): {dt:.2f} s, "
                  f"peak RSS {human_bytes(peak)}; shuffle / numpy = {head['wall'] / dt:.2f}")
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

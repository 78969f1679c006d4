"""Shuffle cost and quality: our shuffle against what users would pick instead, on the same data in one run.

    .venv/bin/python benchmarks/peers.py --repeat 2  # 1 GiB synthetic (699,050 x 768 float16) + 200k captured tokens
    .venv/bin/python benchmarks/peers.py --quick     # 64 MiB synthetic + the cached 26k-row real sample (`make bench`)

Tools (each runs in its own process, so its wall time and memory are its own):
- ours: shuffler.shuffle (two-pass external shuffle), our format in, our format out.
- numpy: the in-memory bound. Load .npy, rng.permutation, gather, save .npy (one process, whole data in RAM).
- ray: Ray Data read_parquet -> random_shuffle(seed) -> write_parquet (zstd 1) on a local Ray started and
  stopped inside the tool's process, loopback only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, docs/benchmarks.md).
- hf: Hugging Face datasets from_parquet -> shuffle(seed).flatten_indices() -> save_to_disk.
- saelens / webdataset / litdata / mosaic: buffer shuffles as those tools do them (benchmarks/common.py),
  streaming our dataset in stored order. They shuffle on the fly while training reads and write nothing, so
  their time is one read pass plus the buffer work; what they cost is quality, not time.
Parquet inputs hold x as fixed_size_binary (FixedSizeList<float16> is pathological in pyarrow's Parquet path,
docs/benchmarks.md). Input preparation is not timed. Wall time is spawn to exit (interpreter start and imports
included); "phase" is the tool's own work, timed inside its process. Memory: ru_maxrss of the largest process
(wait4), and the peak summed PSS of the whole process tree (psutil, sampled every 0.2 s): PSS splits shared
pages (Ray's plasma store) fairly between processes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

from benchmarks.common import (  # noqa: E402
    GiB,
    MiB,
    block_shuffle,
    chunk_shuffle,
    fmt_bytes,
    load_note,
    mixing_buffer,
    quality,
    run_measured,
    webdataset_buffer,
    write_real,
    write_synth,
)

TOOLS = ("ours", "numpy", "ray", "hf", "saelens", "webdataset", "litdata", "mosaic")
LABEL = {
    "ours": "**ours** (`shuffler.shuffle`, two-pass)",
    "numpy": "numpy in memory (load, permutation, gather, save)",
    "ray": "Ray Data `random_shuffle` (local Ray, 2 CPUs)",
    "hf": "HF datasets `shuffle().flatten_indices()` + `save_to_disk`",
    "saelens": "SAELens mixing buffer (40,960 rows, keep half)",
    "webdataset": "WebDataset `.shuffle(1000)` buffer",
    "litdata": "LitData chunk order + within-chunk permutation (64 MiB chunks)",
    "mosaic": "MosaicML py1b (shard order + 262,144-row blocks)",
}
WRITES = {"ours", "numpy", "ray", "hf"}  # tools that write a shuffled copy; the rest shuffle on the fly
PIECE_BYTES = 64 * MiB  # Parquet piece / LitData chunk / MosaicML shard size (both tools' usual 64 MB)


# ---------------------------------------------------------------------------------------------------
# Input preparation (untimed): the same rows as our dataset, as .npy and as Parquet pieces


def prepare(work: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shuffler import Dataset

    ds = Dataset.open(f"{work}/src")
    n, d = ds.num_rows, ds.d_model
    x = np.lib.format.open_memmap(f"{work}/x.npy", mode="w+", dtype=ds.schema.storage_dtype, shape=(n, d))
    rid = np.empty(n, np.int64)
    doc = np.empty(n, np.int64)
    s = 0
    for _, _, b in ds.iter_chunks():
        k = len(b)
        x[s : s + k], rid[s : s + k], doc[s : s + k] = b.acts, b.columns["row_id"], b.columns["doc_id"]
        s += k
    assert s == n and np.array_equal(rid, np.arange(n))
    x.flush()
    np.save(f"{work}/row_id.npy", rid)
    np.save(f"{work}/doc_id.npy", doc)
    os.makedirs(f"{work}/parquet")
    per = max(1, PIECE_BYTES // (d * ds.schema.itemsize))
    width = d * ds.schema.itemsize
    for k, lo in enumerate(range(0, n, per)):
        hi = min(n, lo + per)
        xb = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), hi - lo, [None, pa.py_buffer(np.ascontiguousarray(x[lo:hi]))])
        t = pa.table({"x": xb, "row_id": rid[lo:hi], "doc_id": doc[lo:hi]})
        pq.write_table(t, f"{work}/parquet/part-{k:05d}.parquet", compression="zstd", compression_level=1,
                       row_group_size=hi - lo)
    del x
    return {"rows": n, "d_model": d, "dtype": ds.dtype, "doc": doc, "stored": ds.manifest.stored_bytes,
            "parquet_files": len(os.listdir(f"{work}/parquet"))}


def output_order(tool: str, work: str) -> np.ndarray:
    """Input row ids in output order, read back from what the tool wrote (untimed)."""
    out = f"{work}/out"
    if tool == "ours":
        from shuffler import Dataset

        ds = Dataset.open(out)
        return np.concatenate([b.columns["row_id"] for _, _, b in ds.iter_chunks()])
    if tool == "numpy":
        return np.load(f"{out}/row_id.npy")
    if tool == "ray":
        import pyarrow.parquet as pq

        return np.concatenate([pq.read_table(f, columns=["row_id"])["row_id"].to_numpy()
                               for f in sorted(glob.glob(f"{out}/*.parquet"))])
    if tool == "hf":
        import pyarrow as pa

        return np.concatenate([pa.ipc.open_stream(f).read_all()["row_id"].to_numpy()
                               for f in sorted(glob.glob(f"{out}/data-*.arrow"))])
    return np.load(f"{work}/order.npy")


# ---------------------------------------------------------------------------------------------------
# The tools, each run as `peers.py --child TOOL` in its own process. They print one JSON line of phase times.


def child(tool: str, work: str, seed: int, workers: int) -> dict:
    out = f"{work}/out"
    t0 = time.perf_counter()
    r: dict = {}
    if tool == "ours":
        from shuffler.shuffling.run import shuffle

        stats: dict = {}
        shuffle(f"{work}/src", out, seed=seed, workers=workers, progress=False, stats=stats)
        r["buckets"] = stats["plan"]["buckets"]
    elif tool == "numpy":
        os.makedirs(out)
        x = np.load(f"{work}/x.npy")
        perm = np.random.default_rng(seed).permutation(len(x))
        np.save(f"{out}/x.npy", x[perm])
        for k in ("row_id", "doc_id"):
            np.save(f"{out}/{k}.npy", np.load(f"{work}/{k}.npy")[perm])
    elif tool == "ray":
        r.update(_ray(work, out, seed))
    elif tool == "hf":
        import datasets

        datasets.disable_progress_bars()
        a = time.perf_counter()
        d = datasets.Dataset.from_parquet(sorted(glob.glob(f"{work}/parquet/*.parquet")),
                                          cache_dir=f"{work}/hfcache")
        b = time.perf_counter()
        d = d.shuffle(seed=seed).flatten_indices()
        c = time.perf_counter()
        d.save_to_disk(out)
        r.update(from_parquet=b - a, shuffle_flatten=c - b, save=time.perf_counter() - c)
    else:
        np.save(f"{work}/order.npy", _buffer(tool, f"{work}/src", seed))
    r["phase"] = time.perf_counter() - t0
    return r


def _buffer(tool: str, src: str, seed: int) -> np.ndarray:
    """Stream the dataset in stored order through a buffer shuffle, as a trainer would consume it; returns the
    row ids in the order served. (Saving them is outside the hot loop: a list of small arrays.)"""
    from shuffler import Dataset

    ds = Dataset.open(src)

    def stream():
        for _, _, b in ds.iter_chunks():
            yield b.acts, b.columns["row_id"]

    if tool == "saelens":
        it = mixing_buffer(stream(), buffer_rows=40960, batch_rows=4096, seed=seed)
    elif tool == "webdataset":
        it = webdataset_buffer(stream(), bufsize=1000, initial=100, seed=seed)
    else:
        # chunks of ~64 MiB of consecutive stored chunks (LitData optimize(chunk_bytes="64MB"); MosaicML
        # MDSWriter's size_limit default 1 << 26)
        per = max(1, PIECE_BYTES // ds.manifest.schema.row_bytes)
        starts = list(range(0, ds.num_rows, per))
        rows = [(i, j, int(e["rows"])) for i in range(len(ds.shards)) for j, e in enumerate(ds.index(i).entries)]
        ends = np.cumsum([r for _, _, r in rows])
        table = [(i, j, int(e - r), int(e)) for (i, j, r), e in zip(rows, ends, strict=True)]  # global row ranges

        def read(lo):
            hi = lo + per
            parts = [ds.read_chunk(i, j) for i, j, a, b in table if a < hi and b > lo]
            acts = np.concatenate([p.acts for p in parts])
            rid = np.concatenate([p.columns["row_id"] for p in parts])
            keep = (rid >= lo) & (rid < hi)  # row_id == global row index in the stored (input) order
            return acts[keep], rid[keep]

        it = chunk_shuffle(starts, read, seed=seed)
        if tool == "mosaic":
            it = block_shuffle(it, block_rows=1 << 18, seed=seed)
    ids = []
    for _acts, rid in it:
        ids.append(rid)
    return np.concatenate(ids) if ids else np.empty(0, np.int64)  # SAELens serves nothing under one batch


def _ray(work: str, out: str, seed: int) -> dict:
    import psutil
    import ray

    a = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             _temp_dir=os.environ["BENCH_RAY_TMP"])
    b = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.read_parquet(f"{work}/parquet")
    ds.random_shuffle(seed=seed).write_parquet(out, compression="zstd", compression_level=1)
    c = time.perf_counter()
    exposed = []
    for p in psutil.Process().children(recursive=True):
        try:
            for conn in p.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1"):
                    exposed.append(f"{p.name()} {conn.laddr.ip}:{conn.laddr.port}")
        except psutil.Error:
            pass
    ray.shutdown()
    return {"init": b - a, "shuffle_write": c - b, "shutdown": time.perf_counter() - c, "non_loopback": exposed}


# ---------------------------------------------------------------------------------------------------
# The parent: prepare data, run each tool in its own process, score its output order


def run_tool(tool: str, work: str, seed: int, workers: int, doc: np.ndarray) -> dict:
    env = dict(os.environ, SHUFFLER_NO_PROGRESS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               RAY_enable_metrics_collection="0", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)) or ".")
    raytmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env["BENCH_RAY_TMP"] = raytmp
    shutil.rmtree(f"{work}/out", ignore_errors=True)
    os.sync()  # one run's write-back must not land in the next
    try:
        m = run_measured([sys.executable, os.path.abspath(__file__), "--child", tool, "--work", work,
                          "--seed", str(seed), "--workers", str(workers)], env=env)
        q = quality(output_order(tool, work), doc)
    finally:
        shutil.rmtree(f"{work}/out", ignore_errors=True)
        shutil.rmtree(f"{work}/hfcache", ignore_errors=True)
        shutil.rmtree(raytmp, ignore_errors=True)
    if m.leftover:
        print(f"warning: {tool} left processes {m.leftover} running after exit; terminated them", file=sys.stderr)
    return {"tool": tool, "seed": seed, "wall": m.wall, "max_rss": m.max_rss, "tree_pss": m.tree_pss,
            "tree_rss": m.tree_rss, "procs": m.procs, "leftover": m.leftover, **m.result, "quality": q}


def med(xs):
    return float(np.median(xs))


def spread(xs) -> str:
    return f"{med(xs):.1f}" + (f" [{min(xs):.1f}-{max(xs):.1f}]" if len(xs) > 1 else "")


def table(name: str, info: dict, runs: dict[str, list[dict]]) -> str:
    base = med([r["wall"] for r in runs["ours"]]) if runs.get("ours") else None
    npy = med([r["wall"] for r in runs["numpy"]]) if runs.get("numpy") else None
    lines = [f"### {name}", "",
             "| tool | wall s | phase s | x ours | x numpy | largest process | tree PSS | procs | "
             "adjacent same-doc (x uniform) | tagged-block chi2 p | displacement (x uniform) | rows out |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for tool, rs in runs.items():
        w = [r["wall"] for r in rs]
        q = rs[0]["quality"]
        a, c, dsp = q["adjacency"], q["chi2"], q["displacement"]
        rows = f"{q['rows']:,}" + ("" if q["is_permutation"] else f" (of {q['input_rows']:,})")
        xo = f"{med(w) / base:.2f}" if base else "-"
        xn = f"{med(w) / npy:.2f}" if npy else "-"
        lines.append(
            f"| {LABEL[tool]} | {spread(w)} | {spread([r['phase'] for r in rs])} | {xo} | {xn} | "
            f"{fmt_bytes(max(r['max_rss'] for r in rs))} | {fmt_bytes(max(r['tree_pss'] for r in rs))} | "
            f"{max(r['procs'] for r in rs)} | {a['observed']:.2e} ({a['ratio']:.2f}) | {c['p']:.2g} | "
            f"{dsp['observed']:.3f} ({dsp['ratio']:.2f}) | {rows} |")
    lines.append("")
    lines.append(f"Uniform expectation of adjacent same-doc: {runs[next(iter(runs))][0]['quality']['adjacency']['expected']:.2e}; "
                 f"displacement {runs[next(iter(runs))][0]['quality']['displacement']['expected']:.3f}. Quality from the run with seed 1.")
    for tool, rs in runs.items():
        extra = {k: v for k, v in rs[0].items() if k in ("init", "shuffle_write", "shutdown", "from_parquet",
                                                            "shuffle_flatten", "save", "buckets", "non_loopback")}
        if extra:
            lines.append(f"- {tool} phases (seed 1): " + ", ".join(
                f"{k} {v:.1f} s" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 MiB of synthetic data, one run each")
    ap.add_argument("--gib", type=float, default=1.0, help="synthetic data size (x only), GiB")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool (seeds 1..N), interleaved")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    ap.add_argument("--data", default="synth,real", help="comma-separated: synth, real")
    ap.add_argument("--real-tokens", type=int, default=None,
                    help="tokens of MiniLM-L6 layer 3 to capture now as the real data (default 200,000; --quick: "
                         "0 = the cached 26,041-row sample, captured on first use)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="our shuffle's worker processes")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary folder); deleted at the end")
    ap.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.seed, args.workers)))
        return
    tools = [t for t in args.tools.split(",") if t]
    for t in tools:
        if t not in TOOLS:
            raise SystemExit(f"--tools: unknown tool {t!r}; expected some of {','.join(TOOLS)}")
    gib = 1 / 16 if args.quick else args.gib
    print(f"machine: {load_note()} at start; {fmt_bytes(shutil.disk_usage(args.dir or tempfile.gettempdir()).free)} "
          f"free on the work disk")
    root = tempfile.mkdtemp(prefix="bench-peers-", dir=args.dir)
    report: dict = {}
    try:
        for data in args.data.split(","):
            work = f"{root}/{data}"
            os.makedirs(work)
            t = time.perf_counter()
            if data == "synth":
                rows = int(gib * GiB) // (768 * 2)
                write_synth(f"{work}/src", rows, 768)
                desc = (f"synthetic, {rows:,} x 768 float16 ({fmt_bytes(rows * 768 * 2)} of x), documents of 256 rows "
                        f"(benchmarks/common.synth_docs generator)")
            elif data == "real":
                tokens = args.real_tokens if args.real_tokens is not None else (0 if args.quick else 200_000)
                desc = write_real(f"{work}/src", capture_tokens=tokens or None)
            else:
                raise SystemExit(f"--data: unknown {data!r}; expected synth or real")
            info = prepare(work)
            print(f"\ndata {data}: {desc}; ours stored {fmt_bytes(info['stored'])}, {info['parquet_files']} Parquet "
                  f"files; prepared in {time.perf_counter() - t:.1f} s")
            runs: dict[str, list[dict]] = {t: [] for t in tools}
            for r in range(args.repeat):
                for tool in tools:
                    res = run_tool(tool, work, r + 1, args.workers, info["doc"])
                    runs[tool].append(res)
                    q = res["quality"]
                    print(f"  {tool:<10} seed {r + 1}: wall {res['wall']:6.1f} s (phase {res['phase']:6.1f}), largest "
                          f"{fmt_bytes(res['max_rss'])}, tree PSS {fmt_bytes(res['tree_pss'])}; adj ratio "
                          f"{q['adjacency']['ratio']:.2f}, chi2 p {q['chi2']['p']:.2g}, displacement "
                          f"{q['displacement']['ratio']:.2f}", flush=True)
            print()
            print(table(f"{data}: {desc}", info, runs))
            report[data] = {"desc": desc, "runs": runs}
            shutil.rmtree(work)
        print(f"\nmachine: {load_note()} at end")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

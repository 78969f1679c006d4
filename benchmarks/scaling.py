"""Scaling: shuffle time against data size, workers and memory budget; reader throughput against threads and
chunk size. Prints tables and draws PNG plots (matplotlib) under docs/img/.

    .venv/bin/python benchmarks/scaling.py                   # 0.25..4 GiB (--max-gib), plots in docs/img/
    .venv/bin/python benchmarks/scaling.py --quick           # 1/16..1/4 GiB, plots in a temporary folder

Data: the benchmarks/common.synth_docs generator (documents of 256 rows, float16, d_model 768) written in 0.25 GiB pieces
(1/16 GiB in --quick); a size of k pieces is the shuffle of the first k pieces given as k sources, so every
size shuffles the same rows. Each shuffle runs in its own process (benchmarks/common.run_measured): wall time
is its `shuffle()` call, memory the largest process's peak RSS and the whole tree's peak PSS. Defaults are the
shuffle's own: memory 2 GiB per task, every core, scratch next to the output. Reader: ActivationStream over a
dataset written with each chunk size (page cache warm), batches of 4096 rows, every row read once; GB/s counts
uncompressed bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

from benchmarks.common import GiB, MiB, fmt_bytes, load_note, run_measured, write_synth  # noqa: E402

D_MODEL = 768
ROW_X = D_MODEL * 2
IMG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "img")

CHILD = """
import json, sys, time
from shuffler.shuffling.run import shuffle
a = json.loads(sys.argv[1])
stats = {}
t = time.perf_counter()
shuffle(a["src"], a["dst"], seed=1, memory=a["memory"], workers=a["workers"], progress=False, stats=stats)
print(json.dumps({"phase": time.perf_counter() - t, "buckets": stats["plan"]["buckets"],
                  "pass1": stats["pass2_start"] - stats["pass1_start"], "pass2": stats["pass2_end"] - stats["pass2_start"]}))
"""


def make_pieces(work: str, n: int, piece_rows: int) -> list[str]:
    urls = []
    for k in range(n):
        url = f"{work}/piece-{k:03d}"
        write_synth(url, piece_rows, D_MODEL, seed=1234 + k)
        urls.append(url)
    return urls


def timed_shuffle(srcs: list[str], dst: str, *, memory: int, workers: int) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    arg = json.dumps({"src": srcs, "dst": dst, "memory": memory, "workers": workers})
    env = dict(os.environ, SHUFFLER_NO_PROGRESS="1",
               PYTHONPATH=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))
    m = run_measured([sys.executable, "-c", CHILD, arg], env=env)
    shutil.rmtree(dst, ignore_errors=True)
    return {"wall": m.wall, **m.result, "max_rss": m.max_rss, "tree_pss": m.tree_pss, "procs": m.procs}


def read_throughput(work: str, rows: int, chunk_mib: list[int], threads: list[int], repeat: int) -> list[dict]:
    from readers import ActivationStream

    out = []
    for cm in chunk_mib:
        url = f"{work}/read-{cm}"
        write_synth(url, rows, D_MODEL, chunk_bytes=cm * MiB)
        for t in threads:
            best = None
            for _ in range(repeat):  # best of: the machine is shared and noisy
                t0 = time.perf_counter()
                n = 0
                for b in ActivationStream(url, batch_size=4096, threads=t, seed=1):
                    n += len(b.acts)
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            assert n == rows
            out.append({"chunk_mib": cm, "threads": t, "seconds": best, "gbps": rows * (ROW_X + 16) / best / 1e9})
            print(f"  reader chunk {cm:>2} MiB, threads {t}: {out[-1]['gbps']:.2f} GB/s ({best:.2f} s)", flush=True)
        shutil.rmtree(url)
    return out


def plots(res: dict, img: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(img, exist_ok=True)
    made = []

    def save(fig, name):
        path = os.path.join(img, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

    s = res["size"]
    fig, ax = plt.subplots(figsize=(6, 4))
    g = [r["gib"] for r in s]
    ax.plot(g, [r["phase"] for r in s], "o-", label="shuffle (2 workers)")
    ax.plot(g, [r["pass1"] for r in s], "s--", label="pass 1 (scatter)")
    ax.plot(g, [r["pass2"] for r in s], "^--", label="pass 2 (permute, write)")
    ax.set_xlabel("data size, GiB of x (float16, d_model 768)")
    ax.set_ylabel("seconds")
    ax.set_title("Shuffle time against data size")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(g, [r["gib"] * 1024 / r["phase"] for r in s], "k:", alpha=0.6, label="throughput, MiB/s (right)")
    ax2.set_ylim(0, None)
    ax2.set_ylabel("MiB/s of x")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    save(fig, "scaling-size.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    w = res["workers"]
    ax.bar([str(r["workers"]) for r in w], [r["phase"] for r in w], color="C0")
    ax.set_xlabel("worker processes")
    ax.set_ylabel("seconds")
    ax.set_title(f"Shuffle of {w[0]['gib']:g} GiB against workers (2 cores)")
    save(fig, "scaling-workers.png")

    m = res["memory"]
    fig, ax = plt.subplots(figsize=(6, 4))
    budget = [r["memory"] / MiB for r in m]
    ax.plot(budget, [r["phase"] for r in m], "o-", label="time")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory budget per task, MiB")
    ax.set_ylabel("seconds")
    ax.set_title(f"Shuffle of {m[0]['gib']:g} GiB against the memory budget")
    for r, b in zip(m, budget, strict=True):
        ax.annotate(f"B={r['buckets']}", (b, r["phase"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(budget, [r["max_rss"] / MiB for r in m], "s--", color="C1", label="largest process peak RSS")
    ax2.plot(budget, budget, ":", color="gray", label="budget")
    ax2.set_ylabel("MiB")
    ax.set_ylim(0, None)
    ax2.set_ylim(0, None)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center")
    ax.grid(alpha=0.3)
    save(fig, "scaling-memory.png")

    rd = res["reader"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for cm in sorted({r["chunk_mib"] for r in rd}):
        pts = [r for r in rd if r["chunk_mib"] == cm]
        ax.plot([r["threads"] for r in pts], [r["gbps"] for r in pts], "o-", label=f"{cm} MiB chunks")
    ax.set_xlabel("reader threads")
    ax.set_ylabel("GB/s (uncompressed)")
    ax.set_title("ActivationStream throughput, local disk, warm cache")
    ax.set_xticks(sorted({r["threads"] for r in rd}))
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "reader-throughput.png")
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1/16..1/4 GiB, one run each; plots to a temporary folder")
    ap.add_argument("--max-gib", type=float, default=4.0, help="largest data size (doubling from 0.25 GiB)")
    ap.add_argument("--at-gib", type=float, default=1.0, help="data size for the workers and memory sweeps")
    ap.add_argument("--memories", default="320MiB,512MiB,1GiB,2GiB", help="memory budgets per task to sweep")
    ap.add_argument("--chunks", default="1,4,8,32", help="reader chunk sizes, MiB")
    ap.add_argument("--threads", default="1,2,4", help="reader thread counts")
    ap.add_argument("--read-mib", type=int, default=1024, help="reader dataset size, MiB of x")
    ap.add_argument("--img", default=None, help="folder for the PNGs (default docs/img; --quick: the work folder)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary folder); deleted at the end")
    ap.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    args = ap.parse_args()
    from shuffler.units import parse_size

    piece = 1 / 16 if args.quick else 0.25
    top = 0.25 if args.quick else args.max_gib
    at = 0.25 if args.quick else args.at_gib
    memories = [parse_size(m, what="memory") for m in (("320MiB,2GiB" if args.quick else args.memories).split(","))]
    chunks = [1, 8] if args.quick else [int(c) for c in args.chunks.split(",")]
    threads = [1, 2] if args.quick else [int(t) for t in args.threads.split(",")]
    read_rows = (128 if args.quick else args.read_mib) * MiB // ROW_X
    piece_rows = int(piece * GiB) // ROW_X
    sizes = []
    g = piece
    while g <= top + 1e-9:
        sizes.append(g)
        g *= 2
    n_pieces = int(round(max(sizes[-1], at) / piece))
    root = tempfile.mkdtemp(prefix="bench-scaling-", dir=args.dir)
    print(f"machine: {load_note()} at start; {fmt_bytes(shutil.disk_usage(root).free)} free on the work disk; "
          f"needs about {fmt_bytes(3.2 * max(sizes[-1], at) * GiB)}")
    res: dict = {"size": [], "workers": [], "memory": [], "reader": []}
    try:
        t = time.perf_counter()
        srcs = make_pieces(root, n_pieces, piece_rows)
        print(f"data: {n_pieces} pieces of {piece_rows:,} x {D_MODEL} float16 ({fmt_bytes(piece_rows * ROW_X)} of x "
              f"each) in {time.perf_counter() - t:.0f} s")
        cores = os.cpu_count() or 1
        print("shuffle time against size (defaults: memory 2 GiB per task, every core):")
        for gib in sizes:
            r = timed_shuffle(srcs[: int(round(gib / piece))], f"{root}/out", memory=2 * GiB, workers=cores)
            res["size"].append({"gib": gib, **r})
            print(f"  {gib:5.2f} GiB: {r['phase']:6.1f} s (pass 1 {r['pass1']:.1f}, pass 2 {r['pass2']:.1f}), "
                  f"{gib * 1024 / r['phase']:.0f} MiB/s, B={r['buckets']}, largest process {fmt_bytes(r['max_rss'])}, "
                  f"tree PSS {fmt_bytes(r['tree_pss'])}", flush=True)
        k = int(round(at / piece))
        print(f"shuffle time against workers ({at:g} GiB, memory 2 GiB per task):")
        for w in (1, 2):
            r = timed_shuffle(srcs[:k], f"{root}/out", memory=2 * GiB, workers=w)
            res["workers"].append({"gib": at, "workers": w, **r})
            print(f"  workers {w}: {r['phase']:6.1f} s, B={r['buckets']}, tree PSS {fmt_bytes(r['tree_pss'])}", flush=True)
        print(f"shuffle time against the memory budget ({at:g} GiB, {cores} workers):")
        for mem in memories:
            r = timed_shuffle(srcs[:k], f"{root}/out", memory=mem, workers=cores)
            res["memory"].append({"gib": at, "memory": mem, **r})
            print(f"  memory {fmt_bytes(mem):>9}: {r['phase']:6.1f} s, B={r['buckets']}, largest process "
                  f"{fmt_bytes(r['max_rss'])} ({r['max_rss'] / mem:.2f} x budget), tree PSS {fmt_bytes(r['tree_pss'])}",
                  flush=True)
        for s in srcs:
            shutil.rmtree(s)
        print(f"reader throughput ({fmt_bytes(read_rows * ROW_X)} of x, batches of 4096, best of {1 if args.quick else 3}):")
        res["reader"] = read_throughput(root, read_rows, chunks, threads, repeat=1 if args.quick else 3)
        img = args.img or (os.path.join(root, "img") if args.quick else IMG)
        made = plots(res, img)
        print("plots: " + ", ".join(made))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        print(f"machine: {load_note()} at end")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

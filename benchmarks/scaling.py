"""Scaling: shuffle time per GiB from 1 GiB to past this machine's RAM, the peers at the largest size, and (with
--sweeps) shuffle time against workers and memory budget and reader throughput against threads and chunk size.

    .venv/bin/python benchmarks/scaling.py                   # 1, 2, 4, ... GiB up to 1.2 x RAM, then the peers there
    .venv/bin/python benchmarks/scaling.py --max-gib 4       # 1, 2, 4 GiB (peers at 4 GiB)
    .venv/bin/python benchmarks/scaling.py --quick           # 1/16..1/4 GiB, the peers and the sweeps, small

Data: the benchmarks/common.synth_docs generator (documents of 256 rows, bfloat16, d_model 768, doc_id and row_id)
written in 1 GiB pieces (1/16 GiB in --quick); a size of k pieces is the shuffle of the first k pieces given as k
sources, so every size shuffles the same rows. Sizes count whole rows (x and columns, 1552 B). Before writing
anything the script checks the free disk for the largest size (source + scratch + output + the peers' copies
+ a margin) and refuses, saying what it needs, when it is short.

Each shuffle runs in its own process (benchmarks/common.run_measured) with the shuffle's defaults (memory 2 GiB
per task, every core, scratch next to the output): wall time per GiB; the largest process's peak RSS against
--memory; the bytes the process tree read from and wrote to the disk (wait4's block counts: O_DIRECT and
page-cache misses, not hits) and the disk device's own counters (/sys/dev/block, which also see any other
work on the machine); and the cost model's prediction for that run (shuffler/shuffling/costmodel.py: this
machine as one node, rates and disk calibrated first by benchmarks/costmodel.calibrate, or --rates FILE).
At the largest size, the peers of benchmarks/peers.py run under guards (benchmarks/scaling_peers.py).
A plot goes to docs/img/scaling-past-ram.png when matplotlib is installed (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

from benchmarks.common import GiB, MiB, disk_counters, fmt_bytes, load_note, run_measured, write_synth  # noqa: E402

D_MODEL = 768
DTYPE = "bfloat16"
ROW_BYTES = D_MODEL * 2 + 16  # x, doc_id, row_id
IMG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "img")
TARGET = 1.15
"""Time per GiB at the largest size within 1.15x of the 1 GiB figure (issue 17)."""

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


def make_pieces(work: str, first: int, n: int, piece_rows: int) -> list[str]:
    urls = []
    for k in range(first, n):
        url = f"{work}/piece-{k:03d}"
        write_synth(url, piece_rows, D_MODEL, dtype=DTYPE, seed=1234 + k)
        urls.append(url)
    return urls


def timed_shuffle(srcs: list[str], dst: str, *, memory: int, workers: int) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    arg = json.dumps({"src": srcs, "dst": dst, "memory": memory, "workers": workers})
    env = dict(os.environ, SHUFFLER_NO_PROGRESS="1",
               PYTHONPATH=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))
    before = disk_counters(os.path.dirname(dst))
    m = run_measured([sys.executable, "-c", CHILD, arg], env=env, timeout=6 * 3600)
    after = disk_counters(os.path.dirname(dst))
    shutil.rmtree(dst, ignore_errors=True)
    dev = [b - a for a, b in zip(before, after, strict=True)] if before and after else [None, None]
    return {"wall": m.wall, **m.result, "max_rss": m.max_rss, "tree_pss": m.tree_pss, "procs": m.procs,
            "read_bytes": m.read_bytes, "write_bytes": m.write_bytes, "dev_read": dev[0], "dev_write": dev[1]}


def predict(srcs: list[str], dst: str, *, memory: int, workers: int, rates, disk: float, cores: int, ram: int) -> dict:
    """The cost model's estimate for this shuffle on this machine (one node)."""
    from shuffler.shuffling.costmodel import Cluster, estimate
    from shuffler.shuffling.run import ShuffleConfig, open_sources, plan_for

    plan = plan_for(open_sources(srcs), ShuffleConfig(seed=1, memory=memory), workers=workers,
                    scratch_url=f"{dst}/.shuffle/scratch", dst_url=dst)
    est = estimate(plan, Cluster(nodes=1, cores=cores, memory=ram, disk=disk), rates=rates)
    return {"pred": est.wall_s, "pred_bounds": "/".join(p.bound for p in est.passes), "plan_peak": plan.peak_task_bytes}


def read_throughput(work: str, rows: int, chunk_mib: list[int], threads: list[int], repeat: int) -> list[dict]:
    from readers import ActivationStream

    out = []
    for cm in chunk_mib:
        url = f"{work}/read-{cm}"
        write_synth(url, rows, D_MODEL, dtype=DTYPE, chunk_bytes=cm * MiB)
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
            out.append({"chunk_mib": cm, "threads": t, "seconds": best, "gbps": rows * ROW_BYTES / best / 1e9})
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
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    g = [r["gib"] for r in s]
    ax.plot(g, [r["per_gib"] for r in s], "o-", label="shuffle, s per GiB")
    ax.plot(g, [r["pred"] / r["gib"] for r in s], "x--", label="cost model, s per GiB")
    ax.axvline(res["ram"] / GiB, color="gray", ls=":", label="RAM")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"data size, GiB of rows ({DTYPE}, d_model {D_MODEL})")
    ax.set_ylabel("seconds per GiB")
    ax.set_ylim(0, None)
    ax.set_title("Shuffle time per GiB, past RAM")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(g, [r["max_rss"] / GiB for r in s], "s:", color="C2", label="largest process, GiB (right)")
    ax2.axhline(res["memory_budget"] / GiB, color="C2", ls="-.", alpha=0.5, label="--memory (right)")
    ax2.set_ylim(0, None)
    ax2.set_ylabel("GiB")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    save(fig, "scaling-past-ram.png")
    if not res["workers"]:
        return made

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


def plan_disk(top: float, ratio: float, peers: bool) -> int:
    """Free bytes the run needs at its largest size `top` GiB, 5% + 2 GiB to spare: our shuffle holds the
    sources, the scratch (a fast negative level: about raw) and the output; the peers then hold the sources and
    numpy's output (numpy past 80% of RAM fails before it writes), or the sources and the Parquet copy, and
    then, the sources deleted, the Parquet copy, Ray's output and 5 GiB (Ray stops spilling there)."""
    raw, stored = top * GiB, top * GiB / ratio
    ours = stored + raw + stored
    numpy_out = raw if raw < 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") else 0
    theirs = max(stored + numpy_out, 2 * stored, 2 * stored + 5 * GiB) if peers else 0.0
    return int(1.05 * max(ours, theirs) + 2 * GiB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1/16..1/4 GiB, the peers and the sweeps; plots to a temporary folder")
    ap.add_argument("--max-gib", type=float, default=None, help="largest size, GiB of rows [default: 1.2 x RAM, rounded up]")
    ap.add_argument("--memory", default="2GiB", help="--memory of every shuffle of the size sweep")
    ap.add_argument("--no-peers", action="store_true", help="skip numpy and Ray at the largest size")
    ap.add_argument("--ray-timeout", type=float, default=3600, help="seconds Ray may take at the largest size")
    ap.add_argument("--rates", default=None, help="rates JSON (benchmarks/costmodel.py --save-rates) instead of calibrating")
    ap.add_argument("--disk-bw", type=float, default=None, help="disk bytes/s for the model, with --rates")
    ap.add_argument("--sweeps", action="store_true", help="also workers, memory and reader sweeps at --at-gib")
    ap.add_argument("--at-gib", type=float, default=1.0, help="data size for the workers and memory sweeps")
    ap.add_argument("--memories", default="448MiB,512MiB,1GiB,2GiB", help="memory budgets per task to sweep")
    ap.add_argument("--chunks", default="1,4,8,32", help="reader chunk sizes, MiB")
    ap.add_argument("--threads", default="1,2,4", help="reader thread counts")
    ap.add_argument("--read-mib", type=int, default=1024, help="reader dataset size, MiB of x")
    ap.add_argument("--img", default=None, help="folder for the PNGs (default docs/img; --quick: the work folder)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary folder); deleted at the end")
    ap.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    args = ap.parse_args()
    from shuffler.shuffling.costmodel import Rates
    from shuffler.shuffling.plan import usable_cores
    from shuffler.units import parse_size

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cores = usable_cores()
    memory = parse_size(args.memory, what="memory")
    piece = 1 / 16 if args.quick else 1.0
    top = 0.25 if args.quick else (args.max_gib or math.ceil(1.2 * ram / GiB))
    sizes, g = [], piece
    while g < top - 1e-9:
        sizes.append(g)
        g *= 2
    sizes.append(top)
    sweeps = args.sweeps or args.quick
    at = 0.25 if args.quick else args.at_gib
    piece_rows = int(piece * GiB) // ROW_BYTES
    n_pieces = math.ceil(max(top, at if sweeps else 0) / piece - 1e-9)
    root = tempfile.mkdtemp(prefix="bench-scaling-", dir=args.dir)
    res: dict = {"size": [], "peers": [], "workers": [], "memory": [], "reader": [], "ram": ram, "cores": cores,
                 "memory_budget": memory}
    try:
        print(f"machine: {load_note()} at start; RAM {fmt_bytes(ram)}; sizes {', '.join(f'{s:g}' for s in sizes)} GiB "
              f"of rows ({D_MODEL} {DTYPE} + doc_id, row_id); largest {top / (ram / GiB):.2f} x RAM", flush=True)
        t = time.perf_counter()
        srcs = make_pieces(root, 0, 1, piece_rows)
        first_s = time.perf_counter() - t
        from shuffler import Dataset

        ratio = piece_rows * ROW_BYTES / Dataset.open(srcs[0]).manifest.stored_bytes
        need, free = plan_disk(top, ratio, not args.no_peers), shutil.disk_usage(root).free
        print(f"disk: {fmt_bytes(free)} free at {root}; the largest size needs about {fmt_bytes(need)} (sources stored "
              f"at {ratio:.2f}x, scratch about raw, output{'' if args.no_peers else '; then the peers: Parquet copy, Ray output, 5 GiB'}"
              " + 5% + 2 GiB)", flush=True)
        if need > free:
            raise SystemExit(f"refused: {top:g} GiB needs about {fmt_bytes(need)} free on {root}'s disk, it has "
                             f"{fmt_bytes(free)}. Free space, give --dir on a larger disk, a smaller --max-gib, or "
                             "--no-peers.")
        srcs += make_pieces(root, 1, n_pieces, piece_rows)
        print(f"data: {n_pieces} pieces of {piece_rows:,} rows ({fmt_bytes(piece_rows * ROW_BYTES)} each) in "
              f"{first_s + time.perf_counter() - t:.0f} s", flush=True)
        if args.rates:
            with open(args.rates) as f:
                rates, disk = Rates.from_json(f.read(), where=args.rates), args.disk_bw or 1e9
        else:
            from benchmarks.costmodel import calibrate

            t = time.perf_counter()
            rates, disk, cal = calibrate(os.path.join(root, "cal"))
            shutil.rmtree(os.path.join(root, "cal"), ignore_errors=True)
            print(f"model: calibrated in {time.perf_counter() - t:.0f} s (benchmarks/costmodel.calibrate): disk "
                  f"{disk / 1e6:.0f} MB/s", flush=True)
        print(f"shuffle against size (memory {fmt_bytes(memory)} per task, {cores} workers):")
        print(f"  {'GiB':>6} {'rows':>12} {'B':>4} {'wall s':>8} {'s/GiB':>6} {'x 1GiB':>6} {'pass1':>6} {'pass2':>6} "
              f"{'largest':>9} {'/mem':>5} {'tree PSS':>9} {'read':>9} {'written':>9} {'disk r/w':>19} "
              f"{'model s':>8} {'pred/meas':>9}", flush=True)
        for gib in sizes:
            k = math.ceil(gib / piece - 1e-9)
            dst = f"{root}/out"
            p = predict(srcs[:k], dst, memory=memory, workers=cores, rates=rates, disk=disk, cores=cores, ram=ram)
            r = timed_shuffle(srcs[:k], dst, memory=memory, workers=cores)
            r.update(p, gib=k * piece, rows=k * piece_rows, per_gib=r["phase"] / (k * piece))
            res["size"].append(r)
            base = res["size"][0]["per_gib"] if res["size"][0]["gib"] >= 1 or args.quick else None
            dev = ("n/a" if r["dev_read"] is None else f"{fmt_bytes(r['dev_read'])}/{fmt_bytes(r['dev_write'])}")
            print(f"  {r['gib']:6.3g} {r['rows']:12,} {r['buckets']:4} {r['phase']:8.1f} {r['per_gib']:6.2f} "
                  f"{r['per_gib'] / base if base else float('nan'):6.2f} {r['pass1']:6.1f} {r['pass2']:6.1f} "
                  f"{fmt_bytes(r['max_rss']):>9} {r['max_rss'] / memory:5.2f} {fmt_bytes(r['tree_pss']):>9} "
                  f"{fmt_bytes(r['read_bytes']):>9} {fmt_bytes(r['write_bytes']):>9} {dev:>19} {r['pred']:8.1f} "
                  f"{r['pred'] / r['phase']:9.2f}", flush=True)
        last, first = res["size"][-1], res["size"][0]
        ratio_t = last["per_gib"] / first["per_gib"]
        print(f"result: {last['gib']:g} GiB ({last['gib'] * GiB / ram:.2f} x RAM) took {last['per_gib']:.2f} s/GiB, "
              f"{ratio_t:.2f} x the {first['gib']:g} GiB figure (target <= {TARGET}: {'met' if ratio_t <= TARGET else 'MISSED'}); "
              f"largest process {fmt_bytes(last['max_rss'])} against --memory {fmt_bytes(memory)} "
              f"({'under' if last['max_rss'] <= memory else 'OVER'}); model {last['pred']:.0f} s "
              f"({last['pred_bounds']}-bound) against {last['phase']:.0f} s measured", flush=True)
        if sweeps:
            sweep(res, srcs, root, args, at, piece, memory, cores)
        if not args.no_peers:
            from benchmarks.scaling_peers import run_peers

            k = math.ceil(top / piece - 1e-9)
            print(f"peers at {k * piece:g} GiB ({fmt_bytes(k * piece_rows * ROW_BYTES)} of rows):", flush=True)
            res["peers"] = run_peers(srcs[:k], root, seed=1, cores=cores, ram=ram,
                                     ray_timeout=120 if args.quick else args.ray_timeout)
        img = args.img or (os.path.join(root, "img") if args.quick else IMG)
        try:
            made = plots(res, img)
            print("plots: " + ", ".join(made))
        except ImportError:
            print("plots: none (matplotlib is not in this venv: pip install -e '.[bench]')")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        print(f"machine: {load_note()} at end")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sweep(res: dict, srcs: list[str], root: str, args, at: float, piece: float, memory: int, cores: int) -> None:
    """Workers, memory budget and reader sweeps at `at` GiB (--sweeps; always in --quick)."""
    from shuffler.units import parse_size

    memories = [parse_size(m, what="memory") for m in (("448MiB,2GiB" if args.quick else args.memories).split(","))]
    chunks = [1, 8] if args.quick else [int(c) for c in args.chunks.split(",")]
    threads = [1, 2] if args.quick else [int(t) for t in args.threads.split(",")]
    read_rows = (128 if args.quick else args.read_mib) * MiB // (D_MODEL * 2)
    k = math.ceil(at / piece - 1e-9)
    print(f"shuffle time against workers ({at:g} GiB, memory {fmt_bytes(memory)} per task):")
    for w in (1, 2):
        r = timed_shuffle(srcs[:k], f"{root}/out", memory=memory, workers=w)
        res["workers"].append({"gib": at, "workers": w, **r})
        print(f"  workers {w}: {r['phase']:6.1f} s, B={r['buckets']}, tree PSS {fmt_bytes(r['tree_pss'])}", flush=True)
    print(f"shuffle time against the memory budget ({at:g} GiB, {cores} workers):")
    for mem in memories:
        r = timed_shuffle(srcs[:k], f"{root}/out", memory=mem, workers=cores)
        res["memory"].append({"gib": at, "memory": mem, **r})
        print(f"  memory {fmt_bytes(mem):>9}: {r['phase']:6.1f} s, B={r['buckets']}, largest process "
              f"{fmt_bytes(r['max_rss'])} ({r['max_rss'] / mem:.2f} x budget), tree PSS {fmt_bytes(r['tree_pss'])}",
              flush=True)
    print(f"reader throughput ({fmt_bytes(read_rows * D_MODEL * 2)} of x, batches of 4096, best of {1 if args.quick else 3}):")
    res["reader"] = read_throughput(root, read_rows, chunks, threads, repeat=1 if args.quick else 3)


if __name__ == "__main__":
    main()

"""One task with every core (`--workers 1 --threads 2`) against one core per task (`--workers 2 --threads 1`).

`shuffler shuffle --threads N` gives one task N codec threads (decode, byte-split and zstd release the GIL), so
a node of 64 cores can run a few large tasks (large pieces, docs/scale.md) and still use every core. Target
(issue "Petabyte-ready", part 1): on this 2-core machine `--workers 1 --threads 2` within 10% of
`--workers 2 --threads 1`. Each configuration runs as its own `shuffler shuffle` process, round-robin, after one
warm-up run; printed: median wall time, CPU time (user + system of the process tree), and the ratios.

    python benchmarks/threads.py            # 768 MiB of float16 at d_model 768, 3 rounds
    python benchmarks/threads.py --quick    # 192 MiB, 2 rounds
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import load_note, synth_source, timed_rounds  # noqa: E402

CONFIGS = {  # name -> shuffle options
    "workers 1 threads 2": ["--workers", "1", "--threads", "2"],
    "workers 2 threads 1": ["--workers", "2", "--threads", "1"],
    "workers 2 threads 2": ["--workers", "2", "--threads", "2"],  # before --threads: 2 threads per task always
}


def run(src: str, dst: str, opts: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the child's whole tree) of one shuffle."""
    shutil.rmtree(dst, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "shuffler", "shuffle", src, dst, "--seed", "0", "--memory", "512MiB", *opts],
                   check=True, capture_output=True, env=dict(os.environ, SHUFFLER_NO_PROGRESS="1"))
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=768, help="uncompressed MiB of float16 activations")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="192 MiB, 2 rounds")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "bench-out", "threads"))
    args = ap.parse_args()
    mib, rounds = (192, 2) if args.quick else (args.mib, args.rounds)
    d_model = 768
    src, rows = synth_source(args.out, mib, d_model)
    print(f"{mib} MiB float16, d_model {d_model}, {rows:,} rows; {os.cpu_count()} cores; {load_note()}")
    dst = os.path.join(args.out, "dst")
    run(src, dst, CONFIGS["workers 1 threads 2"])  # warm the page cache
    med = timed_rounds(CONFIGS, rounds, lambda opts: run(src, dst, opts))
    one, two = med["workers 1 threads 2"], med["workers 2 threads 1"]
    ratio = one[0] / two[0]
    print(f"wall, workers 1 threads 2 / workers 2 threads 1: {ratio:.3f} (target <= 1.10); "
          f"cpu {one[1] / two[1]:.3f}; {load_note()}")
    shutil.rmtree(dst, ignore_errors=True)


if __name__ == "__main__":
    main()

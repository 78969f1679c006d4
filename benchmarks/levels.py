"""Two scatter levels as tasks of their own (`--levels 2`) against the serial recursion (`--levels 1 --buckets S`).

Both give the same bytes (docs/shuffle.md, "Two levels"): pass 1 scatters into the same S super-buckets, each
larger than a task; `--levels 1 --buckets S` then recurses over each oversize bucket inside its one reduce task,
while `--levels 2` runs every level-2 map task and every sub-bucket as a task of its own on the worker pool,
at the price of one more write and read of the data in scratch. This measures what that costs or saves on one
machine: each configuration runs as its own `shuffler shuffle --workers 2` process, round-robin, after one
warm-up run; the output shards of the two are checked byte-identical; printed: median wall time, CPU time (user +
system of the process tree) and the ratios two levels / one level. Two cases: the plan's S (at least as many
super-buckets as workers, so the serial recursion keeps both workers busy too), and S = 1 (`--buckets 1`: one
super-bucket, which the serial recursion works through in one reduce task on one worker).

    python benchmarks/levels.py             # 512 MiB of float16 at d_model 768, --memory 448MiB, 3 rounds
    python benchmarks/levels.py --quick     # 128 MiB, --memory 416MiB, 2 rounds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import load_note, synth_source, timed_rounds  # noqa: E402

ENV = dict(os.environ, SHUFFLER_NO_PROGRESS="1")


def shuffler(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "shuffler", *args], check=True, capture_output=True, text=True,
                          env=ENV).stdout


def run(src: str, dst: str, opts: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the child's whole tree) of one shuffle."""
    shutil.rmtree(dst, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "shuffler", "shuffle", src, dst, "--seed", "0", "--workers", "2", *opts],
                   check=True, capture_output=True, env=ENV)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def output_digest(dst: str) -> dict[str, str]:
    """sha256 of every shard of a finished output. (The manifests differ by design: each records its run's id and
    levels.)"""
    out = {}
    for name in sorted(os.listdir(dst)):
        path = os.path.join(dst, name)
        if name.endswith(".shard") and os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="uncompressed MiB of float16 activations (at most 1024)")
    ap.add_argument("--memory", default="448MiB", help="--memory of every task: small, so buckets exceed a task")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="128 MiB, --memory 416MiB, 2 rounds")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "bench-out", "levels"))
    args = ap.parse_args()
    mib, memory, rounds = (128, "416MiB", 2) if args.quick else (args.mib, args.memory, args.rounds)
    if mib > 1024:
        ap.error(f"--mib {mib}: at most 1024 (this benchmark is for small sizes; benchmarks/scaling.py goes large)")
    d_model = 768
    src, rows = synth_source(args.out, mib, d_model)
    plan = json.loads(shuffler("plan", src, "--memory", memory, "--levels", "2", "--workers", "2", "--json"))
    S = plan["buckets"]
    print(f"{mib} MiB float16, d_model {d_model}, {rows:,} rows, --memory {memory}: the plan's S = {S} super-buckets "
          f"of ~{rows // S:,} rows, ~{plan['sub_buckets']} sub-buckets each (capacity {plan['capacity_rows']:,} "
          f"rows); 2 workers; {load_note()}")
    # The plan's S, then S = 1: one super-bucket, which the serial recursion works through on one worker.
    for s, two in ((S, ["--levels", "2"]), (1, ["--levels", "2", "--buckets", "1"])):
        compare(src, os.path.join(args.out, "dst"), rounds, {  # the same memory: the same super-buckets and bytes
            f"--levels 1 --buckets {s}": ["--memory", memory, "--levels", "1", "--buckets", str(s)],
            " ".join(two): ["--memory", memory, *two],
        })
    shutil.rmtree(os.path.join(args.out, "dst"), ignore_errors=True)


def compare(src: str, dst: str, rounds: int, configs: dict[str, list[str]]) -> None:
    """Warm-up runs that check the two configurations' shards are the same bytes, then `rounds` rounds of each."""
    digests = {}
    for name, opts in configs.items():
        run(src, dst, opts)
        digests[name] = output_digest(dst)
    one_name, two_name = configs
    same = digests[one_name] == digests[two_name]
    print(f"{one_name} against {two_name}: output shards byte-identical: {same} ({len(digests[one_name])} shards)")
    if not same:
        raise SystemExit(f"{one_name} and {two_name} wrote different bytes: the two levels must be the serial "
                         "recursion's (docs/shuffle.md)")
    med = timed_rounds(configs, rounds, lambda opts: run(src, dst, opts), indent="  ")
    one, two = med[one_name], med[two_name]
    print(f"  {two_name} / {one_name}: wall {two[0] / one[0]:.3f}, cpu {two[1] / one[1]:.3f}; {load_note()}")


if __name__ == "__main__":
    main()

"""Where a shuffle's CPU goes, per pass and per kind of kernel work: `perf record -g` with kernel symbols over a
whole `shuffle` (coordinator and pool workers), its samples split by time into passes and by call stack into kinds.

    .venv/bin/python benchmarks/kernel_profile.py SRC [--workers 2]      # needs Linux `perf` (Debian: linux-perf)

SRC is an existing dataset (for issue 21's case: 1 GiB of float16, d_model 768, made with benchmarks/cpu.py
--dir or benchmarks/shuffle.py). Samples are cpu-clock at 1 kHz (hardware cycle counters are not offered on
this VM); each is one millisecond of one core's CPU. A sample in user space counts as "user"; a kernel sample is
classed by the kernel functions on its stack: write() into the page cache (copy_folio_from_iter_atomic), first
touch of anonymous memory (do_anonymous_page, clear_page: the fault and the zeroing), faults on memory-mapped
files, read() from the page cache, unmapping and madvise, and so on. docs/benchmarks.md ("Where the kernel's
time went") has the results before and after issue 21's changes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

KINDS = [  # (kind, kernel functions of which one on the stack puts a sample in it), first match wins
    ("write() into page cache", ("copy_folio_from_iter_atomic", "generic_perform_write")),
    ("mmap file faults", ("filemap_fault", "filemap_map_pages", "do_read_fault")),
    ("read() from page cache", ("filemap_read", "copy_page_to_iter")),
    ("anon first touch (fault + zeroing)", ("do_anonymous_page", "folio_zero_user", "clear_page",
                                            "do_huge_pmd_anonymous_page")),
    ("other page faults", ("exc_page_fault", "handle_mm_fault")),
    ("unmap / madvise", ("__x64_sys_madvise", "zap_page_range", "unmap_page_range", "__x64_sys_munmap", "exit_mmap")),
    ("unlink / truncate", ("__x64_sys_unlink", "evict", "truncate_inode")),
    ("O_DIRECT I/O and other fs", ("ext4", "iomap", "__x64_sys_write", "__x64_sys_pread", "__x64_sys_preadv")),
    ("process start / exit", ("execve", "clone", "do_exit", "fork")),
    ("scheduler / futex", ("futex", "schedule", "finish_task_switch")),
]

DRIVER = """
import json, sys, time
from shuffler.shuffling.run import shuffle
if __name__ == "__main__":
    st = {}
    off = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
    shuffle(sys.argv[1], sys.argv[2], seed=0, workers=int(sys.argv[3]), stats=st, progress=False)
    print(json.dumps({k: v - off for k, v in st.items() if k.startswith("pass")}))
"""


def kind_of(stack: list[tuple[str, bool]]) -> str:
    """stack: (function, is_kernel) from the sampled frame outwards."""
    if not stack or not stack[0][1]:
        return "user"
    names = " ".join(f for f, _ in stack)
    for kind, marks in KINDS:
        if any(m in names for m in marks):
            return kind
    return "other kernel"


def samples(script: str):
    """(time, stack) of each sample in `perf script -F time,ip,sym,dso` output."""
    cur = None
    for line in script.splitlines():
        m = re.match(r"^\s*(\d+\.\d+):\s*$", line)
        if m:
            cur = (float(m.group(1)), [])
        elif not line.strip():
            if cur is not None:
                yield cur
            cur = None
        elif cur is not None:
            f = line.split()
            if len(f) >= 2:
                cur[1].append((f[1].split("+")[0], "[kernel" in f[-1]))
    if cur is not None:
        yield cur


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hz", type=int, default=1000)
    ap.add_argument("--code", help="another checkout to profile (a before/after comparison); default: this one")
    args = ap.parse_args()
    if shutil.which("perf") is None:
        sys.exit("needs Linux perf (Debian: apt-get install linux-perf)")
    work = tempfile.mkdtemp(prefix="kprof-")
    try:
        data, driver = os.path.join(work, "perf.data"), os.path.join(work, "drive.py")
        with open(driver, "w") as f:
            f.write(DRIVER)
        env = dict(os.environ, PYTHONPATH=os.path.abspath(args.code or ROOT), SHUFFLER_NO_PROGRESS="1")
        t = time.perf_counter()
        out = subprocess.run(["perf", "record", "-F", str(args.hz), "-e", "cpu-clock", "-g", "-k", "CLOCK_MONOTONIC",
                              "-o", data, "--", sys.executable, driver, args.src, os.path.join(work, "dst"),
                              str(args.workers)], env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t
        bounds = json.loads(out.stdout.strip().splitlines()[-1])
        script = subprocess.run(["perf", "script", "-i", data, "-F", "time,ip,sym,dso"], capture_output=True,
                                text=True, check=True).stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
    count: collections.Counter = collections.Counter()
    for t, stack in samples(script):
        p = ("start" if t < bounds["pass1_start"] else "pass 1" if t < bounds["pass2_start"]
             else "pass 2" if t < bounds["pass2_end"] else "commit")
        count[(p, kind_of(stack))] += 1
    total = sum(count.values()) / args.hz
    kernel = sum(v for (_, k), v in count.items() if k != "user") / args.hz
    print(f"code: {os.path.abspath(args.code or ROOT)}")
    print(f"shuffle of {args.src}, {args.workers} workers: {total:.2f} CPU-s sampled ({kernel:.2f} s kernel, "
          f"{100 * kernel / max(total, 1e-9):.0f}%), wall {wall:.1f} s under perf; load {os.getloadavg()[0]:.1f}")
    for p in ("start", "pass 1", "pass 2", "commit"):
        rows = {k: v / args.hz for (pp, k), v in count.items() if pp == p}
        if rows:
            print(f"{p}: {sum(rows.values()):.2f} CPU-s")
            for k, v in sorted(rows.items(), key=lambda x: -x[1]):
                if v >= 0.01:
                    print(f"  {k:<38} {v:6.2f} s")


if __name__ == "__main__":
    main()

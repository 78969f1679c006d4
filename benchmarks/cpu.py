"""CPU per GiB (user and system) and minor page faults per GiB of the shuffle, the fused path, the writer and the
reader, beside an in-memory numpy permutation of the same rows, measured in one run (issue 21).

    .venv/bin/python benchmarks/cpu.py             # 1 GiB of float16 activations (d_model 768), 2 workers
    .venv/bin/python benchmarks/cpu.py --quick     # 128 MiB, for `make bench` (a smoke test: at that size
                                                   # process start and first touch dominate the per-GiB figures)

CPU time is steadier than wall time on a shared machine, so this prints CPU seconds and fault counts (wall is
printed too). Every step runs in its own process, started from here, so its numbers are its own:
- numpy: a process that loads the rows (.npy), permutes them in memory (Generator.permutation, one gather)
  and saves them (.npy): the in-memory bound of benchmarks/shuffle.py, whole process, as /usr/bin/time sees it;
- shuffle: `shuffler shuffle SRC DST --seed 0 --workers W`, the whole process tree (coordinator and pool
  workers, interpreter start included), as /usr/bin/time -v measured it for the issue;
- writer: ShardWriter writing the rows (already in memory) to local disk: the process's own CPU and faults
  from the first write() to close(), i.e. without loading the rows;
- reader: ActivationStream reading the shuffled dataset in batches of 4,096 rows (all columns), likewise;
- fused: ShardWriter(scatter=...) then ActivationStream(permute_buckets=True), the fused path of
  benchmarks/fused.py, likewise.
Per GiB means per GiB of activations (rows x d_model x 2 B). It also prints the SHA-256 of the shuffle's
output shards (name order), so a change that must keep the output bytes can be checked with it.
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
import tempfile
import time

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

GiB = 1 << 30


def usage() -> tuple[float, float, int]:
    """(user s, system s, minor faults) of this process so far, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def measured(fn) -> dict:
    """Run fn() and return this process's CPU and faults over it (fn's threads included)."""
    u0, s0, f0 = usage()
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    u1, s1, f1 = usage()
    return {"wall": wall, "user": u1 - u0, "sys": s1 - s0, "faults": f1 - f0}


# ---------------------------------------------------------------------------------------------------
# The steps, each run as `cpu.py --step NAME --dir DIR ...` in its own process


def load(base: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(os.path.join(base, "acts.npy")), np.load(os.path.join(base, "doc.npy"))


def step_numpy(base: str, _args) -> None:
    acts = np.load(os.path.join(base, "acts.npy"))
    perm = np.random.default_rng(0).permutation(len(acts))
    np.save(os.path.join(base, "numpy-out.npy"), acts[perm])


def step_writer(base: str, _args) -> dict:
    acts, doc = load(base)
    return measured(lambda: write(os.path.join(base, "src"), acts, doc, None))


def write(url: str, acts: np.ndarray, doc: np.ndarray, scatter) -> None:
    from writers import ShardWriter

    block = 8192
    with ShardWriter(url, d_model=acts.shape[1], dtype="float16", scatter=scatter) as w:
        for s in range(0, len(acts), block):
            e = min(len(acts), s + block)
            w.write(acts[s:e], token_id=np.zeros(e - s, np.int32), doc_id=doc[s:e],
                    position=(np.arange(s, e) % 256).astype(np.int32))


def read_all(url: str, **options) -> None:
    from readers import ActivationStream

    rows = 0
    for b in ActivationStream(url, batch_size=4096, columns=("doc_id", "position"), **options):
        rows += len(b.acts)
    assert rows > 0


def step_reader(base: str, _args) -> dict:
    return measured(lambda: read_all(os.path.join(base, "dst")))


def step_fused(base: str, args) -> dict:
    from shuffler.io.dataset import Dataset
    from shuffler.shuffling.on_write import ScatterSpec
    from shuffler.units import parse_size

    acts, doc = load(base)
    memory = parse_size(args.memory)
    spec = ScatterSpec.sized(seed=0, rows=len(acts), schema=Dataset.open(os.path.join(base, "src")).schema,
                             memory=memory)
    url = os.path.join(base, "scattered")

    def run() -> None:
        write(url, acts, doc, spec)
        read_all(url, permute_buckets=True, memory=memory)

    return measured(run)


STEPS = {"numpy": step_numpy, "writer": step_writer, "reader": step_reader, "fused": step_fused}


# ---------------------------------------------------------------------------------------------------
# The driver


def child(args, step: str, cmd: list[str] | None = None) -> dict:
    """Run one step in a new process; its whole-process rusage (from wait4), or what the step measured itself."""
    cmd = cmd or [sys.executable, os.path.abspath(__file__), "--step", step, "--dir", args.dir, "--memory", args.memory]
    if args.code and cmd[1] == os.path.abspath(__file__):
        cmd += ["--code", args.code]
    code = os.path.abspath(args.code) if args.code else ROOT
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([code, ROOT, os.environ.get("PYTHONPATH", "")]),
               SHUFFLER_NO_PROGRESS="1")
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=code)  # not ROOT: `-m shuffler` imports from cwd first
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if status:
        raise RuntimeError(f"step {step} failed ({status}): {' '.join(cmd)}")
    lines = [x for x in out.decode().splitlines() if x.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return {"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "faults": ru.ru_minflt}


def make_rows(base: str, rows: int, d_model: int) -> None:
    """The rows once, as .npy files every step loads: documents of 256 rows in order (benchmarks/common.py)."""
    from benchmarks.common import synth_docs

    acts = np.lib.format.open_memmap(os.path.join(base, "acts.npy"), mode="w+", dtype=np.float16, shape=(rows, d_model))
    doc = np.empty(rows, np.int64)
    for s in range(0, rows, 65536):
        e = min(rows, s + 65536)
        x, d = synth_docs(e - s, d_model, start=s)
        acts[s:e] = x
        doc[s:e] = d
    acts.flush()
    del acts
    np.save(os.path.join(base, "doc.npy"), doc)


def tree_hash(path: str) -> str:
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(path) if n.endswith(".shard")):
        with open(os.path.join(path, name), "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB instead of 1 GiB")
    ap.add_argument("--mib", type=int, help="MiB of float16 activations")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory", default="2GiB", help="the shuffle's per-task budget (and the fused reader's)")
    ap.add_argument("--dir", help="working folder (default: a temporary one, deleted at the end)")
    ap.add_argument("--code", help="another checkout whose shuffler/writers/readers the steps run (a before/after "
                                   "comparison); default: this one")
    ap.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        if args.code:
            sys.path.insert(0, os.path.abspath(args.code))
        r = STEPS[args.step](args.dir, args)
        if r is not None:
            print(json.dumps(r))
        return
    mib = args.mib or (128 if args.quick else 1024)
    rows = mib * (1 << 20) // (args.d_model * 2)
    gib = rows * args.d_model * 2 / GiB
    own = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="bench-cpu-")
    os.makedirs(args.dir, exist_ok=True)
    try:
        make_rows(args.dir, rows, args.d_model)
        print(f"code: {os.path.abspath(args.code) if args.code else ROOT}")
        print(f"data: {rows:,} rows x {args.d_model} float16 ({gib:.2f} GiB of activations) + token_id, doc_id, "
              f"position; shuffle --workers {args.workers} --memory {args.memory}; load {os.getloadavg()[0]:.1f}")
        results = {"numpy": child(args, "numpy"), "writer": child(args, "writer")}
        shutil.rmtree(os.path.join(args.dir, "dst"), ignore_errors=True)
        results["shuffle"] = child(args, "shuffle", [sys.executable, "-m", "shuffler", "shuffle", os.path.join(args.dir, "src"),
                                                      os.path.join(args.dir, "dst"), "--seed", "0", "--workers",
                                                      str(args.workers), "--memory", args.memory])
        results["reader"] = child(args, "reader")
        results["fused"] = child(args, "fused")
        print(f"{'step':<8} {'wall s':>7} {'user/GiB':>9} {'sys/GiB':>8} {'CPU/GiB':>8} {'sys %':>6} {'faults/GiB':>11} "
              f"{'CPU/numpy':>9}")
        base_cpu = (results["numpy"]["user"] + results["numpy"]["sys"]) / gib
        for name in ("numpy", "shuffle", "fused", "writer", "reader"):
            r = results[name]
            cpu = (r["user"] + r["sys"]) / gib
            print(f"{name:<8} {r['wall']:7.2f} {r['user'] / gib:9.2f} {r['sys'] / gib:8.2f} {cpu:8.2f} "
                  f"{100 * r['sys'] / max(r['user'] + r['sys'], 1e-9):6.1f} {r['faults'] / gib:11,.0f} {cpu / base_cpu:9.2f}")
        print(f"shuffle output sha256 {tree_hash(os.path.join(args.dir, 'dst'))}; load {os.getloadavg()[0]:.1f}")
    finally:
        if own:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()

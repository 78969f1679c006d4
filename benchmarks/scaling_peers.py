"""The peers of benchmarks/peers.py at one size, guarded so that a size past RAM cannot take the machine down.

    from benchmarks.scaling_peers import run_peers
    rows = run_peers(srcs, work, seed=1, cores=2, ram=ram, ray_timeout=1800)   # called by benchmarks/scaling.py

- numpy (the in-memory bound, as peers.py runs it: load everything, rng.permutation, gather, save .npy) in its
  own process under RLIMIT_AS = 80% of RAM, so past RAM it fails with MemoryError instead of waking the
  kernel's OOM killer. It reads our datasets straight into one array (no .npy copy on disk first).
- ray: Ray Data read_parquet -> random_shuffle(seed) -> write_parquet (zstd 1), as peers.py runs it, on a local
  Ray (loopback only), with its object spilling folder on the work disk (sampled for its peak size, deleted
  after) and a time limit: past it the driver is killed and its process tree ended by PID
  (benchmarks/common.run_measured). Ray's own memory monitor kills workers near 95% of RAM, and it stops
  spilling when the disk is 95% full (its OutOfDiskError).

Each prints one line: time, the largest process, the process tree's peak PSS, bytes read and written (the
tree's, from wait4, which misses Ray's workers: the raylet starts them and they are not reaped through the
driver; and the work disk's, which see everything on the machine), spill, or the error it ended with.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

from benchmarks.common import GiB, MiB, disk_counters, fmt_bytes, run_measured  # noqa: E402

PIECE_BYTES = 64 * MiB  # Parquet piece size, as benchmarks/peers.py
NUMPY_LIMIT = 0.8
"""numpy's RLIMIT_AS as a fraction of RAM: below it, so an allocation past it fails in numpy, not in the kernel."""


def _numpy_child(srcs: list[str], out: str, seed: int, limit: int) -> dict:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from shuffler import Dataset

    t0 = time.perf_counter()
    dss = [Dataset.open(u) for u in srcs]
    n, d = sum(ds.num_rows for ds in dss), dss[0].d_model
    x = np.empty((n, d), dtype=dss[0].schema.storage_dtype)  # past the limit: MemoryError here
    rid = np.empty(n, np.int64)
    s = 0
    for ds in dss:
        for _, _, b in ds.iter_chunks():
            k = len(b)
            x[s : s + k], rid[s : s + k] = b.acts, b.columns["row_id"]
            s += k
    perm = np.random.default_rng(seed).permutation(n)
    os.makedirs(out)
    np.save(f"{out}/x.npy", x[perm])
    np.save(f"{out}/row_id.npy", rid[perm])
    return {"phase": time.perf_counter() - t0}


def _ray_child(parquet: str, out: str, seed: int, cores: int, raytmp: str, spill: str, full: float) -> dict:
    import ray

    t0 = time.perf_counter()
    # Spilling stops (OutOfDiskError) when the disk is `full` used: run_peers leaves room for the output.
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             _temp_dir=raytmp, _system_config={"local_fs_capacity_threshold": full, "object_spilling_config":
                                               json.dumps({"type": "filesystem", "params": {"directory_path": spill}})})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ray.data.read_parquet(parquet).random_shuffle(seed=seed).write_parquet(out, compression="zstd",
                                                                         compression_level=1)
    phase = time.perf_counter() - t0
    ray.shutdown()
    return {"phase": phase}


def write_parquet(srcs: list[str], folder: str) -> int:
    """Our datasets as Parquet pieces of about 64 MiB (x as fixed_size_binary, as benchmarks/peers.py); bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shuffler import Dataset

    os.makedirs(folder)
    k, parts, rows = 0, [], 0

    def flush():
        nonlocal k, parts, rows
        x = np.concatenate([p[0] for p in parts])
        rid = np.concatenate([p[1] for p in parts])
        width = x.shape[1] * x.itemsize
        xb = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(x), [None, pa.py_buffer(np.ascontiguousarray(x))])
        pq.write_table(pa.table({"x": xb, "row_id": rid}), f"{folder}/part-{k:05d}.parquet", compression="zstd",
                       compression_level=1, row_group_size=len(x))
        k, parts, rows = k + 1, [], 0

    for u in srcs:
        ds = Dataset.open(u)
        for _, _, b in ds.iter_chunks():
            parts.append((b.acts, b.columns["row_id"]))
            rows += len(b)
            if rows * ds.schema.row_bytes >= PIECE_BYTES:
                flush()
    if parts:
        flush()
    return sum(os.path.getsize(f) for f in glob.glob(f"{folder}/*.parquet"))


def _du(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def _measure(args: list[str], *, timeout: float, where: str, watch: str | None = None) -> dict:
    """Run this module as a child with `args`; its time, memory, I/O and outcome (never raises)."""
    env = dict(os.environ, SHUFFLER_NO_PROGRESS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled", RAY_enable_metrics_collection="0",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    peak = {"spill": 0}
    stop = threading.Event()

    def sample():
        while not stop.wait(2.0):
            peak["spill"] = max(peak["spill"], _du(watch))

    th = threading.Thread(target=sample, daemon=True) if watch else None
    if th:
        th.start()
    before = disk_counters(where)  # the work disk's counters: they see Ray's workers, which wait4's do not
    m = run_measured([sys.executable, os.path.abspath(__file__), *args], env=env, timeout=timeout, check=False)
    after = disk_counters(where)
    dev = [b - a for a, b in zip(before, after, strict=True)] if before and after else [None, None]
    if th:
        stop.set()
        th.join()
        peak["spill"] = max(peak["spill"], _du(watch))
    timed_out = m.wall > timeout
    err = "" if m.returncode == 0 else (f"killed at the {timeout:.0f} s limit" if timed_out else _last_error(m.stderr))
    return {"ok": m.returncode == 0, "error": err, "wall": m.wall, "max_rss": m.max_rss, "tree_pss": m.tree_pss,
            "read_bytes": m.read_bytes, "write_bytes": m.write_bytes, "dev_read": dev[0], "dev_write": dev[1],
            "spill": peak["spill"], **m.result}


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs[-1] if errs else lines[-1] if lines else "no message")[:300]


def run_peers(srcs: list[str], work: str, *, seed: int, cores: int, ram: int, ray_timeout: float,
              numpy_timeout: float = 3600) -> list[dict]:
    """Run numpy, then Ray, on the rows of `srcs`; deletes what each wrote (and the Parquet copy) after it, and
    `srcs` once the Parquet copy is written (so the disk holds one copy of the input while Ray runs)."""
    out = []
    limit = int(NUMPY_LIMIT * ram)
    r = _measure(["numpy", json.dumps({"srcs": srcs, "out": f"{work}/np-out", "seed": seed, "limit": limit})],
                 timeout=numpy_timeout, where=work)
    shutil.rmtree(f"{work}/np-out", ignore_errors=True)
    out.append({"tool": "numpy", "limit": limit, **r})
    _print(out[-1])
    t = time.perf_counter()
    parquet_bytes = write_parquet(srcs, f"{work}/parquet")
    for u in srcs:
        shutil.rmtree(u, ignore_errors=True)
    disk = shutil.disk_usage(work)
    keep = parquet_bytes + 5 * GiB  # room for Ray's output and the machine
    full = min(0.95, max(0.05, (disk.total - keep) / disk.total))
    print(f"  (Parquet input for Ray: {fmt_bytes(parquet_bytes)} in {time.perf_counter() - t:.0f} s, not timed; "
          f"sources deleted; Ray may spill until the disk is {full:.0%} full, "
          f"{fmt_bytes(full * disk.total - (disk.total - disk.free))} from now)", flush=True)
    raytmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    spill = f"{work}/ray-spill"
    os.makedirs(spill)
    try:
        r = _measure(["ray", json.dumps({"parquet": f"{work}/parquet", "out": f"{work}/ray-out", "seed": seed,
                                         "cores": cores, "raytmp": raytmp, "spill": spill, "full": full})],
                     timeout=ray_timeout, where=work, watch=spill)
    finally:
        for p in (f"{work}/ray-out", f"{work}/parquet", spill, raytmp):
            shutil.rmtree(p, ignore_errors=True)
    out.append({"tool": "ray", "limit": ray_timeout, "parquet_bytes": parquet_bytes, **r})
    _print(out[-1])
    return out


def _dev(r: dict) -> str:
    return "n/a" if r["dev_read"] is None else f"read {fmt_bytes(r['dev_read'])}, wrote {fmt_bytes(r['dev_write'])}"


def _print(r: dict) -> None:
    what = (f"{r['tool']:<6} {'done' if r['ok'] else 'FAILED'} in {r['wall']:.1f} s; largest process "
            f"{fmt_bytes(r['max_rss'])}, tree PSS {fmt_bytes(r['tree_pss'])}; read {fmt_bytes(r['read_bytes'])}, "
            f"wrote {fmt_bytes(r['write_bytes'])} (the disk: {_dev(r)})")
    if r["tool"] == "numpy":
        what += f"; RLIMIT_AS {fmt_bytes(r['limit'])}"
    else:
        what += f"; spill peak {fmt_bytes(r['spill'])} on disk; time limit {r['limit']:.0f} s"
    if not r["ok"]:
        what += f": {r['error']}"
    print("  " + what, flush=True)


if __name__ == "__main__":
    tool, a = sys.argv[1], json.loads(sys.argv[2])
    if tool == "numpy":
        res = _numpy_child(a["srcs"], a["out"], a["seed"], a["limit"])
    else:
        res = _ray_child(a["parquet"], a["out"], a["seed"], a["cores"], a["raytmp"], a["spill"], a["full"])
    print(json.dumps(res))

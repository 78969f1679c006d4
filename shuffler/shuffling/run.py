"""`shuffler.shuffle`: the two-pass external shuffle, run locally on a process pool, resumable and locked.

    shuffle("data/raw", "data/shuffled", seed=0, memory="4GiB")

Layout under DST while a run is in progress (docs/shuffle.md, "Resume and safety"):

    .shuffle/lock                 who runs now (first writer wins: Storage.put_if_absent)
    .shuffle/run.json             what this run is: seed, sources and their fingerprints, plan; a re-run must match
    .shuffle/reduce/b-000012.json bucket 12 committed: its output shards and fingerprint
    .shuffle/scratch/run-<id>/    default scratch: map-000003.shard (intermediate) + map-000003.idx (its commit)
    shard-000012-0000.shard       output shards, bucket by bucket
    manifest.json                 written last: until it exists there is no dataset here

Where the tasks run is shuffler/shuffling/executor.py (process pool or Ray); the state and markers are
shuffler/shuffling/markers.py; array-job stages (plan, scatter, permute, finalize as separate commands) are
shuffler/shuffling/array_job.py. This module holds the configuration, the lock and one run's orchestration.

Every task commits with a marker written after its objects, so a re-run after kill -9 skips committed tasks;
tasks are deterministic, so redoing a half-done one rewrites the same bytes and the output is identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shuffler.errors import FormatError, SchemaError
from shuffler.format.manifest import Fingerprint, Manifest, ShardInfo, write_manifest
from shuffler.io.chunks import ChunkTable, storage
from shuffler.io.dataset import Dataset
from shuffler.io.rolling import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES
from shuffler.keys import stream_key
from shuffler.progress import Progress
from shuffler.shuffling.executor import (
    EXECUTORS,
    LocalExecutor,
    _die,
    _faults,
    _map_worker,
    _reduce_worker,
    make_executor,
)
from shuffler.shuffling.map import MapOutput, MapTask
from shuffler.shuffling.markers import (  # noqa: F401  (REDUCE_DONE, reduce_marker: re-exported, tests and tools use them from here)
    DEFAULT_SCRATCH,
    LOCK,
    REDUCE_DONE,
    RUN,
    STATE,
    committed_reduces,
    crc,
    read_reduce_marker,
    reduce_marker,
)
from shuffler.shuffling.plan import (
    DEFAULT_MEMORY,
    ENCODE_THREADS,
    Plan,
    PlanRequest,
    make_plan,
    read_batch_bytes,
)
from shuffler.shuffling.reduce import Intermediates, ReduceTask
from shuffler.shuffling.runstate import RunState
from shuffler.storage.storage import Storage
from shuffler.units import parse_size

_Pool = LocalExecutor  # the name from_scatter.py and older code use
_crc, _read_marker = crc, read_reduce_marker


class ShuffleLockedError(RuntimeError):
    """Another shuffle is writing into the same DST right now."""


@dataclass(frozen=True, kw_only=True)
class ShuffleConfig:
    """Options of one shuffle. Only seed, buckets/memory and the output layout change the output bytes."""

    seed: int
    """Seeds every random draw; the same seed and inputs give byte-identical output."""
    memory: int = DEFAULT_MEMORY
    """Memory budget per task (per worker process), bytes; sizes the buckets."""
    buckets: int | None = None
    """Bucket count; None sizes it from memory (docs/shuffle.md)."""
    workers: int | None = None
    """Worker processes; None uses every core. Never changes the output."""
    scratch: str | None = None
    """URL for intermediates (may be another filesystem than DST); None: DST/.shuffle/scratch."""
    scratch_level: int | None = None
    """zstd level of intermediates; None picks from where scratch lives (local -3, object store 1)."""
    keep_intermediate: bool = False
    """Leave the intermediates in scratch after success."""
    overwrite: bool = False
    """Replace a dataset, or discard another run's unfinished state, found at DST."""
    break_lock: bool = False
    """Take DST's lock even if it looks held (only when its holder is known dead on another machine)."""
    level: int = 1
    """zstd level of the output shards."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Uncompressed bytes per chunk of output and intermediates."""
    shard_bytes: int = DEFAULT_SHARD_BYTES
    """Uncompressed bytes per output shard (each bucket starts a new shard)."""
    map_rows: int | None = None
    """Rows per map task; None splits the input for the workers. Never changes the output."""
    executor: str = "local"
    """Where tasks run: "local" (this process or a process pool) or "ray" (Ray tasks). Never changes the output."""
    ray_address: str | None = None
    """Ray cluster to join with executor="ray" (None: the one this process joined, RAY_ADDRESS, or a new local one)."""

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor={self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError(f"ray_address={self.ray_address!r} needs executor='ray', not {self.executor!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2^64)")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1")


def shuffle(
    src: str | Sequence[str],
    dst: str,
    *,
    seed: int,
    memory: int | str | None = None,
    buckets: int | None = None,
    workers: int | None = None,
    scratch: str | None = None,
    scratch_level: int | None = None,
    keep_intermediate: bool = False,
    overwrite: bool = False,
    break_lock: bool = False,
    level: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    map_rows: int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    progress: bool | None = None,
    stats: dict | None = None,
) -> Manifest:
    """Write a uniformly shuffled copy of the rows of `src` (one URL or several, concatenated) to `dst`.

    Returns the output manifest. Options are those of ShuffleConfig; `memory` also takes "8GiB".
    `progress` forces the progress bars on or off (default: on when stderr is a terminal). `stats`, if
    given, is filled with the plan, the worker count and each pass's start and end (time.time()).
    """
    cfg = ShuffleConfig(
        seed=seed, memory=parse_size(memory, what="memory") if memory is not None else DEFAULT_MEMORY, buckets=buckets,
        workers=workers, scratch=scratch, scratch_level=scratch_level, keep_intermediate=keep_intermediate,
        overwrite=overwrite, break_lock=break_lock, level=level, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes,
        map_rows=map_rows, executor=executor, ray_address=ray_address,
    )
    run = _Run([src] if isinstance(src, str) else list(src), dst, cfg, progress)
    try:
        return run.execute()
    finally:
        if stats is not None:
            stats.update(run.stats)


def open_sources(srcs: Sequence[str]) -> list[Dataset]:
    """Open every SRC and check they agree on dtype, d_model and columns."""
    if not srcs:
        raise ValueError("no SRC dataset given")
    datasets = [Dataset.open(u) for u in srcs]
    for ds in datasets[1:]:
        if ds.schema != datasets[0].schema:
            raise SchemaError(
                f"{ds.url} cannot be shuffled with {datasets[0].url}: "
                f"{ds.schema.describe_difference(datasets[0].schema)}"
            )
    return datasets


def canonical_url(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def plan_for(datasets: list[Dataset], cfg: ShuffleConfig, *, workers: int, scratch_url: str, dst_url: str) -> Plan:
    return make_plan(PlanRequest(
        rows=sum(d.num_rows for d in datasets), schema=datasets[0].schema, memory=cfg.memory, buckets=cfg.buckets,
        workers=workers, stored_bytes=sum(d.manifest.stored_bytes for d in datasets),
        scratch_remote=not Storage(scratch_url).is_local, dst_remote=not Storage(dst_url).is_local,
        scratch_level=cfg.scratch_level, level=cfg.level, chunk_bytes=cfg.chunk_bytes, shard_bytes=cfg.shard_bytes,
        map_rows=cfg.map_rows,
    ))


# ---------------------------------------------------------------------------------------------------
# The lock


def _proc_start(pid: int) -> str | None:
    """Start time (clock ticks since boot) of a live process; None if it is gone or a zombie, or no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _holder_dead(other: dict) -> bool:
    """True only when the holder ran on this machine and that process is gone (or its pid was reused)."""
    if other.get("host") != socket.gethostname() or not isinstance(other.get("pid"), int):
        return False
    pid = other["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    if not os.path.exists("/proc/self/stat"):
        return False  # no /proc: a live pid is all we can tell
    return _proc_start(pid) != other.get("pid_start")  # zombie (killed, not yet reaped) or pid reused


class _Lock:
    def __init__(self, store: Storage, break_lock: bool):
        self.store, self.break_lock, self.token = store, break_lock, uuid.uuid4().hex

    def acquire(self) -> None:
        me = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
              "pid_start": _proc_start(os.getpid()), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(100):
            if self.store.put_if_absent(LOCK, json.dumps(me).encode()):
                return
            other = self._read(LOCK)
            if other is None:
                continue  # released meanwhile
            if self.break_lock or _holder_dead(other):
                # The holder was killed (kill -9 leaves its lock behind). Of several runs that find it dead at
                # once, only the one that creates lock.broken-<its token> deletes it; a plain check-then-delete
                # would let a slower run delete the lock the faster one has just taken.
                mark = f"{LOCK}.broken-{str(other.get('token'))[:64]}"
                if self.store.put_if_absent(mark, json.dumps(me).encode()):
                    self.store.delete(LOCK)
                    continue
                breaker = self._read(mark)
                if breaker is not None and _holder_dead(breaker):
                    self.store.delete(mark)  # the breaker died mid-break; let the next try break again
                time.sleep(0.02)
                continue
            raise ShuffleLockedError(
                f"{self.store.url}: another shuffle is writing here (lock {self.store.url_of(LOCK)}: host "
                f"{other.get('host')!r}, pid {other.get('pid')}, started {other.get('started')}); wait for it to "
                "finish. If that process is dead on another machine, re-run with --break-lock"
            )
        raise ShuffleLockedError(f"{self.store.url}: could not take {LOCK}: other shuffles keep racing for it")

    def _read(self, name: str) -> dict | None:
        """A lock-like JSON object; None if absent, {} if unreadable (a holder we know nothing about)."""
        try:
            v = json.loads(self.store.read(name))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return v if isinstance(v, dict) else {}

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(self.store.read(LOCK)).get("token") == self.token:
                self.store.delete(LOCK)


# ---------------------------------------------------------------------------------------------------
# One run


class _Run(RunState):
    def __init__(self, srcs: list[str], dst: str, cfg: ShuffleConfig, progress: bool | None):
        self.cfg, self.progress = cfg, progress
        self.datasets = open_sources(srcs)
        self.dst = Storage(dst)
        for ds in self.datasets:
            if canonical_url(ds.url) == canonical_url(self.dst.url):
                raise ValueError(f"DST {dst} is also a SRC: the shuffle writes a new dataset, never in place")
        self.schema = self.datasets[0].schema
        self.scratch_base = cfg.scratch.rstrip("/") if cfg.scratch else self.dst.url_of(DEFAULT_SCRATCH)
        cpus = os.cpu_count() or 1
        self.workers = cfg.workers or cpus
        self.plan = plan_for(self.datasets, cfg, workers=self.workers, scratch_url=self.scratch_base, dst_url=dst)
        self.identity = {
            "format": 1,
            "seed": cfg.seed,
            "sources": [
                {"url": canonical_url(d.url), "rows": d.num_rows, "fingerprint": d.manifest.fingerprint.to_json()}
                for d in self.datasets
            ],
            "schema": self.schema.to_json(),
            "buckets": self.plan.buckets,
            "capacity_rows": self.plan.capacity_rows,
            "chunk_bytes": cfg.chunk_bytes,
            "shard_bytes": cfg.shard_bytes,
            "level": cfg.level,
        }
        blob = json.dumps(self.identity, sort_keys=True).encode()
        self.run_id = hashlib.sha256(blob).hexdigest()[:16]
        self.scratch = f"{self.scratch_base}/run-{self.run_id}"
        urls = [self.dst.url, self.scratch] + [d.url for d in self.datasets]
        self.in_process = self.workers == 1 or any(u.startswith("memory://") for u in urls)
        if cfg.executor == "ray":
            if any(u.startswith("memory://") for u in urls):
                raise ValueError(f"executor='ray' cannot reach memory:// URLs ({', '.join(urls)}): Ray workers are "
                                 "other processes; use local paths or object storage")
            self.in_process = False
        self.faults = _faults()
        self.only: Callable[[int], bool] | None = None
        """Array-job stages (stages.py) run only the map and reduce tasks this selects; None runs all."""
        self.stats: dict = {"plan": self.plan.to_json(), "workers": self.workers, "in_process": self.in_process}

    # -- the whole run ---------------------------------------------------------------------------------
    def execute(self) -> Manifest:
        lock = _Lock(self.dst, self.cfg.break_lock)
        lock.acquire()
        try:
            if self.faults.get("pause-after-lock"):
                time.sleep(self.faults["pause-after-lock"])
            finished = self._check_dst()
            if finished is not None:
                self._cleanup()
                return finished
            map_rows = self._start_or_resume()
            with self._executor() as pool:
                self.stats["pass1_start"] = time.time()
                maps = self._pass1(pool, map_rows)
                self.stats["pass2_start"] = time.time()
                try:
                    results = self._pass2(pool, maps)
                except FormatError as e:
                    raise self._uncommit_damaged(e) from None
                self.stats["pass2_end"] = time.time()
            return self._commit(results)
        finally:
            lock.release()
            self._remove_empty_dirs()

    def _commit(self, results: list[tuple[list[ShardInfo], Fingerprint]]) -> Manifest:
        """Check every bucket's rows against the sources, write the manifest (last), clean up."""
        shards = [s for r in results for s in r[0]]
        fp = sum((r[1] for r in results), Fingerprint())
        expected = sum((d.manifest.fingerprint for d in self.datasets), Fingerprint())
        if fp != expected:
            raise RuntimeError(
                f"{self.dst.url}: shuffled rows fingerprint {fp} differs from the sources' {expected}; "
                "nothing was committed (re-run with --overwrite; report this as a bug)"
            )
        meta = {
            "producer": "shuffler shuffle",
            "shuffle": {
                "run_id": self.run_id, "seed": self.cfg.seed, "buckets": self.plan.buckets,
                "capacity_rows": self.plan.capacity_rows, "sources": self.identity["sources"],
            },
            "source_metadata": [d.metadata for d in self.datasets],
        }
        manifest = Manifest(schema=self.schema, shards=tuple(shards), fingerprint=fp, metadata=meta)
        write_manifest(self.dst, manifest)  # the dataset exists from here on, and not before
        self._cleanup()
        return manifest

    def _executor(self):
        return make_executor(self.cfg.executor, workers=self.workers, in_process=self.in_process,
                             ray_address=self.cfg.ray_address)

    # -- pass 1 ----------------------------------------------------------------------------------------
    def _pass1(self, pool: _Pool, map_rows: int) -> list[MapOutput]:
        table = ChunkTable.of_datasets(self.datasets)
        n, B = table.rows, self.plan.buckets
        store = storage(self.scratch)
        names = set(store.list(""))
        done: dict[int, MapOutput] = {}
        for name in names:
            if name.startswith("map-") and name.endswith(".idx") and name[:-4] + ".shard" in names:
                try:
                    out = MapOutput.from_bytes(store.read(name), where=store.url_of(name), buckets=B)
                except FormatError:
                    continue  # a damaged commit marker commits nothing: the task is redone below
                done[out.index] = out
        key = stream_key(self.cfg.seed)
        calls = []
        for m, lo in enumerate(range(0, n, map_rows)):
            hi = min(n, lo + map_rows)
            if m in done and done[m].rows == hi - lo:
                continue
            done.pop(m, None)
            if self.only is not None and not self.only(m):
                continue
            sel, skip = table.select(lo, hi)
            calls.append((MapTask(
                index=m, table=sel, skip=skip, rows=hi - lo, row_start=lo, key=key, buckets=B, scratch=self.scratch,
                level=self.plan.scratch_level, chunk_bytes=self.cfg.chunk_bytes, threads=ENCODE_THREADS,
                batch_bytes=read_batch_bytes(self.cfg.chunk_bytes),
            ),))
        kill = int(self.faults.get("kill-after-map", 0))
        with Progress("pass 1/2 scatter", n, enabled=self.progress) as bar:
            bar.update(sum(o.rows for o in done.values()))
            outs = pool.run(_map_worker, calls, bar, lambda k: _die() if kill and k >= kill else None)
        for o in outs:
            done[o.index] = o
        return [done[m] for m in sorted(done)]

    # -- pass 2 ----------------------------------------------------------------------------------------
    def _intermediates(self, maps: list[MapOutput]) -> Intermediates:
        """Where each bucket's chunks are: pass 1's objects (shuffler/shuffling/from_scatter.py reads producers' instead)."""
        return Intermediates(self.schema, self.scratch, maps, self.plan.buckets)

    def _pass2(self, pool: _Pool, maps: list[MapOutput]) -> list[tuple[list[ShardInfo], Fingerprint]]:
        B = self.plan.buckets
        results = committed_reduces(self.dst, B)
        todo = [b for b in range(B) if b not in results and (self.only is None or self.only(b))]
        calls = []
        if todo:
            inter = self._intermediates(maps)
            kill_in = int(self.faults.get("kill-in-reduce", 0))
            for i, b in enumerate(todo):
                calls.append((ReduceTask(
                    path=(b,), table=inter.table(b), seed=self.cfg.seed, capacity_rows=self.plan.capacity_rows,
                    dst=self.dst.url, chunk_bytes=self.cfg.chunk_bytes, shard_bytes=self.cfg.shard_bytes,
                    level=self.cfg.level, scratch=self.scratch, scratch_level=self.plan.scratch_level,
                    threads=ENCODE_THREADS, batch_bytes=read_batch_bytes(self.cfg.chunk_bytes),
                ), self.dst.url, kill_in if i == 0 else 0))
        kill = int(self.faults.get("kill-after-reduce", 0))
        with Progress("pass 2/2 permute", self.plan.rows, enabled=self.progress) as bar:
            bar.update(sum(s.rows for r in results.values() for s in r[0]))
            outs = pool.run(_reduce_worker, calls, bar, lambda k: _die() if kill and k >= kill else None)
        for (task, *_), out in zip(calls, outs, strict=True):
            results[task.path[0]] = out
        return [results[b] for b in range(B) if b in results]  # all B of them, unless self.only chose some

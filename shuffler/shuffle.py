"""`shuffler.shuffle`: the two-pass external shuffle, run locally on a process pool, resumable and locked.

    shuffle("data/raw", "data/shuffled", seed=0, memory="4GiB")

Layout under DST while a run is in progress (docs/shuffle.md, "Resume and safety"):

    .shuffle/lock                 who runs now (first writer wins: Storage.put_if_absent)
    .shuffle/run.json             what this run is: seed, sources and their fingerprints, plan; a re-run must match
    .shuffle/reduce/b-000012.json bucket 12 committed: its output shards and fingerprint
    .shuffle/scratch/run-<id>/    default scratch: map-000003.shard (intermediate) + map-000003.idx (its commit)
    shard-000012-0000.shard       output shards, bucket by bucket
    manifest.json                 written last: until it exists there is no dataset here

Every task commits with a marker written after its objects, so a re-run after kill -9 skips committed tasks;
tasks are deterministic, so redoing a half-done one rewrites the same bytes and the output is identical.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import multiprocessing
import os
import queue
import re
import signal
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from . import env
from .dataset import Dataset
from .errors import FormatError, SchemaError
from .manifest import MANIFEST, Fingerprint, Manifest, ShardInfo, read_manifest, write_manifest
from .permute import Intermediates, ReduceTask, run_reduce
from .plan import DEFAULT_MEMORY, ENCODE_THREADS, Plan, PlanRequest, make_plan, read_batch_bytes
from .progress import Progress
from .rolling import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES
from .scatter import ChunkTable, MapOutput, MapTask, release_buffers, run_map, storage, stream_key
from .storage import Storage

STATE = ".shuffle"
LOCK = f"{STATE}/lock"
RUN = f"{STATE}/run.json"
REDUCE_DONE = f"{STATE}/reduce"
DEFAULT_SCRATCH = f"{STATE}/scratch"


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

    def __post_init__(self) -> None:
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
    progress: bool | None = None,
    stats: dict | None = None,
) -> Manifest:
    """Write a uniformly shuffled copy of the rows of `src` (one URL or several, concatenated) to `dst`.

    Returns the output manifest. Options are those of ShuffleConfig; `memory` also takes "8GiB".
    `progress` forces the progress bars on or off (default: on when stderr is a terminal). `stats`, if
    given, is filled with the plan, the worker count and each pass's start and end (time.time()).
    """
    cfg = ShuffleConfig(
        seed=seed, memory=_size(memory) if memory is not None else DEFAULT_MEMORY, buckets=buckets,
        workers=workers, scratch=scratch, scratch_level=scratch_level, keep_intermediate=keep_intermediate,
        overwrite=overwrite, break_lock=break_lock, level=level, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes,
        map_rows=map_rows,
    )
    run = _Run([src] if isinstance(src, str) else list(src), dst, cfg, progress)
    try:
        return run.execute()
    finally:
        if stats is not None:
            stats.update(run.stats)


def _size(v: int | str) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    import click

    from .cli import parse_size

    try:
        return parse_size(v, what="memory")
    except click.BadParameter as e:
        raise ValueError(e.message) from None


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
# Fault injection for the resume tests (env.shuffle_fault)


def _faults() -> dict[str, float]:
    out = {}
    for part in filter(None, env.shuffle_fault().split(",")):
        k, _, v = part.partition("=")
        out[k.strip()] = float(v)
    return out


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------
# Running tasks: in this process, or on a pool of spawned processes


_report: Callable[[int, int], None] | None = None


def _init_worker(q, parent: int) -> None:
    global _report
    _report = lambda rows, nbytes: q.put((rows, nbytes))  # noqa: E731
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the coordinator, which stops the pool
    # A coordinator killed with SIGKILL cannot stop its pool, and workers left running would go on writing
    # intermediates after a re-run has cleaned up. Linux kills us with our parent (PR_SET_PDEATHSIG);
    # elsewhere a watcher exits once we are reparented. Either way the re-run redoes our task.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(70)  # the parent died before the line above took effect

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _map_worker(task: MapTask) -> MapOutput:
    return run_map(task, _report)


def _reduce_worker(task: ReduceTask, state_url: str, kill_in: int) -> tuple[list[ShardInfo], Fingerprint]:
    hook = (lambda k: _die() if k >= kill_in else None) if kill_in else None
    shards, fp = run_reduce(task, _report, hook)
    marker = {"bucket": list(task.path), "shards": [s.__dict__ for s in shards], "fingerprint": fp.to_json()}
    marker["crc"] = _crc(marker)
    storage(state_url).write(reduce_marker(task.path[0]), json.dumps(marker).encode())  # the commit, last
    return shards, fp


def _crc(obj: dict) -> int:
    return zlib.crc32(json.dumps({k: v for k, v in obj.items() if k != "crc"}, sort_keys=True).encode())


def _read_marker(data: bytes, b: int) -> tuple[list[ShardInfo], Fingerprint] | None:
    """Bucket b's commit marker, or None if it is damaged (then the bucket is redone, rewriting the same bytes)."""
    try:
        m = json.loads(data)
        if m["crc"] != _crc(m) or m["bucket"] != [b]:
            return None
        return [ShardInfo(**s) for s in m["shards"]], Fingerprint.from_json(m["fingerprint"], where="marker")
    except (ValueError, TypeError, KeyError, FormatError):
        return None


def reduce_marker(b: int) -> str:
    return f"{REDUCE_DONE}/b-{b:06d}.json"


class _Pool:
    """Runs tasks in this process (workers == 1, or memory:// URLs that other processes cannot see) or on
    a pool of spawned processes; the first task error stops the rest and is re-raised."""

    def __init__(self, workers: int, in_process: bool):
        self.workers, self.in_process = workers, in_process
        self.executor: ProcessPoolExecutor | None = None
        self.queue = None

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def _start(self) -> ProcessPoolExecutor:
        if self.executor is None:
            # spawn, not fork: the coordinator may hold s3fs/aiohttp threads, which do not survive fork.
            ctx = multiprocessing.get_context("spawn")
            self.queue = ctx.Queue()
            self.executor = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=(self.queue, os.getpid()))
        return self.executor

    def run(self, fn, calls: list[tuple], bar: Progress, on_done: Callable[[int], None]) -> list:
        """fn(*call) for every call; on_done(count_done) after each commit. Results in call order."""
        global _report
        if self.in_process or len(calls) <= 1 and self.executor is None:
            _report = bar.update
            try:
                out = []
                for args in calls:
                    out.append(fn(*args))
                    on_done(len(out))
                return out
            finally:
                _report = None
                release_buffers()  # the coordinator keeps no bucket-sized buffer while workers run
        ex = self._start()
        futures = [ex.submit(fn, *args) for args in calls]
        pending, done_count = set(futures), 0
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                self._drain(bar)
                for f in done:
                    f.result()  # the first error stops here and is re-raised
                    done_count += 1
                    on_done(done_count)
        except BrokenProcessPool:
            raise RuntimeError(
                "a worker process died (killed, or out of memory): lower --memory or --workers, then re-run the "
                "same command to resume"
            ) from None
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        self._drain(bar)
        return [f.result() for f in futures]

    def _drain(self, bar: Progress) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                bar.update(*self.queue.get_nowait())


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


class _Run:
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
        self.faults = _faults()
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
            with _Pool(self.workers, self.in_process) as pool:
                self.stats["pass1_start"] = time.time()
                maps = self._pass1(pool, map_rows)
                self.stats["pass2_start"] = time.time()
                try:
                    results = self._pass2(pool, maps)
                except FormatError as e:
                    raise self._uncommit_damaged(e) from None
                self.stats["pass2_end"] = time.time()
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
        finally:
            lock.release()
            self._remove_empty_dirs()

    def _uncommit_damaged(self, e: FormatError) -> FormatError:
        """An intermediate found damaged in pass 2 loses its commit marker, so the next run redoes its map task
        (without this, every re-run would stop at the same damaged chunk)."""
        m = re.search(re.escape(self.scratch) + r"/(map-\d+)\.shard", str(e))
        if m is None:
            return e
        storage(self.scratch).delete(m.group(1) + ".idx")
        return type(e)(f"{e}; that intermediate is now uncommitted: re-run the same command to redo it and finish")

    def _check_dst(self) -> Manifest | None:
        """A finished run of this very shuffle returns its manifest; anything else at DST is refused or cleared."""
        if self.dst.exists(MANIFEST):
            try:
                old = read_manifest(self.dst)
            except (FormatError, SchemaError):
                old = None
            if old is not None and old.metadata.get("shuffle", {}).get("run_id") == self.run_id:
                return old
            if not self.cfg.overwrite:
                raise FileExistsError(
                    f"{self.dst.url} already holds a dataset ({MANIFEST}) that is not this shuffle's output; "
                    "pass --overwrite to replace it"
                )
            self.dst.delete(MANIFEST)  # first: from here on DST is no dataset, never a half-replaced one
            for s in old.shards if old is not None else ():
                self.dst.delete(s.name)
            self._clear_state()
        if self.dst.exists(RUN):
            other = self._read_state()
            if other.get("identity") != self.identity:
                if not self.cfg.overwrite:
                    raise FileExistsError(
                        f"{self.dst.url} holds the unfinished state of another shuffle "
                        f"({_difference(other.get('identity') or {}, self.identity)}); re-run that command to "
                        "finish it, or pass --overwrite to discard it"
                    )
                self._clear_state(other)
        return None

    def _read_state(self) -> dict:
        """run.json, or {} if it is damaged (then it is no run's state: refused, or cleared by --overwrite)."""
        try:
            state = json.loads(self.dst.read(RUN))
        except (ValueError, FileNotFoundError):
            return {}
        return state if isinstance(state, dict) else {}

    def _clear_state(self, other: dict | None = None) -> None:
        if other is None and self.dst.exists(RUN):
            other = self._read_state()
        scratch = other.get("scratch") if other else None
        if isinstance(scratch, str) and scratch != self.scratch and re.search(r"/run-[0-9a-f]{16}$", scratch):
            # Only objects an intermediate can be named: run.json is data at DST, and must not be able to
            # make --overwrite delete anything else wherever it points.
            store = storage(scratch)
            for name in store.list(""):
                if re.fullmatch(r"(sub-[0-9.]+/)*map-\d+\.(shard|idx)(\.tmp-[0-9a-f]+)?", name):
                    store.delete(name)
        for name in self.dst.list(""):
            if name.startswith("shard-") or (name.startswith(STATE + "/") and name != LOCK):
                self.dst.delete(name)

    def _start_or_resume(self) -> int:
        """Write run.json for a new run; for a resumed one keep its map split (it fixes the intermediates)."""
        if self.dst.exists(RUN):
            map_rows = self._read_state().get("map_rows")
            # A damaged value only changes the split, and the split never changes the output.
            return map_rows if isinstance(map_rows, int) and map_rows >= 1 else self.plan.map_rows
        state = {"identity": self.identity, "run_id": self.run_id, "map_rows": self.plan.map_rows,
                 "scratch": self.scratch}
        self.dst.write(RUN, json.dumps(state, indent=1).encode())
        return self.plan.map_rows

    def _cleanup(self) -> None:
        if not self.cfg.keep_intermediate:
            storage(self.scratch).delete_prefix("")
        for name in self.dst.list(""):
            if (name.startswith("shard-") or name.startswith(MANIFEST + ".")) and ".tmp-" in name:
                self.dst.delete(name)  # left by a task killed mid-write; we hold the lock, so none is live
            elif name.startswith(STATE + "/") and name != LOCK:
                if not (self.cfg.keep_intermediate and name.startswith(DEFAULT_SCRATCH + "/")):
                    self.dst.delete(name)
        if not self.cfg.keep_intermediate:
            self.dst.delete_prefix(DEFAULT_SCRATCH)

    def _remove_empty_dirs(self) -> None:
        """Local disk keeps empty folders where objects were; remove the state folder's, if empty."""
        if not self.dst.is_local:
            return
        base = self.dst.path(STATE)
        for dirpath, _, _ in sorted(os.walk(base), key=lambda t: -len(t[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)  # fails, harmlessly, while anything (a lock, a marker) is inside

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
        """Where each bucket's chunks are: pass 1's objects (shuffler/from_scatter.py reads producers' instead)."""
        return Intermediates(self.schema, self.scratch, maps, self.plan.buckets)

    def _pass2(self, pool: _Pool, maps: list[MapOutput]) -> list[tuple[list[ShardInfo], Fingerprint]]:
        B = self.plan.buckets
        present = set(self.dst.list(""))
        results: dict[int, tuple[list[ShardInfo], Fingerprint]] = {}
        for name in present:
            if name.startswith(REDUCE_DONE + "/b-") and name.endswith(".json") and name[len(REDUCE_DONE) + 3 : -5].isdigit():
                b = int(name[len(REDUCE_DONE) + 3 : -5])
                got = _read_marker(self.dst.read(name), b)
                if got is not None and b < B and all(s.name in present for s in got[0]):
                    results[b] = got
        todo = [b for b in range(B) if b not in results]
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
        return [results[b] for b in range(B)]


def _difference(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    parts = [f"{k}: {json.dumps(a.get(k))[:120]} there, {json.dumps(b.get(k))[:120]} now" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(parts) or "no recorded identity"



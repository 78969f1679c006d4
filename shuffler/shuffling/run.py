"""`shuffler.shuffle`: the two-pass external shuffle, run locally on a process pool or on Ray, resumable and locked.

    shuffle("data/raw", "data/shuffled", seed=0, memory="4GiB")

Under DST while a run is in progress: its state in .shuffle/ (lock, run.json, commit markers, default scratch:
shuffler/shuffling/markers.py, docs/shuffle.md "Resume and safety"), output shards bucket by bucket, and
manifest.json, written last: until it exists there is no dataset here.

This module holds the options (ShuffleConfig) and `Run`, one run's steps: check_dst and start_or_resume
(what is at DST decides whether a run starts, resumes, returns a finished result or is refused), map (pass
1), reduce (pass 2; with two levels shuffler/shuffling/second_level.py), commit (manifest last), cleanup.
`Run.execute` is the one-machine run; the array-job stages (array_job.py) call the same steps one stage at a
time; `--from-scatter` (from_scatter.py) is a Run whose intermediates come from a ScatteredDataset. Tasks run
on executor.py's process pool or Ray; the lock is lock.py.

Every task commits with a marker written after its objects, so a re-run after kill -9 skips committed tasks;
tasks are deterministic, so redoing a half-done one rewrites the same bytes and the output is identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shuffler.errors import FormatError, SchemaError
from shuffler.format.manifest import MANIFEST, Fingerprint, Manifest, ShardInfo, read_manifest, write_manifest
from shuffler.io.chunks import ChunkTable, storage
from shuffler.io.dataset import Dataset
from shuffler.io.rolling import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES
from shuffler.keys import stream_key
from shuffler.progress import Progress
from shuffler.shuffling import second_level
from shuffler.shuffling.executor import EXECUTORS, die, faults, make_executor, map_worker, reduce_worker
from shuffler.shuffling.lock import Lock, ShuffleLockedError  # noqa: F401  (ShuffleLockedError: re-exported, tests use it from here)
from shuffler.shuffling.map import MapOutput, MapTask, committed_maps
from shuffler.shuffling.markers import (  # noqa: F401  (re-exported: tests and tools use them)
    DEFAULT_SCRATCH,
    LOCK,
    REDUCE_DONE,
    RUN,
    STATE,
    committed_reduces,
    reduce_marker,
)
from shuffler.shuffling.plan import (
    DEFAULT_MEMORY,
    LEVELS,
    Plan,
    PlanRequest,
    make_plan,
    read_batch_bytes,
    usable_cores,
)
from shuffler.shuffling.reduce import Intermediates, ReduceTask
from shuffler.storage.storage import Storage, split_prefixes, with_prefixes
from shuffler.units import parse_size

if TYPE_CHECKING:
    from shuffler.shuffling.on_write import ScatteredDataset

#: Chooses the map tasks or buckets (by number) a step runs; the array-job stages pass one, None runs all.
Selector = Callable[[int], bool]


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
    """Worker processes; None uses every core this process may run on. Never changes the output."""
    threads: int | None = None
    """Codec threads per task (decode, byte-split, zstd: they release the GIL); None fills the cores: cores / workers, rounded up. Never changes the output."""
    scratch: str | None = None
    """URL for intermediates (may be another filesystem than DST); None: DST/.shuffle/scratch."""
    scratch_level: int | None = None
    """zstd level of intermediates; None picks from where scratch lives (local -3, object store 1)."""
    scratch_prefixes: int | None = None
    """Hashed prefixes the intermediates spread over, for S3's request rate per prefix (docs/scale.md); None: the
    plan's (1 on local disk, one per 64 tasks on an object store). Never changes the output."""
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
    levels: str = "1"
    """Scatter levels: 1, 2 (scatter into super-buckets, then each super-bucket is scattered again by its own
    parallel tasks, and --buckets counts super-buckets), or auto (2 when one level's pieces would fall below
    8 MiB and --buckets is not given). Changes the output."""

    def __post_init__(self) -> None:
        # memory also takes a size such as "4GiB" (None: the default), kept as bytes from here on.
        memory = DEFAULT_MEMORY if self.memory is None else parse_size(self.memory, what="memory")
        object.__setattr__(self, "memory", memory)
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor={self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError(f"ray_address={self.ray_address!r} needs executor='ray', not {self.executor!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2^64)")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1")
        object.__setattr__(self, "levels", str(self.levels))  # 2 and "2" alike
        if self.levels not in LEVELS:
            raise ValueError(f"levels={self.levels!r} must be one of {', '.join(LEVELS)}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads={self.threads!r} must be an integer >= 1 (codec threads per task)")


#: The options shuffle() takes: every ShuffleConfig field, defined once there.
OPTIONS = tuple(f.name for f in dataclasses.fields(ShuffleConfig))


def check_options(what: str, options: Iterable[str], allowed: Sequence[str]) -> None:
    """TypeError naming any option of `what` (a function) that is not one of `allowed`."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{what} got unknown option(s) {', '.join(unknown)}; the options are {', '.join(allowed)}")


def shuffle(
    src: str | Sequence[str], dst: str, *, progress: bool | None = None, stats: dict | None = None, **options
) -> Manifest:
    """Write a uniformly shuffled copy of the rows of `src` (one URL or several, concatenated) to `dst`.

    Returns the output manifest. `options` are the fields of ShuffleConfig (`seed` is required); `memory`
    also takes "8GiB". `progress` forces the progress bars on or off (default: on when stderr is a terminal).
    `stats`, if given, is filled with the plan, the worker count and each pass's start and end (time.time()),
    and on Ray with `task_nodes`: {"pass1": [...], "pass2": [...]}, the Ray node id each task ran on.
    """
    check_options("shuffle()", options, OPTIONS)
    run = Run([src] if isinstance(src, str) else list(src), dst, ShuffleConfig(**options), progress=progress)
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
    for ds in datasets:
        ds.manifest.fingerprint.require_current(ds.url)  # the end-of-run check compares against it
    for ds in datasets[1:]:
        if ds.schema != datasets[0].schema:
            raise SchemaError(
                f"{ds.url} cannot be shuffled with {datasets[0].url}: "
                f"{ds.schema.describe_difference(datasets[0].schema)}"
            )
    return datasets


def canonical_url(url: str) -> str:
    """One spelling per location: a local path (or file:// URL) resolved to its real absolute path."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    return url if "://" in url else os.path.realpath(url)


def threads_for(cfg: ShuffleConfig, workers: int) -> int:
    """Codec threads per task: cfg.threads, or this process's cores (a SLURM job's) over its workers, rounded up."""
    return cfg.threads or -(-usable_cores() // workers)


def plan_for(datasets: list[Dataset], cfg: ShuffleConfig, *, workers: int, scratch_url: str, dst_url: str) -> Plan:
    return make_plan(PlanRequest(
        rows=sum(d.num_rows for d in datasets), schema=datasets[0].schema, memory=cfg.memory, buckets=cfg.buckets,
        workers=workers, threads=threads_for(cfg, workers), stored_bytes=sum(d.manifest.stored_bytes for d in datasets),
        scratch_remote=not Storage(scratch_url).is_local, dst_remote=not Storage(dst_url).is_local,
        scratch_level=cfg.scratch_level, level=cfg.level, chunk_bytes=cfg.chunk_bytes, shard_bytes=cfg.shard_bytes,
        map_rows=cfg.map_rows, levels=cfg.levels, scratch_prefixes=cfg.scratch_prefixes,
    ))


class Run:
    """One shuffle of `srcs` into `dst`: its identity (what a re-run must match), its plan, and its steps.

    `scattered`: the sources were written scattered (shuffler/shuffling/on_write.py), so pass 1's output
    already exists: map() does nothing, reduce() reads each bucket's chunks from the producers' runs, the
    identity records the scatter spec (a two-pass shuffle of the same data is another run), and a damaged run
    is named, never uncommitted (it is the producers' data, not an intermediate to redo).
    """

    def __init__(self, srcs: Sequence[str], dst: str, cfg: ShuffleConfig, *, progress: bool | None = None,
                 scattered: ScatteredDataset | None = None):
        self.cfg, self.progress, self.scattered = cfg, progress, scattered
        self.datasets = open_sources(srcs)
        self.dst = Storage(dst)
        for ds in self.datasets:
            if canonical_url(ds.url) == canonical_url(self.dst.url):
                raise ValueError(f"DST {dst} is also a SRC: the shuffle writes a new dataset, never in place")
        self.schema = self.datasets[0].schema
        self.scratch_base = cfg.scratch.rstrip("/") if cfg.scratch else self.dst.url_of(DEFAULT_SCRATCH)
        self.workers = cfg.workers or usable_cores()  # a SLURM job's CPUs, not the whole node's
        self.plan = plan_for(self.datasets, cfg, workers=self.workers, scratch_url=self.scratch_base, dst_url=dst)
        self.identity = {
            "format": 1,
            "seed": cfg.seed,
            "sources": [
                {"url": canonical_url(d.url), "rows": d.num_rows, "fingerprint": d.manifest.fingerprint.to_json()}
                for d in self.datasets
            ],
            "schema": self.schema.to_json(), "buckets": self.plan.buckets, "capacity_rows": self.plan.capacity_rows,
            "chunk_bytes": cfg.chunk_bytes, "shard_bytes": cfg.shard_bytes, "level": cfg.level,
        }
        if self.plan.levels == 2:
            self.identity["levels"] = 2  # one level's identities (and run ids) stay as they were
        if scattered is not None:
            # Another identity than a two-pass shuffle of the same data (which is possible too: scattered data
            # is also an ordinary dataset), so neither run mistakes the other's state or output for its own.
            self.identity["from_scatter"] = scattered.spec.to_json()
        self.run_id = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        # Keyed by the destination too: two destinations sharing --scratch never see each other's intermediates
        # (the map split is checked marker by marker, map()). From scatter, only oversize buckets use it.
        owner = json.dumps([self.run_id, canonical_url(self.dst.url)]).encode()
        # Spread over the plan's hashed prefixes (storage/storage.py): the marker travels in the URL, so every
        # task, listing and recursion under it hashes the same way.
        self.scratch = with_prefixes(f"{self.scratch_base}/run-{hashlib.sha256(owner).hexdigest()[:16]}",
                                     self.plan.scratch_prefixes)
        urls = [self.dst.url, self.scratch] + [d.url for d in self.datasets]
        self.in_process = self.workers == 1 or any(u.startswith("memory://") for u in urls)
        if cfg.executor == "ray":
            if any(u.startswith("memory://") for u in urls):
                raise ValueError(f"executor='ray' cannot reach memory:// URLs ({', '.join(urls)}): Ray workers are "
                                 "other processes; use local paths or object storage")
            self.in_process = False
        self.faults = faults()
        self.stats: dict = {"plan": self.plan.to_json(), "workers": self.workers, "in_process": self.in_process}
        if scattered is not None:
            self.stats["from_scatter"] = True

    # -- the whole run on one machine ------------------------------------------------------------------
    def execute(self) -> Manifest:
        lock = Lock(self.dst, self.cfg.break_lock)
        lock.acquire()
        try:
            if self.faults.get("pause-after-lock"):
                time.sleep(self.faults["pause-after-lock"])
            finished = self.check_dst()
            if finished is not None:
                self.cleanup()
                return finished
            map_rows = self.start_or_resume()
            with self.executor() as pool:
                self.stats["pass1_start"] = time.time()
                maps = self.map(pool, map_rows)
                self.stats["pass2_start"] = time.time()
                try:
                    results = (second_level.run_second_level(self, pool, maps, map_rows) if self.plan.levels == 2
                               else self.reduce(pool, maps))
                except FormatError as e:
                    raise self.uncommit_damaged(e) from None
                self.stats["pass2_end"] = time.time()
            return self.commit(results)
        finally:
            lock.release()
            self.remove_empty_dirs()

    def executor(self):
        """The executor (shuffler/shuffling/executor.py) the options name, as a context manager."""
        return make_executor(self.cfg.executor, workers=self.workers, in_process=self.in_process,
                             ray_address=self.cfg.ray_address, threads=threads_for(self.cfg, self.workers))

    # -- what is at DST ----------------------------------------------------------------------------------
    def check_dst(self) -> Manifest | None:
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

    def start_or_resume(self) -> int:
        """Write run.json for a new run; for a resumed one keep its map split (it fixes the intermediates).
        Returns the rows per map task."""
        if self.dst.exists(RUN):
            state = self._read_state()
            recorded = state.get("scratch")
            if isinstance(recorded, str) and split_prefixes(recorded)[0] == split_prefixes(self.scratch)[0]:
                self.scratch = recorded  # this run's folder, with the prefixes it started with
            map_rows = state.get("map_rows")
            # A damaged value only changes the split, and the split never changes the output.
            return map_rows if isinstance(map_rows, int) and map_rows >= 1 else self.plan.map_rows
        state = {"identity": self.identity, "run_id": self.run_id, "map_rows": self.plan.map_rows,
                 "scratch": self.scratch}
        self.dst.write(RUN, json.dumps(state, indent=1).encode())
        return self.plan.map_rows

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
        if (isinstance(scratch, str) and scratch != self.scratch
                and re.search(r"/run-[0-9a-f]{16}$", split_prefixes(scratch)[0])):
            # Only objects an intermediate can be named: run.json is data at DST, and must not be able to
            # make --overwrite delete anything else wherever it points.
            store = storage(scratch)
            for name in store.list(""):
                if re.fullmatch(r"((sub-[0-9.]+/)*map-\d+\.(shard|idx)|index/(b-\d+\.idx|done\.json))(\.tmp-[0-9a-f]+)?",
                                name):
                    store.delete(name)
        for name in self.dst.list(""):
            if name.startswith("shard-") or (name.startswith(STATE + "/") and name != LOCK):
                self.dst.delete(name)

    # -- pass 1 ------------------------------------------------------------------------------------------
    def map(self, pool, map_rows: int, *, only: Selector | None = None) -> list[MapOutput]:
        """Run the map tasks of `map_rows` rows each that `only` selects and have not committed; return every
        committed one's output, in order. From scatter there is none: the producers did pass 1."""
        if self.scattered is not None:
            return []
        table = ChunkTable.of_datasets(self.datasets)
        n, B = table.rows, self.plan.buckets
        store = storage(self.scratch)
        done = committed_maps(store, set(store.list("")), B)  # a damaged marker: its task is redone below
        key = stream_key(self.cfg.seed)
        calls = []
        tasks = -(-n // map_rows)
        for m in [m for m in done if m >= tasks]:
            del done[m]  # another split's (the split never changes the output); overwritten or deleted with scratch
        for m, lo in enumerate(range(0, n, map_rows)):
            hi = min(n, lo + map_rows)
            if m in done and done[m].row_start == lo and done[m].rows == hi - lo:
                continue  # committed, and for exactly these rows
            done.pop(m, None)
            if only is not None and not only(m):
                continue
            sel, skip = table.select(lo, hi)
            calls.append((MapTask(
                index=m, table=sel, skip=skip, rows=hi - lo, row_start=lo, key=key, buckets=B, scratch=self.scratch,
                level=self.plan.scratch_level, chunk_bytes=self.cfg.chunk_bytes, threads=self.plan.request.threads,
                batch_bytes=read_batch_bytes(self.cfg.chunk_bytes),
            ),))
        kill = int(self.faults.get("kill-after-map", 0))
        with Progress("pass 1/2 scatter", n, enabled=self.progress) as bar:
            bar.update(sum(o.rows for o in done.values()))
            outs = pool.run(map_worker, calls, bar, lambda k: die() if kill and k >= kill else None)
        self.record_nodes("pass1", pool)
        for o in outs:
            done[o.index] = o
        return [done[m] for m in sorted(done)]

    # -- pass 2 ------------------------------------------------------------------------------------------
    def reduce(self, pool, maps: list[MapOutput], *, only: Selector | None = None, tables=None
               ) -> list[tuple[list[ShardInfo], Fingerprint]]:
        """Run the reduce tasks of the buckets that `only` selects and have not committed; return every committed
        bucket's (shards, fingerprint), in bucket order: all of them unless `only` chose some. `tables.table(b)`
        (e.g. shuffling/bucket_index.BucketIndex) says where bucket b's chunks are; None: read the footers."""
        B = self.plan.buckets
        results = committed_reduces(self.dst, B, only=only)
        todo = [b for b in range(B) if b not in results and (only is None or only(b))]
        calls = []
        if todo:
            # Where each bucket's chunks are: the given tables, pass 1's objects, or the producers' runs.
            inter = tables if tables is not None else self.scattered
            inter = inter if inter is not None else Intermediates(self.schema, self.scratch, maps, B)
            kill_in = int(self.faults.get("kill-in-reduce", 0))
            for i, b in enumerate(todo):
                calls.append((self.reduce_task((b,), inter.table(b)), self.dst.url, kill_in if i == 0 else 0))
        kill = int(self.faults.get("kill-after-reduce", 0))
        with Progress("pass 2/2 permute", self.plan.rows, enabled=self.progress) as bar:
            bar.update(sum(s.rows for r in results.values() for s in r[0]))
            outs = pool.run(reduce_worker, calls, bar, lambda k: die() if kill and k >= kill else None)
        self.record_nodes("pass2", pool)
        for (task, *_), out in zip(calls, outs, strict=True):
            results[task.path[0]] = out
        return [results[b] for b in range(B) if b in results]

    def reduce_task(self, path: tuple[int, ...], table: ChunkTable, *, scratch: str | None = None) -> ReduceTask:
        """The task permuting bucket `path` ((b,), or (b, j) with two levels) from `table`; recursing in `scratch`."""
        c = self.cfg
        return ReduceTask(path=path, table=table, seed=c.seed, capacity_rows=self.plan.capacity_rows, dst=self.dst.url,
                          chunk_bytes=c.chunk_bytes, shard_bytes=c.shard_bytes, level=c.level, scratch=scratch or self.scratch,
                          scratch_level=self.plan.scratch_level, threads=self.plan.request.threads,
                          batch_bytes=read_batch_bytes(c.chunk_bytes))

    def record_nodes(self, what: str, pool) -> None:
        """stats["task_nodes"][what]: the Ray node each task of that pass ran on, in task order, when the executor
        reports them (RayExecutor.task_nodes); the CLI prints a summary, so a user sees the spread."""
        nodes = getattr(pool, "task_nodes", None)
        if nodes:
            self.stats.setdefault("task_nodes", {})[what] = list(nodes)

    def uncommit_damaged(self, error: FormatError) -> FormatError:
        """The error to raise for `error`, found in pass 2. A damaged intermediate loses its commit marker, so
        the next run redoes its map task (without this, every re-run would stop at the same damaged chunk);
        a damaged scattered run is the producers' data, and is only named."""
        if self.scattered is not None:
            return error
        m = re.search(re.escape(self.scratch) + r"/((?:sub-\d+/)?map-\d+)\.shard", str(error))
        if m is None:
            return error
        storage(self.scratch).delete(m.group(1) + ".idx")
        return type(error)(f"{error}; that intermediate is now uncommitted: re-run the same command to redo it "
                           "and finish")

    # -- the end -----------------------------------------------------------------------------------------
    def commit(self, results: list[tuple[list[ShardInfo], Fingerprint]]) -> Manifest:
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
                **({"levels": 2} if self.plan.levels == 2 else {}),
            },
            "source_metadata": [d.metadata for d in self.datasets],
        }
        manifest = Manifest(schema=self.schema, shards=tuple(shards), fingerprint=fp, metadata=meta)
        write_manifest(self.dst, manifest)  # the dataset exists from here on, and not before
        self.cleanup()
        return manifest

    def cleanup(self) -> None:
        """Delete the run's state and, unless keep_intermediate, its intermediates (the lock stays)."""
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

    def remove_empty_dirs(self) -> None:
        """Local disk keeps empty folders where objects were; remove the state folder's, if empty."""
        if not self.dst.is_local:
            return
        base = self.dst.path(STATE)
        for dirpath, _, _ in sorted(os.walk(base), key=lambda t: -len(t[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)  # fails, harmlessly, while anything (a lock, a marker) is inside


def _difference(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    parts = [f"{k}: {json.dumps(a.get(k))[:120]} there, {json.dumps(b.get(k))[:120]} now" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(parts) or "no recorded identity"

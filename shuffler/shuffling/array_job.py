"""Array-job stages: the shuffle as four commands a cluster scheduler runs (docs/cluster.md).

    shuffler shuffle SRC... DST --seed S --stage plan                         # once
    shuffler shuffle SRC... DST --seed S --stage scatter --task-index I --num-tasks N    # N tasks, any order
    shuffler shuffle SRC... DST --seed S --stage permute --task-index I --num-tasks N    # after every scatter
    shuffler shuffle SRC... DST --seed S --stage finalize                     # once, after every permute

`plan` fixes the run (seed, buckets, map split, scratch) in DST/.shuffle/plan.json, first writer wins, so
later stages and every task read one plan. Task I of N runs the map tasks (scatter) or buckets (permute)
whose number is congruent to I mod N and not yet committed. Tasks share nothing but storage: each commits
every object atomically and its marker last, and a task computes the same bytes however often it runs, so
a retry, even one running beside the attempt it replaces, changes nothing. `finalize` checks that every
bucket committed and that the rows' fingerprint equals the sources', then writes the manifest: the output
is byte for byte that of `shuffler shuffle SRC... DST --seed S` on one machine.

Each stage is a plain Run (shuffler/shuffling/run.py) taking the steps of its share: plan = check_dst and
start_or_resume under DST's lock (shuffler/shuffling/lock.py); scatter = map(only=this task's), and the
scatter task that finds every map task committed writes the bucket index (shuffler/shuffling/bucket_index.py);
permute = reduce(only=this task's), reading only its own buckets' index objects (or, without an index, every
intermediate's footer); finalize = commit under the lock.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shuffler import env
from shuffler.errors import FormatError
from shuffler.format.manifest import MANIFEST, Manifest, read_manifest
from shuffler.io.chunks import storage
from shuffler.shuffling import second_level
from shuffler.shuffling.bucket_index import BucketIndex, DamagedIndex, discard, write_index
from shuffler.shuffling.lock import Lock
from shuffler.shuffling.map import MapOutput, map_name
from shuffler.shuffling.markers import PLAN, committed_paths, committed_reduces
from shuffler.shuffling.reduce import Intermediates
from shuffler.shuffling.run import Run, ShuffleConfig, canonical_url
from shuffler.storage.storage import Storage, split_prefixes

Tables = second_level.Tables

STAGES = ("plan", "scatter", "scatter2", "permute", "finalize")
#: ShuffleConfig fields that the plan fixes (they change the output, or where intermediates live).
PLANNED = ("memory", "buckets", "scratch", "scratch_level", "scratch_prefixes", "keep_intermediate", "level",
           "chunk_bytes", "shard_bytes", "map_rows", "levels")


@dataclass(frozen=True, kw_only=True)
class TaskSlot:
    """Which share of a stage's tasks this process runs: those numbered index mod count."""

    index: int
    """This task's index, 0-based."""
    count: int
    """How many array tasks share the stage."""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"num_tasks={self.count} must be >= 1")
        if not 0 <= self.index < self.count:
            raise ValueError(f"task index {self.index} is outside [0, {self.count}) (num_tasks={self.count})")

    def owns(self, k: int) -> bool:
        return k % self.count == self.index


def resolve_slot(task_index: int | None, num_tasks: int | None) -> TaskSlot:
    """The explicit --task-index/--num-tasks, else the array job's variables (env.array_task)."""
    index, count, source = env.array_task()
    if task_index is not None:
        index, source = task_index, "--task-index"
    if num_tasks is not None:
        count = num_tasks
    if index is None:
        raise ValueError("no task index: pass --task-index I --num-tasks N, or run inside a SLURM array "
                         "(SLURM_ARRAY_TASK_ID), a Kubernetes Indexed Job (JOB_COMPLETION_INDEX) or an AWS Batch "
                         "array job (AWS_BATCH_JOB_ARRAY_INDEX)")
    if count is None:
        raise ValueError(f"task index {index} comes from {source}, which does not give the task count: pass "
                         "--num-tasks N (the Job's completions)")
    return TaskSlot(index=index, count=count)


def run_stage(
    stage: str,
    srcs: Sequence[str],
    dst: str,
    *,
    seed: int,
    slot: TaskSlot | None = None,
    config: dict | None = None,
    workers: int | None = None,
    threads: int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    overwrite: bool = False,
    break_lock: bool = False,
    progress: bool | None = None,
) -> dict:
    """Run one stage (of this task, for scatter and permute). Returns a summary: {"stage", "did", ...}.

    `config` holds the ShuffleConfig fields of PLANNED for the plan stage; later stages read them from the
    plan and refuse a `config` that contradicts it (the same command line for every stage is fine).
    `workers` and `threads` are this task's (a node's cores), never planned: they do not change the output.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not one of {', '.join(STAGES)}")
    config = dict(config or {})
    unknown = set(config) - set(PLANNED)
    if unknown:
        raise ValueError(f"config keys {sorted(unknown)} are not planned options ({', '.join(PLANNED)})")
    if stage in ("scatter", "scatter2", "permute") and slot is None:
        raise ValueError(f"stage {stage!r} needs a task slot (--task-index/--num-tasks or an array job)")
    srcs = list(srcs)
    if stage == "plan":
        return _plan(srcs, dst, seed, config, workers, threads, overwrite, break_lock, progress)
    loaded = _load(srcs, dst, seed, config, workers, threads, executor, ray_address, progress)
    if loaded is None:
        return {"stage": stage, "did": 0, "note": f"{dst} is finalized already; nothing to do"}
    run, plan = loaded
    if stage == "finalize":
        return _finalize(run, plan)
    assert slot is not None
    if stage == "scatter2" and run.plan.levels == 1:
        return {"stage": stage, "did": 0, "note": "one scatter level: nothing to do"}
    map_rows, n = plan["map_rows"], run.plan.rows
    maps = math.ceil(n / map_rows) if n else 0
    if stage == "scatter":
        with run.executor() as pool:
            run.map(pool, map_rows, only=slot.owns)
            indexed = _index_if_last(run, pool, map_rows, maps)
        return {"stage": stage, "did": sum(map(slot.owns, range(maps))), "of": maps, "indexed": indexed}
    if run.plan.levels == 2:
        return _second_level(stage, run, slot, map_rows, maps)
    B = run.plan.buckets
    index = BucketIndex.open(run.scratch, run.schema, run_id=run.run_id, maps=maps, map_rows=map_rows, buckets=B)
    if index is not None:
        # The index exists only once every map task committed: O(this task's buckets) small reads from here on,
        # instead of every intermediate's marker and footer (shuffling/bucket_index.py).
        with run.executor() as pool:
            try:
                run.reduce(pool, [], only=slot.owns, tables=index)
                return {"stage": stage, "did": sum(map(slot.owns, range(B))), "of": B, "indexed": True}
            except DamagedIndex as e:
                warnings.warn(f"{e}; reading the intermediates' footers instead", stacklevel=1)
                discard(run.scratch)
            except FileNotFoundError as e:
                # An intermediate gone since the index was written: the footer path below names what to redo.
                warnings.warn(f"{e}; the bucket index is dropped", stacklevel=1)
                discard(run.scratch)
            except FormatError as e:
                discard(run.scratch)  # a damaged intermediate is redone; the index is written again after it
                raise run.uncommit_damaged(e) from None
    with run.executor() as pool:
        done = _committed_maps(run, pool, map_rows, maps, slot)
        try:
            run.reduce(pool, done, only=slot.owns)
        except FormatError as e:
            discard(run.scratch)  # an index written before this damage showed must not outlive the redo
            raise run.uncommit_damaged(e) from None
    return {"stage": stage, "did": sum(map(slot.owns, range(B))), "of": B, "indexed": False}


def _committed_maps(run: Run, pool, map_rows: int, maps: int, slot: TaskSlot | None) -> list[MapOutput]:
    """Every map task's committed output (the markers the scatter stage wrote); RuntimeError naming the missing."""
    done = run.map(pool, map_rows, only=lambda m: False)  # only collect what the scatter stage committed
    if len(done) != maps:
        have = {o.index for o in done}
        missing = [m for m in range(maps) if m not in have]
        owners = f" (array tasks {sorted({m % slot.count for m in missing})[:8]} of {slot.count} own them)" if slot else ""
        raise RuntimeError(f"{run.dst.url}: {len(missing)} of {maps} map task(s) have not committed (first: "
                           f"{missing[:8]}); run the scatter stage to completion before the later stages{owners}")
    return done


def _super_buckets(run: Run, pool, map_rows: int, maps: int, slot: TaskSlot | None) -> tuple[list[int], Tables]:
    """Two levels: each super-bucket's rows and where its chunks are. From the bucket index when it lists the rows
    (one small read; each table one more), else from every intermediate's footer."""
    B = run.plan.buckets
    index = BucketIndex.open(run.scratch, run.schema, run_id=run.run_id, maps=maps, map_rows=map_rows, buckets=B)
    if index is not None and index.rows is not None:
        return index.rows, functools.lru_cache(maxsize=64)(index.table)
    inter = Intermediates(run.schema, run.scratch, _committed_maps(run, pool, map_rows, maps, slot), B)
    tables = [inter.table(b) for b in range(B)]
    return [t.rows for t in tables], tables.__getitem__


def _block(slot: TaskSlot, n: int) -> Callable[[int], bool]:
    """Ownership of n items in contiguous blocks (not mod N): a permute task then touches the level-2
    intermediates of about S/N + 1 super-buckets, not of every one."""
    return lambda i: i * slot.count // n == slot.index


def _second_level(stage: str, run: Run, slot: TaskSlot, map_rows: int, maps: int) -> dict:
    """The scatter2 or permute stage of a two-level run (shuffler/shuffling/second_level.py)."""
    with run.executor() as pool:
        try:
            rows, tables = _super_buckets(run, pool, map_rows, maps, slot)
            layout = second_level.layout_of(run, rows, map_rows)
            if stage == "scatter2":
                n = len(layout.maps())
                second_level.scatter(run, pool, layout, tables, only=slot.owns)
                return {"stage": stage, "did": sum(map(slot.owns, range(n))), "of": n}
            leaves = layout.leaves()
            owns = _block(slot, len(leaves))
            supers = {p[0] for i, p in enumerate(leaves) if len(p) == 2 and owns(i)}
            outputs = second_level.scatter(run, pool, layout, tables, only=lambda k: False, supers=supers)
            second_level.permute(run, pool, layout, tables, outputs, only=owns)
            return {"stage": stage, "did": sum(map(owns, range(len(leaves)))), "of": len(leaves)}
        except FormatError as e:
            discard(run.scratch)  # a damaged index or intermediate: the footers, or the redone task, next time
            raise run.uncommit_damaged(e) from None


def _index_if_last(run: Run, pool, map_rows: int, maps: int) -> bool:
    """Write the bucket index if every map task has committed (this task is among the last to finish) and no
    valid index exists; a LIST decides, so only those tasks read the markers. True if it wrote it.

    An intermediate found damaged while its footer is read is uncommitted and redone here (any task may redo
    any map task: the bytes are the same), then the index is written; so the scatter stage can always finish."""
    B = run.plan.buckets
    names = set(storage(run.scratch).list(""))
    if any(f"{map_name(m)}.idx" not in names for m in range(maps)):
        return False
    if BucketIndex.open(run.scratch, run.schema, run_id=run.run_id, maps=maps, map_rows=map_rows, buckets=B):
        return False  # a re-run of a finished scatter stage: nothing to redo
    for attempt in (1, 2):
        done = run.map(pool, map_rows, only=None if attempt == 2 else lambda m: False)
        if len(done) != maps:
            continue  # a damaged marker: the second round redoes its task
        try:
            write_index(run.scratch, run.schema, done, B, run_id=run.run_id, map_rows=map_rows,
                        bucket_rows=run.plan.levels == 2)
            return True
        except FormatError as e:
            if attempt == 2:
                raise
            err = run.uncommit_damaged(e)  # its marker goes: the second round redoes that map task
            warnings.warn(f"{err}; redoing it before writing the bucket index", stacklevel=1)
    return False


def _plan(srcs, dst, seed, config, workers, threads, overwrite, break_lock, progress) -> dict:
    cfg = ShuffleConfig(seed=seed, workers=workers, threads=threads, overwrite=overwrite, break_lock=break_lock,
                        **config)
    run = Run(srcs, dst, cfg, progress=progress)
    lock = Lock(run.dst, break_lock)
    lock.acquire()  # no one-machine shuffle may be writing here while we lay out the run
    try:
        finished = run.check_dst()
        if finished is not None:
            return {"stage": "plan", "did": 0, "note": f"{dst} already holds this shuffle's output"}
        map_rows = run.start_or_resume()
        doc = {
            "format": 1, "run_id": run.run_id, "seed": seed, "sources": [canonical_url(u) for u in srcs],
            "config": {k: getattr(cfg, k) for k in PLANNED}, "map_rows": map_rows,
            "map_tasks": math.ceil(run.plan.rows / map_rows) if run.plan.rows else 0,
            "buckets": run.plan.buckets, "scratch": run.scratch,
        }
        blob = json.dumps(doc, indent=1, sort_keys=True).encode()
        if not run.dst.put_if_absent(PLAN, blob):  # first writer wins: every task reads one plan
            old = json.loads(run.dst.read(PLAN))
            if old.get("run_id") != run.run_id:
                raise FileExistsError(f"{run.dst.url_of(PLAN)} plans another run ({old.get('run_id')}); pass "
                                      "--overwrite to discard it")
            doc = old
        stages = " -> ".join(f"{st['stage']} x{st['tasks']}" for st in run.plan.stages)  # what each task count runs
        return {"stage": "plan", "did": 1, "map_tasks": doc["map_tasks"], "buckets": doc["buckets"],
                "levels": run.plan.levels, "stages": stages, "run_id": doc["run_id"]}
    finally:
        lock.release()


def _load(srcs, dst, seed, config, workers, threads, executor, ray_address, progress) -> tuple[Run, dict] | None:
    store = Storage(dst)
    try:
        plan = json.loads(store.read(PLAN))
    except FileNotFoundError:
        if _finished(store, seed):
            return None  # a late retry after finalize: the output exists, and it must not be touched
        raise FileNotFoundError(f"{store.url_of(PLAN)} does not exist: run `--stage plan` first") from None
    except ValueError:
        raise FormatError(f"{store.url_of(PLAN)} is damaged; run `--stage plan --overwrite` again") from None
    if plan.get("seed") != seed:
        raise ValueError(f"--seed {seed} differs from the plan's seed {plan.get('seed')} ({store.url_of(PLAN)})")
    given = [canonical_url(u) for u in srcs]
    if given != plan["sources"]:
        raise ValueError(f"SRC {given} differs from the planned sources {plan['sources']} ({store.url_of(PLAN)})")
    for k, v in config.items():
        if plan["config"].get(k) != v:
            raise ValueError(f"{k}={v!r} differs from the plan's {plan['config'].get(k)!r} ({store.url_of(PLAN)}): "
                             "later stages take every planned option from the plan")
    cfg = ShuffleConfig(seed=seed, workers=workers, threads=threads, executor=executor, ray_address=ray_address,
                        **plan["config"])
    run = Run(plan["sources"], dst, cfg, progress=progress)
    if run.run_id != plan["run_id"]:
        raise ValueError(f"the sources changed since the plan stage (run {run.run_id}, planned {plan['run_id']}); "
                         "run `--stage plan --overwrite` again")
    # Every stage uses the scratch folder the plan fixed, however this task spells DST (a node may mount the
    # same filesystem elsewhere, or say file://).
    scratch = plan.get("scratch")
    if not isinstance(scratch, str) or not re.search(r"/run-[0-9a-f]{16}$", split_prefixes(scratch)[0]):
        raise FormatError(f"{store.url_of(PLAN)}: 'scratch' is {scratch!r}, not a run folder; run `--stage plan "
                          "--overwrite` again")
    run.scratch = scratch
    return run, plan


def _finished(store: Storage, seed: int) -> bool:
    if not store.exists(MANIFEST):
        return False
    try:
        m = read_manifest(store)
    except (FormatError, ValueError):
        return False
    return m.metadata.get("shuffle", {}).get("seed") == seed


def _finalize(run: Run, plan: dict) -> dict:
    B = run.plan.buckets
    if run.plan.levels == 2:
        map_rows, n = plan["map_rows"], run.plan.rows
        with run.executor() as pool:
            rows, _ = _super_buckets(run, pool, map_rows, math.ceil(n / map_rows) if n else 0, None)
        paths = second_level.layout_of(run, rows, map_rows).leaves()
        results = committed_paths(run.dst, paths)
    else:
        paths = [(b,) for b in range(B)]
        results = {(b,): r for b, r in committed_reduces(run.dst, B).items()}
    missing = [p for p in paths if p not in results]
    if missing:
        raise RuntimeError(
            f"{run.dst.url}: {len(missing)} of {len(paths)} bucket(s) have not committed (first: "
            f"{[p[0] if len(p) == 1 else p for p in missing[:8]]}); run the permute stage to completion (every task "
            "index) before finalize"
        )
    lock = Lock(run.dst, run.cfg.break_lock)
    lock.acquire()
    try:
        manifest: Manifest = run.commit([results[p] for p in paths])
    finally:
        lock.release()
        run.remove_empty_dirs()
    return {"stage": "finalize", "did": 1, "rows": manifest.num_rows, "shards": len(manifest.shards),
            "buckets": B}

"""The second scatter level (`levels=2`, docs/shuffle.md "Two levels"): every super-bucket shuffled as its own
two-pass job, whose tasks run in parallel on the executor (local pool or Ray) or across array tasks.

Pass 1 (map.py, run.Run.map) scatters the rows into S super-buckets. Then super-bucket b, of n_b rows, is

- permuted directly as bucket (b,) when it fits one task (n_b <= capacity), or
- scattered again into J_b = buckets_for(n_b, capacity) sub-buckets by level-2 map tasks: task m reads rows
  [lo, hi) of b (in their pass-1 order: map tasks in row order, stable within each) and draws their
  sub-buckets from stream_key(seed, (b,)) at counters lo..hi-1 (keys.bucket_ids); then every sub-bucket
  (b, j) is permuted with bucket_permutation(seed, (b, j)) and written as shards shard_name((b, j), k).

These are the very draws of reduce.py's serial recursion (`_recurse`, which a one-level reduce task runs for
a bucket larger than its capacity), so the output is byte for byte that of a one-level shuffle with
`--buckets S` and the same memory, whatever the split into tasks: a row's draw depends only on (seed, b, its
position in b). Here each level-2 map task and each sub-bucket is a task of its own, so the second level runs
in parallel instead of serially inside one reduce task (docs/scale.md, "Where the design breaks first").

Layout: level-2 intermediates go to <scratch>/sub-<b>/map-<m>.shard with their commit markers (.idx) beside
them, as the serial recursion names them; a sub-bucket commits with DST/.shuffle/reduce/b-<b>.<j>.json
(markers.py). A killed run resumes from whatever committed, at either level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shuffler.format.manifest import Fingerprint, ShardInfo
from shuffler.io.chunks import ChunkTable, storage
from shuffler.keys import stream_key
from shuffler.progress import Progress
from shuffler.shuffling.executor import die, map_worker, reduce_worker
from shuffler.shuffling.map import MapOutput, MapTask, committed_maps
from shuffler.shuffling.markers import Path, committed_paths
from shuffler.shuffling.plan import buckets_for, read_batch_bytes
from shuffler.shuffling.reduce import Intermediates

Selector = Callable[[int], bool]
Tables = Callable[[int], ChunkTable]
"""Super-bucket b's chunks in pass 1's intermediates (Intermediates.table, or bucket_index.BucketIndex.table)."""


def sub_scratch(scratch: str, b: int) -> str:
    """Folder of super-bucket b's level-2 intermediates: the serial recursion's name (reduce._recurse)."""
    return f"{scratch}/sub-{b}"


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The second level's tasks, from the super-buckets' row counts: level-2 map tasks and the buckets to permute."""

    rows: tuple[int, ...]
    """Rows of each super-bucket."""
    capacity: int
    """Rows one task holds (Plan.capacity_rows): a larger super-bucket is scattered again."""
    map_rows: int
    """Rows per level-2 map task (<= capacity). Never changes the output."""

    def sub_buckets(self, b: int) -> int:
        """Sub-buckets of super-bucket b; 0 when it fits one task and is permuted directly."""
        n = self.rows[b]
        return buckets_for(n, self.capacity) if n > self.capacity else 0

    def maps(self) -> list[tuple[int, int, int, int]]:
        """Every level-2 map task as (super-bucket, index within it, first row, end row), numbered in this order."""
        step = max(1, min(self.map_rows, self.capacity))
        return [(b, m, lo, min(n, lo + step)) for b, n in enumerate(self.rows) if self.sub_buckets(b)
                for m, lo in enumerate(range(0, n, step))]

    def leaves(self) -> list[Path]:
        """The buckets to permute, in output order: (b,) for a super-bucket that fits a task, else (b, j)."""
        return [(b, j) if self.sub_buckets(b) else (b,) for b in range(len(self.rows))
                for j in range(max(1, self.sub_buckets(b)))]


def layout_of(run, rows: list[int], map_rows: int) -> Layout:
    return Layout(rows=tuple(int(n) for n in rows), capacity=run.plan.capacity_rows, map_rows=map_rows)


def run_second_level(run, pool, maps: list[MapOutput], map_rows: int) -> list[tuple[list[ShardInfo], Fingerprint]]:
    """Both steps of the second level on one executor (Run.execute): pass 1's footers give the super-buckets'
    chunks, then the level-2 scatter, then the permute, each a batch of parallel tasks."""
    inter = Intermediates(run.schema, run.scratch, maps, run.plan.buckets)
    tables = [inter.table(b) for b in range(run.plan.buckets)]
    layout = layout_of(run, [t.rows for t in tables], map_rows)
    outputs = scatter(run, pool, layout, tables.__getitem__)
    return permute(run, pool, layout, tables.__getitem__, outputs)


def scatter(run, pool, layout: Layout, tables: Tables, *, only: Selector | None = None,
            supers: set[int] | None = None) -> dict[int, list[MapOutput]]:
    """Run the level-2 map tasks (numbered as Layout.maps lists them) that `only` selects and have not committed.
    Returns, for each super-bucket (of `supers`, None: all) whose level-2 tasks have all committed, their outputs
    in order; only those super-buckets' commit markers are read."""
    store = storage(run.scratch)
    names = set(store.list(""))
    done = {b: committed_maps(store, names, layout.sub_buckets(b), prefix=f"sub-{b}/")
            for b in range(len(layout.rows)) if layout.sub_buckets(b) and (supers is None or b in supers)}
    tasks = layout.maps()
    count = {b: 0 for b in done}
    calls, owners, skipped = [], [], 0
    for k, (b, m, lo, hi) in enumerate(tasks):
        if b not in done:
            continue
        count[b] += 1
        have = done[b].get(m)
        if have is not None and have.row_start == lo and have.rows == hi - lo:
            skipped += hi - lo
            continue  # committed, for exactly these rows
        done[b].pop(m, None)
        if only is not None and not only(k):
            continue
        sel, skip = tables(b).select(lo, hi)
        owners.append(b)
        calls.append((MapTask(
            index=m, table=sel, skip=skip, rows=hi - lo, row_start=lo, key=stream_key(run.cfg.seed, (b,)),
            buckets=layout.sub_buckets(b), scratch=sub_scratch(run.scratch, b), level=run.plan.scratch_level,
            chunk_bytes=run.cfg.chunk_bytes, threads=run.plan.request.threads,
            batch_bytes=read_batch_bytes(run.cfg.chunk_bytes),
        ),))
    kill = int(run.faults.get("kill-after-map2", 0))
    total = sum(hi - lo for _, _, lo, hi in tasks)
    with Progress("level 2 scatter", total, enabled=run.progress) as bar:
        bar.update(skipped)
        outs = pool.run(map_worker, calls, bar, lambda k: die() if kill and k >= kill else None)
    run.record_nodes("level2", pool)
    for b, out in zip(owners, outs, strict=True):
        done[b][out.index] = out
    return {b: [d[m] for m in range(count[b])] for b, d in done.items() if all(m in d for m in range(count[b]))}


def permute(run, pool, layout: Layout, tables: Tables, outputs: dict[int, list[MapOutput]], *,
            only: Selector | None = None) -> list[tuple[list[ShardInfo], Fingerprint]]:
    """Permute the buckets (numbered as Layout.leaves lists them) that `only` selects and have not committed.
    Returns every committed one's (shards, fingerprint), in output order: all of them unless `only` chose some."""
    leaves = layout.leaves()
    mine = [p for i, p in enumerate(leaves) if only is None or only(i)]
    results = committed_paths(run.dst, mine)
    inter: dict[int, Intermediates] = {}
    calls = []
    kill_in = int(run.faults.get("kill-in-reduce", 0))
    for p in mine:
        if p in results:
            continue
        b = p[0]
        if len(p) == 1:
            task = run.reduce_task(p, tables(b))
        else:
            if b not in outputs:
                raise RuntimeError(f"{run.dst.url}: super-bucket {b}'s level-2 scatter has not finished; run the "
                                   "scatter2 stage to completion before permute")
            if b not in inter:
                inter[b] = Intermediates(run.schema, sub_scratch(run.scratch, b), outputs[b], layout.sub_buckets(b))
            task = run.reduce_task(p, inter[b].table(p[1]), scratch=sub_scratch(run.scratch, b))
        calls.append((task, run.dst.url, kill_in if not calls else 0))
    kill = int(run.faults.get("kill-after-reduce", 0))
    with Progress("permute", sum(layout.rows), enabled=run.progress) as bar:
        bar.update(sum(s.rows for r in results.values() for s in r[0]))
        outs = pool.run(reduce_worker, calls, bar, lambda k: die() if kill and k >= kill else None)
    run.record_nodes("pass2", pool)
    for (task, *_), out in zip(calls, outs, strict=True):
        results[task.path] = out
    return [results[p] for p in leaves if p in results]

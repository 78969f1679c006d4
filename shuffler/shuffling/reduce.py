"""Pass 2 of the shuffle (permute): one reduce task per bucket.

A reduce task fetches its bucket's segment from every intermediate with batched ranged reads (a bucket's
chunks are contiguous in each intermediate), draws a uniform permutation of the bucket from a generator
keyed by (seed, bucket), and decodes each chunk straight into its permuted place in one reused buffer:
peak memory is the bucket once, not twice. It then writes the bucket as output shards.

A bucket larger than the task's capacity (possible only with forced --buckets or tiny budgets) is shuffled
again on its own: its rows are scattered into sub-buckets with fresh randomness (a key derived from the
bucket's path) and each sub-bucket is permuted, recursively. Any uniform permutation of the bucket keeps
the whole result exactly uniform (docs/shuffle.md), so this is exact too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from shuffler.format.manifest import Fingerprint, ShardInfo
from shuffler.format.schema import Schema
from shuffler.io.chunks import CHUNK, ChunkTable, iter_decoded, storage
from shuffler.io.rolling import RollingShardWriter
from shuffler.keys import bucket_permutation, permutation, stream_key
from shuffler.shuffling.map import (
    MapOutput,
    MapTask,
    Progress,
    map_name,
    read_intermediate_footer,
    row_buffers,
    run_map,
)
from shuffler.shuffling.plan import buckets_for


def shard_name(path: tuple[int, ...], k: int) -> str:
    """Output shard k of bucket `path`: shard-000012-0000.shard, or shard-000012.0001-0000.shard when recursed."""
    return "shard-" + ".".join(f"{p:06d}" if i == 0 else f"{p:04d}" for i, p in enumerate(path)) + f"-{k:04d}.shard"


class Intermediates:
    """The committed intermediates of one level: where each bucket's chunks lie in each of them."""

    def __init__(self, schema: Schema, scratch: str, outputs: list[MapOutput], buckets: int):
        self.schema, self.scratch, self.buckets = schema, scratch, buckets
        outputs = sorted(outputs, key=lambda o: o.index)
        store = storage(scratch)
        entries = [read_intermediate_footer(store, map_name(o.index) + ".shard", o, schema) for o in outputs]
        self.objects = tuple((scratch, map_name(o.index) + ".shard") for o in outputs)
        self.base = np.concatenate([[0], np.cumsum([len(e) for e in entries], dtype=np.int64)])
        self.chunks = np.zeros(int(self.base[-1]), dtype=CHUNK)
        for m, e in enumerate(entries):
            c = self.chunks[self.base[m] : self.base[m + 1]]
            c["obj"] = m
            for f in ("offset", "comp_len", "rows", "checksum"):
                c[f] = e[f]
        self.starts = np.stack([o.chunk_start for o in outputs]) if outputs else np.zeros((0, buckets + 1), np.int64)

    def entries(self, b: int) -> np.ndarray:
        """Bucket b's chunks (CHUNK, "obj" indexing every intermediate), in map-task order. [n] CHUNK."""
        lo = self.base[:-1] + self.starts[:, b]
        hi = self.base[:-1] + self.starts[:, b + 1]
        idx = np.concatenate([np.arange(s, e) for s, e in zip(lo.tolist(), hi.tolist(), strict=True)] or [[]])
        return self.chunks[idx.astype(np.int64)]

    def table(self, b: int) -> ChunkTable:
        """Bucket b's chunks from every intermediate, in map-task order (so in global row order)."""
        sub = self.entries(b)
        used, inverse = np.unique(sub["obj"], return_inverse=True)
        sub["obj"] = inverse
        return ChunkTable(self.schema, tuple(self.objects[i] for i in used), sub)


@dataclass(frozen=True, kw_only=True)
class ReduceTask:
    """Permute one bucket and write it to `dst` as shards named by shard_name(path, k)."""

    path: tuple[int, ...]
    table: ChunkTable
    seed: int
    capacity_rows: int
    """Most rows held in memory at once; a larger bucket is re-shuffled recursively."""
    dst: str
    chunk_bytes: int
    shard_bytes: int
    level: int
    scratch: str
    """Folder for a recursive re-shuffle's intermediates."""
    scratch_level: int
    threads: int = 2
    batch_bytes: int = 32 << 20


def run_reduce(
    task: ReduceTask, progress: Progress = None, on_shard: Callable[[int], None] | None = None
) -> tuple[list[ShardInfo], Fingerprint]:
    """Permute the bucket and write it. Returns its output shards (in order) and their fingerprint.

    on_shard(k) is called as output shard k opens (shards 0..k-1 are committed by then): a test hook.
    """
    n = task.table.rows
    if n > task.capacity_rows:
        return _recurse(task, progress)
    schema = task.table.schema
    perm = permutation(n, bucket_permutation(task.seed, task.path))  # [n] int64: row k goes to perm[k]
    acts, cols = row_buffers(schema, n, "rows")  # [n, d_model], reused across buckets
    # The intermediates were written past the page cache (map.write_intermediate): read them past it too.
    for pos, a, c in iter_decoded(task.table, 0, n, threads=task.threads, batch_bytes=task.batch_bytes, direct=True):
        dest = perm[pos : pos + len(a)]
        acts[dest] = a
        for d, s in zip(cols, c, strict=True):
            d[dest] = s
        if progress is not None:
            progress(len(a), len(a) * schema.row_bytes)
    del perm
    def name_of(k: int) -> str:
        if on_shard is not None:
            on_shard(k)
        return shard_name(task.path, k)

    writer = RollingShardWriter(
        storage(task.dst), schema, name_of=name_of,
        chunk_bytes=task.chunk_bytes, shard_bytes=task.shard_bytes, level=task.level, threads=task.threads,
    )
    try:
        writer.append(acts, cols)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    return shards, writer.fingerprint


def _recurse(task: ReduceTask, progress: Progress) -> tuple[list[ShardInfo], Fingerprint]:
    """Shuffle an oversize bucket on its own: scatter into sub-buckets with fresh randomness, permute each."""
    n, cap = task.table.rows, task.capacity_rows
    sub_b = buckets_for(n, cap)
    key = stream_key(task.seed, task.path)
    scratch = f"{task.scratch}/sub-" + ".".join(str(p) for p in task.path)
    outputs = []
    per_map = max(1, cap)
    for m in range(math.ceil(n / per_map)):
        lo, hi = m * per_map, min(n, (m + 1) * per_map)
        sel, skip = task.table.select(lo, hi)
        outputs.append(run_map(MapTask(
            index=m, table=sel, skip=skip, rows=hi - lo, row_start=lo, key=key, buckets=sub_b, scratch=scratch,
            level=task.scratch_level, chunk_bytes=task.chunk_bytes, threads=task.threads, batch_bytes=task.batch_bytes,
        )))
    inter = Intermediates(task.table.schema, scratch, outputs, sub_b)
    shards: list[ShardInfo] = []
    fp = Fingerprint()
    for j in range(sub_b):
        s, f = run_reduce(replace(task, path=(*task.path, j), table=inter.table(j), scratch=scratch), progress)
        shards.extend(s)
        fp = fp + f
    storage(scratch).delete_prefix("")
    return shards, fp

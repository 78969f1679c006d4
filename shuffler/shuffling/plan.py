"""Sizing the two-pass shuffle: bucket count, task counts, I/O per pass and peak memory per task.

`make_plan` is pure arithmetic on a `PlanRequest`, so it plans datasets that do not exist yet
(`shuffler plan --rows 1e12 --d-model 8192 --dtype bfloat16 --memory 64GiB`) as readily as real ones.
The shuffle itself runs from the same `Plan`, so what `plan` prints is what `shuffle` does.

Memory model of one task (one worker process holds one task at a time; `memory` is that task's budget):

    fixed    = BASE_RSS + 3 x read batch (2 compressed batches in flight + 1 decoded) + 2 x (threads + 3) chunks
    pass 1   = fixed + map_rows    x (row_bytes + 12)   rows of the run, int32 bucket ids, int64 sort order
    pass 2   = fixed + bucket_rows x (row_bytes + 16)   the permuted bucket, its sort keys, then the permutation

Bucket sizes are Binomial(N, 1/B): mean mu, standard deviation about sqrt(mu). B is the smallest count whose
mean plus 6 standard deviations fits the capacity (the pile-shuffle headroom rule, docs/shuffle.md, "Plan"); a bucket past it after all is re-shuffled recursively, which stays exact.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from shuffler.format.schema import Schema
from shuffler.io.rolling import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES
from shuffler.progress import human_bytes

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_MEMORY = 2 * GiB
"""Per-task budget when none is given. A constant, not a fraction of this machine's RAM: the budget fixes
the bucket count, and the bucket count fixes the output order, so a default that followed the machine
would make the same command shuffle differently on different machines."""
BASE_RSS = 96 * MiB
"""Interpreter, numpy, zstandard and fsspec in a fresh worker process (80-90 MiB measured here)."""
HEADROOM_SIGMAS = 6.0
"""Bucket capacity = mean + 6 standard deviations: P(one bucket overflows) < 1e-9 (Hardin 2018)."""
MIN_PARALLEL_BUCKET_BYTES = 64 * MiB
MAX_PARALLEL_BUCKETS = 64
"""At least min(64, data / 64 MiB) buckets, so pass 2 has work for up to 64 processes. A constant, for the
same reason as DEFAULT_MEMORY: it must not follow --workers, or the output would."""
MAX_BUCKETS = 1 << 24
MAP_TASKS_PER_WORKER = 4
MIN_MAP_BYTES = 64 * MiB
"""Map tasks are split for parallelism no finer than this, since pieces shrink as the task count grows."""
S3_EFFICIENT_READ = 8 * MiB
"""Ranged GETs below this are latency-bound: 1 MiB ran at 16 MB/s, 8 MiB at 113 MB/s (docs/benchmarks.md, "Measurements behind the design")."""
LOCAL_EFFICIENT_READ = 256 << 10
ROW_EXTRA_PASS1 = 12
ROW_EXTRA_PASS2 = 16
"""Per row in pass 2: the permutation's sort keys, then the permutation itself (keys.permutation), int64 each."""
ENCODE_THREADS = 2

#: Compression ratio of zstd-1 on byte-split real activations (docs/benchmarks.md, "Measurements behind the design").
DTYPE_RATIO = {"float32": 1.185, "float16": 1.168, "bfloat16": 1.454}
#: Negative zstd levels leave activations nearly raw: 1.006-1.009 on float16 here, at 2-3x level 1's speed.
FAST_LEVEL_RATIO = 1.0
LOCAL_SCRATCH_LEVEL = -3
REMOTE_SCRATCH_LEVEL = 1


def read_batch_bytes(chunk_bytes: int) -> int:
    """Compressed bytes fetched per batched ranged read: 4 chunks, between 256 KiB and 32 MiB."""
    return max(256 << 10, min(32 * MiB, 4 * chunk_bytes))


def fixed_overhead(chunk_bytes: int, threads: int = ENCODE_THREADS) -> int:
    return BASE_RSS + 3 * read_batch_bytes(chunk_bytes) + 2 * (threads + 3) * chunk_bytes


def bucket_capacity_mean(capacity_rows: int) -> float:
    """The largest mean bucket size mu with mu + 6 sqrt(mu) <= capacity_rows."""
    r = (-HEADROOM_SIGMAS + math.sqrt(HEADROOM_SIGMAS**2 + 4 * capacity_rows)) / 2
    return max(r * r, 1.0)


def buckets_for(rows: int, capacity_rows: int) -> int:
    """Buckets needed so that every bucket (with 6-sigma headroom) holds at most capacity_rows rows."""
    if rows <= capacity_rows:
        return 1
    return max(2, math.ceil(rows / bucket_capacity_mean(capacity_rows)))


def default_scratch_level(scratch_remote: bool) -> int:
    """Local scratch: a fast negative level (the bytes are cheap, the CPU is not); object store: level 1."""
    return REMOTE_SCRATCH_LEVEL if scratch_remote else LOCAL_SCRATCH_LEVEL


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """What to plan: the data, the budget, and where things live."""

    rows: int
    """Rows (tokens) to shuffle, all sources together."""
    schema: Schema
    """dtype, d_model and provenance columns of every row."""
    memory: int = DEFAULT_MEMORY
    """Memory budget of one task (one worker process), bytes. The run uses up to workers x this."""
    buckets: int | None = None
    """Bucket count; None sizes it from `memory`."""
    workers: int = 1
    """Worker processes running tasks at once. Never changes the output."""
    threads: int = ENCODE_THREADS
    """Codec threads per task. Never changes the output: buckets are sized for ENCODE_THREADS, and each thread
    beyond them adds two chunk buffers to the task's peak."""
    stored_bytes: int | None = None
    """Compressed size of the inputs; None estimates it from the dtype."""
    scratch_remote: bool = False
    """Intermediates live on an object store (S3) rather than local disk."""
    dst_remote: bool = False
    """The output lives on an object store."""
    scratch_level: int | None = None
    """zstd level of intermediates; None picks from where scratch lives (local: -3, object store: 1)."""
    level: int = 1
    """zstd level of the output shards."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Uncompressed bytes per chunk, output and intermediates."""
    shard_bytes: int = DEFAULT_SHARD_BYTES
    """Uncompressed bytes per output shard."""
    map_rows: int | None = None
    """Rows per map task; None splits for `workers` within the budget. Never changes the output."""
    machine_memory: int | None = None
    """RAM the `workers` share, bytes, checked against workers x peak; None: this machine's; 0: no check (a
    plan for a cluster, where the cost model fits the workers to a node's memory)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rows, int) or self.rows < 0:
            raise ValueError(f"rows={self.rows!r} must be an integer >= 0")
        if self.buckets is not None and not 1 <= self.buckets <= MAX_BUCKETS:
            raise ValueError(f"buckets={self.buckets} must be between 1 and {MAX_BUCKETS}")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")
        if self.machine_memory is not None and self.machine_memory < 0:
            raise ValueError(f"machine_memory={self.machine_memory} must be >= 0 bytes (0: no check)")
        if self.stored_bytes is not None and self.stored_bytes < 0:
            raise ValueError(f"stored_bytes={self.stored_bytes} must be >= 0")
        for name, lv in (("scratch_level", self.scratch_level), ("level", self.level)):
            if lv is not None and not -100 <= lv <= 22:
                raise ValueError(f"{name}={lv}: zstd levels run from -100 (fastest) to 22")
        if not self.schema.row_bytes <= self.chunk_bytes <= (1 << 31):
            raise ValueError(
                f"chunk_bytes={self.chunk_bytes} must hold one {self.schema.row_bytes}-byte row and be <= 2 GiB"
            )
        if self.shard_bytes < self.chunk_bytes:
            raise ValueError(f"shard_bytes={self.shard_bytes} must be >= chunk_bytes={self.chunk_bytes}")
        if self.map_rows is not None and self.map_rows < 1:
            raise ValueError(f"map_rows={self.map_rows} must be >= 1")
        fixed = fixed_overhead(self.chunk_bytes)
        least = fixed + 64 * (self.schema.row_bytes + ROW_EXTRA_PASS1)
        if self.memory < least:
            raise ValueError(
                f"memory={human_bytes(self.memory)} is below what one task needs: {human_bytes(fixed)} of fixed "
                f"overhead (process, read batches, {human_bytes(self.chunk_bytes)} chunk buffers) plus room for "
                f"rows; give --memory {math.ceil(least / MiB) + 1}MiB or more"
            )


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The sizing of one shuffle, and what it will cost. Every byte count is an estimate except the counts."""

    request: PlanRequest
    rows: int
    row_bytes: int
    raw_bytes: int
    """Uncompressed size of all rows."""
    buckets: int
    capacity_rows: int
    """Most rows one task holds in memory; a bucket larger than this is re-shuffled recursively."""
    map_rows: int
    map_tasks: int
    reduce_tasks: int
    intermediate_objects: int
    """Objects pass 1 writes: one per map task (plus a small index marker each)."""
    ranged_reads: int
    """Pass-2 fetches: one per (map task, bucket) pair that holds rows."""
    mean_read_bytes: float
    scratch_level: int
    pass1_read_bytes: int
    pass1_write_bytes: int
    pass2_read_bytes: int
    pass2_write_bytes: int
    bucket_mean_rows: float
    bucket_max_rows: int
    """Mean bucket plus 6 standard deviations (or the capacity, if buckets were forced larger)."""
    peak_map_bytes: int
    peak_reduce_bytes: int
    fixed_bytes: int
    recursion_expected: bool
    driver_index_bytes: int
    """Memory the coordinating process needs for the intermediates' chunk indexes (24 B per chunk)."""
    warnings: tuple[str, ...] = field(default=())

    @property
    def peak_task_bytes(self) -> int:
        return max(self.peak_map_bytes, self.peak_reduce_bytes)

    def to_json(self) -> dict:
        d = asdict(self)
        req = d.pop("request")
        req["schema"] = self.request.schema.to_json()
        d["request"] = req
        d["warnings"] = list(self.warnings)
        d["peak_task_bytes"] = self.peak_task_bytes
        return d

    def report(self) -> str:
        """Human-readable lines, one fact each."""
        r, hb = self.request, human_bytes
        s = r.schema
        lines = [
            f"data          {self.rows:,} rows x "
            + (" + ".join(f"{n} {d} {t}" for n, d, t in s.fields) if s.multi else f"{s.d_model} {s.dtype}")
            + (f" + {len(s.columns)} column(s)" if s.columns else "")
            + f" = {hb(self.raw_bytes)} uncompressed ({self.row_bytes} B/row)",
            f"memory        {hb(r.memory)} per task, {r.workers} worker(s) x {r.threads} codec thread(s)",
            f"buckets       B = {self.buckets:,}: mean {self.bucket_mean_rows:,.0f} rows, planned max "
            f"{self.bucket_max_rows:,} rows ({hb(self.bucket_max_rows * self.row_bytes)}); capacity "
            f"{self.capacity_rows:,} rows",
            f"pass 1        {self.map_tasks:,} map task(s) of <= {self.map_rows:,} rows; "
            f"{self.intermediate_objects:,} intermediate object(s) at zstd level {self.scratch_level}",
            f"  read        {hb(self.pass1_read_bytes)}   write {hb(self.pass1_write_bytes)}",
            f"  peak        {hb(self.peak_map_bytes)} per task",
            f"pass 2        {self.reduce_tasks:,} reduce task(s); {self.ranged_reads:,} ranged read(s), mean "
            f"{hb(self.mean_read_bytes)}",
            f"  read        {hb(self.pass2_read_bytes)}   write {hb(self.pass2_write_bytes)}",
            f"  peak        {hb(self.peak_reduce_bytes)} per task (bucket plus {hb(self.fixed_bytes)} fixed)",
            f"total peak    {hb(self.peak_task_bytes * r.workers)} with {r.workers} worker(s); driver index "
            f"{hb(self.driver_index_bytes)}",
        ]
        if self.recursion_expected:
            lines.append("recursion     buckets exceed the capacity and will be re-shuffled on their own")
        for w in self.warnings:
            lines.append(f"WARNING: {w}")
        return "\n".join(lines)


def make_plan(req: PlanRequest) -> Plan:
    """Size the shuffle described by `req`."""
    s = req.schema
    n, rb = req.rows, s.row_bytes
    raw = n * rb
    fixed = fixed_overhead(req.chunk_bytes)
    capacity = max(1, (req.memory - fixed) // (rb + max(ROW_EXTRA_PASS1, ROW_EXTRA_PASS2)))
    if req.buckets is not None:
        buckets = req.buckets
    else:
        parallel = min(MAX_PARALLEL_BUCKETS, math.ceil(raw / MIN_PARALLEL_BUCKET_BYTES))
        buckets = max(1, buckets_for(n, capacity), min(parallel, max(n, 1)))
        buckets = min(buckets, MAX_BUCKETS)
    mu = n / buckets
    bucket_max = n if buckets == 1 else min(n, math.ceil(mu + HEADROOM_SIGMAS * math.sqrt(mu)))
    recursion = bucket_max > capacity
    if req.map_rows is not None:
        map_rows = req.map_rows
    else:
        # Local scratch: about 4 tasks per worker, so that reading, sorting and writing of different tasks
        # overlap and each process touches a smaller run buffer once (first touch runs at about 1 GB/s
        # here: docs/benchmarks.md, "Measurements behind the design"); remote scratch: one task per worker, since pieces shrink as tasks multiply.
        per_worker = 1 if req.scratch_remote else MAP_TASKS_PER_WORKER
        split = max(math.ceil(n / (req.workers * per_worker)), MIN_MAP_BYTES // rb)
        map_rows = max(1, min(capacity, split))
    maps = math.ceil(n / map_rows) if n else 0

    stored = req.stored_bytes if req.stored_bytes is not None else round(raw / DTYPE_RATIO[s.dtype])
    ratio = raw / stored if stored else DTYPE_RATIO[s.dtype]
    slevel = req.scratch_level if req.scratch_level is not None else default_scratch_level(req.scratch_remote)
    scratch_bytes = round(raw / (FAST_LEVEL_RATIO if slevel <= 0 else ratio))
    out_bytes = round(raw / (FAST_LEVEL_RATIO if req.level <= 0 else ratio))
    rows_per_piece = n / max(1, maps * buckets)
    # A piece is empty with probability exp(-rows_per_piece) (Poisson approximation of the multinomial).
    reads = round(maps * buckets * -math.expm1(-rows_per_piece)) if n else 0
    mean_read = scratch_bytes / reads if reads else 0.0
    chunk_rows = max(1, req.chunk_bytes // rb)
    inter_chunks = maps * buckets + math.ceil(n / chunk_rows)
    # The buckets never depend on the threads (the output must not); threads beyond ENCODE_THREADS add their
    # chunk buffers on top of the budget.
    fixed += fixed_overhead(req.chunk_bytes, max(req.threads, ENCODE_THREADS)) - fixed_overhead(req.chunk_bytes)
    peak_map = fixed + min(map_rows, max(n, 1)) * (rb + ROW_EXTRA_PASS1)
    peak_reduce = fixed + min(bucket_max, capacity) * (rb + ROW_EXTRA_PASS2)

    warnings = []
    efficient = S3_EFFICIENT_READ if req.scratch_remote else LOCAL_EFFICIENT_READ
    if reads and mean_read < efficient:
        # Pieces are data / (M x B), and both M and B scale as data / memory, so pieces grow as memory^2.
        need = fixed + (req.memory - fixed) * math.sqrt(efficient / max(mean_read, 1.0))
        where = "an object store" if req.scratch_remote else "local disk"
        fix = f"raise --memory to about {human_bytes(need)}"
        if req.scratch_remote:
            fix += ", or put --scratch on local disk where small reads are cheap"
        warnings.append(
            f"pass 2 ranged reads average {human_bytes(mean_read)}, below the ~{human_bytes(efficient)} that "
            f"{where} needs to read efficiently; {fix} (pieces grow as memory^2 / data)"
        )
    if recursion and req.buckets is None:
        warnings.append(
            f"{buckets_for(n, capacity):,} buckets would be needed, above the cap of {MAX_BUCKETS:,}: buckets of up "
            f"to {bucket_max:,} rows exceed the {capacity:,} rows a task holds and will be re-shuffled recursively; "
            "raise --memory"
        )
    if recursion and req.buckets is not None:
        warnings.append(
            f"--buckets {buckets} gives buckets of up to {bucket_max:,} rows, above the {capacity:,} rows one "
            "task holds in memory: they will be re-shuffled recursively (exact, but one more pass over them); "
            f"use --buckets {buckets_for(n, capacity)} or more, or more --memory"
        )
    if max(peak_map, peak_reduce) > req.memory and req.threads > ENCODE_THREADS:
        warnings.append(
            f"{req.threads} codec threads raise a task's peak to {human_bytes(max(peak_map, peak_reduce))}, above "
            f"--memory {human_bytes(req.memory)} (two {human_bytes(req.chunk_bytes)} chunk buffers per thread past "
            f"{ENCODE_THREADS}); leave room for it, or give fewer --threads"
        )
    ram = _machine_ram() if req.machine_memory is None else req.machine_memory
    total = max(peak_map, peak_reduce) * req.workers
    if ram and total > ram:
        where = "a node's" if req.machine_memory else "this machine's"
        warnings.append(
            f"{req.workers} worker(s) x {human_bytes(max(peak_map, peak_reduce))} = {human_bytes(total)} exceeds "
            f"{where} {human_bytes(ram)} of RAM; lower --workers or --memory"
        )
    driver = inter_chunks * 24
    if driver > 4 * GiB:
        warnings.append(
            f"the coordinator would hold {human_bytes(driver)} of intermediate chunk indexes; raise --memory to "
            "cut the number of pieces"
        )
    return Plan(
        request=req,
        rows=n,
        row_bytes=rb,
        raw_bytes=raw,
        buckets=buckets,
        capacity_rows=capacity,
        map_rows=map_rows,
        map_tasks=maps,
        reduce_tasks=buckets,
        intermediate_objects=maps,
        ranged_reads=reads,
        mean_read_bytes=mean_read,
        scratch_level=slevel,
        pass1_read_bytes=stored,
        pass1_write_bytes=scratch_bytes,
        pass2_read_bytes=scratch_bytes,
        pass2_write_bytes=out_bytes,
        bucket_mean_rows=mu,
        bucket_max_rows=bucket_max,
        peak_map_bytes=peak_map,
        peak_reduce_bytes=peak_reduce,
        fixed_bytes=fixed,
        recursion_expected=recursion,
        driver_index_bytes=driver,
        warnings=tuple(warnings),
    )


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (what SLURM, taskset and cgroup cpusets leave it),
    not os.cpu_count(), which counts the whole node."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _machine_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None

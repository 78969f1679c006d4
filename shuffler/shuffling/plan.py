"""Sizing the two-pass shuffle: bucket count, task counts, I/O per pass and peak memory per task.

`make_plan` is pure arithmetic on a `PlanRequest`, so it plans datasets that do not exist yet
(`shuffler plan --rows 1e12 --d-model 8192 --dtype bfloat16 --memory 64GiB`) as readily as real ones.
The shuffle itself runs from the same `Plan`, so what `plan` prints is what `shuffle` does.

Memory model of one task (one worker process holds one task at a time; `memory` is that task's budget):

    fixed    = BASE_RSS + 3 x read batch (2 compressed batches in flight + 1 decoded) + 2 x (threads + 3) chunks
               + 2 x upload part (an object being written to S3: s3fs's part buffer and its copy; counted on
               local disk too, so the bucket count never depends on where DST or scratch lives)
    pass 1   = fixed + map_rows    x (row_bytes + 12)   rows of the run, int32 bucket ids, int64 sort order
    pass 2   = fixed + bucket_rows x (row_bytes + 16)   the permuted bucket, its sort keys, then the permutation

Bucket sizes are Binomial(N, 1/B): mean mu, standard deviation about sqrt(mu). B is the smallest count whose
mean plus 6 standard deviations fits the capacity (the pile-shuffle headroom rule, docs/shuffle.md, "Plan"); a bucket past it after all is re-shuffled recursively, which stays exact.

Two levels (`levels="2"`, docs/shuffle.md, "Two levels"): pass 1 scatters into S super-buckets, then each
super-bucket larger than a task is scattered again into its own sub-buckets by tasks that run in parallel, and
every sub-bucket is permuted. Pieces are data / (map tasks x buckets) at each level, so with B one-level buckets
S = ceil(sqrt(B)) makes both levels' pieces about sqrt(B) times larger than one level's, for one more pass.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from shuffler.format.schema import Schema
from shuffler.io.rolling import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES
from shuffler.progress import human_bytes
from shuffler.storage.storage import PART_BYTES, UPLOAD_BUFFERS, part_bytes_for

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
LEVELS = ("1", "2", "auto")
AUTO_LEVEL2_MIN_BUCKETS = 4
"""`auto` picks two levels only when the memory rule alone needs this many buckets: below it, super-buckets of
sqrt(B) would hardly be larger than one task, and the extra pass would buy nothing."""
ROW_EXTRA_PASS1 = 12
ROW_EXTRA_PASS2 = 16
"""Per row in pass 2: the permutation's sort keys, then the permutation itself (keys.permutation), int64 each."""
ENCODE_THREADS = 2
TASKS_PER_PREFIX = 64
"""Object-store scratch gets one hashed prefix per 64 tasks (map or reduce, the more): a task issues at most a
few dozen requests a second (a 12 MiB ranged GET or a 64 MiB part each), so 64 of them stay well under S3's
3,500 PUT and 5,500 GET per second per prefix (storage/storage.py)."""
MAX_PREFIXES = 4096

#: Compression ratio of zstd-1 on byte-split real activations (docs/benchmarks.md, "Measurements behind the design").
DTYPE_RATIO = {"float32": 1.185, "float16": 1.168, "bfloat16": 1.454}
#: Negative zstd levels leave activations nearly raw: 1.006-1.009 on float16 here, at 2-3x level 1's speed.
FAST_LEVEL_RATIO = 1.0
LOCAL_SCRATCH_LEVEL = -3
REMOTE_SCRATCH_LEVEL = 1


def read_batch_bytes(chunk_bytes: int) -> int:
    """Compressed bytes fetched per batched ranged read: 4 chunks, between 256 KiB and 32 MiB."""
    return max(256 << 10, min(32 * MiB, 4 * chunk_bytes))


def fixed_overhead(chunk_bytes: int, threads: int = ENCODE_THREADS, part_bytes: int = PART_BYTES) -> int:
    return (BASE_RSS + 3 * read_batch_bytes(chunk_bytes) + 2 * (threads + 3) * chunk_bytes
            + UPLOAD_BUFFERS * part_bytes)


def default_prefixes(scratch_remote: bool, tasks: int) -> int:
    """Hashed prefixes of the scratch: 1 on local disk; on an object store one per TASKS_PER_PREFIX tasks,
    rounded up to a power of two."""
    if not scratch_remote or tasks <= TASKS_PER_PREFIX:
        return 1
    return min(MAX_PREFIXES, 1 << math.ceil(math.log2(tasks / TASKS_PER_PREFIX)))


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
    scratch_prefixes: int | None = None
    """Hashed prefixes the intermediates spread over (storage/storage.py, prefixed_key); None: 1 on local disk,
    one per 64 tasks on an object store. Never changes the output."""
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
    levels: str = "1"
    """Scatter levels: 1, 2 (scatter into super-buckets, then each super-bucket is scattered again by its own
    parallel tasks, and --buckets counts super-buckets), or auto (2 when one level's pieces would fall below
    8 MiB and --buckets is not given). Changes the output."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", str(self.levels))
        if self.levels not in LEVELS:
            raise ValueError(f"levels={self.levels!r} must be one of {', '.join(LEVELS)}")
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
        if self.scratch_prefixes is not None and not 1 <= self.scratch_prefixes <= MAX_PREFIXES:
            raise ValueError(f"scratch_prefixes={self.scratch_prefixes} must be between 1 and {MAX_PREFIXES}")
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
                f"overhead (process, read batches, {human_bytes(self.chunk_bytes)} chunk buffers, upload parts) "
                "plus room for "
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
    scratch_prefixes: int
    """Hashed prefixes the intermediates spread over (storage/storage.py)."""
    part_bytes: int
    """Multipart part size of objects written to an object store (storage.part_bytes_for of the largest object
    a task can write, its budget): PART_BYTES up to 10,000 parts, larger past them."""
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
    levels: int = 1
    """Scatter levels this plan runs (request.levels with auto decided). With 2, `buckets` are super-buckets,
    `ranged_reads` the level-2 scatter's reads of them, and `reduce_tasks` the sub-buckets permuted."""
    sub_buckets: int = 0
    """Two levels: sub-buckets of a super-bucket of mean size (each super-bucket's own count follows its rows)."""
    level2_map_tasks: int = 0
    """Two levels: scatter tasks of the second level, all super-buckets together (<= capacity rows each)."""
    level2_ranged_reads: int = 0
    """Two levels: the permute pass's fetches, one per (level-2 map task, sub-bucket) pair that holds rows."""
    level2_mean_read_bytes: float = 0.0

    @property
    def stages(self) -> list[dict]:
        """The array-job stages (docs/cluster.md) in order: name, task count and what each task runs."""
        out = [{"stage": "plan", "tasks": 1, "runs": "fixes the run in DST/.shuffle/plan.json"},
               {"stage": "scatter", "tasks": self.map_tasks,
                "runs": f"map tasks: rows into {self.buckets:,} {'super-' if self.levels == 2 else ''}buckets"}]
        if self.levels == 2:
            out.append({"stage": "scatter2", "tasks": self.level2_map_tasks,
                        "runs": f"level-2 map tasks: one super-bucket's rows into its ~{self.sub_buckets:,} "
                                "sub-buckets"})
        out += [{"stage": "permute", "tasks": self.reduce_tasks,
                 "runs": "permute tasks: one " + ("(sub-)bucket" if self.levels == 2 else "bucket") + " each"},
                {"stage": "finalize", "tasks": 1, "runs": "checks every bucket, writes the manifest"}]
        return out

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
        d["stages"] = self.stages
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
            f"{self.intermediate_objects:,} intermediate object(s) at zstd level {self.scratch_level}"
            + (f", over {self.scratch_prefixes:,} hashed prefixes" if self.scratch_prefixes > 1 else ""),
            f"  read        {hb(self.pass1_read_bytes)}   write {hb(self.pass1_write_bytes)}",
            f"  peak        {hb(self.peak_map_bytes)} per task",
            f"pass 2        {self.reduce_tasks:,} reduce task(s); {self.ranged_reads:,} ranged read(s), mean "
            f"{hb(self.mean_read_bytes)}",
            f"  read        {hb(self.pass2_read_bytes)}   write {hb(self.pass2_write_bytes)}",
            f"  peak        {hb(self.peak_reduce_bytes)} per task (bucket plus {hb(self.fixed_bytes)} fixed)",
            f"uploads       {hb(self.part_bytes)} multipart parts on object stores",
            f"total peak    {hb(self.peak_task_bytes * r.workers)} with {r.workers} worker(s); driver index "
            f"{hb(self.driver_index_bytes)}",
        ]
        if self.levels == 2:
            again = (f"each scattered again into ~{self.sub_buckets:,} sub-bucket(s) by {self.level2_map_tasks:,} "
                     "level-2 map task(s) in all" if self.sub_buckets > 1 else
                     "each fits a task and is permuted directly (no level-2 scatter: one level would do)")
            lines[2] = (f"levels        2: S = {self.buckets:,} super-buckets of mean {self.rows / self.buckets:,.0f} "
                        f"rows, {again}; {self.reduce_tasks:,} buckets permuted, mean {self.bucket_mean_rows:,.0f} "
                        f"rows, planned max {self.bucket_max_rows:,}; capacity {self.capacity_rows:,} rows")
            lines.insert(6, f"level 2       {self.level2_map_tasks:,} map task(s) read the super-buckets: "
                            f"{self.ranged_reads:,} ranged read(s), mean {hb(self.mean_read_bytes)}; read "
                            f"{hb(self.pass2_read_bytes)}   write {hb(self.pass2_read_bytes)}")
            lines[7] = (f"pass 2        {self.reduce_tasks:,} permute task(s); {self.level2_ranged_reads:,} ranged "
                        f"read(s), mean {hb(self.level2_mean_read_bytes)}")
        lines.append(f"stages        {len(self.stages)} as an array job (docs/cluster.md), tasks and what each runs:")
        lines += [f"  {st['stage']:<11} x{st['tasks']:,}: {st['runs']}" for st in self.stages]
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
    # A task never writes an object larger than what it holds, its budget: that bounds the part size.
    part = part_bytes_for(req.memory)
    fixed = fixed_overhead(req.chunk_bytes, part_bytes=part)
    capacity = max(1, (req.memory - fixed) // (rb + max(ROW_EXTRA_PASS1, ROW_EXTRA_PASS2)))
    if req.buckets is not None:
        buckets = req.buckets
    else:
        parallel = min(MAX_PARALLEL_BUCKETS, math.ceil(raw / MIN_PARALLEL_BUCKET_BYTES))
        buckets = max(1, buckets_for(n, capacity), min(parallel, max(n, 1)))
        buckets = min(buckets, MAX_BUCKETS)
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
    reads, mean_read = _pieces(n, maps * buckets, scratch_bytes)
    levels = 2 if req.levels == "2" else 1
    if req.levels == "auto" and req.buckets is None and buckets_for(n, capacity) >= AUTO_LEVEL2_MIN_BUCKETS:
        # Judged on what fixes the bytes only (rows, row size, the stored ratio, memory), never on --workers,
        # --map-rows or where scratch lives, which must not change the output: map tasks of a full task's rows,
        # the largest pieces one level can have, at the sources' compression.
        _, widest = _pieces(n, math.ceil(n / capacity) * buckets, round(raw / ratio))
        levels = 2 if widest < S3_EFFICIENT_READ else 1
    leaves, sub_b, maps2, map2_rows = buckets, 0, 0, 0
    reads2, mean_read2 = 0, 0.0
    if levels == 2:
        if req.buckets is None:
            buckets = min(max(2, math.ceil(math.sqrt(buckets))), max(n, 1))  # S: both levels' pieces ~sqrt(B) larger
        reads, mean_read = _pieces(n, maps * buckets, scratch_bytes)
        mu_s = n / buckets
        # A super-bucket that fits a task is permuted directly (reduce.run_reduce), as the serial recursion does.
        sub_b = buckets_for(math.ceil(mu_s), capacity)
        map2_rows = min(capacity, math.ceil(mu_s)) if sub_b > 1 else 0
        maps2 = buckets * math.ceil(mu_s / capacity) if sub_b > 1 else 0
        leaves = buckets * sub_b
        reads2, mean_read2 = _pieces(n, maps2 * sub_b, scratch_bytes) if sub_b > 1 else (reads, mean_read)
    mu = n / leaves
    bucket_max = n if leaves == 1 else min(n, math.ceil(mu + HEADROOM_SIGMAS * math.sqrt(mu)))
    recursion = bucket_max > capacity
    chunk_rows = max(1, req.chunk_bytes // rb)
    inter_chunks = maps * buckets + math.ceil(n / chunk_rows)
    # The buckets never depend on the threads (the output must not); threads beyond ENCODE_THREADS add their
    # chunk buffers on top of the budget.
    fixed += fixed_overhead(req.chunk_bytes, max(req.threads, ENCODE_THREADS)) - fixed_overhead(req.chunk_bytes)
    prefixes = req.scratch_prefixes or default_prefixes(req.scratch_remote, max(maps, maps2, leaves))  # any stage's tasks
    peak_map = fixed + max(min(map_rows, max(n, 1)), map2_rows) * (rb + ROW_EXTRA_PASS1)
    peak_reduce = fixed + min(bucket_max, capacity) * (rb + ROW_EXTRA_PASS2)

    warnings = []
    efficient = S3_EFFICIENT_READ if req.scratch_remote else LOCAL_EFFICIENT_READ
    smallest = min(mean_read, mean_read2) if levels == 2 and reads2 else mean_read  # the warning's pieces
    if reads and smallest < efficient:
        # Pieces are data / (M x B), and both M and B scale as data / memory, so pieces grow as memory^2.
        need = fixed + (req.memory - fixed) * math.sqrt(efficient / max(smallest, 1.0))
        where = "an object store" if req.scratch_remote else "local disk"
        fix = f"raise --memory to about {human_bytes(need)}"
        if req.scratch_remote:
            fix += ", or put --scratch on local disk where small reads are cheap"
        if levels == 1 and buckets_for(n, capacity) >= AUTO_LEVEL2_MIN_BUCKETS:
            fix += ", or give --levels 2 (pieces about sqrt(B) times larger, for one more pass)"
        warnings.append(
            f"pass 2 ranged reads average {human_bytes(smallest)}, below the ~{human_bytes(efficient)} that "
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
        reduce_tasks=leaves,
        intermediate_objects=maps,
        ranged_reads=reads,
        mean_read_bytes=mean_read,
        scratch_level=slevel,
        scratch_prefixes=prefixes,
        part_bytes=part,
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
        levels=levels,
        sub_buckets=sub_b,
        level2_map_tasks=maps2,
        level2_ranged_reads=reads2,
        level2_mean_read_bytes=mean_read2,
    )


def _pieces(rows: int, pairs: int, nbytes: int) -> tuple[int, float]:
    """(ranged reads, mean bytes each) of `pairs` (map task, bucket) pieces of `rows` rows and `nbytes` in all.
    A piece is empty with probability exp(-rows per piece) (Poisson approximation of the multinomial)."""
    if not rows or not pairs:
        return 0, 0.0
    reads = max(1, round(pairs * -math.expm1(-rows / pairs)))
    return reads, nbytes / reads


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

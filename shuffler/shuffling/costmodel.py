"""What a shuffle costs on a cluster: wall time, requests and dollars per pass, objects and scratch space.

    est = estimate(plan, Cluster(nodes=64, cores=32, memory=256 * GiB, network=10e9 / 8, disk=2e9))
    print(est.report())

Wall time of a pass is the largest of what bounds it (a pass streams, so its stages overlap):
    network   bytes to and from object storage / (nodes x network bandwidth)
    disk      bytes to and from local scratch / (nodes x disk bandwidth)
    CPU       core-seconds of codec and in-memory work, at calibrated per-core rates, plus the kernel's work
              of moving the local-disk bytes (copies, page faults: Rates.local_io), / (nodes x usable cores)
plus a fixed start-up per pass (processes, listing, footers). Workers per node are the fewest of the plan's
--workers, the cores, and the tasks that fit in a node's memory at the plan's peak per task. Usable cores per
node are min(cores, workers x the cores one task keeps busy): a task of 2 codec threads (the plan's --threads)
plus a reader already keeps 1.6-1.75 of this machine's 2 cores busy (docs/scale.md), and T threads T/2 times
that. Local-disk I/O
counts on the CPU too because, below the page cache's size, it is kernel work on the same cores (sys time
was 0.6-2.3 s of a 4.5 s shuffle of 768 MiB here); counting it only as a separate disk bound under-predicts
a machine whose cores are already full. So does a fresh worker's first touch of its memory
(Rates.first_touch): two pool workers took 250,000 page faults in that shuffle (1.3x their peak), one
in-process worker 48,000-102,000. Since issue 21 shards and intermediates bypass the page cache (O_DIRECT,
storage/direct.py), so local I/O costs a fraction of that (Rates.local_io), and workers reuse their memory
(io/pages.py): 85,000-107,000 faults for a 1 GiB shuffle with two workers.

Request counts follow what the code does (shuffler/shuffling/map.py, reduce.py, shuffler/storage/storage.py): a map task reads
its input in batched ranged GETs of `read_batch_bytes`, writes one intermediate (one PUT, or a multipart
upload of the plan's parts, 64 MiB by default, above one part) and one marker; a reduce task makes one ranged
GET per non-empty piece, writes its shards the same way and one marker. With two levels (plan.levels == 2,
docs/shuffle.md "Two levels") a "level 2 scatter" pass sits between them: it reads pass 1's pieces of the
super-buckets and writes the level-2 intermediates, and the permute pass then reads the level-2 pieces. Prices
are per 1,000 requests; storage-time cost is left out (intermediates live for hours). Checked against measured
runs by benchmarks/costmodel.py.

Requests also bound the time: S3 serves about 3,500 PUT and 5,500 GET requests per second per partitioned prefix
(https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html), so a pass takes at least
its scratch requests / (the plan's hashed prefixes x those rates): the `requests` bound. SRC and DST are the
user's folders, one prefix each; where their rates pass the limit, the estimate warns (S3 must partition them).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field

from shuffler.progress import human_bytes
from shuffler.shuffling.plan import ENCODE_THREADS, GiB, Plan, PlanRequest, make_plan, read_batch_bytes
from shuffler.units import parse_size

PRICE_SOURCE = "AWS S3 pricing page, us-east-1, as documented defaults, check current prices"


def _fields_of(cls, doc: dict | str, where: str) -> dict:
    """A copy of `doc` (a dict or JSON text) whose keys are all fields of the dataclass `cls`."""
    try:
        doc = json.loads(doc) if isinstance(doc, str) else doc
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    allowed = ", ".join(cls.__dataclass_fields__)
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object with fields of {cls.__name__} ({allowed})")
    unknown = set(doc) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {allowed}")
    return dict(doc)


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """The machines a shuffle runs on (all nodes alike)."""

    nodes: int = 1
    """Machines."""
    cores: int = 2
    """CPU cores per node."""
    memory: int = 8 * GiB
    """RAM per node, bytes; bounds the workers per node at the plan's peak per task."""
    network: float = 1.25e9
    """Bytes/s per node to and from object storage (10 Gbit/s = 1.25e9)."""
    disk: float = 1e9
    """Bytes/s per node to and from local scratch (reads plus writes)."""

    def __post_init__(self) -> None:
        for name in ("nodes", "cores", "memory"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"cluster {name}={v!r} must be an integer >= 1")
        for name in ("network", "disk"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"cluster {name}={v!r} must be a bandwidth > 0 in bytes/s")

    @classmethod
    def from_json(cls, doc: dict | str, *, where: str = "cluster description") -> Cluster:
        """From a dict or JSON text with the fields of Cluster (memory may be "256GiB")."""
        doc = _fields_of(cls, doc, where)
        if isinstance(doc.get("memory"), str):
            doc["memory"] = parse_size(doc["memory"], what="memory")
        return cls(**doc)


@dataclass(frozen=True, kw_only=True)
class Prices:
    """Request prices, dollars per 1,000 requests. Defaults: S3 Standard (see PRICE_SOURCE)."""

    put: float = 0.005
    """PUT, COPY, POST, LIST requests (multipart create/part/complete are each one)."""
    get: float = 0.0004
    """GET (ranged or whole), HEAD and other read requests."""
    source: str = PRICE_SOURCE
    """Where the prices come from."""
    put_rate: float = 3500.0
    """PUT-class requests per second one prefix serves (S3: 3,500; see the module docstring)."""
    get_rate: float = 5500.0
    """GET-class requests per second one prefix serves (S3: 5,500)."""

    def __post_init__(self) -> None:
        if not (self.put >= 0 and self.get >= 0):
            raise ValueError(f"prices put={self.put}, get={self.get} must be >= 0 dollars per 1,000 requests")
        if not (self.put_rate > 0 and self.get_rate > 0):
            raise ValueError(f"put_rate={self.put_rate}, get_rate={self.get_rate} must be > 0 requests/s per prefix")


@dataclass(frozen=True, kw_only=True)
class Rates:
    """Per-core throughput of the CPU work, uncompressed bytes/s; calibrate with benchmarks/costmodel.py."""

    # Defaults: benchmarks/costmodel.py on the project's 2-core machine (docs/scale.md), rounded.
    decode_input: float = 800e6
    """Decoding the source (zstd level 1, byte-plane merge, checksum)."""
    scatter: float = 6e9
    """Pass 1 in-memory work: bucket draws, stable sort by bucket, gather."""
    encode_scratch: float = 700e6
    """Encoding intermediates at a negative (fast) level; at level >= 1 encode_output applies."""
    decode_scratch: float = 1.1e9
    """Decoding intermediates of a negative level; at level >= 1 decode_input applies."""
    permute: float = 7e9
    """Pass 2 in-memory work: permutation draw and gather."""
    encode_output: float = 530e6
    """Encoding at zstd level 1 (output shards, and intermediates on object stores); for output shards this
    includes the per-row hashes of the fingerprint (calibrated so)."""
    local_io: float = 1e10
    """Moving bytes to or from a local filesystem: bytes per core-second. With O_DIRECT through reused buffers
    (storage/direct.py) that is one copy into an aligned buffer and the system calls: 9.6-14.6 GB/s here
    (1.5 GB/s through the page cache before issue 21)."""
    first_touch: float = 1.2e9
    """A fresh worker process's first touch of its memory: bytes per core-second. Each worker of a pool that
    gets a task faults in its peak once, in the pass that starts the pool: about half of it huge-page buffers,
    half malloc arenas in 4 KiB pages (1.2-2.7 GB/s on this VM, which varies with how readily the kernel
    finds free 2 MiB pages; bare metal is several times faster)."""
    threads_per_task: float = 1.6
    """Cores one task of 2 codec threads keeps busy, prefetch and I/O overlapping ((user + sys) / wall of a
    one-worker shuffle of 768 MiB on this 2-core machine: 1.60-1.78); a task of T threads keeps T/2 times that."""
    startup_s: float = 0.1
    """Fixed seconds per pass (listing, footers, markers)."""
    process_start_s: float = 1.0
    """Seconds to start a node's worker processes (spawned together; interpreter, numpy, zstd imports), paid
    once, in pass 1, when a node runs more than one task."""

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            fixed = k.endswith("_s")
            if not (v >= 0 if fixed else v > 0):
                raise ValueError(f"rate {k}={v} must be {'>= 0' if fixed else '> 0'}")

    @classmethod
    def from_json(cls, doc: dict | str, *, where: str = "rates") -> Rates:
        """From a dict or JSON text with some fields of Rates (the rest keep their defaults)."""
        doc = _fields_of(cls, doc, where)
        bad = {k: v for k, v in doc.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            raise ValueError(f"{where}: {bad} must be numbers (bytes/s per core, or seconds)")
        try:
            return cls(**doc)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True, kw_only=True)
class PassCost:
    """One pass of the shuffle on the cluster."""

    name: str
    wall_s: float
    bound: str
    """What limits it: "network", "disk", "cpu" or "requests" (per scratch prefix)."""
    network_s: float
    disk_s: float
    cpu_s: float
    requests_s: float = 0.0
    """Scratch requests / (prefixes x the per-prefix rates)."""
    gets: int
    puts: int
    dollars: float


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """The cost of a plan on a cluster at given prices."""

    plan: Plan
    cluster: Cluster
    prices: Prices
    rates: Rates
    passes: tuple[PassCost, ...]
    workers_per_node: int
    intermediate_objects: int
    scratch_bytes: int
    """Peak scratch: every intermediate exists until pass 2 ends (with two levels, both levels' intermediates)."""
    warnings: tuple[str, ...] = field(default=())

    @property
    def wall_s(self) -> float:
        return sum(p.wall_s for p in self.passes)

    @property
    def dollars(self) -> float:
        return sum(p.dollars for p in self.passes)

    def to_json(self) -> dict:
        return {
            "cluster": asdict(self.cluster), "prices": asdict(self.prices), "rates": asdict(self.rates),
            "workers_per_node": self.workers_per_node, "passes": [asdict(p) for p in self.passes],
            "wall_s": self.wall_s, "dollars": self.dollars, "intermediate_objects": self.intermediate_objects,
            "scratch_bytes": self.scratch_bytes, "warnings": list(self.warnings),
        }

    def report(self) -> str:
        c = self.cluster
        lines = [f"cluster       {c.nodes} node(s) x {c.cores} cores, {human_bytes(c.memory)} RAM, network "
                 f"{human_bytes(c.network)}/s, disk {human_bytes(c.disk)}/s; {self.workers_per_node} worker(s) "
                 "per node"]
        for p in self.passes:
            lines.append(f"{p.name:<13} ~{_dur(p.wall_s)} ({p.bound}-bound: network {_dur(p.network_s)}, disk "
                         f"{_dur(p.disk_s)}, cpu {_dur(p.cpu_s)}, requests {_dur(p.requests_s)}); {p.gets:,} GET, "
                         f"{p.puts:,} PUT = ${p.dollars:,.2f}")
        lines += [
            f"total         ~{_dur(self.wall_s)}, ${self.dollars:,.2f} in requests "
            f"(GET ${self.prices.get}/1k, PUT ${self.prices.put}/1k: {self.prices.source})",
            f"intermediates {self.intermediate_objects:,} object(s), {human_bytes(self.scratch_bytes)} of scratch "
            f"at the peak, over {self.plan.scratch_prefixes:,} hashed prefix(es); {human_bytes(self.plan.part_bytes)} "
            "parts",
        ]
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _objects_puts(total_bytes: float, objects: int, part_bytes: int) -> int:
    """PUT-class requests to write `objects` objects of `total_bytes` in all, in parts of `part_bytes` (one PUT
    for an object that never fills a part: s3fs uploads it whole at close)."""
    if objects <= 0:
        return 0
    each = total_bytes / objects
    per = 1 if each <= part_bytes else math.ceil(each / part_bytes) + 2  # create + parts + complete
    return objects * per


def fit_to_node(request: PlanRequest, cluster: Cluster, *, threads: int | None = None) -> Plan:
    """The plan of `request` with as many workers per node as the node's cores and memory (at the plan's peak per
    task) allow, and `threads` per task (None: the cores shared among those workers, rounded up). Each thread
    past ENCODE_THREADS raises the peak by two chunks, so this fits again until it settles (2-3 rounds)."""
    plan = make_plan(dataclasses.replace(request, workers=cluster.cores, machine_memory=0,
                                         threads=threads or 1))
    for _ in range(4):
        fit = min(cluster.cores, max(1, cluster.memory // max(plan.peak_task_bytes, 1)))
        per_task = threads or -(-cluster.cores // fit)
        if (fit, per_task) == (plan.request.workers, plan.request.threads):
            break
        plan = make_plan(dataclasses.replace(plan.request, workers=fit, threads=per_task))
    return plan


def estimate(plan: Plan, cluster: Cluster, prices: Prices | None = None, rates: Rates | None = None, *,
             src_remote: bool | None = None) -> Estimate:
    """Cost of running `plan` on `cluster`. `src_remote`: SRC on object storage (default: where DST is)."""
    prices, rates = prices or Prices(), rates or Rates()
    req = plan.request
    src_remote = req.dst_remote if src_remote is None else src_remote
    fit = max(1, cluster.memory // max(plan.peak_task_bytes, 1))
    workers = max(1, min(cluster.cores, fit, req.workers))
    busy = rates.threads_per_task * req.threads / ENCODE_THREADS  # cores one task keeps busy
    usable = cluster.nodes * min(cluster.cores, workers * busy)
    raw = plan.raw_bytes
    warnings = []
    if min(fit, req.workers) * req.threads < cluster.cores:
        warnings.append(f"{min(fit, req.workers)} task(s) per node (memory allows {fit} at "
                        f"{human_bytes(plan.peak_task_bytes)} each, --workers {req.workers}) of {req.threads} codec "
                        f"thread(s) keep fewer than the {cluster.cores} cores busy; raise --threads (or --workers, "
                        "or lower --memory) to use them all")
    tasks = max(plan.map_tasks, 1)
    if plan.map_tasks < cluster.nodes * workers or plan.reduce_tasks < cluster.nodes * workers:
        warnings.append(f"{plan.map_tasks:,} map and {plan.reduce_tasks:,} reduce task(s) for "
                        f"{cluster.nodes * workers:,} workers: some workers idle (raise --num-tasks / lower map rows)")

    prefixes = plan.scratch_prefixes

    def bound(name, ntasks, net_bytes, disk_bytes, cpu_core_s, gets, puts, scratch_gets, scratch_puts, other,
              extra_s=0.0) -> PassCost:
        # A pass cannot use more cores than it has tasks, nor more nodes' links than it has tasks.
        nodes = max(1, min(cluster.nodes, ntasks))
        net = net_bytes / (nodes * cluster.network)
        dsk = disk_bytes / (nodes * cluster.disk)
        cpu_core_s += disk_bytes / rates.local_io
        cpu = cpu_core_s / max(1.0, min(usable, ntasks * busy))
        req = max(scratch_gets / prices.get_rate, scratch_puts / prices.put_rate) / prefixes
        which = max((net, "network"), (dsk, "disk"), (cpu, "cpu"), (req, "requests"))
        wall = which[0] + rates.startup_s + extra_s
        for folder, kind, count, rate in other:  # SRC and DST: one prefix each, the user's layout
            if count / wall > rate:
                warnings.append(f"{name}: {count / wall:,.0f} {kind}/s on {folder}, one prefix, above S3's "
                                f"{rate:,.0f}/s per prefix: expect 503 SlowDown until S3 partitions it (retried "
                                "with backoff); ramp the tasks up")
        dollars = gets / 1000 * prices.get + puts / 1000 * prices.put
        return PassCost(name=name, wall_s=wall, bound=which[1], network_s=net, disk_s=dsk, cpu_s=cpu,
                        requests_s=req, gets=int(gets), puts=int(puts), dollars=dollars)

    batch = read_batch_bytes(req.chunk_bytes)
    scratch_remote = req.scratch_remote
    # pass 1: read SRC, write intermediates
    src_gets = math.ceil(plan.pass1_read_bytes / batch) + tasks  # + one footer read per task (order of)
    p1_net = (plan.pass1_read_bytes if src_remote else 0) + (plan.pass1_write_bytes if scratch_remote else 0)
    p1_disk = (0 if src_remote else plan.pass1_read_bytes) + (0 if scratch_remote else plan.pass1_write_bytes)
    fast = plan.scratch_level <= 0  # negative levels: near-raw frames, faster codec
    enc_s = rates.encode_scratch if fast else rates.encode_output
    dec_s = rates.decode_scratch if fast else rates.decode_input
    p1_cpu = raw / rates.decode_input + raw / rates.scatter + raw / enc_s
    p1_puts = (_objects_puts(plan.pass1_write_bytes, plan.map_tasks, plan.part_bytes) + plan.map_tasks
               if scratch_remote else 0)
    # The local executor runs a single task in-process; more start a pool (shuffler/shuffling/executor.py).
    pool1 = plan.map_tasks > 1 and workers > 1
    pool2 = not pool1 and plan.reduce_tasks > 1 and workers > 1
    spawn1, spawn2 = (rates.process_start_s if pool else 0.0 for pool in (pool1, pool2))
    # Fresh worker processes fault in their memory (up to the plan's peak) once, in the pass that starts them;
    # a task run in-process reuses the coordinator's warm heap. Only workers that get a task start.
    started = min(cluster.nodes * workers, plan.map_tasks if pool1 else plan.reduce_tasks)
    touch = started * plan.peak_task_bytes / rates.first_touch
    p1_cpu += touch if pool1 else 0.0
    p1_gets = src_gets if src_remote else 0
    p1 = bound("pass 1 scatter", plan.map_tasks, p1_net, p1_disk, p1_cpu, p1_gets, p1_puts, 0, p1_puts,
               [("SRC", "GET", p1_gets, prices.get_rate)], spawn1)
    passes = [p1]
    if plan.levels == 2:
        # the second scatter level (docs/shuffle.md, "Two levels"): read each super-bucket's pieces, scatter them
        # again into intermediates of its own, one more pass over the data in scratch.
        l2_net = (plan.pass2_read_bytes + plan.pass1_write_bytes) if scratch_remote else 0
        l2_disk = 0 if scratch_remote else plan.pass2_read_bytes + plan.pass1_write_bytes
        l2_cpu = raw / dec_s + raw / rates.scatter + raw / enc_s
        l2_gets = (plan.ranged_reads + plan.map_tasks) if scratch_remote else 0  # pieces + footers or index
        l2_puts = (_objects_puts(plan.pass1_write_bytes, plan.level2_map_tasks, plan.part_bytes)
                   + plan.level2_map_tasks if scratch_remote else 0)
        passes.append(bound("level 2 scatter", plan.level2_map_tasks, l2_net, l2_disk, l2_cpu, l2_gets, l2_puts,
                            l2_gets, l2_puts, []))
    # pass 2: read intermediates piece by piece, write output shards
    out_shards = math.ceil(raw / req.shard_bytes) + plan.reduce_tasks  # shard_bytes is uncompressed; buckets split
    p2_net = (plan.pass2_read_bytes if scratch_remote else 0) + (plan.pass2_write_bytes if req.dst_remote else 0)
    p2_disk = (0 if scratch_remote else plan.pass2_read_bytes) + (0 if req.dst_remote else plan.pass2_write_bytes)
    p2_cpu = raw / dec_s + raw / rates.permute + raw / rates.encode_output + (touch if pool2 else 0.0)
    last_reads, last_maps = ((plan.level2_ranged_reads, plan.level2_map_tasks) if plan.levels == 2 and plan.level2_map_tasks
                             else (plan.ranged_reads, plan.map_tasks))
    p2_gets = (last_reads + last_maps) if scratch_remote else 0  # pieces + intermediate footers
    p2_puts = ((_objects_puts(plan.pass2_write_bytes, out_shards, plan.part_bytes) + plan.reduce_tasks + 1)
               if req.dst_remote else 0)
    p2 = bound("pass 2 permute", plan.reduce_tasks, p2_net, p2_disk, p2_cpu, p2_gets, p2_puts, p2_gets, 0,
               [("DST", "PUT", p2_puts, prices.put_rate)], spawn2)
    return Estimate(
        plan=plan, cluster=cluster, prices=prices, rates=rates, passes=(*passes, p2), workers_per_node=workers,
        intermediate_objects=2 * (plan.map_tasks + plan.level2_map_tasks),
        scratch_bytes=plan.pass1_write_bytes * (2 if plan.level2_map_tasks else 1), warnings=tuple(warnings),
    )


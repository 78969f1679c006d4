"""CLI commands of the shuffle: shuffle, plan, cost, verify (docs/shuffle.md, docs/scale.md)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter

import click

from shuffler.cli import SIZE
from shuffler.cli.options import option, options
from shuffler.format.schema import ACT_DTYPES, STANDARD_COLUMNS, Schema
from shuffler.progress import Progress, human_bytes
from shuffler.shuffling.executor import EXECUTORS
from shuffler.shuffling.plan import LEVELS, PlanRequest, make_plan, usable_cores
from shuffler.shuffling.recompute import Economics, Workload
from shuffler.shuffling.run import ShuffleConfig

_MEM_EXTRA = ("E.g. 4GiB. With --seed it fixes the output order; the run uses up to workers x this, plus two chunk "
              "buffers for each thread past 2 (`shuffler plan` prints the peak).")


@click.command("shuffle")
@click.argument("paths", nargs=-1, required=True, metavar="SRC... DST")
@option(ShuffleConfig, "seed", type=click.IntRange(0, 2**64 - 1), extra="Required, except with --from-scatter, "
        "where it defaults to the scatter seed.")
@option(ShuffleConfig, "memory", extra=_MEM_EXTRA)
@option(ShuffleConfig, "buckets", type=click.IntRange(1))
@option(ShuffleConfig, "levels", choices=LEVELS)
@click.option("--from-scatter", is_flag=True, help="SRC was written scattered (ShardWriter scatter=, synth/capture "
              "--scatter): run pass 2 only, with the producers' buckets.")
@option(ShuffleConfig, "workers", type=click.IntRange(1))
@option(ShuffleConfig, "threads", type=click.IntRange(1), extra="One task can use every core of a node: "
        "--workers 1 --threads 64.")
@option(ShuffleConfig, "scratch", extra="E.g. local NVMe while DST is on S3.")
@option(ShuffleConfig, "scratch_level", type=click.IntRange(-100, 22))
@option(ShuffleConfig, "scratch_prefixes", type=click.IntRange(1, 4096))
@options(ShuffleConfig, "keep_intermediate", "overwrite", "break_lock")
@option(ShuffleConfig, "level", type=click.IntRange(-100, 22))
@options(ShuffleConfig, "chunk_bytes", "shard_bytes")
@option(ShuffleConfig, "map_rows", type=click.IntRange(1))
@option(ShuffleConfig, "executor", choices=EXECUTORS, extra="Ray needs the extra `ray`.")
@option(ShuffleConfig, "ray_address")
@click.option("--stage", type=click.Choice(["plan", "scatter", "scatter2", "permute", "finalize"]),
              help="Run one stage of an array job (docs/cluster.md): plan once, scatter, scatter2 and permute on "
              "every task, finalize once (scatter2 does nothing with one level).")
@click.option("--task-index", type=click.IntRange(0), help="This array task's index [default: from SLURM, "
              "JOB_COMPLETION_INDEX or AWS Batch].")
@click.option("--num-tasks", type=click.IntRange(1), help="How many array tasks share a stage [default: from the "
              "scheduler; required with JOB_COMPLETION_INDEX].")
def shuffle_cmd(paths, seed, memory, buckets, levels, from_scatter, workers, threads, scratch, scratch_level,
                scratch_prefixes, keep_intermediate, overwrite, break_lock, level, chunk_bytes, shard_bytes, map_rows,
                executor, ray_address, stage,
                task_index, num_tasks):
    """Write a globally shuffled copy of SRC (one or more datasets) to DST.

    Pass 1 sends every row to a uniformly random bucket; pass 2 permutes each bucket in memory and writes it.
    The result is a uniformly random permutation of all rows (docs/shuffle.md), the same bytes for the same
    seed and --memory/--buckets whatever --workers. DST gets its manifest.json last. If the run dies
    (even kill -9), run the same command again: committed tasks are skipped.

    \b
    Examples:
      shuffler shuffle data/raw data/shuffled --seed 0
      shuffler shuffle s3://b/raw-0 s3://b/raw-1 s3://b/shuffled --seed 7 --memory 16GiB --scratch /nvme/tmp
      shuffler shuffle --from-scatter data/scattered data/shuffled    # pass 2 only (docs/shuffle.md)
      shuffler shuffle s3://b/raw s3://b/shuffled --seed 0 --executor ray --ray-address auto
      shuffler shuffle s3://b/raw s3://b/shuffled --seed 0 --stage scatter   # in a SLURM array (docs/cluster.md)
    """
    from shuffler.shuffling.run import shuffle

    if len(paths) < 2:
        raise click.UsageError("give at least one SRC and a DST: shuffler shuffle SRC... DST --seed S")
    *srcs, dst = paths
    if stage is not None:
        if from_scatter:
            raise click.UsageError("--stage does not apply to --from-scatter")
        if seed is None:
            raise click.UsageError("Missing option '--seed' (every stage needs the same one)")
        _stage(stage, srcs, dst, seed, task_index, num_tasks, workers, threads, executor, ray_address, overwrite,
               break_lock,
               dict(memory=memory, buckets=buckets, scratch=scratch, scratch_level=scratch_level,
                    scratch_prefixes=scratch_prefixes, keep_intermediate=keep_intermediate, level=level,
                    chunk_bytes=chunk_bytes, shard_bytes=shard_bytes, map_rows=map_rows, levels=levels))
        return
    if task_index is not None or num_tasks is not None:
        raise click.UsageError("--task-index/--num-tasks need --stage scatter, scatter2 or permute")
    if from_scatter:
        if levels != "1":
            raise click.UsageError(f"--levels {levels} does not apply to --from-scatter: the producers wrote "
                                   "the one scatter level")
        _from_scatter(srcs, dst, seed, memory, buckets, workers, threads, scratch, scratch_level, keep_intermediate,
                      overwrite, break_lock, level, chunk_bytes, shard_bytes, map_rows, executor, ray_address)
        return
    if seed is None:
        raise click.UsageError("Missing option '--seed' (every shuffle needs one, except --from-scatter)")
    t0 = time.perf_counter()
    stats: dict = {}
    m = shuffle(srcs, dst, seed=seed, memory=memory, buckets=buckets, workers=workers, threads=threads, scratch=scratch,
                scratch_level=scratch_level, scratch_prefixes=scratch_prefixes, keep_intermediate=keep_intermediate,
                overwrite=overwrite, break_lock=break_lock, level=level, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes,
                map_rows=map_rows, executor=executor, ray_address=ray_address, levels=levels, stats=stats)
    info = m.metadata["shuffle"]
    passes = ""
    if "pass2_end" in stats:
        passes = (f" (pass 1 {stats['pass2_start'] - stats['pass1_start']:.1f} s, pass 2 "
                  f"{stats['pass2_end'] - stats['pass2_start']:.1f} s, {stats['workers']} worker(s))")
    levels = " super-bucket(s) in 2 levels" if info.get("levels") == 2 else " bucket(s)"
    click.echo(f"shuffled {m.num_rows:,} rows from {len(srcs)} source(s) into {dst}: {info['buckets']}{levels}, "
               f"{len(m.shards)} shard(s), {human_bytes(m.stored_bytes)}, {time.perf_counter() - t0:.1f} s{passes}")
    _echo_nodes(stats)


def _echo_nodes(stats: dict) -> None:
    """With Ray, one line saying where the tasks ran: per pass, the task count per node (the first 8 hex digits
    of the Ray node id, as `ray list nodes` shows it), so a user sees whether the work spread over the cluster."""
    for what, nodes in stats.get("task_nodes", {}).items():
        counts = Counter(nodes)
        spread = ", ".join(f"{node[:8]} x{n}" for node, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        label = {"pass1": "pass 1", "level2": "level-2 scatter", "pass2": "pass 2"}.get(what, what)
        click.echo(f"ray {label}: {len(nodes)} task(s) on {len(counts)} node(s): {spread}")


def _stage(stage, srcs, dst, seed, task_index, num_tasks, workers, threads, executor, ray_address, overwrite,
           break_lock, planned: dict) -> None:
    from shuffler.shuffling.array_job import resolve_slot, run_stage

    t0 = time.perf_counter()
    ctx = click.get_current_context()
    if stage == "plan":
        config = planned
        if num_tasks is not None and workers is None:
            workers = num_tasks  # split the input into at least one map task per array task
    else:
        # Later stages read the planned options from the plan; only those given on this command line are
        # checked against it (so the same command line for every stage works, and a different one is refused).
        config = {k: v for k, v in planned.items()
                  if ctx.get_parameter_source(k) is click.core.ParameterSource.COMMANDLINE}
    slot = resolve_slot(task_index, num_tasks) if stage in ("scatter", "scatter2", "permute") else None
    out = run_stage(stage, srcs, dst, seed=seed, slot=slot, config=config, workers=workers, threads=threads,
                    executor=executor,
                    ray_address=ray_address, overwrite=overwrite, break_lock=break_lock)
    who = f" task {slot.index}/{slot.count}" if slot else ""
    facts = ", ".join(f"{k} {v}" for k, v in out.items() if k not in ("stage", "did"))
    click.echo(f"stage {stage}{who} of {dst}: done ({facts}), {time.perf_counter() - t0:.1f} s")


def _from_scatter(srcs, dst, seed, memory, buckets, workers, threads, scratch, scratch_level, keep_intermediate, overwrite,
                  break_lock, level, chunk_bytes, shard_bytes, map_rows, executor, ray_address) -> None:
    from shuffler.shuffling.from_scatter import shuffle_from_scatter

    if len(srcs) != 1:
        raise click.UsageError(f"--from-scatter takes one scattered SRC and a DST, got {len(srcs)} SRC(s)")
    for name, v in (("--buckets", buckets), ("--map-rows", map_rows), ("--keep-intermediate", keep_intermediate or None)):
        if v is not None:
            raise click.UsageError(f"{name} does not apply to --from-scatter: the producers fixed the buckets and runs")
    t0 = time.perf_counter()
    stats: dict = {}
    m = shuffle_from_scatter(srcs[0], dst, seed=seed, memory=memory, workers=workers, threads=threads,
                             scratch=scratch,
                             scratch_level=scratch_level, overwrite=overwrite, break_lock=break_lock, level=level,
                             chunk_bytes=chunk_bytes, shard_bytes=shard_bytes, executor=executor,
                             ray_address=ray_address, stats=stats)
    info = m.metadata["shuffle"]
    click.echo(f"shuffled {m.num_rows:,} scattered rows of {srcs[0]} into {dst} (pass 2 only): {info['buckets']} "
               f"bucket(s), {len(m.shards)} shard(s), {human_bytes(m.stored_bytes)}, {time.perf_counter() - t0:.1f} s")
    _echo_nodes(stats)


@click.command("plan")
@click.argument("src", nargs=-1, metavar="[SRC...]")
@click.option("--rows", type=float, help="Plan a dataset that does not exist: its rows (1e12 is fine).")
@click.option("--d-model", type=click.IntRange(1), help="...its activation width.")
@click.option("--dtype", type=click.Choice(sorted(ACT_DTYPES)), help="...its dtype.")
@click.option("--columns", default="token_id,doc_id,position", show_default=True,
              help="...its provenance columns: standard names, or name:dtype.")
@click.option("--compression", type=float, help="...its compression ratio (default: measured zstd-1 ratio of the dtype).")
@option(ShuffleConfig, "memory", extra=_MEM_EXTRA)
@option(ShuffleConfig, "buckets", type=click.IntRange(1))
@option(ShuffleConfig, "levels", choices=LEVELS)
@option(ShuffleConfig, "workers", type=click.IntRange(1), extra="With a cluster: per node [default: as many as a "
        "node's cores and memory allow].")
@option(ShuffleConfig, "threads", type=click.IntRange(1), extra="With a cluster: a node's cores over its workers.")
@click.option("--dst", help="Where the output would go (an s3:// DST puts the default scratch on S3).")
@option(ShuffleConfig, "scratch", extra="Without --dst: local.")
@option(ShuffleConfig, "scratch_level", type=click.IntRange(-100, 22))
@option(ShuffleConfig, "scratch_prefixes", type=click.IntRange(1, 4096))
@option(ShuffleConfig, "level", type=click.IntRange(-100, 22))
@options(ShuffleConfig, "chunk_bytes", "shard_bytes")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--cluster", "cluster_file", type=click.Path(exists=True, dir_okay=False),
              help="Cluster description, JSON: {nodes, cores, memory, network, disk} (bandwidths in bytes/s). "
              "Any cluster option adds the cost estimate: wall time, requests and dollars per pass.")
@click.option("--nodes", type=click.IntRange(1), help="Cluster: machines.")
@click.option("--cores", type=click.IntRange(1), help="Cluster: CPU cores per node.")
@click.option("--node-memory", type=SIZE, help="Cluster: RAM per node, e.g. 256GiB.")
@click.option("--network", type=SIZE, help="Cluster: bytes/s per node to object storage, e.g. 1.25GB (10 Gbit/s).")
@click.option("--disk", type=SIZE, help="Cluster: bytes/s per node of local scratch disk, e.g. 2GB.")
@click.option("--put-price", type=click.FloatRange(0), help="Dollars per 1,000 PUT/COPY/POST/LIST [default: 0.005, "
              "S3 Standard us-east-1, check current prices].")
@click.option("--get-price", type=click.FloatRange(0), help="Dollars per 1,000 GET [default: 0.0004].")
@click.option("--rates", "rates_file", type=click.Path(exists=True, dir_okay=False),
              help="Per-core codec rates, JSON (fields of shuffler.shuffling.costmodel.Rates; `python benchmarks/costmodel.py "
              "--save-rates FILE` measures them on the machine it runs on).")
def plan_cmd(src, rows, d_model, dtype, columns, compression, memory, buckets, levels, workers, threads, dst, scratch,
             scratch_level, scratch_prefixes, level, chunk_bytes, shard_bytes, as_json, cluster_file, nodes, cores,
             node_memory, network, disk,
             put_price, get_price, rates_file):
    """Print how a shuffle would run: buckets, tasks, objects, ranged reads, bytes per pass, peak memory;
    with a cluster description, also its cost there: time, requests and dollars per pass (docs/scale.md).

    Plans existing datasets (SRC...) or ones that do not exist yet, from --rows, --d-model and --dtype.
    Warns when pass 2's ranged reads would be too small to be efficient (about 8 MiB on S3) and says what
    to change.

    \b
    Examples:
      shuffler plan data/raw --memory 4GiB
      shuffler plan --rows 1e12 --d-model 8192 --dtype bfloat16 --memory 64GiB --dst s3://bucket/out
      shuffler plan --rows 6.1e10 --d-model 8192 --dtype bfloat16 --memory 48GiB --dst s3://b/out \
          --nodes 256 --cores 64 --node-memory 512GiB --network 5GB --disk 4GB
    """
    cluster = _cluster(cluster_file, nodes, cores, node_memory, network, disk)
    # On a cluster, --workers is per node; the RAM to check it against is a node's. Without --workers the
    # cost model fits as many workers as a node's memory holds, so there is nothing to check here.
    machine_memory = (cluster.memory if workers else 0) if cluster else None
    workers = workers or (cluster.cores if cluster else None) or usable_cores()
    if src:
        if rows is not None or d_model is not None or dtype is not None:
            raise click.UsageError("give either SRC datasets or --rows/--d-model/--dtype, not both")
        from shuffler.shuffling.run import open_sources

        datasets = open_sources(list(src))
        schema = datasets[0].schema
        n = sum(d.num_rows for d in datasets)
        stored = sum(d.manifest.stored_bytes for d in datasets)
    else:
        if rows is None or d_model is None or dtype is None:
            raise click.UsageError("give SRC datasets, or all of --rows, --d-model and --dtype for a planned dataset")
        if rows < 0 or rows != math.floor(rows) or rows > 2**63:
            raise click.BadParameter(f"{rows!r} is not a whole number of rows", param_hint="--rows")
        schema = Schema(dtype=dtype, d_model=d_model, columns=_parse_columns(columns))
        n = int(rows)
        if compression is not None and compression <= 0:
            raise click.BadParameter(f"{compression} must be > 0", param_hint="--compression")
        stored = round(n * schema.row_bytes / compression) if compression else None
    scratch_url = scratch or (f"{dst.rstrip('/')}/.shuffle/scratch" if dst else None)
    node_cores = cluster.cores if cluster else usable_cores()
    request = PlanRequest(
        rows=n, schema=schema, memory=memory, buckets=buckets, workers=workers,
        threads=threads or -(-node_cores // workers), stored_bytes=stored,
        scratch_remote=bool(scratch_url) and not _is_local(scratch_url), dst_remote=bool(dst) and not _is_local(dst),
        scratch_level=scratch_level, level=level, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes,
        machine_memory=machine_memory, levels=levels, scratch_prefixes=scratch_prefixes,
    )
    if cluster is not None and machine_memory == 0:
        # No --workers on a cluster: as many per node as its cores and its memory (at this plan's peak) allow,
        # so the plan's own figures (total peak, task split) speak of the workers that will run.
        from shuffler.shuffling.costmodel import fit_to_node

        plan = fit_to_node(request, cluster, threads=threads)
        workers = plan.request.workers
    else:
        plan = make_plan(request)
    est = None
    if cluster is not None or put_price is not None or get_price is not None or rates_file:
        from shuffler.shuffling.costmodel import Cluster, Prices, Rates, estimate

        prices = Prices(**{k: v for k, v in (("put", put_price), ("get", get_price)) if v is not None})
        try:
            if rates_file:
                with open(rates_file, encoding="utf-8") as f:
                    rates = Rates.from_json(f.read(), where=rates_file)
            else:
                rates = Rates()
        except UnicodeDecodeError as e:
            raise click.BadParameter(f"{rates_file}: not UTF-8 JSON text ({e})", param_hint="--rates") from None
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--rates") from None
        est = estimate(plan, cluster or Cluster(cores=workers), prices, rates,
                       src_remote=not _is_local(src[0]) if src else None)
    if as_json:
        doc = plan.to_json()
        if est is not None:
            doc["cost"] = est.to_json()
        click.echo(json.dumps(doc, indent=1))
    else:
        click.echo(plan.report())
        if est is not None:
            click.echo(est.report())


@click.command("cost")
@option(Workload, "tokens", type=float, required=True, extra="1e9 is fine.")
@option(Workload, "d_model", type=click.IntRange(1), required=True)
@option(Workload, "dtype", choices=sorted(ACT_DTYPES))
@option(Workload, "hooks", type=click.IntRange(1))
@option(Workload, "reads", type=click.IntRange(1))
@option(Workload, "shared_forward", "--shared-forward/--no-shared-forward", show_default=True)
@option(Workload, "compression", type=click.FloatRange(0, min_open=True))
@option(Economics, "capture_rate", type=click.FloatRange(0, min_open=True), required=True)
@option(Economics, "gpu_price", type=click.FloatRange(0))
@option(Economics, "storage_price", type=click.FloatRange(0))
@option(Economics, "months", type=click.FloatRange(0))
@option(Economics, "node_price", type=click.FloatRange(0))
@click.option("--memory", type=SIZE, help="Memory budget of one shuffle task [default: a quarter of --node-memory, "
              "so that pass 2's ranged reads stay large on S3].")
@option(ShuffleConfig, "threads", type=click.IntRange(1), extra="Of the shuffle's tasks.")
@click.option("--nodes", type=click.IntRange(1), default=16, show_default=True, help="Shuffle cluster: machines.")
@click.option("--cores", type=click.IntRange(1), default=32, show_default=True, help="Shuffle cluster: cores per node.")
@click.option("--node-memory", type=SIZE, default="256GiB", show_default=True, help="Shuffle cluster: RAM per node.")
@click.option("--network", type=SIZE, default="3.125GB", show_default=True,
              help="Shuffle cluster: bytes/s per node to object storage (25 Gbit/s).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cost_cmd(tokens, d_model, dtype, hooks, reads, shared_forward, compression, capture_rate, gpu_price, storage_price, months,
             node_price, memory, threads, nodes, cores, node_memory, network, as_json):
    """Store or recompute? Print what storing activations costs (capture once, write, shuffle, keep, read per
    run) against regenerating them for every training run, and the break-even number of runs.

    The shuffle's cost comes from the cost model (`shuffler plan` with a cluster, docs/scale.md) on S3; the
    capture's from --capture-rate (measure it with benchmarks/capture.py on your GPU) and --gpu-price.
    docs/scale.md ("Store or recompute?") works through Gemma Scope and Llama Scope.

    \b
    Examples:
      shuffler cost --tokens 4e9 --d-model 3584 --capture-rate 20000 --reads 8
      shuffler cost --tokens 8e9 --d-model 4096 --hooks 128 --capture-rate 25000 --reads 2 --json
    """
    from shuffler.shuffling.costmodel import Cluster, estimate, fit_to_node
    from shuffler.shuffling.recompute import compare

    if tokens != math.floor(tokens) or not 1 <= tokens <= 2**63:
        raise click.BadParameter(f"{tokens!r} is not a whole number of tokens >= 1", param_hint="--tokens")
    workload = Workload(tokens=int(tokens), d_model=d_model, dtype=dtype, hooks=hooks, reads=reads,
                        shared_forward=shared_forward, compression=compression)
    economics = Economics(capture_rate=capture_rate, gpu_price=gpu_price, storage_price=storage_price,
                          months=months, node_price=node_price)
    cluster = Cluster(nodes=nodes, cores=cores, memory=node_memory, network=network)
    schema = Schema(dtype=dtype, d_model=d_model)
    memory = memory or node_memory // 4
    request = PlanRequest(rows=workload.tokens * hooks, schema=schema, memory=memory,
                          stored_bytes=workload.stored_bytes, scratch_remote=True, dst_remote=True)
    plan = fit_to_node(request, cluster, threads=threads)
    est = estimate(plan, cluster, src_remote=True)
    c = compare(workload, economics, shuffle=est)
    if as_json:
        click.echo(json.dumps({**c.to_json(), "shuffle": {**est.to_json(), "plan": plan.to_json()}}, indent=1))
        return
    click.echo(c.report())
    click.echo(f"shuffle     ~{est.wall_s / 3600:,.1f} h on {nodes} node(s) x {cores} cores: {plan.request.workers} "
               f"task(s) of {human_bytes(memory)} and {plan.request.threads} thread(s) each; `shuffler plan --rows "
               f"{workload.tokens * hooks} --d-model {d_model} --dtype {dtype} --memory "
               f"{human_bytes(memory).replace(' ', '')} --dst s3://b/out --nodes {nodes} ...` shows its passes")
    for warning in (*plan.warnings, *est.warnings):
        click.echo(f"WARNING: {warning}")


def _cluster(path, nodes, cores, memory, network, disk):
    """The cluster from --cluster FILE, with any single option overriding it; None if none was given."""
    given = {k: v for k, v in (("nodes", nodes), ("cores", cores), ("memory", memory), ("network", network),
                               ("disk", disk)) if v is not None}
    if path is None and not given:
        return None
    from shuffler.shuffling.costmodel import Cluster

    doc = {}
    if path is not None:
        try:
            doc = json.loads(open(path).read())
        except ValueError as e:
            raise click.BadParameter(f"{path} is not JSON ({e})", param_hint="--cluster") from None
        if not isinstance(doc, dict):
            raise click.BadParameter(f"{path} must hold a JSON object", param_hint="--cluster")
    return Cluster.from_json({**doc, **given}, where=path or "cluster options")


def _is_local(url: str) -> bool:
    """Local disk or memory: small reads are cheap. Anything else (s3://, gs://, ...) is an object store."""
    return "://" not in url or url.split("://", 1)[0] in ("file", "local", "memory")


def _parse_columns(text: str) -> tuple[tuple[str, str], ...]:
    cols = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, dt = part.partition(":")
        if not dt:
            if name not in STANDARD_COLUMNS:
                raise click.BadParameter(f"{name!r} is not a standard column ({', '.join(STANDARD_COLUMNS)}); "
                                         "write name:dtype", param_hint="--columns")
            dt = STANDARD_COLUMNS[name]
        cols.append((name, dt))
    return tuple(cols)


@click.command("verify")
@click.argument("paths", nargs=-1, required=True, metavar="SRC... DST")
@click.option("--full", is_flag=True, help="Also read SRC and compare the sorted per-row hashes (8 B per row of memory).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_cmd(paths, full, as_json):
    """Check that DST holds exactly the rows of SRC (one or more datasets), in any order.

    Reads every chunk of DST (checksums), compares row counts and order-independent fingerprints with SRC;
    --full compares sorted per-row hashes too. Exits 0 if all match, 1 with a report naming what differs.

    \b
    Example:
      shuffler verify data/raw data/shuffled --full
    """
    from shuffler.shuffling.verify import verify

    if len(paths) < 2:
        raise click.UsageError("give at least one SRC and a DST: shuffler verify SRC... DST")
    *srcs, dst = paths
    with Progress("verify", None) as bar:
        rep = verify(srcs, dst, full=full, progress=bar.update)
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=1))
    elif rep.ok:
        click.echo(rep.report())
    else:
        click.echo(rep.report(), err=True)
    if not rep.ok:
        sys.exit(1)

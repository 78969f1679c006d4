"""Shuffle planning: bucket sizing with 6-sigma headroom, budgets respected, planned (nonexistent) datasets."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from shuffler.cli import main
from shuffler.format.schema import Schema, standard_columns
from shuffler.shuffling.plan import (
    HEADROOM_SIGMAS,
    LOCAL_SCRATCH_LEVEL,
    MAX_BUCKETS,
    REMOTE_SCRATCH_LEVEL,
    PlanRequest,
    buckets_for,
    fixed_overhead,
    make_plan,
)
from shuffler.shuffling.run import shuffle

from .test_shuffle import SMALL, make_dataset

GiB = 1 << 30
SCHEMA = Schema(dtype="bfloat16", d_model=4096, columns=standard_columns())


@given(rows=st.integers(1, 10**13), capacity=st.integers(64, 10**9))
def test_buckets_for_is_the_smallest_count_with_headroom(rows, capacity):
    b = buckets_for(rows, capacity)

    def fits(k: int, slack: float) -> bool:
        mu = rows / k
        return (k == 1 and rows <= capacity) or mu + HEADROOM_SIGMAS * math.sqrt(mu) <= capacity * (1 + slack)

    assert fits(b, 1e-9)
    assert b == 1 or b == 2 or not fits(b - 1, -1e-6)  # b - 1 buckets would not fit (up to float rounding)


def test_tiny_capacity_bottoms_out_at_one_row_per_bucket():
    assert buckets_for(1000, 5) == 1000


@settings(max_examples=200)
@given(
    rows=st.integers(0, 10**12),
    d_model=st.sampled_from([64, 768, 4096, 8192]),
    memory_gib=st.floats(0.5, 512),
    workers=st.integers(1, 64),
    remote=st.booleans(),
)
def test_plan_invariants(rows, d_model, memory_gib, workers, remote):
    schema = Schema(dtype="float16", d_model=d_model, columns=standard_columns())
    req = PlanRequest(rows=rows, schema=schema, memory=int(memory_gib * GiB), workers=workers, scratch_remote=remote)
    p = make_plan(req)
    assert p.peak_map_bytes <= req.memory and p.peak_reduce_bytes <= req.memory
    if p.buckets < MAX_BUCKETS:
        assert not p.recursion_expected, "sized buckets must fit with headroom"
        assert p.bucket_max_rows <= p.capacity_rows
    else:
        assert p.recursion_expected and any("above the cap" in w for w in p.warnings)
    assert p.map_tasks * p.map_rows >= rows and (p.map_tasks - 1) * p.map_rows < max(rows, 1)
    assert p.ranged_reads <= p.map_tasks * p.buckets
    assert p.reduce_tasks == p.buckets and p.intermediate_objects == p.map_tasks
    assert p.scratch_level == (REMOTE_SCRATCH_LEVEL if remote else LOCAL_SCRATCH_LEVEL)
    # the bucket count, which fixes the output order, must not follow the worker count
    assert make_plan(PlanRequest(rows=rows, schema=schema, memory=req.memory, workers=1)).buckets == p.buckets
    json.dumps(p.to_json())


def test_petabyte_plan_warns_about_small_reads_and_says_what_to_change():
    p = make_plan(PlanRequest(rows=10**12, schema=SCHEMA, memory=64 * GiB, workers=8, scratch_remote=True))
    assert p.buckets > 100_000 and p.map_tasks > 100_000
    assert p.mean_read_bytes < 8 << 20
    (w,) = [w for w in p.warnings if "ranged reads average" in w]
    assert "raise --memory to about" in w and "local disk" in w
    bigger = make_plan(PlanRequest(rows=10**12, schema=SCHEMA, memory=64 * GiB * 8, scratch_remote=True))
    assert bigger.mean_read_bytes > 30 * p.mean_read_bytes  # pieces grow as memory^2


def test_small_data_plan_is_quiet():
    p = make_plan(PlanRequest(rows=10**6, schema=SCHEMA, memory=4 * GiB, workers=1))
    assert p.warnings == ()
    assert p.pass1_read_bytes < p.raw_bytes  # stored input is compressed (bfloat16 ratio ~1.45)


def test_forced_buckets_too_large_predicts_recursion():
    p = make_plan(PlanRequest(rows=10**7, schema=SCHEMA, memory=2 * GiB, buckets=2, workers=1))
    assert p.recursion_expected
    assert any("re-shuffled recursively" in w for w in p.warnings)


def test_bad_requests():
    with pytest.raises(ValueError, match=r"memory=10.0 MiB is below .* give --memory \d+MiB"):
        PlanRequest(rows=1, schema=SCHEMA, memory=10 << 20)
    with pytest.raises(ValueError, match="buckets=0"):
        PlanRequest(rows=1, schema=SCHEMA, buckets=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        PlanRequest(rows=1, schema=SCHEMA, chunk_bytes=100)
    assert fixed_overhead(8 << 20) > fixed_overhead(64 << 10)


def test_plan_cli_for_a_dataset_that_does_not_exist():
    r = CliRunner().invoke(main, ["plan", "--rows", "1e12", "--d-model", "8192", "--dtype", "bfloat16",
                                  "--memory", "64GiB", "--workers", "8", "--dst", "s3://bucket/out"])
    assert r.exit_code == 0, r.output
    for word in ("B = ", "map task", "intermediate object", "ranged read", "peak", "WARNING: pass 2 ranged reads"):
        assert word in r.output
    r = CliRunner().invoke(main, ["plan", "--rows", "1e9", "--d-model", "768", "--dtype", "float16", "--json",
                                  "--columns", "token_id,doc_id,weight:float32"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    assert j["rows"] == 10**9 and j["row_bytes"] == 768 * 2 + 4 + 8 + 4
    r = CliRunner().invoke(main, ["plan", "--rows", "1.5", "--d-model", "8", "--dtype", "float16"])
    assert r.exit_code == 2 and "whole number" in r.output
    r = CliRunner().invoke(main, ["plan", "--rows", "10", "--d-model", "8"])
    assert r.exit_code == 2 and "--dtype" in r.output


def test_plan_of_a_dataset_is_what_shuffle_runs(tmp_path):
    src = str(tmp_path / "raw")
    make_dataset(src, 4000)
    memory = fixed_overhead(SMALL["chunk_bytes"]) + (200 << 10)
    r = CliRunner().invoke(main, ["plan", src, "--memory", str(memory), "--chunk-bytes", "4KiB", "--shard-bytes",
                                  "32KiB", "--json", "--workers", "1"])
    assert r.exit_code == 0, r.output
    planned = json.loads(r.output)
    m = shuffle(src, str(tmp_path / "out"), seed=0, memory=memory, workers=1, **SMALL)
    assert planned["buckets"] == m.metadata["shuffle"]["buckets"] > 1
    assert planned["capacity_rows"] == m.metadata["shuffle"]["capacity_rows"]


def test_threads_leave_the_buckets_and_add_their_buffers_to_the_peak():
    from shuffler.shuffling.plan import ENCODE_THREADS, fixed_overhead

    req = PlanRequest(rows=10**8, schema=Schema(dtype="bfloat16", d_model=1024), memory=4 << 30, workers=2)
    base = make_plan(req)
    assert req.threads == ENCODE_THREADS
    for threads, extra in ((1, 0), (2, 0), (16, fixed_overhead(req.chunk_bytes, 16) - fixed_overhead(req.chunk_bytes))):
        p = make_plan(dataclasses.replace(req, threads=threads))
        assert (p.buckets, p.capacity_rows, p.map_rows) == (base.buckets, base.capacity_rows, base.map_rows)
        assert p.peak_task_bytes == base.peak_task_bytes + extra
    assert fixed_overhead(req.chunk_bytes, 16) - fixed_overhead(req.chunk_bytes) == 2 * 14 * req.chunk_bytes
    with pytest.raises(ValueError, match="threads=0 must be >= 1"):
        dataclasses.replace(req, threads=0)


def test_threads_past_the_budget_are_named_and_the_default_follows_cpu_affinity():
    import subprocess
    import sys

    req = PlanRequest(rows=10**7, schema=Schema(dtype="bfloat16", d_model=1024), memory=1 << 30, workers=1,
                      threads=64)
    p = make_plan(req)
    assert p.peak_task_bytes > req.memory
    assert any("64 codec threads raise a task's peak" in w and "above --memory 1.0 GiB" in w for w in p.warnings)
    assert not any("codec threads raise" in w for w in make_plan(dataclasses.replace(req, threads=2)).warnings)
    # A process pinned to one CPU (as SLURM pins a 1-CPU job) defaults to one thread per task, not the node's cores.
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from shuffler.shuffling.run import ShuffleConfig, threads_for; "
            "print(threads_for(ShuffleConfig(seed=0), 1), threads_for(ShuffleConfig(seed=0, threads=3), 1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "3"]

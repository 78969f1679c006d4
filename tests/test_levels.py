"""Two scatter levels (`--levels 1|2|auto`, docs/shuffle.md "Two levels"): the plan, the cost model, and runs whose
output is byte for byte the serial recursion's, whatever the executor, the workers or the array tasks."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from shuffler.cli import main
from shuffler.format.schema import Schema, standard_columns
from shuffler.shuffling.costmodel import Cluster, estimate
from shuffler.shuffling.plan import S3_EFFICIENT_READ, PlanRequest, make_plan

GiB = 1 << 30
SCHEMA = Schema(dtype="bfloat16", d_model=8192, columns=standard_columns())
PETABYTE = dict(rows=10**12, schema=SCHEMA, memory=64 * GiB, scratch_remote=True, dst_remote=True, machine_memory=0)


# -- the plan ------------------------------------------------------------------------------------------------------
def test_two_levels_grow_the_pieces_by_about_sqrt_b_for_one_more_pass():
    one = make_plan(PlanRequest(**PETABYTE))
    two = make_plan(PlanRequest(**PETABYTE, levels="2"))
    assert (one.levels, two.levels) == (1, 2)
    assert one.mean_read_bytes < S3_EFFICIENT_READ, "the case two levels are for"
    assert two.buckets == math.ceil(math.sqrt(one.buckets)), "S = ceil(sqrt(B)) super-buckets"
    assert two.reduce_tasks == two.buckets * two.sub_buckets >= one.buckets
    assert two.bucket_max_rows <= two.capacity_rows and not two.recursion_expected
    for mean in (two.mean_read_bytes, two.level2_mean_read_bytes):
        assert mean > 0.5 * math.sqrt(one.buckets) * one.mean_read_bytes and mean > S3_EFFICIENT_READ
    assert two.level2_map_tasks >= two.buckets and two.peak_task_bytes <= two.request.memory
    assert [s["stage"] for s in two.stages] == ["plan", "scatter", "scatter2", "permute", "finalize"]
    assert [s["stage"] for s in one.stages] == ["plan", "scatter", "permute", "finalize"]
    assert [s["tasks"] for s in two.stages] == [1, two.map_tasks, two.level2_map_tasks, two.reduce_tasks, 1]
    assert any("--levels 2" in w for w in one.warnings) and not any("below the" in w for w in two.warnings)


def test_auto_picks_two_levels_only_where_one_levels_pieces_are_small():
    assert make_plan(PlanRequest(**PETABYTE, levels="auto")).levels == 2
    small = dict(PETABYTE, rows=10**6)  # 16 GiB in 64 GiB tasks: pieces are small, but one bucket holds it all
    assert make_plan(PlanRequest(**small, levels="auto")).levels == 1
    assert make_plan(PlanRequest(**PETABYTE, levels="auto", buckets=100_000)).levels == 1, "--buckets fixes one level"
    assert make_plan(PlanRequest(**dict(PETABYTE, memory=1 << 40), levels="auto")).levels == 1, "large pieces"
    with pytest.raises(ValueError, match=r"levels='3' must be one of 1, 2, auto"):
        PlanRequest(**PETABYTE, levels=3)


def test_cost_model_counts_the_extra_pass():
    cluster = Cluster(nodes=128, cores=64, memory=1 << 40, network=12.5e9, disk=2e9)
    one = estimate(make_plan(PlanRequest(**PETABYTE)), cluster)
    two = estimate(make_plan(PlanRequest(**PETABYTE, levels="2")), cluster)
    assert [p.name for p in one.passes] == ["pass 1 scatter", "pass 2 permute"]
    assert [p.name for p in two.passes] == ["pass 1 scatter", "level 2 scatter", "pass 2 permute"]
    plan = two.plan
    assert two.passes[1].gets == plan.ranged_reads + plan.map_tasks
    assert two.passes[2].gets == plan.level2_ranged_reads + plan.level2_map_tasks
    assert two.passes[2].gets < one.passes[1].gets / 100, "the permute pass's GETs fall by about sqrt(B)"
    assert two.intermediate_objects == 2 * (plan.map_tasks + plan.level2_map_tasks)
    assert two.scratch_bytes == 2 * one.scratch_bytes


def test_plan_cli_prints_the_levels_and_the_stages():
    args = ["plan", "--rows", "1e12", "--d-model", "8192", "--dtype", "bfloat16", "--memory", "64GiB", "--dst",
            "s3://b/out"]
    r = CliRunner().invoke(main, [*args, "--levels", "2"])
    assert r.exit_code == 0, r.output
    assert "levels        2: S = 491 super-buckets" in r.output
    assert "stages        5 as an array job: plan x1; scatter x" in r.output and "scatter2 x" in r.output
    r = CliRunner().invoke(main, [*args, "--levels", "auto", "--json"])
    doc = json.loads(r.output)
    assert doc["levels"] == 2 and doc["request"]["levels"] == "auto" and len(doc["stages"]) == 5
    r = CliRunner().invoke(main, [*args, "--levels", "3"])
    assert r.exit_code == 2 and "'3' is not one of '1', '2', 'auto'" in r.output

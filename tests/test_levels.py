"""Two scatter levels (`--levels 1|2|auto`, docs/shuffle.md "Two levels"): the plan, the cost model, and runs whose
output is byte for byte the serial recursion's, whatever the executor, the workers or the array tasks."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from shuffler import Dataset
from shuffler.cli import main
from shuffler.format.schema import Schema, standard_columns
from shuffler.shuffling.array_job import TaskSlot, run_stage
from shuffler.shuffling.bucket_index import BucketIndex, discard
from shuffler.shuffling.costmodel import Cluster, estimate
from shuffler.shuffling.markers import PLAN
from shuffler.shuffling.plan import ROW_EXTRA_PASS2, S3_EFFICIENT_READ, PlanRequest, fixed_overhead, make_plan
from shuffler.shuffling.run import shuffle
from shuffler.shuffling.verify import verify
from shuffler.storage.storage import Storage, prefixed_key

from .test_shuffle import SMALL, assert_permutation, make_dataset, output_bytes, read_all

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
    assert "stages        5 as an array job" in r.output
    assert "  scatter2    x" in r.output and ": level-2 map tasks: one super-bucket's rows into its ~491 sub-buckets" in r.output
    r = CliRunner().invoke(main, [*args, "--levels", "auto", "--json"])
    doc = json.loads(r.output)
    assert doc["levels"] == 2 and doc["request"]["levels"] == "auto" and len(doc["stages"]) == 5
    r = CliRunner().invoke(main, [*args, "--levels", "3"])
    assert r.exit_code == 2 and "'3' is not one of '1', '2', 'auto'" in r.output


# -- runs: the bytes of the serial recursion, whatever runs the tasks ------------------------------------------------
ROWS, CAPACITY = 5000, 500


def memory_for(url: str, capacity: int = CAPACITY) -> int:
    """A --memory whose tasks hold `capacity` rows of `url`'s dataset (plan.py's model)."""
    return fixed_overhead(SMALL["chunk_bytes"]) + capacity * (Dataset.open(url).schema.row_bytes + ROW_EXTRA_PASS2)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("raw") / "raw")
    make_dataset(url, ROWS)
    return url


@pytest.fixture(scope="module")
def serial(raw, tmp_path_factory) -> tuple[dict[str, bytes], int]:
    """One level with --buckets S: every bucket is larger than a task and recurses inside its reduce task."""
    plan = make_plan(PlanRequest(rows=ROWS, schema=Dataset.open(raw).schema, memory=memory_for(raw), levels="2",
                                 chunk_bytes=SMALL["chunk_bytes"], shard_bytes=SMALL["shard_bytes"]))
    dst = str(tmp_path_factory.mktemp("serial") / "out")
    stats: dict = {}
    shuffle(raw, dst, seed=1, memory=memory_for(raw), buckets=plan.buckets, workers=1, stats=stats, **SMALL)
    assert stats["plan"]["levels"] == 1 and stats["plan"]["bucket_max_rows"] > CAPACITY, "the serial recursion runs"
    return output_bytes(dst), plan.buckets


@pytest.mark.parametrize(("workers", "map_rows"), [(1, None), (2, 700), (3, 1234)])
def test_two_levels_are_the_serial_recursions_bytes_for_any_workers_and_split(raw, serial, tmp_path, workers,
                                                                               map_rows):
    reference, S = serial
    dst = str(tmp_path / "two")
    stats: dict = {}
    m = shuffle(raw, dst, seed=1, memory=memory_for(raw), levels=2, workers=workers, map_rows=map_rows, stats=stats,
                **SMALL)
    plan = stats["plan"]
    assert (plan["levels"], plan["buckets"]) == (2, S) and plan["sub_buckets"] > 1
    assert output_bytes(dst) == reference
    assert any("." in name.split("-")[1] for name in reference), "sub-buckets (b, j) were written"
    assert m.metadata["shuffle"]["levels"] == 2
    assert_permutation(read_all(raw), read_all(dst))
    assert verify([raw], dst, full=True).ok
    assert sorted(os.listdir(dst)) == sorted([*reference, "manifest.json"]), "no state, scratch or temp files left"


def test_levels_two_and_auto_from_the_cli(raw, serial, tmp_path):
    reference, _ = serial
    args = [raw, "--seed", "1", "--memory", str(memory_for(raw)), "--chunk-bytes", "4KiB", "--shard-bytes", "32KiB"]
    r = CliRunner().invoke(main, ["shuffle", *args[:1], str(tmp_path / "two"), *args[1:], "--levels", "2"])
    assert r.exit_code == 0, r.output
    assert output_bytes(str(tmp_path / "two")) == reference
    r = CliRunner().invoke(main, ["plan", *args[:1], *args[3:], "--levels", "auto", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["levels"] == 2, "tiny pieces and 14 buckets' worth of rows: auto picks two levels"
    r = CliRunner().invoke(main, ["shuffle", *args[:1], str(tmp_path / "auto"), *args[1:], "--levels", "auto"])
    assert r.exit_code == 0 and "super-bucket(s) in 2 levels" in r.output, r.output
    assert output_bytes(str(tmp_path / "auto")) == reference
    r = CliRunner().invoke(main, ["plan", *args[:1], "--memory", "1GiB", "--levels", "2"])
    assert r.exit_code == 0 and "permuted directly (no level-2 scatter" in r.output, r.output
    r = CliRunner().invoke(main, ["shuffle", "--from-scatter", raw, str(tmp_path / "x"), "--levels", "2"])
    assert r.exit_code == 2 and "--levels 2 does not apply to --from-scatter" in r.output


def run_cli(*args: str, fault: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, SHUFFLER_TEST_FAULT=fault, SHUFFLER_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "shuffler", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("fault", "workers"), [
    ("kill-after-map=2", "1"),    # pass 1: two intermediates committed
    ("kill-after-map2=2", "1"),   # the level-2 scatter: two of its tasks committed
    ("kill-after-map2=1", "2"),   # the same on a process pool
    ("kill-after-reduce=3", "1"),  # permute: three sub-buckets committed
    ("kill-in-reduce=1", "1"),    # inside the first permute task: shard 0 of sub-bucket (0, 0) written, no marker
])
def test_resume_after_kill_9_at_either_level_is_byte_identical(raw, serial, tmp_path, fault, workers):
    reference, _ = serial
    shard = "32KiB"
    if fault.startswith("kill-in-reduce"):  # sub-buckets of several shards
        shard = "8KiB"
        shuffle(raw, str(tmp_path / "ref"), seed=1, memory=memory_for(raw), levels=2, workers=1,
                chunk_bytes=SMALL["chunk_bytes"], shard_bytes=8 << 10)
        reference = output_bytes(str(tmp_path / "ref"))
    dst = str(tmp_path / "out")
    args = ["shuffle", raw, dst, "--seed", "1", "--memory", str(memory_for(raw)), "--levels", "2", "--chunk-bytes",
            "4KiB", "--shard-bytes", shard, "--map-rows", "1000", "--workers", workers]
    p = run_cli(*args, fault=fault)
    assert p.returncode == -9, p.stderr
    assert not os.path.exists(os.path.join(dst, "manifest.json"))
    if fault.startswith("kill-in-reduce"):
        assert os.path.exists(os.path.join(dst, "shard-000000.0000-0000.shard"))
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    assert output_bytes(dst) == reference
    assert sorted(os.listdir(dst)) == sorted([*reference, "manifest.json"])


# -- the array-job stages: one command line for every task, the scatter2 stage between scatter and permute -------------
def test_array_stages_from_one_command_line_give_the_same_bytes(raw, serial, tmp_path):
    reference, _ = serial
    dst = str(tmp_path / "dst")
    line = ["shuffle", raw, dst, "--seed", "1", "--memory", str(memory_for(raw)), "--levels", "2", "--chunk-bytes",
            "4KiB", "--shard-bytes", "32KiB", "--map-rows", "1000", "--workers", "1"]
    r = CliRunner().invoke(main, [*line, "--stage", "plan"])
    assert r.exit_code == 0, r.output
    assert "levels 2" in r.output and "scatter2 x" in r.output, r.output
    for stage in ("scatter", "scatter2", "permute"):
        for i in (1, 0):
            r = CliRunner().invoke(main, [*line, "--stage", stage, "--task-index", str(i), "--num-tasks", "2"])
            assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*line, "--stage", "finalize"])
    assert r.exit_code == 0, r.output
    assert output_bytes(dst) == reference
    assert sorted(os.listdir(dst)) == sorted([*reference, "manifest.json"])


def test_array_stages_in_order_without_the_bucket_index(raw, serial, tmp_path):
    reference, _ = serial
    dst = str(tmp_path / "dst")
    config = dict(memory=memory_for(raw), levels="2", map_rows=1000, **SMALL)
    run_stage("plan", [raw], dst, seed=1, config=config, workers=1)
    slots = [TaskSlot(index=i, count=3) for i in range(3)]
    for slot in slots:
        run_stage("scatter", [raw], dst, seed=1, slot=slot, workers=1)
    scratch = json.loads(Storage(dst).read(PLAN))["scratch"]
    assert BucketIndex.open(scratch, Dataset.open(raw).schema, run_id=json.loads(Storage(dst).read(PLAN))["run_id"],
                            maps=5, map_rows=1000, buckets=serial[1]).rows is not None, "the index lists the rows"
    discard(scratch)  # from here on the stages read the intermediates' footers
    run_stage("scatter2", [raw], dst, seed=1, slot=slots[0], workers=1)
    with pytest.raises(RuntimeError, match="level-2 scatter has not finished"):
        for slot in slots:
            run_stage("permute", [raw], dst, seed=1, slot=slot, workers=1)
    for slot in slots[1:]:
        out = run_stage("scatter2", [raw], dst, seed=1, slot=slot, workers=1)
        assert out["of"] >= 6
    for slot in slots:
        run_stage("permute", [raw], dst, seed=1, slot=slot, workers=1)
    run_stage("finalize", [raw], dst, seed=1, workers=1)
    assert output_bytes(dst) == reference
    one = run_stage("scatter2", [raw], dst, seed=1, slot=slots[0])
    assert one["did"] == 0 and "finalized" in one["note"]


def test_a_damaged_level_2_intermediate_is_named_uncommitted_and_redone(raw, serial, tmp_path):
    reference, _ = serial
    dst = str(tmp_path / "out")
    args = ["shuffle", raw, dst, "--seed", "1", "--memory", str(memory_for(raw)), "--levels", "2", "--chunk-bytes",
            "4KiB", "--shard-bytes", "32KiB", "--map-rows", "1000", "--workers", "1"]
    assert run_cli(*args, fault="kill-after-map2=1").returncode == -9  # super-bucket 0's first level-2 task committed
    [inter] = glob.glob(os.path.join(dst, ".shuffle", "scratch", "run-*", "sub-0", "map-000000.shard"))
    with open(inter, "r+b") as f:  # one byte in the middle: inside a chunk's frame, which its checksum covers
        f.seek(os.path.getsize(inter) // 2)
        b = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b ^ 0x40]))
    p = run_cli(*args)
    assert p.returncode == 1, p.stderr
    assert "sub-0/map-000000.shard" in p.stderr and "now uncommitted" in p.stderr, p.stderr
    assert not os.path.exists(inter[:-len(".shard")] + ".idx")
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    assert output_bytes(dst) == reference


def test_array_stages_on_s3_with_worker_processes(raw, serial, s3_url):
    """Scratch and output on S3 (moto on 127.0.0.1), two array tasks; the level-2 scatter on worker processes, which
    must find the pass-1 objects other processes wrote (no listing cache, shuffler/storage/storage.py)."""
    reference, _ = serial
    config = dict(memory=memory_for(raw), levels="2", map_rows=1000, **SMALL)
    out = run_stage("plan", [raw], s3_url, seed=1, config=config, workers=1)
    assert out["levels"] == 2 and "scatter2 x" in out["stages"]
    for stage in ("scatter", "scatter2", "permute"):
        for i in (0, 1):
            run_stage(stage, [raw], s3_url, seed=1, slot=TaskSlot(index=i, count=2),
                      workers=2 if stage == "scatter2" else 1)
    run_stage("finalize", [raw], s3_url, seed=1, workers=1)
    assert output_bytes(s3_url) == reference
    assert verify([raw], s3_url).ok
    assert not [n for n in Storage(s3_url).list("") if n.startswith(".shuffle/") and n != ".shuffle/lock"]


def test_scatter2_does_nothing_with_one_level(raw, tmp_path):
    dst = str(tmp_path / "dst")
    run_stage("plan", [raw], dst, seed=1, config=dict(memory=memory_for(raw), **SMALL), workers=1)
    out = run_stage("scatter2", [raw], dst, seed=1, slot=TaskSlot(index=0, count=2), workers=1)
    assert out["did"] == 0 and out["note"] == "one scatter level: nothing to do"
    with pytest.raises(ValueError, match="needs a task slot"):
        run_stage("scatter2", [raw], dst, seed=1)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_levels_with_scratch_spread_over_hashed_prefixes(raw, serial, tmp_path, s3_url, where):
    """The level-2 intermediates and markers go through the same prefixed scratch (a '#prefixes=N' URL,
    shuffler/storage/storage.py) as pass 1's: the same bytes, and every scratch object sits under its hashed key."""
    reference, _ = serial
    if where == "local":
        dst, scratch = str(tmp_path / "out"), str(tmp_path / "scratch")
        stats: dict = {}
        shuffle(raw, dst, seed=1, memory=memory_for(raw), levels=2, workers=2, map_rows=700, scratch=scratch,
                scratch_prefixes=4, keep_intermediate=True, stats=stats, **SMALL)
        assert stats["plan"]["scratch_prefixes"] == 4 and stats["plan"]["levels"] == 2
        (run_dir,) = os.listdir(scratch)
        keys = Storage(os.path.join(scratch, run_dir)).list("")
        assert len({k.split("/", 1)[0] for k in keys}) > 1, "objects spread over several prefixes"
        assert all(prefixed_key(k.split("/", 1)[1], 4) == k for k in keys), "every key, level 2's too, is hashed"
        assert any("/sub-" in k for k in keys), "the level-2 intermediates were kept beside pass 1's"
    else:
        dst = s3_url
        config = dict(memory=memory_for(raw), levels="2", map_rows=1000, scratch_prefixes=8, **SMALL)
        out = run_stage("plan", [raw], dst, seed=1, config=config, workers=1)
        assert out["levels"] == 2
        for stage in ("scatter", "scatter2", "permute"):
            for i in (0, 1):
                run_stage(stage, [raw], dst, seed=1, slot=TaskSlot(index=i, count=2), workers=1)
        run_stage("finalize", [raw], dst, seed=1, workers=1)
    assert output_bytes(dst) == reference
    assert verify([raw], dst).ok


def test_auto_never_depends_on_the_workers_the_map_split_or_where_scratch_lives():
    """`auto` must not change the bytes with --workers, --map-rows or the scratch's place (docs/shuffle.md): a
    case near the threshold, where judging pieces at the run's own map split flipped between one and two levels."""
    schema = Schema(dtype="bfloat16", d_model=4096, columns=standard_columns())
    base = dict(rows=3_000_000, schema=schema, memory=2 * GiB, levels="auto")
    seen = {(p.levels, p.buckets) for p in (
        make_plan(PlanRequest(**base, workers=w, map_rows=m, scratch_remote=r, machine_memory=0))
        for w in (1, 4, 16, 64) for m in (None, 5000) for r in (False, True))}
    assert len(seen) == 1, seen
    near = dict(PETABYTE, levels="auto")
    assert len({make_plan(PlanRequest(**near, workers=w, map_rows=m)).levels
                for w in (1, 64, 4096) for m in (None, 100_000)}) == 1


def test_from_scatter_refuses_levels_before_writing_anything(tmp_path):
    from shuffler.shuffling.from_scatter import shuffle_from_scatter

    dst = tmp_path / "out"
    with pytest.raises(TypeError, match="unknown option.*levels"):
        shuffle_from_scatter(str(tmp_path / "scattered"), str(dst), levels="2")
    assert not dst.exists()

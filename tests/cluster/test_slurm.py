"""examples/slurm/shuffle.sbatch, the very file docs/cluster.md shows, submitted to a real SLURM cluster.

The cluster is Debian's slurmctld and two slurmd on this host (tests/cluster/slurm_cluster.py), the data is
in S3 (moto on 127.0.0.1, tests/conftest.py). Checks: the output equals a local `shuffler shuffle` with the
same seed byte for byte; array tasks ran on both nodes at once; a scatter task cancelled with `scancel`
mid-run and requeued still gives the same bytes; `sacct` lists every array task as completed; the same file
with `--levels 2` among the planned options runs a two-level job (its scatter2 array does the level-2 scatter)
with the bytes of a local `--levels 2` run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shuffler.shuffling.verify import verify
from tests.cluster.slurm_cluster import ACTIVE, SlurmCluster, missing_binaries, require_loopback_only
from tests.test_shuffle import output_bytes

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "examples" / "slurm" / "shuffle.sbatch"
BIN = Path(sys.executable).parent
SEED, TASKS, ROWS, MAP_ROWS = 7, 4, 120_000, 3000
# Small chunks and many map tasks: each scatter task owns 10 maps, so one can be caught half done.
PLANNED = ["--buckets", "8", "--chunk-bytes", "256KiB", "--shard-bytes", "2MiB", "--map-rows", str(MAP_ROWS)]
STAGES = ("shuffle-plan", "shuffle-scatter", "shuffle-scatter2", "shuffle-permute", "shuffle-finalize")
# Two levels (docs/shuffle.md): the smallest memory a task may have with these chunks, so 120,000 rows make
# 4 super-buckets of about 3 task capacities each (shuffler plan prints the layout).
TWO_LEVELS = ["--levels", "2", "--memory", "231MiB", "--chunk-bytes", "256KiB", "--shard-bytes", "2MiB"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    assert not missing, f"{missing} not on PATH: `make test-cluster` installs Debian's slurm-wlm"
    require_loopback_only()
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def cli(*args: str) -> str:
    r = subprocess.run([str(BIN / "shuffler"), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"shuffler {' '.join(args)}: {r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def case(s3_endpoint, tmp_path_factory):
    """Sources in S3 and the bytes of a local one-machine shuffle of them."""
    base = "s3://test-bucket/slurm"
    src = f"{base}/raw"
    cli("synth", src, "--rows", str(ROWS), "--d-model", "64", "--dtype", "float16", "--docs", "50",
        "--chunk-bytes", "256KiB", "--shard-bytes", "4MiB")
    ref = str(tmp_path_factory.mktemp("ref") / "shuffled")
    cli("shuffle", src, ref, "--seed", str(SEED), "--workers", "2", *PLANNED)
    return base, src, output_bytes(ref)


def submit(cluster: SlurmCluster, src: str, dst: str, workdir: Path, planned: list[str] = PLANNED) -> str:
    """sbatch the shipped script as a user would; its first job's id."""
    env = dict(cluster.env, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT),
               SHUFFLER_NO_PROGRESS="1")
    out = cluster.run("sbatch", "--parsable", str(SBATCH), src, dst, str(SEED), str(TASKS), *planned,
                      cwd=workdir, env=env)
    return out.strip()


def by_stage(jobs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {s: [] for s in STAGES}
    for j in jobs:
        out[j["JobName"]].append(j)
    return out


def finished(cluster: SlurmCluster, workdir: Path) -> dict[str, list[dict]]:
    jobs = by_stage(cluster.wait(workdir, 300))
    outs = "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(workdir.glob("slurm-*.out")))
    for stage in STAGES:
        want = 1 if stage in ("shuffle-plan", "shuffle-finalize") else TASKS
        states = [j["JobState"] for j in jobs[stage]]
        assert states == ["COMPLETED"] * want, f"{stage}: {states}\n{outs}\n{cluster.log_tail()}"
    return jobs


def overlap(a: dict, b: dict) -> bool:
    return a["StartTime"] < b["EndTime"] and b["StartTime"] < a["EndTime"]


def test_sbatch_file_gives_the_local_bytes(cluster, case, tmp_path):
    base, src, ref = case
    dst = f"{base}/out-plain"
    submit(cluster, src, dst, tmp_path)
    jobs = finished(cluster, tmp_path)
    assert output_bytes(dst) == ref
    assert verify(src, dst, full=True).ok
    scatter = jobs["shuffle-scatter"]
    assert {j["NodeList"] for j in scatter} == {"n1", "n2"}, "array tasks ran on both nodes"
    assert any(overlap(a, b) for a in scatter for b in scatter if a is not b), "array tasks ran at once"
    assert sorted(int(j["ArrayTaskId"]) for j in scatter) == list(range(TASKS))
    assert s3_names(dst, ".shuffle/") == [], "finalize removed the state and scratch"
    # One level: every scatter2 task ran and did nothing.
    for log in logs(tmp_path, jobs["shuffle-scatter2"]):
        assert "one scatter level: nothing to do" in log, log


def logs(workdir: Path, jobs: list[dict]) -> list[str]:
    """The slurm-<array>_<task>.out of each array task (sbatch's default output name)."""
    return [(workdir / f"slurm-{j['ArrayJobId']}_{j['ArrayTaskId']}.out").read_text() for j in jobs]


def test_sbatch_file_runs_two_levels_with_the_local_bytes(cluster, case, tmp_path):
    base, src, _ = case
    ref = str(tmp_path / "ref")
    cli("shuffle", src, ref, "--seed", str(SEED), "--workers", "2", *TWO_LEVELS)
    dst = f"{base}/out-two-levels"
    plan_job = submit(cluster, src, dst, tmp_path, TWO_LEVELS)
    jobs = finished(cluster, tmp_path)
    plan_log = (tmp_path / f"slurm-{plan_job}.out").read_text()
    assert "levels 2" in plan_log and "scatter2 x" in plan_log, plan_log
    done = [re.search(r"stage scatter2 task \d+/4 of .*: done \(of (\d+)", log) for log in
            logs(tmp_path, jobs["shuffle-scatter2"])]
    assert all(done) and len({int(m.group(1)) for m in done}) == 1 and int(done[0].group(1)) >= TASKS, done
    assert output_bytes(dst) == output_bytes(ref)
    assert verify(src, dst, full=True).ok
    assert s3_names(dst, ".shuffle/") == []


def s3_names(url: str, prefix: str) -> list[str]:
    """Object keys under url/prefix, listed with boto3 (s3fs would answer from its listing cache)."""
    import boto3

    bucket, key = url[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key}/{prefix}")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def owned_maps(dst: str, index: int) -> tuple[set[int], set[int]]:
    """(committed, all) map tasks of array task `index`: map m belongs to task m mod TASKS, and commits with
    its .idx (shuffler/shuffling/markers.py). Listed with boto3, which caches nothing between calls."""
    committed = {int(m) for m in re.findall(r"map-(\d+)\.idx", " ".join(s3_names(dst, ".shuffle/scratch/")))}
    mine = {m for m in range(ROWS // MAP_ROWS) if m % TASKS == index}
    return committed & mine, mine


def task_record(cluster: SlurmCluster, workdir: Path, name: str, index: int) -> dict | None:
    return next((j for j in cluster.jobs(workdir) if j["JobName"] == name and j.get("ArrayTaskId") == str(index)),
                None)


def test_cancelled_task_requeued_gives_the_same_bytes_and_sacct_lists_every_task(cluster, case, tmp_path):
    base, src, ref = case
    dst = f"{base}/out-cancelled"
    submit(cluster, src, dst, tmp_path)
    victim = 1
    deadline = time.monotonic() + 180
    task = None
    while time.monotonic() < deadline:  # until scatter task 1 runs and has committed part of its share
        task = task_record(cluster, tmp_path, "shuffle-scatter", victim)
        if task and task["JobState"] == "RUNNING" and owned_maps(dst, victim)[0]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"scatter task {victim} never ran: {task}\n{cluster.log_tail()}")
    array = task["ArrayJobId"]
    cluster.run("scancel", f"{array}_{victim}")
    while (state := task_record(cluster, tmp_path, "shuffle-scatter", victim)["JobState"]) in ACTIVE:
        time.sleep(0.2)
    done, mine = owned_maps(dst, victim)
    assert state == "CANCELLED", state
    assert 0 < len(done) < len(mine), f"cancelled mid-run: {len(done)} of its {len(mine)} maps committed"

    # The other tasks finish; scatter2 waits on a dependency that can no longer be met, and permute on scatter2.
    def stuck(jobs):
        return all(j["JobState"] not in ACTIVE for j in jobs if j["JobName"] == "shuffle-scatter") and any(
            j["Reason"] == "DependencyNeverSatisfied" for j in jobs if j["JobName"] == "shuffle-scatter2")

    jobs = by_stage(cluster.wait(tmp_path, 300, stuck))
    scatter2 = jobs["shuffle-scatter2"][0]["ArrayJobId"]
    assert [j["JobState"] for j in jobs["shuffle-scatter2"]] == ["PENDING"]
    assert [j["JobState"] for j in jobs["shuffle-permute"]] == ["PENDING"]
    assert s3_names(dst, "manifest.json") == []

    # The recovery docs/cluster.md gives: requeue the task (now, not after the requeue delay), re-arm scatter2.
    cluster.run("scontrol", "requeue", f"{array}_{victim}")
    cluster.run("scontrol", "update", f"JobId={array}_{victim}", "StartTime=now")
    cluster.run("scontrol", "update", f"JobId={scatter2}", f"Dependency=afterok:{array}_{victim}")
    jobs = finished(cluster, tmp_path)
    assert output_bytes(dst) == ref
    assert verify(src, dst, full=True).ok
    assert [j["Restarts"] for j in jobs["shuffle-scatter"] if j["ArrayTaskId"] == str(victim)] == ["1"]

    # sacct (from the job-completion log): every job of this run completed, the cancelled attempt listed too.
    out = cluster.run("sacct", "--completion", "--allusers", "--starttime", "now-1days", "--noheader",
                      "--parsable2", "--format", "JobID,JobName,State")
    states: dict[str, list[str]] = {}
    for line in out.splitlines():
        jobid, _name, st = line.split("|")
        states.setdefault(jobid, []).append(st)
    ours = [j for stage in STAGES for j in jobs[stage]]
    assert len(ours) == 2 + 3 * TASKS
    for j in ours:
        assert "COMPLETED" in states.get(j["JobId"], []), (j["JobName"], j.get("ArrayTaskId"), states)
    victim_id = next(j["JobId"] for j in jobs["shuffle-scatter"] if j["ArrayTaskId"] == str(victim))
    assert states[victim_id][0] == "CANCELLED" and states[victim_id][-1] == "COMPLETED", states[victim_id]

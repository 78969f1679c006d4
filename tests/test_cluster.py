"""Array-job stages (shuffler/shuffling/array_job.py): plan, scatter, permute, finalize as separate commands, tasks chosen
by index mod count, from flags or the scheduler's variables. The result must equal a one-machine run byte for
byte, whatever the task count, order, duplicates and concurrent retries."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner

from shuffler import Dataset, env
from shuffler.cli import main
from shuffler.shuffling.array_job import TaskSlot, resolve_slot, run_stage
from shuffler.shuffling.markers import PLAN
from shuffler.shuffling.plan import fixed_overhead
from shuffler.shuffling.run import shuffle
from shuffler.shuffling.verify import verify
from shuffler.storage.storage import Storage
from tests.test_shuffle import SMALL, make_dataset, output_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 6000
MEMORY = fixed_overhead(SMALL["chunk_bytes"]) + (128 << 10)  # ~1,900 rows a task: several buckets per array task
OPTS = dict(memory=MEMORY, **SMALL)
CONFIG = dict(memory=MEMORY, chunk_bytes=SMALL["chunk_bytes"], shard_bytes=SMALL["shard_bytes"], map_rows=700)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    src = str(base / "raw")
    make_dataset(src, ROWS)
    ref = str(base / "ref")
    shuffle(src, ref, seed=11, workers=1, **OPTS)
    return src, output_bytes(ref)


def all_stages(src: str, dst: str, n: int, *, order=None, twice=()) -> None:
    run_stage("plan", [src], dst, seed=11, config=CONFIG, workers=1)
    for stage in ("scatter", "permute"):
        for i in order or range(n):
            for _ in range(2 if i in twice else 1):
                run_stage(stage, [src], dst, seed=11, slot=TaskSlot(index=i, count=n), workers=1)
    run_stage("finalize", [src], dst, seed=11, workers=1)


@pytest.mark.parametrize("n", [1, 3])
def test_stages_equal_one_machine_byte_for_byte(case, tmp_path, n):
    src, ref = case
    dst = str(tmp_path / "dst")
    all_stages(src, dst, n, order=list(reversed(range(n))), twice={0})  # any order; task 0 runs twice
    assert output_bytes(dst) == ref
    assert verify(src, dst).ok
    assert Dataset.open(dst).manifest.metadata["shuffle"]["buckets"] >= 3  # every task owned some buckets
    assert sorted(os.listdir(dst)) == sorted([*ref, "manifest.json"]), "no state or scratch may be left"


def test_concurrent_retries_are_harmless(case, tmp_path):
    """Two copies of every task run at once (a retry beside its first attempt): same result."""
    src, ref = case
    dst = str(tmp_path / "dst")
    run_stage("plan", [src], dst, seed=11, config=CONFIG, workers=1)
    for stage in ("scatter", "permute"):
        errors = []

        def task(i, stage=stage, errors=errors):
            try:
                run_stage(stage, [src], dst, seed=11, slot=TaskSlot(index=i, count=2), workers=1)
            except Exception as e:  # noqa: BLE001 (collected, asserted below)
                errors.append(e)

        threads = [threading.Thread(target=task, args=(i,)) for i in (0, 1, 0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
    run_stage("finalize", [src], dst, seed=11, workers=1)
    assert output_bytes(dst) == ref


def test_stage_order_is_enforced_and_late_retries_are_noops(case, tmp_path):
    src, ref = case
    dst = str(tmp_path / "dst")
    with pytest.raises(FileNotFoundError, match="--stage plan"):
        run_stage("scatter", [src], dst, seed=11, slot=TaskSlot(index=0, count=2))
    run_stage("plan", [src], dst, seed=11, config=CONFIG, workers=1)
    run_stage("plan", [src], dst, seed=11, config=CONFIG, workers=1)  # plan twice: the same plan
    run_stage("scatter", [src], dst, seed=11, slot=TaskSlot(index=0, count=2), workers=1)
    with pytest.raises(RuntimeError, match="map task.*have not committed.*array tasks \\[1\\] of 2"):
        run_stage("permute", [src], dst, seed=11, slot=TaskSlot(index=0, count=2), workers=1)
    run_stage("scatter", [src], dst, seed=11, slot=TaskSlot(index=1, count=2), workers=1)
    run_stage("permute", [src], dst, seed=11, slot=TaskSlot(index=1, count=2), workers=1)
    with pytest.raises(RuntimeError, match="bucket.*have not committed"):
        run_stage("finalize", [src], dst, seed=11)
    assert not os.path.exists(os.path.join(dst, "manifest.json"))
    with pytest.raises(ValueError, match="seed 12 differs"):
        run_stage("permute", [src], dst, seed=12, slot=TaskSlot(index=0, count=2))
    with pytest.raises(ValueError, match="memory=.*differs from the plan"):
        run_stage("permute", [src], dst, seed=11, slot=TaskSlot(index=0, count=2), config={"memory": MEMORY + 1})
    run_stage("permute", [src], dst, seed=11, slot=TaskSlot(index=0, count=2), workers=1)
    run_stage("finalize", [src], dst, seed=11)
    assert output_bytes(dst) == ref
    late = run_stage("scatter", [src], dst, seed=11, slot=TaskSlot(index=0, count=2))
    assert late["did"] == 0 and "finalized" in late["note"]
    assert sorted(os.listdir(dst)) == sorted([*ref, "manifest.json"])


def test_another_plan_is_refused(case, tmp_path):
    src, _ = case
    dst = str(tmp_path / "dst")
    run_stage("plan", [src], dst, seed=11, config=CONFIG, workers=1)
    with pytest.raises(FileExistsError, match="another shuffle"):
        run_stage("plan", [src], dst, seed=12, config=CONFIG, workers=1)
    assert Storage(dst).exists(PLAN)


@pytest.mark.parametrize("vars_, flags, want", [
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (None, None), (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (None, None), (2, 4)),
    ({"JOB_COMPLETION_INDEX": "3"}, (None, 8), (3, 8)),
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "0", "AWS_BATCH_JOB_ARRAY_SIZE": "2"}, (None, None), (0, 2)),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "16"}, (1, 3), (1, 3)),  # flags win
])
def test_task_slot_from_scheduler_variables(monkeypatch, vars_, flags, want):
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "JOB_COMPLETION_INDEX",
              "AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ARRAY_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in vars_.items():
        monkeypatch.setenv(k, v)
    slot = resolve_slot(*flags)
    assert (slot.index, slot.count) == want


def test_task_slot_errors(monkeypatch):
    for k in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="no task index"):
        resolve_slot(None, 4)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    with pytest.raises(ValueError, match="JOB_COMPLETION_INDEX.*--num-tasks"):
        resolve_slot(None, None)
    with pytest.raises(ValueError, match="outside \\[0, 2\\)"):
        resolve_slot(None, 2)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "x")
    with pytest.raises(ValueError, match="JOB_COMPLETION_INDEX='x' must be an integer"):
        env.array_task()


def test_cli_stages_through_kubernetes_index(case, tmp_path, monkeypatch):
    """CliRunner: plan, then each index through JOB_COMPLETION_INDEX with --num-tasks, then finalize."""
    src, ref = case
    dst = str(tmp_path / "dst")
    base = ["shuffle", src, dst, "--seed", "11", "--memory", str(MEMORY), "--chunk-bytes", "4KiB", "--shard-bytes",
            "32KiB", "--map-rows", "700", "--workers", "1"]
    r = CliRunner().invoke(main, [*base, "--stage", "plan"])
    assert r.exit_code == 0, r.output
    for stage in ("scatter", "permute"):
        for i in range(2):
            monkeypatch.setenv("JOB_COMPLETION_INDEX", str(i))
            # --threads is each task's own (a node's cores), never planned: tasks may differ, the bytes may not.
            r = CliRunner().invoke(main, [*base, "--stage", stage, "--num-tasks", "2", "--threads", str(1 + 2 * i)])
            assert r.exit_code == 0, r.output
            assert f"task {i}/2" in r.output
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    r = CliRunner().invoke(main, [*base, "--stage", "finalize"])
    assert r.exit_code == 0, r.output
    assert output_bytes(dst) == ref
    r = CliRunner().invoke(main, ["shuffle", src, dst, "--seed", "11", "--task-index", "0"])
    assert r.exit_code != 0 and "need --stage" in r.output


def test_subprocess_slurm_array(case, tmp_path):
    """A real CLI process per SLURM array task (IDs 1..3, so the MIN offset matters), all running at once."""
    src, ref = case
    dst = str(tmp_path / "dst")
    base = [sys.executable, "-m", "shuffler", "shuffle", src, dst, "--seed", "11", "--memory", str(MEMORY),
            "--chunk-bytes", "4KiB", "--shard-bytes", "32KiB", "--map-rows", "700", "--workers", "1"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION", "AWS_BATCH"))}
    subprocess.run([*base, "--stage", "plan"], env=clean, cwd=ROOT, check=True, capture_output=True, timeout=120)
    for stage in ("scatter", "permute"):
        procs = [subprocess.Popen([*base, "--stage", stage], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=dict(clean, SLURM_ARRAY_TASK_ID=str(i), SLURM_ARRAY_TASK_MIN="1",
                                           SLURM_ARRAY_TASK_COUNT="3"))
                 for i in (1, 2, 3)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
    p = subprocess.run([*base, "--stage", "finalize"], env=clean, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert output_bytes(dst) == ref

"""The Ray executor (shuffler/shuffling/executor.py, extra `ray`): a real local Ray on 127.0.0.1, started once for this
module. Its output equals the local executor's byte for byte (also for `--from-scatter`, pass 2 only); a
task whose worker dies is retried; a task's error reaches the caller as itself; every Ray listener is on
loopback; no Ray process outlives the module."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile

import numpy as np
import psutil
import pytest
from click.testing import CliRunner

from shuffler.cli import main
from shuffler.format.seal import seal
from shuffler.shuffling.executor import RayExecutor
from shuffler.shuffling.from_scatter import shuffle_from_scatter
from shuffler.shuffling.plan import fixed_overhead
from shuffler.shuffling.run import shuffle
from shuffler.shuffling.verify import verify
from tests.test_cluster import MEMORY
from tests.test_fused import ROW, row_ids, shard_bytes, write_scattered
from tests.test_shuffle import SMALL, make_dataset, output_bytes

# Loopback only (../shared/reference/infra-check.md 1.3-1.4): without the first variable Ray binds every
# interface and uses the host's routable address even when told 127.0.0.1. Ray reads it when imported, so it
# is set before the import; these variables mean nothing to anything but Ray.
for _k, _v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               "RAY_enable_metrics_collection": "0"}.items():
    os.environ.setdefault(_k, _v)
ray = pytest.importorskip("ray")


class _Bar:
    def __init__(self):
        self.rows = 0

    def update(self, rows, nbytes=0):
        self.rows += rows


@pytest.fixture(scope="module")
def local_ray():
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live here (108-byte limit)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             _temp_dir=temp, object_store_memory=128 << 20)
    try:
        yield
    finally:
        ray.shutdown()
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        gone, alive = psutil.wait_procs(left, timeout=10)
        shutil.rmtree(temp, ignore_errors=True)
        assert not alive, f"Ray processes left behind: {[(p.pid, p.name()) for p in alive]}"


def ray_listeners() -> list[str]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            out += [c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def test_ray_output_equals_local_byte_for_byte(local_ray, tmp_path):
    src = str(tmp_path / "raw")
    make_dataset(src, 5000)
    shuffle(src, str(tmp_path / "local"), seed=3, workers=1, memory=MEMORY, **SMALL)
    stats: dict = {}
    m = shuffle(src, str(tmp_path / "ray"), seed=3, executor="ray", memory=MEMORY, map_rows=900, stats=stats, **SMALL)
    assert m.metadata["shuffle"]["buckets"] >= 3 and not stats["in_process"]
    assert output_bytes(str(tmp_path / "ray")) == output_bytes(str(tmp_path / "local"))
    assert verify(src, str(tmp_path / "ray")).ok
    ips = ray_listeners()
    assert ips and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in ips), ips
    # the CLI path, on the Ray this process already joined
    r = CliRunner().invoke(main, ["shuffle", src, str(tmp_path / "cli"), "--seed", "3", "--executor", "ray",
                                  "--memory", str(MEMORY), "--chunk-bytes", "4KiB", "--shard-bytes", "32KiB"])
    assert r.exit_code == 0, r.output
    assert output_bytes(str(tmp_path / "cli")) == output_bytes(str(tmp_path / "local"))


def test_two_levels_on_ray_equal_the_serial_recursion_byte_for_byte(local_ray, tmp_path):
    """--levels 2 on Ray: the level-2 scatter and the sub-buckets are Ray tasks; the bytes are those of one level with
    --buckets S on one process, where each super-bucket recurses inside its reduce task (tests/test_levels.py)."""
    from tests.test_levels import memory_for

    src = str(tmp_path / "raw")
    make_dataset(src, 5000)
    stats: dict = {}
    shuffle(src, str(tmp_path / "ray"), seed=3, executor="ray", memory=memory_for(src), levels=2, map_rows=900,
            stats=stats, **SMALL)
    assert stats["plan"]["levels"] == 2 and stats["plan"]["sub_buckets"] > 1
    assert len(stats["task_nodes"]["level2"]) >= stats["plan"]["buckets"], "level-2 map tasks ran as Ray tasks"
    shuffle(src, str(tmp_path / "serial"), seed=3, workers=1, memory=memory_for(src), buckets=stats["plan"]["buckets"],
            **SMALL)
    assert output_bytes(str(tmp_path / "ray")) == output_bytes(str(tmp_path / "serial"))
    assert verify(src, str(tmp_path / "ray")).ok


def _dies_once(flag: str, x: int) -> int:
    """Kills its worker process on the first call (a node lost mid-task), then works."""
    if not os.path.exists(flag):
        open(flag, "w").close()
        os._exit(1)
    return 2 * x


def _fails(x: int) -> int:
    raise ValueError(f"bad task {x}")


def test_ray_retries_a_dead_worker_and_reraises_errors(local_ray, tmp_path):
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # Ray workers need not import tests/
    flag = str(tmp_path / "died")
    with RayExecutor() as ex:
        assert ex.run(_dies_once, [(flag, 1), (flag, 2)], _Bar(), lambda k: None) == [2, 4]
        assert os.path.exists(flag)
        with pytest.raises(ValueError, match="bad task 1"):
            ex.run(_fails, [(1,)], _Bar(), lambda k: None)


def _assigned_cpus(x: int) -> float:
    return ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)


def test_ray_tasks_ask_for_their_codec_threads_as_cpus(local_ray, monkeypatch, tmp_path):
    """A task with --threads N asks Ray for N CPUs, so Ray places no more tasks on a node than its cores run;
    capped at the largest node's CPUs (2 here), since Ray never schedules a task no node can hold."""
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    for threads, want in ((1, 1.0), (2, 2.0), (8, 2.0)):
        with RayExecutor(cpus_per_task=threads) as ex:
            assert ex.task_cpus() == int(want)
            assert ex.run(_assigned_cpus, [(1,), (2,)], _Bar(), lambda k: None) == [want, want]
    with pytest.raises(ValueError, match=r"cpus_per_task=0 must be an integer >= 1"):
        RayExecutor(cpus_per_task=0)
    # Through the shuffle's options: --threads 2 reaches the executor, and the bytes do not change.
    src = str(tmp_path / "raw")
    make_dataset(src, 3000)
    shuffle(src, str(tmp_path / "one"), seed=5, executor="ray", threads=1, memory=MEMORY, map_rows=900, **SMALL)
    made = []
    run_module = importlib.import_module("shuffler.shuffling.run")
    real = run_module.make_executor

    def spy(kind, **kw):
        made.append(kw["threads"])
        return real(kind, **kw)

    monkeypatch.setattr(run_module, "make_executor", spy)
    shuffle(src, str(tmp_path / "two"), seed=5, executor="ray", threads=2, memory=MEMORY, map_rows=900, **SMALL)
    assert made and set(made) == {2}
    assert output_bytes(str(tmp_path / "two")) == output_bytes(str(tmp_path / "one"))


def test_ray_refuses_memory_urls(local_ray, memory_url, tmp_path):
    src = str(tmp_path / "raw")
    make_dataset(src, 100)
    with pytest.raises(ValueError, match="cannot reach memory://"):
        shuffle(src, memory_url, seed=1, executor="ray")
    with pytest.raises(ValueError, match="needs executor='ray'"):
        shuffle(src, str(tmp_path / "x"), seed=1, ray_address="127.0.0.1:6379")


# ---------------------------------------------------------------------------------------------------
# `shuffle --from-scatter` (pass 2 only) on Ray


def test_from_scatter_on_ray_equals_local_byte_for_byte(local_ray, tmp_path):
    src = str(tmp_path / "scattered")
    for p, rows in enumerate([range(0, 180), range(180, 300), range(300, 301)]):
        write_scattered(src, rows, seed=5, buckets=4, producer=f"p{p}")
    seal(src)
    opts = dict(chunk_bytes=4 * ROW, shard_bytes=8 * ROW)
    local = shuffle_from_scatter(src, str(tmp_path / "local"), workers=1, **opts)
    stats: dict = {}
    m = shuffle_from_scatter(src, str(tmp_path / "ray"), executor="ray", workers=1, stats=stats, **opts)
    assert stats["from_scatter"] and not stats["in_process"]  # workers=1 runs in-process, but not on Ray
    assert m.to_json() == local.to_json()
    assert shard_bytes(str(tmp_path / "ray")) == shard_bytes(str(tmp_path / "local"))
    assert np.array_equal(np.sort(row_ids(str(tmp_path / "ray"))), np.arange(301))
    assert verify([src], str(tmp_path / "ray"), full=True).ok
    # one bucket 6x the memory: the Ray task recurses through scratch, which it must reach too
    one = str(tmp_path / "one-bucket")
    write_scattered(one, range(400), seed=3, buckets=1, run_rows=50, chunk_rows=4)
    memory = fixed_overhead(4 * ROW) + 64 * (ROW + 12)
    shuffle_from_scatter(one, str(tmp_path / "one-local"), memory=memory, workers=1, **opts)
    m = shuffle_from_scatter(one, str(tmp_path / "one-ray"), memory=memory, executor="ray", **opts)
    assert any("." in s.name.split("-")[1] for s in m.shards), "expected recursed shard names"
    assert shard_bytes(str(tmp_path / "one-ray")) == shard_bytes(str(tmp_path / "one-local"))


def test_cli_from_scatter_executor_ray(local_ray, monkeypatch, tmp_path):
    run_module = importlib.import_module("shuffler.shuffling.run")
    kinds = []
    real = run_module.make_executor
    monkeypatch.setattr(run_module, "make_executor", lambda kind, **kw: kinds.append(kind) or real(kind, **kw))
    src, dst, ref = str(tmp_path / "sc"), str(tmp_path / "ray"), str(tmp_path / "local")
    r = CliRunner().invoke(main, ["synth", src, "--rows", "3000", "--d-model", "8", "--scatter", "--seed", "4",
                                  "--buckets", "5", "--chunk-bytes", "4KiB"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["shuffle", "--from-scatter", src, ref, "--workers", "1", "--chunk-bytes", "4KiB"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["shuffle", "--from-scatter", src, dst, "--executor", "ray", "--chunk-bytes", "4KiB"])
    assert r.exit_code == 0, r.output
    assert "pass 2 only" in r.output and kinds == ["local", "ray"]
    assert output_bytes(dst) == output_bytes(ref)
    assert verify([src], dst).ok


def test_cli_from_scatter_passes_executor_and_address_on(monkeypatch, tmp_path):
    import shuffler.shuffling.from_scatter

    seen: dict = {}

    def fake(url, dst, **kw):
        seen.update(kw, url=url, dst=dst)
        raise RuntimeError("stop here")

    monkeypatch.setattr(shuffler.shuffling.from_scatter, "shuffle_from_scatter", fake)
    r = CliRunner().invoke(main, ["shuffle", "--from-scatter", "a", "b", "--executor", "ray",
                                  "--ray-address", "127.0.0.1:6379"])
    assert r.exit_code == 1 and "stop here" in r.output, r.output
    assert (seen["url"], seen["dst"], seen["executor"], seen["ray_address"]) == ("a", "b", "ray", "127.0.0.1:6379")
    r = CliRunner().invoke(main, ["shuffle", "--from-scatter", "a", "b"])
    assert seen["executor"] == "local" and seen["ray_address"] is None
    monkeypatch.undo()
    # errors as before: a bad executor, --stage, and an address without Ray (checked before any Ray starts)
    r = CliRunner().invoke(main, ["shuffle", "--from-scatter", "a", "b", "--executor", "dask"])
    assert r.exit_code == 2 and "'dask' is not one of 'local', 'ray'" in r.output, r.output
    r = CliRunner().invoke(main, ["shuffle", "--from-scatter", "a", "b", "--stage", "permute", "--seed", "1"])
    assert r.exit_code == 2 and "--stage does not apply to --from-scatter" in r.output, r.output
    src = str(tmp_path / "sc")
    assert CliRunner().invoke(main, ["synth", src, "--rows", "200", "--d-model", "2", "--scatter"]).exit_code == 0
    r = CliRunner().invoke(main, ["shuffle", "--from-scatter", src, str(tmp_path / "o"), "--ray-address", "x:1"])
    assert r.exit_code == 1 and "needs executor='ray'" in r.output, r.output

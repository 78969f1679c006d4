"""The Ray executor (shuffler/executor.py, extra `ray`): a real local Ray on 127.0.0.1, started once for this
module. Its output equals the local executor's byte for byte; a task whose worker dies is retried; a task's
error reaches the caller as itself; every Ray listener is on loopback; no Ray process outlives the module."""

from __future__ import annotations

import os
import shutil
import tempfile

import psutil
import pytest
from click.testing import CliRunner

from shuffler.cli import main
from shuffler.executor import RayExecutor
from shuffler.shuffle import shuffle
from shuffler.verify import verify
from tests.test_cluster import MEMORY
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


def test_ray_refuses_memory_urls(local_ray, memory_url, tmp_path):
    src = str(tmp_path / "raw")
    make_dataset(src, 100)
    with pytest.raises(ValueError, match="cannot reach memory://"):
        shuffle(src, memory_url, seed=1, executor="ray")
    with pytest.raises(ValueError, match="needs executor='ray'"):
        shuffle(src, str(tmp_path / "x"), seed=1, ray_address="127.0.0.1:6379")

"""`shuffler shuffle --executor ray` on a real multi-node Ray cluster that loses nodes mid-pass (issue 18, part 2).

A head and three worker nodes on 127.0.0.1 (tests/cluster/ray_nodes.py), one CPU each (the head none), and S3 (moto, the root
conftest's `s3_endpoint`) the only storage they share. The shuffle runs as a user runs it: the CLI in its own
process, joining the cluster with --ray-address. While it runs, a worker node is killed with SIGKILL (its raylet
and every process under it) at a moment one of its workers is executing a task of pass 1, and another while one
runs a task of pass 2. The job must still finish, byte-identical to a local `shuffler shuffle` with the same
seed, and `shuffler verify --full` must pass. The same for `shuffle --from-scatter` (pass 2 only), losing two
nodes during that pass. The CLI's "ray pass N" lines (RayExecutor.task_nodes) show where the tasks ran.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import boto3
import pytest

from tests.cluster.ray_nodes import LoopbackCluster

pytest.importorskip("ray")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# ~33 MiB of float32 rows; 24 buckets and 20 map tasks, so each pass has many more tasks than the cluster
# has CPUs (4) and a node can be caught mid-task with others still to come.
ROWS, D_MODEL, BUCKETS, MAP_ROWS = 32_000, 256, 24, 1600
LAYOUT = ["--chunk-bytes", "512KiB", "--shard-bytes", "4MiB"]


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The CLI in its own process, as a user runs it (the environment carries the S3 endpoint and keys)."""
    env = dict(os.environ, SHUFFLER_NO_PROGRESS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "shuffler", *args], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"shuffler {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def objects(url: str) -> dict[str, bytes]:
    """Every object under an s3:// prefix, by name relative to it."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1:]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def count(url: str, pattern: str) -> int:
    """How many object names under `url` match `pattern` (a commit marker's name)."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in p.get("Contents", [])]
    return sum(1 for k in keys if re.search(pattern, k))


def placements(stdout: str) -> dict[str, dict[str, int]]:
    """The CLI's "ray pass N: T task(s) on K node(s): id x n, ..." lines: pass -> {node id prefix: tasks}."""
    out = {}
    for line in stdout.splitlines():
        m = re.fullmatch(r"ray (pass \d): (\d+) task\(s\) on \d+ node\(s\): (.*)", line)
        if m:
            out[m.group(1)] = {k: int(n) for k, n in re.findall(r"([0-9a-f]{8}) x(\d+)", m.group(3))}
            assert sum(out[m.group(1)].values()) == int(m.group(2)), line
    return out


@pytest.fixture
def cluster(s3_endpoint):
    """Head + 3 worker nodes on loopback; started after the S3 endpoint, so every node's workers inherit it."""
    c = LoopbackCluster(workers=3)
    try:
        yield c
    finally:
        left = c.shutdown()
        assert not left, f"Ray processes left behind: {left}"


def run_with_kills(cluster: LoopbackCluster, args: list[str], kills: list[tuple[str, object]]):
    """Run `shuffler *args` in its own process while a thread kills one worker node per (task, ready) in `kills`,
    in order: the first node seen running `task` once ready() holds. Returns (CompletedProcess, killed nodes)."""
    killed, errors = [], []

    def killer() -> None:
        try:
            for task, ready in kills:
                killed.append(cluster.kill_when_running(task, cluster.workers, ready=ready))
        except BaseException as e:  # reported by the test, not lost in the thread
            errors.append(e)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    t0 = time.monotonic()
    r = cli(*args)
    t.join(timeout=5)
    assert not t.is_alive(), f"the job finished before all {len(kills)} kills ({len(killed)} done):\n{r.stdout}"
    assert not errors, f"the kills did not happen: {errors!r}; the job printed:\n{r.stdout}"
    print(f"\n{' '.join(args[:2])}: {time.monotonic() - t0:.1f} s with {len(killed)} node(s) killed\n{r.stdout}")
    return r, killed


def check_losses(cluster: LoopbackCluster, killed: list, stdout: str) -> dict[str, dict[str, int]]:
    """The kills were real node losses, every task reported ran on a node of the cluster, and tasks ran on more
    than one node: the nodes the CLI reports (where each task's successful attempt ran) plus those seen executing
    a task (the killed ones were, by construction). Returns the CLI's report."""
    assert len({n.node_id for n in killed}) == len(killed) == 2
    for node in killed:
        cluster.wait_dead(node.node_id)  # the GCS saw the node die, not just a worker crash
        assert not cluster.raylet_alive(node)
    alive = cluster.alive()
    assert sum(alive[n] for n in cluster.node_ids()) == len(cluster.node_ids()) - 2
    where = placements(stdout)
    every = {n[:8] for n in cluster.node_ids()}
    for counts in where.values():
        assert set(counts) <= every, (counts, every)
    ran = set().union(*where.values()) | {n[:8] for n, tasks in cluster.seen.items() if tasks}
    assert {n.node_id[:8] for n in killed} <= ran and len(ran) >= 2, f"every task ran on one node: {where}"
    print(f"nodes: head {cluster.head.node_id}, workers {[n.node_id for n in cluster.workers]}; killed "
          f"{[n.node_id for n in killed]}; tasks ran on {sorted(ran)}; reported {where}")
    return where


def test_two_pass_shuffle_survives_a_node_lost_in_each_pass(cluster, s3_url):
    src, ref, dst = f"{s3_url}/raw", f"{s3_url}/local", f"{s3_url}/ray"
    cli("synth", src, "--rows", str(ROWS), "--d-model", str(D_MODEL), "--docs", "40", *LAYOUT)
    opts = ["--seed", "11", "--buckets", str(BUCKETS), *LAYOUT]
    cli("shuffle", src, ref, *opts, "--workers", "2")  # the local reference (its map split differs: no matter)
    first_map = lambda: count(dst, r"/\.shuffle/scratch/run-[0-9a-f]+/map-\d+\.idx$") >= 1  # noqa: E731
    first_bucket = lambda: count(dst, r"/\.shuffle/reduce/b-\d+\.json$") >= 1  # noqa: E731
    r, killed = run_with_kills(
        cluster, ["shuffle", src, dst, *opts, "--map-rows", str(MAP_ROWS), "--executor", "ray",
                  "--ray-address", cluster.address],
        [("map_worker", first_map), ("reduce_worker", first_bucket)])
    where = check_losses(cluster, killed, r.stdout)
    assert set(where) == {"pass 1", "pass 2"}
    assert sum(where["pass 1"].values()) == ROWS // MAP_ROWS and sum(where["pass 2"].values()) == BUCKETS
    # The node lost in pass 1 was gone before pass 2 began: no pass-2 task can have run there.
    assert killed[0].node_id[:8] not in where["pass 2"], where
    out, want = objects(dst), objects(ref)
    assert sorted(out) == sorted(want) and "manifest.json" in out, (sorted(out), sorted(want))
    assert out == want, [k for k in out if out[k] != want[k]]  # every shard and the manifest, byte for byte
    cli("verify", src, dst, "--full")  # exits 0 only if DST holds exactly SRC's rows (sorted row hashes)


def test_from_scatter_survives_two_nodes_lost_in_its_pass(cluster, s3_url):
    src, ref, dst = f"{s3_url}/scattered", f"{s3_url}/local", f"{s3_url}/ray"
    cli("synth", src, "--rows", str(ROWS), "--d-model", str(D_MODEL), "--docs", "40", "--scatter", "--seed", "5",
        "--buckets", str(BUCKETS), *LAYOUT)
    cli("shuffle", "--from-scatter", src, ref, "--workers", "2", *LAYOUT)
    buckets = lambda k: lambda: count(dst, r"/\.shuffle/reduce/b-\d+\.json$") >= k  # noqa: E731
    r, killed = run_with_kills(
        cluster, ["shuffle", "--from-scatter", src, dst, *LAYOUT, "--executor", "ray", "--ray-address", cluster.address],
        [("reduce_worker", buckets(1)), ("reduce_worker", buckets(4))])
    where = check_losses(cluster, killed, r.stdout)
    assert set(where) == {"pass 2"} and sum(where["pass 2"].values()) == BUCKETS
    out, want = objects(dst), objects(ref)
    assert sorted(out) == sorted(want) and "manifest.json" in out, (sorted(out), sorted(want))
    assert out == want, [k for k in out if out[k] != want[k]]
    cli("verify", src, dst, "--full")

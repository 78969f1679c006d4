"""A real multi-node Ray cluster on this machine, loopback only, for tests/cluster/test_ray_cluster.py.

`LoopbackCluster` starts a head node and worker nodes with `ray.cluster_utils.Cluster` (Ray's own multi-node
harness: each node is a separate raylet, with its object store, agents and worker processes, registered with
the head's GCS), every one bound to 127.0.0.1. Each worker node has one CPU and the head none, so the tasks
of a pass must spread over the worker nodes. `kill` loses a node as a power cut would: SIGKILL to its
raylet and every process under it (its workers and agents), no shutdown. `kill_when_running` waits until a
worker of one of the given nodes is executing a named task (Ray titles a busy worker process "ray::<task
name>"; the product names its tasks map_worker and reduce_worker) and kills that node then.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable

import psutil

# Loopback only: without the first variable Ray binds every interface and advertises the host's routable
# address even when told 127.0.0.1 (docs/cluster.md, "Ray"). Ray reads these when imported, and the node
# processes inherit them.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_enable_metrics_collection": "0"}
for _k, _v in RAY_ENV.items():
    os.environ.setdefault(_k, _v)

# The GCS declares a node dead after health_check_failure_threshold missed checks, every
# health_check_period_ms (Ray's defaults: 5 x 3 s). A shorter period only makes the test wait less for Ray to
# notice what the kill did; task retries do not wait for it (the owner sees its worker's connection drop).
HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                      "health_check_initial_delay_ms": 0}
OBJECT_STORE = 80 << 20  # the tasks put nothing in it: rows move through S3


class LoopbackCluster:
    """Head node (no CPU for tasks) plus `workers` worker nodes, one CPU each, all on 127.0.0.1 under a private
    temp dir."""

    def __init__(self, workers: int = 3):
        from ray.cluster_utils import Cluster

        # Short (Ray's unix sockets live below it: 108-byte limit) and private: RAY_TMPDIR keeps the
        # "current cluster" file Ray writes out of the shared /tmp/ray, where other Ray users would find it.
        self.temp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
        os.makedirs(f"{self.temp}/ray")
        self.old_tmpdir = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = self.temp
        self.before = {p.pid for p in psutil.Process().children(recursive=True)}
        common = dict(node_ip_address="127.0.0.1", num_cpus=1, object_store_memory=OBJECT_STORE)
        # The head runs no tasks (num_cpus=0, as Ray advises for the head of a real cluster): it holds the GCS
        # and the driver, which a node loss must not take; every task runs on a worker node that may be lost.
        self.cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=dict(
            common, num_cpus=0, temp_dir=f"{self.temp}/ray", include_dashboard=False,
            _system_config=HEAD_SYSTEM_CONFIG))
        self.head = self.cluster.head_node
        self.workers = [self.cluster.add_node(**common) for _ in range(workers)]
        self.killed: list[str] = []
        self.seen: dict[str, set[str]] = {}  # node id -> the task names kill_when_running saw it execute

    @property
    def address(self) -> str:
        return self.cluster.address

    def node_ids(self) -> list[str]:
        return [self.head.node_id] + [n.node_id for n in self.workers]

    def alive(self) -> dict[str, bool]:
        """What the head's GCS says of every node it has known: node id -> alive."""
        return {n["NodeID"]: n["Alive"] for n in self.cluster.global_state.node_table()}

    @staticmethod
    def raylet(node) -> psutil.Process:
        return psutil.Process(node.all_processes["raylet"][0].process.pid)

    def raylet_alive(self, node) -> bool:
        try:
            return self.raylet(node).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def busy(self, node) -> list[str]:
        """The task names the node's worker processes are executing now ("ray::<name>" process titles)."""
        names = []
        try:
            procs = self.raylet(node).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            try:
                title = " ".join(p.cmdline()).strip()
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            if title.startswith("ray::") and not title.startswith(("ray::IDLE", "ray::Dashboard", "ray::RuntimeEnv")):
                names.append(title[len("ray::"):].split()[0])
        return names

    def kill(self, node) -> None:
        """SIGKILL the node's raylet first (so it starts no new worker), then every process that was under it."""
        raylet = self.raylet(node)
        under = raylet.children(recursive=True)
        raylet.send_signal(signal.SIGKILL)
        for p in under:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        raylet.wait(timeout=10)  # reaps it (our child); the others were reparented, and their new parent reaps
        self.killed.append(node.node_id)

    def kill_when_running(self, task: str, nodes: list, *, ready: Callable[[], bool] = lambda: True,
                          timeout: float = 120.0):
        """Once `ready()` is true, kill the first of `nodes` seen executing a task named `task`; return that node.
        TimeoutError if none was seen within `timeout` seconds (the pass ended first: make it longer)."""
        end = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > end:
                raise TimeoutError(f"not ready to kill a node running {task} within {timeout} s")
            time.sleep(0.1)
        while time.monotonic() < end:
            for node in nodes:
                if node.node_id in self.killed:
                    continue
                busy = self.busy(node)
                self.seen.setdefault(node.node_id, set()).update(busy)
                if task in busy:
                    self.kill(node)
                    return node
            time.sleep(0.02)
        raise TimeoutError(f"no node of {[n.node_id[:8] for n in nodes]} ran {task} within {timeout} s")

    def wait_dead(self, node_id: str, timeout: float = 30.0) -> None:
        """Until the GCS marks the node dead (its health checks failed): the loss Ray itself saw."""
        end = time.monotonic() + timeout
        while self.alive().get(node_id, True):
            if time.monotonic() > end:
                raise TimeoutError(f"the GCS still lists node {node_id[:8]} alive {timeout} s after its kill")
            time.sleep(0.2)

    def shutdown(self) -> list[tuple[int, str]]:
        """Stop every node; return the Ray processes that outlived it (pid, name): none, if all went well."""
        for node in list(self.cluster.worker_nodes):
            if node.node_id in self.killed:
                self.cluster.worker_nodes.discard(node)  # already gone: nothing left to stop
        self.cluster.shutdown()
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in self.before]
        _, alive = psutil.wait_procs(left, timeout=10)
        if self.old_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = self.old_tmpdir
        shutil.rmtree(self.temp, ignore_errors=True)
        out = []
        for p in alive:
            try:
                out.append((p.pid, p.name()))
            except psutil.NoSuchProcess:
                continue
        return out

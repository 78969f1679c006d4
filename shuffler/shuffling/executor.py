"""Executors: where the shuffle's map and reduce tasks run. One small interface, two back-ends.

    with make_executor("local", workers=8, in_process=False) as ex:
        results = ex.run(fn, [(task,), ...], bar, on_done)     # fn(*call) for every call, results in order

- LocalExecutor: in this process (workers == 1, or memory:// URLs that other processes cannot see) or on a
  pool of spawned processes; the first task error stops the rest and is re-raised.
- RayExecutor (extra `ray`): every call is one Ray task with retries. Tasks are small picklable descriptions
  of object names; the data moves storage -> worker -> storage, never through Ray's object store, so a
  retried task just rewrites the same bytes (tasks are deterministic) and commits with the same marker.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import inspect
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from shuffler import env
from shuffler.format.manifest import Fingerprint, ShardInfo
from shuffler.io.chunks import storage
from shuffler.io.pages import WORKER_TUNABLES, keep_freed_memory
from shuffler.progress import Progress
from shuffler.shuffling.map import MapOutput, MapTask, release_buffers, run_map
from shuffler.shuffling.markers import reduce_marker, reduce_marker_bytes
from shuffler.shuffling.reduce import ReduceTask, run_reduce

EXECUTORS = ("local", "ray")

# ---------------------------------------------------------------------------------------------------
# Fault injection for the resume tests (env.shuffle_fault)


def faults() -> dict[str, float]:
    """The faults SHUFFLER_FAULT asks to inject, e.g. {"kill-after-map": 2.0} (env.shuffle_fault)."""
    out = {}
    for part in filter(None, env.shuffle_fault().split(",")):
        k, _, v = part.partition("=")
        out[k.strip()] = float(v)
    return out


def die() -> None:
    """Kill this process as kill -9 would: no cleanup, no finally (the resume tests' crash)."""
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------
# Running tasks: in this process, or on a pool of spawned processes


_report: Callable[[int, int], None] | None = None


def _init_worker(q, parent: int) -> None:
    global _report
    _report = lambda rows, nbytes: q.put((rows, nbytes))  # noqa: E731
    keep_freed_memory()  # chunk-sized buffers are reused, not faulted in afresh per chunk (io/pages.py)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the coordinator, which stops the pool
    # A coordinator killed with SIGKILL cannot stop its pool, and workers left running would go on writing
    # intermediates after a re-run has cleaned up. Linux kills us with our parent (PR_SET_PDEATHSIG);
    # elsewhere a watcher exits once we are reparented. Either way the re-run redoes our task.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(70)  # the parent died before the line above took effect

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def map_worker(task: MapTask) -> MapOutput:
    """One map task (pass 1), as an executor runs it: progress goes to this process's reporter."""
    return run_map(task, _report)


def reduce_worker(task: ReduceTask, state_url: str, kill_in: int) -> tuple[list[ShardInfo], Fingerprint]:
    """One reduce task (pass 2), then its commit marker under `state_url` (DST); `kill_in` > 0 dies (a fault
    injected by the resume tests) as its output shard `kill_in` opens."""
    hook = (lambda k: die() if k >= kill_in else None) if kill_in else None
    shards, fp = run_reduce(task, _report, hook)
    # The commit, last, replacing whole and atomically. A concurrent copy of this task (an array-job retry
    # beside the attempt it replaces) writes the very same bytes, so whichever rename lands last changes
    # nothing; a plain replace (not first-writer-wins) also repairs a damaged marker on the re-run.
    storage(state_url).write(reduce_marker(task.path), reduce_marker_bytes(task.path, shards, fp))
    return shards, fp


def unguarded_main_line(frame=None) -> tuple[str, int] | None:
    """(script, line) if the running call comes from top-level code of the `__main__` script that is not
    under an `if __name__ == "__main__":` block, else None.

    A spawned process first re-runs the parent's main script (as "__mp_main__") to rebuild its globals:
    Python's "safe importing of main module" rule
    (https://docs.python.org/3/library/multiprocessing.html#the-spawn-and-forkserver-start-methods). An
    unguarded call would run again in every worker, where multiprocessing refuses to start processes and the
    worker dies. Scripts run as `python -m pkg` with a `pkg/__main__.py` and code without a file (`python -c`,
    notebooks) are not re-run (multiprocessing/spawn.py, get_preparation_data and _fixup_main_from_name).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path:
        return None
    name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if name == "__main__" or name.endswith(".__main__"):
        return None
    line = None
    f = frame or inspect.currentframe()
    while f is not None:
        if f.f_globals is vars(main) and f.f_code.co_name == "<module>":
            line = f.f_lineno  # the outermost: the script's own top-level statement
        f = f.f_back
    if line is None:
        return None
    try:
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, ValueError):
        return None
    return None if under_main_guard(tree.body, line) else (path, line)


def under_main_guard(body: list[ast.stmt], line: int) -> bool:
    """Whether source line `line` of a module whose statements are `body` runs only under
    `if __name__ == "__main__":` (at any depth of if/with/try/for blocks)."""
    for node in body:
        if not node.lineno <= line <= (node.end_lineno or node.lineno):
            continue
        if isinstance(node, ast.If) and _is_main_test(node.test):
            return any(c.lineno <= line <= (c.end_lineno or c.lineno) for c in node.body)
        children = [getattr(node, k) for k in ("body", "orelse", "finalbody", "handlers") if hasattr(node, k)]
        return any(under_main_guard([c for c in part if isinstance(c, ast.stmt | ast.excepthandler)], line)
                   for part in children if isinstance(part, list))
    return False


def _is_main_test(test: ast.expr) -> bool:
    """`__name__ == "__main__"`, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = {type(test.left), type(test.comparators[0])}
    names = [x.id for x in (test.left, test.comparators[0]) if isinstance(x, ast.Name)]
    consts = [x.value for x in (test.left, test.comparators[0]) if isinstance(x, ast.Constant)]
    return sides == {ast.Name, ast.Constant} and names == ["__name__"] and consts == ["__main__"]


def require_main_guard(what: str) -> None:
    """Refuse at once, naming the guard, to start worker processes from an unguarded top-level call."""
    found = unguarded_main_line(inspect.currentframe())
    if found is not None:
        path, line = found
        raise RuntimeError(
            f"{path}, line {line}: {what} starts worker processes with spawn, which re-runs this script in each "
            "worker, and the call sits at the top level of the script. Put it under "
            "`if __name__ == \"__main__\":` (Python's rule for scripts that start processes: "
            "https://docs.python.org/3/library/multiprocessing.html#the-spawn-and-forkserver-start-methods), "
            "or pass workers=1 to run in this process"
        )


class LocalExecutor:
    """Runs tasks in this process (workers == 1, or memory:// URLs that other processes cannot see) or on
    a pool of spawned processes; the first task error stops the rest and is re-raised."""

    def __init__(self, workers: int, in_process: bool):
        self.workers, self.in_process = workers, in_process
        self.executor: ProcessPoolExecutor | None = None
        self.queue = None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def _start(self) -> ProcessPoolExecutor:
        if self.executor is None:
            require_main_guard(f"a shuffle with workers={self.workers}")
            # spawn, not fork: the coordinator may hold s3fs/aiohttp threads, which do not survive fork.
            ctx = multiprocessing.get_context("spawn")
            self.queue = ctx.Queue()
            self.executor = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=(self.queue, os.getpid()))
        return self.executor

    def run(self, fn, calls: list[tuple], bar: Progress, on_done: Callable[[int], None]) -> list:
        """fn(*call) for every call; on_done(count_done) after each commit. Results in call order."""
        global _report
        if self.in_process or len(calls) <= 1 and self.executor is None:
            _report = bar.update
            try:
                out = []
                for args in calls:
                    out.append(fn(*args))
                    on_done(len(out))
                return out
            finally:
                _report = None
                release_buffers()  # the coordinator keeps no bucket-sized buffer while workers run
        ex = self._start()
        # Workers are spawned by submit() (ProcessPoolExecutor starts them on demand): with glibc's tunables for
        # one malloc arena advised huge pages, which a process reads only as it starts (io/pages.py).
        with env.glibc_tunables_for_children(WORKER_TUNABLES):
            futures = [ex.submit(fn, *args) for args in calls]
        pending, done_count = set(futures), 0
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                self._drain(bar)
                for f in done:
                    f.result()  # the first error stops here and is re-raised
                    done_count += 1
                    on_done(done_count)
        except BrokenProcessPool:
            raise RuntimeError(
                "a worker process died (killed, or out of memory): lower --memory or --workers, then re-run the "
                "same command to resume"
            ) from None
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        self._drain(bar)
        return [f.result() for f in futures]

    def _drain(self, bar: Progress) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                bar.update(*self.queue.get_nowait())


def _rows_of(result) -> int:
    """Rows a finished task handled: a MapOutput, or a reduce's (shards, fingerprint)."""
    if isinstance(result, MapOutput):
        return result.rows
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Fingerprint):
        return int(result[1].rows)
    return 0


def on_node(fn, *args) -> tuple[str, object]:
    """fn(*args) as a Ray task runs it, with the id of the Ray node it ran on: (node id, result). The driver
    reports where each task ran (RayExecutor.task_nodes, the CLI's summary), so a user sees that the work
    spread over the cluster and which node a retried task finally ran on."""
    import ray

    return ray.get_runtime_context().get_node_id(), fn(*args)


class RayExecutor:
    """Runs every call as one Ray task (extra `ray`), retried up to `max_retries` times when its worker dies
    (a node lost: raylet and workers killed) or it raises OSError (a storage hiccup). Uses the Ray runtime
    this process already joined, else `ray.init(address=address)` (None: RAY_ADDRESS, else a new local Ray)
    and shuts it down on exit.

    Only the task descriptions (object names, a few KiB) and results (chunk counts, fingerprints) pass through
    Ray; rows move through storage, so DST, SRC and scratch must be URLs every Ray worker can reach.
    After `run`, `task_nodes[i]` is the id of the Ray node whose attempt of call i succeeded.
    """

    def __init__(self, address: str | None = None, *, workers: int | None = None, max_retries: int = 3,
                 cpus_per_task: int = 1):
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries} must be >= 0")
        if isinstance(cpus_per_task, bool) or not isinstance(cpus_per_task, int) or cpus_per_task < 1:
            raise ValueError(f"cpus_per_task={cpus_per_task!r} must be an integer >= 1 (a task's codec threads)")
        self.address, self.workers, self.max_retries = address, workers, max_retries
        self.cpus_per_task = cpus_per_task
        self.owned = False
        self.task_nodes: list[str] = []

    def __enter__(self) -> RayExecutor:
        try:
            import ray
        except ImportError:
            raise RuntimeError("--executor ray needs the `ray` extra: pip install 'activation-shuffler[ray]'") from None
        if not ray.is_initialized():
            address = self.address or env.ray_address()
            # A new local Ray gets each worker's CPUs (its codec threads); an existing cluster refuses resource
            # arguments.
            kw = {"num_cpus": self.workers * self.cpus_per_task} if address is None and self.workers else {}
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **kw)
            self.owned = True
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            import ray

            ray.shutdown()
            self.owned = False

    def task_cpus(self) -> int:
        """CPUs each task asks Ray for: its codec threads, so that Ray places no more tasks on a node than its
        cores can run (a task asking 1 CPU while it runs 8 threads would share a core eight ways), but never
        more than the largest live node has: Ray would hold such a task as infeasible for ever
        (https://docs.ray.io/en/latest/ray-core/scheduling/resources.html)."""
        import ray

        largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
        return max(1, min(self.cpus_per_task, int(largest)))

    def run(self, fn, calls: list[tuple], bar: Progress, on_done: Callable[[int], None]) -> list:
        """fn(*call) for every call as Ray tasks; on_done(count_done) after each. Results in call order."""
        import ray
        from ray.exceptions import RayTaskError

        self.task_nodes = []
        if not calls:
            return []
        # Named after fn, so Ray's dashboard, `ray list tasks` and the workers' process titles say
        # "map_worker" or "reduce_worker" rather than the wrapper's name. SPREAD: every task moves its rows
        # between a node and object storage, so spreading them over the nodes adds their network bandwidth;
        # Ray's default packs tasks onto the driver's node first (on a 4-node test cluster, 18 of 20 map tasks
        # ran there). Ray Data spreads its read tasks the same way (DEFAULT_SCHEDULING_STRATEGY = "SPREAD" in
        # ray/data/context.py; https://docs.ray.io/en/latest/ray-core/scheduling/index.html#spread).
        remote = ray.remote(max_retries=self.max_retries, retry_exceptions=[OSError])(on_node).options(
            name=getattr(fn, "__name__", "task"), scheduling_strategy="SPREAD", num_cpus=self.task_cpus())
        refs = [remote.remote(fn, *args) for args in calls]
        pending, done_count = list(refs), 0
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    bar.update(_rows_of(ray.get(ref)[1]), 0)  # the first error stops here and is re-raised
                    done_count += 1
                    on_done(done_count)
            placed = ray.get(refs)
            self.task_nodes = [node for node, _ in placed]
            return [result for _, result in placed]
        except RayTaskError as e:
            for ref in pending:
                ray.cancel(ref)
            cause = e.cause if isinstance(e.cause, BaseException) else e
            raise cause from None
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            raise


def make_executor(kind: str, *, workers: int, in_process: bool, ray_address: str | None = None, threads: int = 1):
    """The executor named `kind` ("local" or "ray"), as a context manager. `threads`: each task's codec threads
    (Ray asks that many CPUs per task; local workers are processes that start their own threads)."""
    if kind == "local":
        if ray_address is not None:
            raise ValueError(f"ray_address={ray_address!r} needs executor='ray', not 'local'")
        return LocalExecutor(workers, in_process)
    if kind == "ray":
        return RayExecutor(ray_address, workers=workers, cpus_per_task=threads)
    raise ValueError(f"executor={kind!r} is not one of {', '.join(EXECUTORS)}")

"""Thread pools shared by every encode pipeline of a shuffle worker process (shuffler/io/rolling.py; in other
processes each pipeline has its own, see io/pages.py: keeping).

Encoding keeps per-thread state (zstd contexts, the split scratch and row-hash work arrays: format/codec.py).
A pool created per writer or task started fresh threads each time, whose state was allocated and faulted in
afresh (one pool worker runs a dozen tasks; a program may write one dataset after another).
Pools here live as long as the process; a forked child, whose copy of a pool has no threads, gets its own.
(The chunk reader's decode threads stay per call: kept alive beside these, each would keep its own malloc
arena, and a shuffle took 12,000 more page faults.)

Sharing is safe because no task waits for another: callers wait only for their own futures, which every
pool thread can run.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()
_pools: dict[tuple[str, int], tuple[int, ThreadPoolExecutor]] = {}


def shared_threads(name: str, n: int) -> ThreadPoolExecutor:
    """This process's pool of n threads named `name` (created on first use; never shut down before exit)."""
    with _lock:
        pid, pool = _pools.get((name, n), (0, None))
        if pool is None or pid != os.getpid():
            pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix=name)
            _pools[(name, n)] = (os.getpid(), pool)
        return pool

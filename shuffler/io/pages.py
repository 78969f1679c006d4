"""Memory the kernel does not have to hand out again: the shuffle workers' allocator settings and huge-page
buffers for the large arrays a task reuses.

Why: on the project's 2-core VM, half of a shuffle's CPU was the kernel's (docs/benchmarks.md, "Where the
kernel's time went"), and a third of that was first-touch page faults: every fresh page is faulted in and
zeroed (`clear_page_erms` under `do_anonymous_page` in `perf record -g`), and on a VM whose guest memory is
backed lazily the first touch of a page that was free for a while costs more again. The faults came from
allocations made and freed per chunk (the decoded chunk, zstd's output bytes, a new thread's scratch): glibc
serves an allocation above its mmap threshold with a fresh mmap and gives freed memory back to the kernel at
once (its dynamic threshold adapts only up to 32 MiB, and trimming returns the top of each arena), so each
8 MiB chunk was 2,048 fresh pages. `keep_freed_memory` makes the allocator keep and reuse that memory.

What was left after that (about 30,000 faults per worker, docs/benchmarks.md) was each worker faulting in its
malloc memory on its first tasks, once per arena: glibc gives each thread that allocates at the same time as
another an arena of its own (up to 8 per core), and the decode, encode and write threads each kept 30-40 MiB
of chunk-sized blocks in theirs, 4 KiB pages all. A worker now uses one arena (M_ARENA_MAX 1: the blocks one
thread frees serve the next thread's allocation; threads allocate a few 8 MiB blocks per chunk, so the
arena's lock is rarely contended) whose memory glibc advises MADV_HUGEPAGE (the tunable glibc.malloc.hugetlb=1,
glibc 2.35 and later, read when a process starts: the executor starts its workers with WORKER_TUNABLES,
shuffling/executor.py). On the 1 GiB shuffle that took the whole process tree from 74,000-78,000 faults to
34,000-36,000, and the largest worker from 400-440 MiB to 350-370 MiB.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap

import numpy as np

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD = 32 << 20
"""glibc's largest allowed mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, mallopt(3)): chunk-sized
allocations (8 MiB by default) come from the arenas and are reused."""
_TRIM_THRESHOLD = 64 << 20
"""Give an arena's freed top back only past 64 MiB: freed chunk-sized blocks stay for the next chunk, while a
task's large temporary arrays (above the mmap threshold anyway) do not pile up beyond the planned peak."""
WORKER_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1"
"""GLIBC_TUNABLES the shuffle's pool workers start with (https://www.gnu.org/software/libc/manual/html_node/Memory-Allocation-Tunables.html):
one malloc arena, whose memory is advised MADV_HUGEPAGE. (arena_max is also set by keep_freed_memory, which
works only before a process's threads first allocate; hugetlb has no mallopt equivalent.)"""
HUGE_MIN = 4 << 20
"""Buffers from this size up are mapped with MADV_HUGEPAGE: a 2 MiB page is one fault instead of 512."""


_keeping = False


def keeping() -> bool:
    """True in a process that called keep_freed_memory: there, encode pipelines also share their threads and
    keep their chunk buffers for the next pipeline (io/rolling.py). Elsewhere (a user's program) they free
    what they used when they close, as memory bounds of a writer promise."""
    return _keeping


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel, and the encode pipelines
    keep theirs (process-wide: call it only in processes this project owns, such as the shuffle's pool
    workers). False where mallopt is not glibc's."""
    global _keeping
    _keeping = True
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
        ok = mallopt(_M_ARENA_MAX, 1) == 1 and ok  # one arena: freed blocks serve every thread (module docstring)
        return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    return False


def huge_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty(shape, dtype), backed by an anonymous map advised MADV_HUGEPAGE when it is large (HUGE_MIN), so
    that first touch faults 2 MiB at a time where transparent huge pages are on (mode `madvise` or `always`).
    The map is freed with the array (numpy keeps the mmap object alive through the array's base)."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if nbytes < HUGE_MIN or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype=dt)
    # Private: mmap's default for anonymous maps is MAP_SHARED, which is shmem, where MADV_HUGEPAGE does not apply.
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):
        mm.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mm, dtype=dt, count=nbytes // dt.itemsize).reshape(shape)

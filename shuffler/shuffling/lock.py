"""DST's lock: at most one shuffle writes into a DST at a time, and a dead holder's lock is taken over.

    lock = Lock(Storage(dst), break_lock=False)
    lock.acquire()          # ShuffleLockedError while another live shuffle holds DST/.shuffle/lock
    try: ...
    finally: lock.release()

The lock is an object created first-writer-wins (Storage.put_if_absent: O_EXCL on disk, If-None-Match on
object stores) naming its holder's host, pid and process start time (docs/shuffle.md, "Resume and safety").
A lock whose holder ran on this host and is gone is taken over; one from another host only with break_lock.
The one-machine run (run.py) and the array-job stages (array_job.py) take the same lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid

from shuffler.shuffling.markers import LOCK
from shuffler.storage.storage import Storage


class ShuffleLockedError(RuntimeError):
    """Another shuffle is writing into the same DST right now."""


def proc_start(pid: int) -> str | None:
    """Start time (clock ticks since boot) of a live process; None if it is gone or a zombie, or no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def holder_dead(other: dict) -> bool:
    """True only when the holder ran on this machine and that process is gone (or its pid was reused)."""
    if other.get("host") != socket.gethostname() or not isinstance(other.get("pid"), int):
        return False
    pid = other["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    if not os.path.exists("/proc/self/stat"):
        return False  # no /proc: a live pid is all we can tell
    return proc_start(pid) != other.get("pid_start")  # zombie (killed, not yet reaped) or pid reused


class Lock:
    """DST/.shuffle/lock, held between acquire() and release(); `token` tells this holder's lock from others'."""

    def __init__(self, store: Storage, break_lock: bool):
        self.store, self.break_lock, self.token = store, break_lock, uuid.uuid4().hex

    def acquire(self) -> None:
        me = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
              "pid_start": proc_start(os.getpid()), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(100):
            if self.store.put_if_absent(LOCK, json.dumps(me).encode()):
                return
            other = self._read(LOCK)
            if other is None:
                continue  # released meanwhile
            if self.break_lock or holder_dead(other):
                # The holder was killed (kill -9 leaves its lock behind). Of several runs that find it dead at
                # once, only the one that creates lock.broken-<its token> deletes it; a plain check-then-delete
                # would let a slower run delete the lock the faster one has just taken.
                mark = f"{LOCK}.broken-{str(other.get('token'))[:64]}"
                if self.store.put_if_absent(mark, json.dumps(me).encode()):
                    self.store.delete(LOCK)
                    continue
                breaker = self._read(mark)
                if breaker is not None and holder_dead(breaker):
                    self.store.delete(mark)  # the breaker died mid-break; let the next try break again
                time.sleep(0.02)
                continue
            raise ShuffleLockedError(
                f"{self.store.url}: another shuffle is writing here (lock {self.store.url_of(LOCK)}: host "
                f"{other.get('host')!r}, pid {other.get('pid')}, started {other.get('started')}); wait for it to "
                "finish. If that process is dead on another machine, re-run with --break-lock"
            )
        raise ShuffleLockedError(f"{self.store.url}: could not take {LOCK}: other shuffles keep racing for it")

    def _read(self, name: str) -> dict | None:
        """A lock-like JSON object; None if absent, {} if unreadable (a holder we know nothing about)."""
        try:
            v = json.loads(self.store.read(name))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return v if isinstance(v, dict) else {}

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(self.store.read(LOCK)).get("token") == self.token:
                self.store.delete(LOCK)

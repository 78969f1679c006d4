"""The state a shuffle run keeps beside DST, and how a run finds, resumes, refuses or clears it.

A mixin of shuffle._Run (which sets self.dst, self.cfg, self.identity, self.run_id, self.scratch,
self.plan): what is at DST decides whether a run starts, resumes, returns a finished result, or is refused.
Names of the state objects are in markers.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from shuffler.errors import FormatError, SchemaError
from shuffler.format.manifest import MANIFEST, Manifest, read_manifest
from shuffler.io.chunks import storage
from shuffler.shuffling.markers import DEFAULT_SCRATCH, LOCK, RUN, STATE


class RunState:
    """Run-state handling of one shuffle run (mixed into shuffle._Run)."""

    def _uncommit_damaged(self, e: FormatError) -> FormatError:
        """An intermediate found damaged in pass 2 loses its commit marker, so the next run redoes its map task
        (without this, every re-run would stop at the same damaged chunk)."""
        m = re.search(re.escape(self.scratch) + r"/(map-\d+)\.shard", str(e))
        if m is None:
            return e
        storage(self.scratch).delete(m.group(1) + ".idx")
        return type(e)(f"{e}; that intermediate is now uncommitted: re-run the same command to redo it and finish")

    def _check_dst(self) -> Manifest | None:
        """A finished run of this very shuffle returns its manifest; anything else at DST is refused or cleared."""
        if self.dst.exists(MANIFEST):
            try:
                old = read_manifest(self.dst)
            except (FormatError, SchemaError):
                old = None
            if old is not None and old.metadata.get("shuffle", {}).get("run_id") == self.run_id:
                return old
            if not self.cfg.overwrite:
                raise FileExistsError(
                    f"{self.dst.url} already holds a dataset ({MANIFEST}) that is not this shuffle's output; "
                    "pass --overwrite to replace it"
                )
            self.dst.delete(MANIFEST)  # first: from here on DST is no dataset, never a half-replaced one
            for s in old.shards if old is not None else ():
                self.dst.delete(s.name)
            self._clear_state()
        if self.dst.exists(RUN):
            other = self._read_state()
            if other.get("identity") != self.identity:
                if not self.cfg.overwrite:
                    raise FileExistsError(
                        f"{self.dst.url} holds the unfinished state of another shuffle "
                        f"({_difference(other.get('identity') or {}, self.identity)}); re-run that command to "
                        "finish it, or pass --overwrite to discard it"
                    )
                self._clear_state(other)
        return None

    def _read_state(self) -> dict:
        """run.json, or {} if it is damaged (then it is no run's state: refused, or cleared by --overwrite)."""
        try:
            state = json.loads(self.dst.read(RUN))
        except (ValueError, FileNotFoundError):
            return {}
        return state if isinstance(state, dict) else {}

    def _clear_state(self, other: dict | None = None) -> None:
        if other is None and self.dst.exists(RUN):
            other = self._read_state()
        scratch = other.get("scratch") if other else None
        if isinstance(scratch, str) and scratch != self.scratch and re.search(r"/run-[0-9a-f]{16}$", scratch):
            # Only objects an intermediate can be named: run.json is data at DST, and must not be able to
            # make --overwrite delete anything else wherever it points.
            store = storage(scratch)
            for name in store.list(""):
                if re.fullmatch(r"(sub-[0-9.]+/)*map-\d+\.(shard|idx)(\.tmp-[0-9a-f]+)?", name):
                    store.delete(name)
        for name in self.dst.list(""):
            if name.startswith("shard-") or (name.startswith(STATE + "/") and name != LOCK):
                self.dst.delete(name)

    def _start_or_resume(self) -> int:
        """Write run.json for a new run; for a resumed one keep its map split (it fixes the intermediates)."""
        if self.dst.exists(RUN):
            map_rows = self._read_state().get("map_rows")
            # A damaged value only changes the split, and the split never changes the output.
            return map_rows if isinstance(map_rows, int) and map_rows >= 1 else self.plan.map_rows
        state = {"identity": self.identity, "run_id": self.run_id, "map_rows": self.plan.map_rows,
                 "scratch": self.scratch}
        self.dst.write(RUN, json.dumps(state, indent=1).encode())
        return self.plan.map_rows

    def _cleanup(self) -> None:
        if not self.cfg.keep_intermediate:
            storage(self.scratch).delete_prefix("")
        for name in self.dst.list(""):
            if (name.startswith("shard-") or name.startswith(MANIFEST + ".")) and ".tmp-" in name:
                self.dst.delete(name)  # left by a task killed mid-write; we hold the lock, so none is live
            elif name.startswith(STATE + "/") and name != LOCK:
                if not (self.cfg.keep_intermediate and name.startswith(DEFAULT_SCRATCH + "/")):
                    self.dst.delete(name)
        if not self.cfg.keep_intermediate:
            self.dst.delete_prefix(DEFAULT_SCRATCH)

    def _remove_empty_dirs(self) -> None:
        """Local disk keeps empty folders where objects were; remove the state folder's, if empty."""
        if not self.dst.is_local:
            return
        base = self.dst.path(STATE)
        for dirpath, _, _ in sorted(os.walk(base), key=lambda t: -len(t[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)  # fails, harmlessly, while anything (a lock, a marker) is inside


def _difference(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    parts = [f"{k}: {json.dumps(a.get(k))[:120]} there, {json.dumps(b.get(k))[:120]} now" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(parts) or "no recorded identity"



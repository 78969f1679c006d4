"""A dependency-free progress bar for long work: rows/s, MB/s and ETA on stderr (off when not a TTY)."""

from __future__ import annotations

import sys
import time

from shuffler import env


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


class Progress:
    """Call `update(rows, nbytes)`; `close()` prints the final line. Use as a context manager."""

    def __init__(self, label: str, total_rows: int | None = None, *, enabled: bool | None = None, stream=None):
        self.label, self.total = label, total_rows
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = not env.progress_disabled() and getattr(self.stream, "isatty", lambda: False)()
        self.enabled = enabled
        self.rows = self.bytes = 0
        self.start = self._last = time.perf_counter()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, rows: int, nbytes: int = 0) -> None:
        self.rows += rows
        self.bytes += nbytes
        now = time.perf_counter()
        if self.enabled and now - self._last > 0.2:
            self._last = now
            self._draw(now, "\r")

    def _draw(self, now: float, end: str) -> None:
        dt = max(now - self.start, 1e-9)
        rate = self.rows / dt
        parts = [f"{self.label}:"]
        if self.total:
            parts.append(f"{100 * self.rows / self.total:5.1f}% {self.rows:,}/{self.total:,} rows")
        else:
            parts.append(f"{self.rows:,} rows")
        parts.append(f"{rate:,.0f} rows/s")
        if self.bytes:
            parts.append(f"{self.bytes / dt / 1e6:,.0f} MB/s")
        if self.total and rate > 0 and end == "\r":
            parts.append(f"ETA {max(self.total - self.rows, 0) / rate:,.0f} s")
        else:
            parts.append(f"{dt:,.1f} s")
        self.stream.write(" ".join(parts).ljust(100) + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter(), "\n")
            self.enabled = False

"""Who reads which rows of each epoch, and what is left of the epoch when the consumers change (elastic resume).

Every epoch has one global order of its N rows (readers/order.py: shards, chunks, and with buffer_shuffle
blocks of rows, permuted; with permute_buckets the buckets, readers/buckets.py). That order does not depend on
the world size, the worker count or the batch size. A *span* (lo, hi) is positions lo..hi-1 of that order;
a sorted tuple of disjoint spans is a set of rows read in epoch order.

A Layout says how P = world_size x num_workers consumers share each epoch: the rows still to read in the
epoch (all N, or after an elastic resume what the previous consumers left) are concatenated in epoch order and
cut into P contiguous ranges, consumer k = rank x num_workers + worker taking [floor(kM/P), floor((k+1)M/P)) of
the M rows (consumer_bounds); with drop_last each keeps only floor(floor(M/P) / batch_size) whole batches,
so every consumer takes the same number of steps. Ranges are read front to back, so each consumer's reads
stay chunk-sequential, and the only chunks decoded twice are the P - 1 that straddle two ranges.

A consumer's progress is a count of batches, its *steps*. Consumers step in lockstep (DDP; a DataLoader
serves its workers round-robin), so one rank's state tells every consumer's steps. `remainder` turns steps
into the rows still unread of each epoch; a new layout (another world size, worker count, batch size or
drop_last) cuts those among its consumers, so across any number of changes every row of an epoch is read
exactly once (with drop_last: at most once, the rows after a consumer's last whole batch being dropped).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Spans = tuple[tuple[int, int], ...]


def consumer_bounds(num_rows: int, consumers: int, k: int) -> tuple[int, int]:
    """Consumer k's contiguous range [start, stop) of `num_rows` ordered rows. Ranges tile [0, num_rows) and
    differ in size by at most one row."""
    if not 0 <= k < consumers:
        raise ValueError(f"consumer {k} is outside 0..{consumers - 1}")
    return k * num_rows // consumers, (k + 1) * num_rows // consumers


def span_rows(spans: Spans) -> int:
    return sum(hi - lo for lo, hi in spans)


def merge(spans: Iterable[tuple[int, int]]) -> Spans:
    """Sorted disjoint spans with empty ones dropped and touching ones joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        if lo >= hi:
            continue
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def take(spans: Spans, ranges: Iterable[tuple[int, int]]) -> Spans:
    """The spans holding rows [a, b) of the concatenation of `spans`, for sorted disjoint `ranges` (a, b).
    One sweep: O(len(spans) + len(ranges))."""
    out: list[tuple[int, int]] = []
    i, base = 0, 0  # spans[i] holds concatenated rows [base, base + its length)
    for a, b in ranges:
        while i < len(spans) and base + spans[i][1] - spans[i][0] <= a:
            base += spans[i][1] - spans[i][0]
            i += 1
        j, jb = i, base
        while j < len(spans) and jb < b:
            lo, hi = spans[j]
            x, y = max(a, jb), min(b, jb + hi - lo)
            if x < y:
                out.append((lo + x - jb, lo + y - jb))
            jb += hi - lo
            j += 1
    return merge(out)


def check_spans(spans: object, num_rows: int, where: str) -> Spans:
    """Spans read from a state: a list of [lo, hi] integer pairs, sorted, disjoint, inside [0, num_rows)."""
    if not isinstance(spans, list | tuple):
        raise ValueError(f"{where} must be a list of [lo, hi] row spans, got {type(spans).__name__}")
    prev = 0
    out = []
    for p in spans:
        if not (isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                    for x in p)):
            raise ValueError(f"{where}: span {p!r} must be [lo, hi] with integers"[:300])
        lo, hi = p
        if not prev <= lo < hi <= num_rows:
            raise ValueError(f"{where}: span [{lo}, {hi}] must be sorted, disjoint, non-empty and inside the "
                             f"dataset's {num_rows} rows")
        out.append((lo, hi))
        prev = hi
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How `consumers` consumers share epochs start.. of a dataset of `num_rows` rows."""

    num_rows: int
    consumers: int
    """world_size x num_workers."""
    batch_size: int
    drop_last: bool
    start: int = 0
    """First epoch this layout reads; earlier epochs were read under another layout."""
    pending: tuple[Spans, ...] = ()
    """The rows to read of epochs start, start + 1, ...; epochs after these are read whole."""

    def __post_init__(self) -> None:
        if self.consumers < 1 or self.batch_size < 1 or self.start < 0:
            raise ValueError(f"layout needs consumers >= 1, batch_size >= 1, start >= 0: {self}")
        # rows of each pending epoch, counted once (bounds() is called for every consumer)
        object.__setattr__(self, "_pending_rows", tuple(span_rows(p) for p in self.pending))

    def base(self) -> tuple[int, tuple[Spans, ...]]:
        """(start, pending): what another layout over the same rows needs."""
        return self.start, self.pending

    def epoch_spans(self, epoch: int) -> Spans:
        """The rows this layout reads of `epoch`, all consumers together (before drop_last)."""
        if epoch < self.start:
            return ()
        i = epoch - self.start
        if i < len(self.pending):
            return self.pending[i]
        return ((0, self.num_rows),) if self.num_rows else ()

    def bounds(self, epoch: int, k: int) -> tuple[int, int]:
        """Consumer k's rows [a, b) of the concatenated epoch_spans(epoch), drop_last applied."""
        i = epoch - self.start
        m = 0 if i < 0 else self._pending_rows[i] if i < len(self.pending) else self.num_rows
        a, b = consumer_bounds(m, self.consumers, k)
        if self.drop_last:
            b = a + (m // self.consumers) // self.batch_size * self.batch_size
        return a, b

    def spans(self, epoch: int, k: int) -> Spans:
        """Consumer k's rows of `epoch`, in order."""
        return take(self.epoch_spans(epoch), [self.bounds(epoch, k)])

    def batches(self, epoch: int, k: int) -> int:
        a, b = self.bounds(epoch, k)
        return -(-(b - a) // self.batch_size)

    def steps(self, k: int, position: tuple[int, int]) -> int:
        """Batches consumer k has read from this layout's start when it is at (epoch, batch)."""
        e, b = position
        n = sum(self.batches(x, k) for x in range(self.start, min(e, self.start + len(self.pending))))
        full = max(0, e - self.start - len(self.pending))
        return n + (full * self.batches(self.start + len(self.pending), k) if full else 0) + b

    def position(self, k: int, steps: int, epochs: int) -> tuple[int, int]:
        """(epoch, batch) of consumer k after `steps` batches from this layout's start; (epochs, 0) at the end."""
        e = self.start
        while e < epochs and e < self.start + len(self.pending):
            n = self.batches(e, k)
            if steps < n:
                return e, steps
            steps -= n
            e += 1
        if e >= epochs:
            return epochs, 0
        n = self.batches(e, k)
        if n == 0 or e + steps // n >= epochs:
            return epochs, 0
        return e + steps // n, steps % n

    def remainder(self, steps: Sequence[int], epochs: int) -> tuple[int, tuple[Spans, ...]]:
        """(start, pending) of the rows no consumer has read when consumer k has read steps[k] batches.

        In an epoch some consumer has begun, a consumer's rows after its last whole batch are dropped under
        drop_last (they would never have been read); an epoch no consumer has begun is left as it was.
        """
        if len(steps) != self.consumers:
            raise ValueError(f"need the steps of all {self.consumers} consumers, got {len(steps)}")
        pos = [self.position(k, s, epochs) for k, s in enumerate(steps)]
        last = min(epochs - 1, max(max(e for e, _ in pos), self.start + len(self.pending) - 1))
        out: list[Spans] = []
        for e in range(self.start, last + 1):
            if not any(pe > e or (pe == e and pb > 0) for pe, pb in pos):
                out.append(self.epoch_spans(e))
                continue
            left = []
            for k, (pe, pb) in enumerate(pos):
                a, b = self.bounds(e, k)
                done = b - a if pe > e else (min(b - a, pb * self.batch_size) if pe == e else 0)
                left.append((a + done, b))
            out.append(take(self.epoch_spans(e), left))
        start = self.start
        while out and not out[0]:
            out.pop(0)
            start += 1
        whole = ((0, self.num_rows),)
        while out and out[-1] == whole:
            out.pop()
        return start, tuple(out)


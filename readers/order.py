"""The order of one epoch, and the units a consumer reads of it.

An epoch's global order is: shards in a permuted order, and inside each shard its chunks in a permuted order
(rows inside a chunk keep their stored order; the data is already globally shuffled by `shuffler shuffle`).
Both permutations come from a counter-based RNG keyed by (seed, epoch[, shard]), so every process computes
the same order with no communication and no state beyond those integers. With buffer_shuffle=N the order is
further permuted within consecutive blocks of N positions of it (readers/stream.py), keyed by (seed, epoch,
block): the order never depends on the world size, the worker count or the batch size.

Which positions of that order a consumer reads is its *spans* (readers/layout.py: contiguous ranges, exact by
construction, re-cut on an elastic resume). A range may start or end inside a chunk; each consumer then reads
that chunk and keeps only its rows (two consumers decode one boundary chunk).

A consumer only needs the manifest's per-shard row counts to find its shards, and reads the footers of just
those shards, so planning costs one small ranged read per shard touched, whatever the dataset's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from readers.layout import Spans, span_rows
from shuffler.io.dataset import Dataset
from shuffler.keys import mix_key, permutation

TAG_SHARDS, TAG_CHUNKS, TAG_BLOCK = 0x5A, 0xC4, 0xB1


class Unit(NamedTuple):
    """Rows [lo, hi) of chunk `chunk` of shard `shard`; they land at position `pos` of the consumer's range."""

    shard: int
    chunk: int
    lo: int
    hi: int
    pos: int


@dataclass(frozen=True, kw_only=True)
class EpochPlan:
    """What one consumer reads in one epoch, in order."""

    dataset: Dataset
    """The opened dataset (its manifest and cached footers)."""
    seed: int
    """Keys the epoch's permutations together with `epoch`."""
    epoch: int
    """Epoch number, from 0."""
    spans: Spans
    """This consumer's positions of the epoch's order (readers/layout.py), sorted; read in this order."""
    batch_size: int
    """Rows per batch."""
    shuffle: bool = True
    """Permute shards and chunks; False reads in stored order."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")

    @property
    def rows(self) -> int:
        return span_rows(self.spans)

    @property
    def n_batches(self) -> int:
        return -(-self.rows // self.batch_size)

    def shard_order(self) -> np.ndarray:
        n = len(self.dataset.shards)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return permutation(n, mix_key(self.seed, self.epoch, TAG_SHARDS))

    def chunk_order(self, shard: int, n_chunks: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n_chunks, dtype=np.int64)
        return permutation(n_chunks, mix_key(self.seed, self.epoch, TAG_CHUNKS, shard))

    def sequence(self, first: int = 0) -> Iterator[tuple[int, int, int]]:
        """(g0, g1, pos): positions [g0, g1) of the epoch's order land at this consumer's rows pos.., for its
        rows [first, rows), in order."""
        if not 0 <= first <= self.rows:
            raise ValueError(f"first row {first} is outside this consumer's 0..{self.rows}")
        pos = 0
        for lo, hi in self.spans:
            if pos + hi - lo > first:
                skip = max(0, first - pos)
                yield lo + skip, hi, pos + skip
            pos += hi - lo

    def units(self, first: int = 0) -> Iterator[Unit]:
        """The units covering this consumer's rows [first, rows), in order. Reads footers lazily."""
        for g0, g1, pos in self.sequence(first):
            yield from self.range_units(g0, g1, pos)

    def range_units(self, g0: int, g1: int, pos: int) -> Iterator[Unit]:
        """The units covering positions [g0, g1) of the epoch's shard and chunk order, landing at pos.."""
        if g0 >= g1:
            return
        order = self.shard_order()
        shard_rows = np.array([self.dataset.shards[i].rows for i in order], dtype=np.int64)
        ends = np.cumsum(shard_rows)  # [n_shards] global end row of each shard in epoch order
        k = int(np.searchsorted(ends, g0, side="right"))
        while k < len(order) and ends[k] - shard_rows[k] < g1:
            s = int(order[k])
            s_start = int(ends[k] - shard_rows[k])
            a, b = max(g0, s_start) - s_start, min(g1, int(ends[k])) - s_start  # rows of this shard to read
            if a < b:
                idx = self.dataset.index(s)
                corder = self.chunk_order(s, idx.n_chunks)
                crows = idx.entries["rows"].astype(np.int64)[corder]
                cends = np.cumsum(crows)  # shard-relative end row of each chunk in epoch order
                c = int(np.searchsorted(cends, a, side="right"))
                while c < len(corder) and cends[c] - crows[c] < b:
                    c_start = int(cends[c] - crows[c])
                    lo, hi = max(a, c_start) - c_start, min(b, int(cends[c])) - c_start
                    if lo < hi:
                        yield Unit(s, int(corder[c]), lo, hi, s_start + c_start + lo - g0 + pos)
                    c += 1
            k += 1

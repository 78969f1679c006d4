"""The order of one epoch, and who reads which part of it.

An epoch's global order is: shards in a permuted order, and inside each shard its chunks in a permuted order
(rows inside a chunk keep their stored order; the data is already globally shuffled by `shuffler shuffle`).
Both permutations come from a counter-based RNG keyed by (seed, epoch[, shard]), so every process computes
the same order with no communication and no state beyond those integers.

The split is exact by construction. The epoch's ordered rows 0..N-1 are cut into P = world_size x num_workers
contiguous ranges, consumer k = rank * num_workers + worker getting rows [floor(kN/P), floor((k+1)N/P)):
the ranges tile 0..N-1, so every row is read once, and sizes differ by at most one row. A range may start or
end inside a chunk; each consumer then reads that chunk and keeps only its rows (two consumers decode one
boundary chunk, at most P-1 extra chunk decodes per epoch). With drop_last, every consumer keeps the same
number of full batches, floor(floor(N/P) / batch_size), so every rank takes the same number of steps (DDP
hangs when ranks disagree) and at most batch_size rows per consumer are left out.

A consumer only needs the manifest's per-shard row counts to find its shards, and reads the footers of just
those shards, so planning costs one small ranged read per shard touched, whatever the dataset's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from shuffler.io.dataset import Dataset
from shuffler.keys import mix_key, permutation

TAG_SHARDS, TAG_CHUNKS, TAG_BLOCK = 0x5A, 0xC4, 0xB1


def consumer_bounds(num_rows: int, consumers: int, k: int) -> tuple[int, int]:
    """Consumer k's contiguous range [start, stop) of the epoch's ordered rows. Ranges tile [0, num_rows)."""
    if not 0 <= k < consumers:
        raise ValueError(f"consumer {k} is outside 0..{consumers - 1}")
    return k * num_rows // consumers, (k + 1) * num_rows // consumers


def consumer_rows(num_rows: int, consumers: int, k: int, batch_size: int, drop_last: bool) -> int:
    """Rows consumer k reads in one epoch: its whole range, or with drop_last the same whole batches for all."""
    start, stop = consumer_bounds(num_rows, consumers, k)
    if drop_last:
        return (num_rows // consumers) // batch_size * batch_size
    return stop - start


def batches_per_epoch(num_rows: int, consumers: int, k: int, batch_size: int, drop_last: bool) -> int:
    rows = consumer_rows(num_rows, consumers, k, batch_size, drop_last)
    return -(-rows // batch_size)


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
    consumer: int
    """This consumer's index, rank * num_workers + worker."""
    consumers: int
    """world_size x num_workers."""
    batch_size: int
    """Rows per batch."""
    drop_last: bool
    """Keep only whole batches, the same number for every consumer."""
    shuffle: bool = True
    """Permute shards and chunks; False reads in stored order."""

    def __post_init__(self) -> None:
        if self.consumers < 1 or not 0 <= self.consumer < self.consumers:
            raise ValueError(f"consumer {self.consumer} of {self.consumers}: need 0 <= consumer < consumers")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")

    @property
    def start(self) -> int:
        """First row of this consumer's range in the epoch's global order."""
        return consumer_bounds(self.dataset.num_rows, self.consumers, self.consumer)[0]

    @property
    def rows(self) -> int:
        return consumer_rows(self.dataset.num_rows, self.consumers, self.consumer, self.batch_size, self.drop_last)

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

    def units(self, first: int = 0) -> Iterator[Unit]:
        """The units covering this consumer's rows [first, rows), in order. Reads footers lazily."""
        if not 0 <= first <= self.rows:
            raise ValueError(f"first row {first} is outside this consumer's 0..{self.rows}")
        g0, g1 = self.start + first, self.start + self.rows
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
                        yield Unit(s, int(corder[c]), lo, hi, s_start + c_start + lo - self.start)
                    c += 1
            k += 1

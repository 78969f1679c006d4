"""The shuffle's output is a uniformly random permutation: chi-square tests over many seeds on tiny datasets.

Every test runs the real `shuffle` (both passes, intermediates, output shards) on memory:// datasets. The
seeds are fixed, so each test's outcome is fixed too: no flakiness, yet each would fail for a biased shuffle
(a windowed buffer, a non-uniform in-bucket permutation, bucket draws that follow row position).
Critical values are scipy.stats.chi2.ppf(0.999, df).
"""

from __future__ import annotations

import itertools
import uuid

import numpy as np
import pytest

from shuffler import Dataset
from shuffler.shuffling.run import shuffle
from writers.shard_writer import ShardWriter

CHI2_999 = {6: 22.458, 23: 49.728, 49: 85.351}


def _source(rows: int) -> str:
    url = f"memory://stats-{uuid.uuid4().hex[:10]}"
    with ShardWriter(url, d_model=1, dtype="float32", columns=(("row_id", "int64"),), chunk_bytes=24 * 3,
                     shard_bytes=24 * 9) as w:  # 3 rows a chunk, 9 a shard: many chunks and shards even here
        w.write(np.arange(rows, dtype=np.float32)[:, None], row_id=np.arange(rows))
    return url


def _orders(rows: int, seeds: range, buckets: int) -> np.ndarray:
    """Output row_id order of each seed. [len(seeds), rows]"""
    src = _source(rows)
    out = []
    for s in seeds:
        dst = f"memory://stats-out-{uuid.uuid4().hex[:10]}"
        shuffle(src, dst, seed=s, buckets=buckets, workers=1, chunk_bytes=24 * 2, shard_bytes=24 * 4)
        ds = Dataset.open(dst)
        out.append(np.concatenate([ds.read_shard(i).columns["row_id"] for i in range(len(ds.shards))]))
    return np.stack(out)


def chi2(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def assert_positions_uniform(orders: np.ndarray, note=None) -> None:
    """Every row lands in every output position equally often: chi-square over [row, position] counts.

    orders: [seeds, n] input row index of each output position.
    """
    seeds, n = orders.shape
    counts = np.zeros((n, n))
    for o in orders:
        counts[o, np.arange(n)] += 1  # counts[row, position]
    assert chi2(counts, np.full((n, n), seeds / n)) < CHI2_999[49], (note, counts)


def assert_adjacent_distances_uniform(orders: np.ndarray) -> np.ndarray:
    """Adjacent output rows are as far apart in the input as under a uniform permutation; returns the distances.

    Under a uniform permutation of n rows, two adjacent output rows are d apart in the input with
    probability 2 (n - d) / (n (n - 1)). A local or windowed shuffle piles up mass at small d.
    """
    n = orders.shape[1]
    d = np.abs(np.diff(orders, axis=1)).ravel()
    edges = [1, 3, 6, 10, 16, 24, 36, 64]
    observed = np.histogram(d, bins=edges)[0]
    p = np.array([sum(2 * (n - k) / (n * (n - 1)) for k in range(lo, hi)) for lo, hi in itertools.pairwise(edges)])
    assert abs(p.sum() - 1) < 1e-12
    assert chi2(observed, p * len(d)) < CHI2_999[6], observed
    return d


def _all_permutations_equally_likely(n_seeds: int) -> None:
    orders = _orders(4, range(n_seeds), buckets=2)
    index = {p: k for k, p in enumerate(itertools.permutations(range(4)))}
    counts = np.bincount([index[tuple(o)] for o in orders.tolist()], minlength=24)
    assert (counts > 0).all(), "some permutation of 4 rows never appears"
    assert chi2(counts, np.full(24, n_seeds / 24)) < CHI2_999[23], counts


def test_all_permutations_equally_likely():
    _all_permutations_equally_likely(480)  # 20 expected per permutation


@pytest.mark.slow
def test_all_permutations_equally_likely_long():
    _all_permutations_equally_likely(4800)


def test_each_rows_position_is_uniform():
    n, seeds = 8, 320
    assert_positions_uniform(_orders(n, range(1000, 1000 + seeds), buckets=3))


def test_adjacent_output_rows_independent_of_input_neighbours():
    n, seeds = 64, 100
    d = assert_adjacent_distances_uniform(_orders(n, range(2000, 2000 + seeds), buckets=4))
    # and the input neighbours specifically: 2/n of adjacent pairs, about 197 of 6,300 here
    assert 140 < int(np.sum(d == 1)) < 260

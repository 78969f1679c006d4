"""The shuffle's output is a uniformly random permutation: chi-square tests over many seeds on tiny datasets.

Every test runs the real `shuffle` (both passes, intermediates, output shards) on memory:// datasets. The
seeds are fixed, so each test's outcome is fixed too: no flakiness, yet each would fail for a biased shuffle
(a windowed buffer, a non-uniform in-bucket permutation, bucket draws that follow row position).
Each test rejects at the 0.001 level, with chi-square tail probabilities computed exactly (`chi2_sf`).
"""

from __future__ import annotations

import itertools
import math
import uuid

import numpy as np
import pytest

from shuffler import Dataset
from shuffler.shuffling.plan import ROW_EXTRA_PASS1, fixed_overhead
from shuffler.shuffling.run import shuffle
from writers.shard_writer import ShardWriter

LEVEL = 0.001
"""Each check fails with this probability for a truly uniform shuffle (it is fixed per seed range, so a test's
outcome never changes between runs)."""


def _source(rows: int) -> str:
    url = f"memory://stats-{uuid.uuid4().hex[:10]}"
    with ShardWriter(url, d_model=1, dtype="float32", columns=(("row_id", "int64"),), chunk_bytes=24 * 3,
                     shard_bytes=24 * 9) as w:  # 3 rows a chunk, 9 a shard: many chunks and shards even here
        w.write(np.arange(rows, dtype=np.float32)[:, None], row_id=np.arange(rows))
    return url


def _orders(rows: int, seeds: range, buckets: int, **options) -> np.ndarray:
    """Output row_id order of each seed. [len(seeds), rows]"""
    src = _source(rows)
    out = []
    for s in seeds:
        dst = f"memory://stats-out-{uuid.uuid4().hex[:10]}"
        shuffle(src, dst, seed=s, buckets=buckets, workers=1, chunk_bytes=24 * 2, shard_bytes=24 * 4, **options)
        ds = Dataset.open(dst)
        out.append(np.concatenate([ds.read_shard(i).columns["row_id"] for i in range(len(ds.shards))]))
    return np.stack(out)


def chi2(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square with integer `df` degrees of freedom, exactly (no scipy needed).

    Even df = 2k: exp(-x/2) sum_{i<k} (x/2)^i / i!. Odd df = 2k+1: erfc(sqrt(x/2)) + exp(-x/2) sum_{i<k}
    (x/2)^(i+1/2) / Gamma(i+3/2) (Abramowitz and Stegun 26.4.4 and 26.4.5).
    """
    if x <= 0:
        return 1.0
    h = x / 2
    if df % 2 == 0:
        return math.exp(-h) * sum(math.exp(i * math.log(h) - math.lgamma(i + 1)) for i in range(df // 2))
    return math.erfc(math.sqrt(h)) + math.exp(-h) * sum(
        math.exp((i + 0.5) * math.log(h) - math.lgamma(i + 1.5)) for i in range(df // 2))


def assert_positions_uniform(orders: np.ndarray, note=None) -> None:
    """Every row lands in every output position equally often: chi-square over [row, position] counts.

    orders: [seeds, n] input row index of each output position.

    Each seed adds a permutation matrix, so every row and every column of the counts sums to `seeds` exactly.
    Pearson's statistic then has mean n (n - 1), not (n - 1)^2: each cell's variance is seeds (1/n)(1 - 1/n)
    and there are n^2 cells. (n - 1)/n times the statistic follows chi-square((n - 1)^2) closely (its mean
    and variance match); without the factor a 0.001 test fails about 1% of the time at n = 8.
    """
    seeds, n = orders.shape
    counts = np.zeros((n, n))
    for o in orders:
        counts[o, np.arange(n)] += 1  # counts[row, position]
    stat = chi2(counts, np.full((n, n), seeds / n)) * (n - 1) / n
    assert chi2_sf(stat, (n - 1) ** 2) > LEVEL, (note, stat, counts)


def assert_adjacent_distances_uniform(orders: np.ndarray) -> np.ndarray:
    """Adjacent output rows are as far apart in the input as under a uniform permutation; returns the distances.

    Under a uniform permutation of n rows, two adjacent output rows are d apart in the input with
    probability 2 (n - d) / (n (n - 1)). A local or windowed shuffle piles up mass at small d.
    """
    n = orders.shape[1]
    d = np.abs(np.diff(orders, axis=1)).ravel()
    edges = [1, 3, 6, 10, 16, 24, 36, 64] + ([n] if n > 64 else [])  # every distance 1..n-1 in some bin
    observed = np.histogram(d, bins=edges)[0]
    p = np.array([sum(2 * (n - k) / (n * (n - 1)) for k in range(lo, hi)) for lo, hi in itertools.pairwise(edges)])
    assert abs(p.sum() - 1) < 1e-12
    assert chi2_sf(chi2(observed, p * len(d)), len(p) - 1) > LEVEL, observed
    return d


def _all_permutations_equally_likely(n_seeds: int) -> None:
    orders = _orders(4, range(n_seeds), buckets=2)
    index = {p: k for k, p in enumerate(itertools.permutations(range(4)))}
    counts = np.bincount([index[tuple(o)] for o in orders.tolist()], minlength=24)
    assert (counts > 0).all(), "some permutation of 4 rows never appears"
    assert chi2_sf(chi2(counts, np.full(24, n_seeds / 24)), 23) > LEVEL, counts


def test_all_permutations_equally_likely():
    _all_permutations_equally_likely(480)  # 20 expected per permutation


@pytest.mark.slow
def test_all_permutations_equally_likely_long():
    _all_permutations_equally_likely(4800)


def test_chi2_sf_matches_published_critical_values():
    # scipy.stats.chi2.ppf(0.999, df) for df 1, 6, 23, 49, and ppf(0.5, 2) = 2 ln 2.
    for df, crit in ((1, 10.828), (6, 22.458), (23, 49.728), (49, 85.351)):
        assert abs(chi2_sf(crit, df) - 0.001) < 2e-6, df
    assert abs(chi2_sf(2 * math.log(2), 2) - 0.5) < 1e-12


def test_position_check_is_calibrated():
    """Under truly uniform permutations (numpy's, 320 of 8 rows as the shuffle test uses) the corrected
    position check fails about 0.1% of the time, and a shuffle that never moves row 0 fails it at once."""
    rng = np.random.default_rng(0)
    fails = 0
    for _ in range(2000):
        try:
            assert_positions_uniform(np.stack([rng.permutation(8) for _ in range(320)]))
        except AssertionError:
            fails += 1
    assert fails <= 10  # Binomial(2000, 0.001): mean 2; 10 or more has probability below 1e-4
    biased = np.stack([np.concatenate([[0], 1 + rng.permutation(7)]) for _ in range(320)])
    with pytest.raises(AssertionError):
        assert_positions_uniform(biased)


def test_each_rows_position_is_uniform():
    n, seeds = 8, 320
    assert_positions_uniform(_orders(n, range(1000, 1000 + seeds), buckets=3))


def test_adjacent_output_rows_independent_of_input_neighbours():
    n, seeds = 64, 100
    d = assert_adjacent_distances_uniform(_orders(n, range(2000, 2000 + seeds), buckets=4))
    # and the input neighbours specifically: 2/n of adjacent pairs, about 197 of 6,300 here
    assert 140 < int(np.sum(d == 1)) < 260


# -- two scatter levels (shuffler/shuffling/second_level.py) with the tiniest memory a task may have ----------------
TINY = fixed_overhead(24 * 2) + 64 * (12 + ROW_EXTRA_PASS1)
"""The least --memory plan.py accepts for these 12-byte rows: a task holds 54 of them, so 120 rows in 2
super-buckets are scattered again into sub-buckets by several level-2 map tasks."""


def assert_binned_positions_uniform(orders: np.ndarray, bins: int) -> None:
    """Every row lands in each of `bins` equal ranges of output positions equally often: chi-square over [row, bin]
    counts. As in assert_positions_uniform, each row's counts sum to `seeds` and each bin's to seeds x n / bins, so
    (n - 1)/n times Pearson's statistic follows chi-square((n - 1)(bins - 1))."""
    seeds, n = orders.shape
    assert n % bins == 0
    counts = np.zeros((n, bins))
    for o in orders:
        counts[o, np.arange(n) // (n // bins)] += 1
    stat = chi2(counts, np.full((n, bins), seeds / bins)) * (n - 1) / n
    assert chi2_sf(stat, (n - 1) * (bins - 1)) > LEVEL, (stat, counts)


def test_two_levels_run_with_tiny_memory():
    stats: dict = {}
    src = _source(120)
    shuffle(src, f"memory://stats-out-{uuid.uuid4().hex[:10]}", seed=0, buckets=2, levels=2, memory=TINY, workers=1,
            chunk_bytes=48, shard_bytes=96, stats=stats)
    plan = stats["plan"]
    assert (plan["levels"], plan["capacity_rows"], plan["buckets"]) == (2, 54, 2) and plan["sub_buckets"] >= 2


def test_two_levels_each_rows_position_is_uniform():
    assert_binned_positions_uniform(_orders(120, range(3000, 3200), buckets=2, levels=2, memory=TINY), bins=4)


def test_two_levels_adjacent_output_rows_independent_of_input_neighbours():
    d = assert_adjacent_distances_uniform(_orders(120, range(4000, 4060), buckets=2, levels=2, memory=TINY))
    assert 70 < int(np.sum(d == 1)) < 170  # 2/n of the 7,140 adjacent pairs: about 119

"""The shuffle-quality metrics and buffer shuffles of benchmarks/common.py: a uniform permutation scores at the
expectation, an identity or buffer shuffle far from it, and the buffer shuffles emit what they were given."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.common import (
    adjacency,
    chi2_sf,
    chunk_shuffle,
    displacement,
    expected_adjacent,
    mixing_buffer,
    order_of,
    position_chi2,
    quality,
    run_measured,
    webdataset_buffer,
)

N = 200_000
DOC = np.arange(N, dtype=np.int64) // 256  # documents of 256 consecutive rows, as in the benchmarks


def batches(n, rows=5000):
    ids = np.arange(n, dtype=np.int64)
    for s in range(0, n, rows):
        yield (ids[s : s + rows] * 10, ids[s : s + rows])  # (a payload column, row ids)


@given(st.lists(st.integers(0, 3), min_size=2, max_size=6))
@settings(max_examples=40, deadline=None)
def test_expected_adjacent_matches_enumeration(doc):
    doc = np.array(doc)
    n = len(doc)
    hits = total = 0
    for p in itertools.permutations(range(n)):
        d = doc[list(p)]
        hits += int(np.count_nonzero(d[1:] == d[:-1]))
        total += n - 1
    assert math.isclose(expected_adjacent(doc), hits / total, rel_tol=1e-12, abs_tol=1e-12)


def test_uniform_permutation_scores_near_expectation():
    order = np.random.default_rng(5).permutation(N)
    q = quality(order, DOC)
    assert q["is_permutation"]
    a = q["adjacency"]
    assert abs(a["z"]) < 4 and 0.7 < a["ratio"] < 1.3
    assert q["chi2"]["p"] > 1e-4 and q["chi2"]["tagged"] == 2000
    assert abs(q["displacement"]["ratio"] - 1) < 0.02


def test_identity_scores_far_from_expectation():
    q = quality(np.arange(N), DOC)
    assert q["adjacency"]["ratio"] > 100
    assert q["chi2"]["p"] < 1e-12 and q["chi2"]["max_bin_share"] >= 0.5  # 1% of rows in 1-2 bins of 100
    assert q["displacement"]["observed"] == 0.0


def test_buffer_shuffles_are_local():
    web = order_of(webdataset_buffer(batches(N), bufsize=1000))
    assert np.array_equal(np.sort(web), np.arange(N))
    qw = quality(web, DOC)
    assert qw["adjacency"]["ratio"] > 50 and qw["chi2"]["p"] < 1e-12 and qw["displacement"]["ratio"] < 0.05

    mix = order_of(mixing_buffer(batches(N), buffer_rows=40960, batch_rows=4096))
    assert len(mix) == N // 4096 * 4096  # the tail under one batch is dropped, as in SAELens
    assert len(np.unique(mix)) == len(mix)
    qm = quality(mix, DOC)
    assert qm["adjacency"]["ratio"] > 3 and qm["chi2"]["p"] < 1e-12

    chunks = list(range(0, N, 20000))
    ids = np.arange(N)
    ch = order_of(chunk_shuffle(chunks, lambda s: (ids[s : s + 20000],), seed=1), column=0)
    qc = quality(ch, DOC)
    assert qc["is_permutation"]
    # chunks travel far, so displacement looks uniform; adjacency and the tagged block expose it
    assert qc["displacement"]["ratio"] > 0.7
    assert qc["adjacency"]["ratio"] > 5 and qc["chi2"]["p"] < 1e-12


def test_payload_follows_row_ids():
    out = list(webdataset_buffer(batches(3000), bufsize=100, initial=10, out_rows=512))
    for payload, ids in out:
        assert np.array_equal(payload, ids * 10)
    assert sum(len(b[1]) for b in out) == 3000


def test_adjacency_counts_pairs():
    a = adjacency(np.array([0, 1, 2, 3]), np.array([7, 7, 8, 7]))
    assert a["pairs"] == 1 and a["observed"] == pytest.approx(1 / 3)


def test_position_chi2_detects_clumping():
    n = 100_000
    order = np.random.default_rng(1).permutation(n)
    lo, hi = 49_500, 50_500
    tagged = np.flatnonzero((order >= lo) & (order < hi))
    clumped = order.copy()
    # move every tagged row into the first half of the output: a uniform test must reject that
    first_half_untagged = np.flatnonzero((order[: n // 2] < lo) | (order[: n // 2] >= hi))
    late = tagged[tagged >= n // 2]
    swap = first_half_untagged[: len(late)]
    clumped[late], clumped[swap] = order[swap], order[late]
    assert position_chi2(order, n)["p"] > 1e-4
    assert position_chi2(clumped, n)["p"] < 1e-12


@pytest.mark.parametrize("df", [20, 99])
def test_chi2_sf_approximation(df):
    # the median of chi2(df) is ~ df (1 - 2/(9 df))^3; the mean df has tail just under one half
    assert abs(chi2_sf(df * (1 - 2 / (9 * df)) ** 3, df) - 0.5) < 1e-9
    assert 0.40 < chi2_sf(df, df) < 0.5
    assert chi2_sf(10 * df, df) < 1e-10 and chi2_sf(0.0, df) == 1.0


def test_displacement_reverse():
    n = 1000
    d = displacement(np.arange(n)[::-1])
    # |n-1-2i| averaged over i is n/2 exactly for even n
    assert d["observed"] == pytest.approx(0.5)


def test_run_measured_reports_child_json_and_memory():
    code = "import numpy as np, json; a = np.ones(50 * 2**20, np.uint8); import time; time.sleep(0.5); print(json.dumps({'ok': int(a.sum())}))"
    m = run_measured([sys.executable, "-c", code], interval=0.02)
    assert m.result == {"ok": 50 * 2**20}
    assert m.max_rss >= 50 * 2**20 and m.wall > 0 and not m.leftover
    with pytest.raises(RuntimeError, match="status 3"):
        run_measured([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_run_measured_counts_the_trees_disk_bytes_and_returns_failures_when_asked():
    # A grandchild writes 8 MiB past the page cache and reads it back: wait4's block counts include it (the
    # child reaped it), as benchmarks/scaling.py's "read" and "written" columns rely on. In the checkout, not
    # in /tmp, which may be a tmpfs (no block device to count).
    import os
    import tempfile

    folder = tempfile.mkdtemp(prefix=".test-io-", dir=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(folder, "blob")
    grandchild = (f"import os, mmap; b = mmap.mmap(-1, 8 << 20); b.write(b'x' * (8 << 20)); "
                  f"fd = os.open({path!r}, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644); os.write(fd, b); os.close(fd); "
                  f"fd = os.open({path!r}, os.O_RDONLY | os.O_DIRECT); os.readv(fd, [b]); os.close(fd)")
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}], check=True)"
    try:
        m = run_measured([sys.executable, "-c", code], interval=0.02)
    finally:
        import shutil

        shutil.rmtree(folder)
    assert m.write_bytes >= 8 << 20 and m.read_bytes >= 8 << 20
    failed = run_measured([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
                          check=False)
    assert failed.returncode == 3 and "boom" in failed.stderr

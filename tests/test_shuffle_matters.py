"""The pieces of benchmarks/shuffle_matters.py that could silently bias its comparison: the SAELens mixing-buffer
emulation, the held-out split, and the mapping of the global shuffle's output back to capture rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.common import expected_adjacent
from benchmarks.shuffle_matters import adjacent_same_doc, global_order, heldout_split, mixing_order, read_rows


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), batch=st.integers(1, 300), buffer=st.integers(1, 2000), passes=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_mixing_order_serves_every_row_exactly_passes_times(n, batch, buffer, passes, seed):
    order = mixing_order(n, buffer_rows=buffer, batch_rows=batch, seed=seed, passes=passes)
    assert order.dtype == np.int64 and len(order) == n * passes
    assert np.array_equal(np.bincount(order, minlength=n), np.full(n, passes))
    assert np.array_equal(order, mixing_order(n, buffer_rows=buffer, batch_rows=batch, seed=seed, passes=passes))


def test_mixing_order_is_local_not_global():
    n, doc_rows = 40_000, 200
    doc = np.arange(n) // doc_rows
    order = mixing_order(n, buffer_rows=4096, batch_rows=512, seed=3)
    capture, uniform = adjacent_same_doc(np.arange(n), doc), expected_adjacent(doc)
    mixed = adjacent_same_doc(order, doc)
    # Locally mixed: far fewer same-document neighbours than capture order (0.995)...
    assert mixed < capture / 5
    # ...but not globally: ~20 documents share a 4096-row buffer, so clearly more than uniform (0.005).
    assert mixed > 3 * uniform
    # Rows stay near where they were read: mean displacement / n is ~1/3 for a uniform permutation.
    out_pos = np.empty(n, dtype=np.int64)
    out_pos[order] = np.arange(n)
    # (measured 0.053 here: about half a buffer, 2,100 rows).
    assert np.abs(out_pos - np.arange(n)).mean() / n < 0.1
    # A buffer at least as large as the data is one permutation of all of it: global again.
    whole = mixing_order(n, buffer_rows=10 * n, batch_rows=512, seed=3)
    assert adjacent_same_doc(whole, doc) < 2 * uniform


def test_mixing_order_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_rows=0"):
        mixing_order(10, buffer_rows=4, batch_rows=0, seed=0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 5000), frac=st.floats(0.01, 0.99), seed=st.integers(0, 1000))
def test_heldout_split_is_disjoint_and_complete(n, frac, seed):
    h = min(max(int(n * frac), 1), n - 1)
    train, held = heldout_split(n, h, seed)
    assert len(held) == h and len(train) == n - h
    assert not np.intersect1d(train, held).size
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(n))
    assert np.all(np.diff(train) > 0)  # training rows keep stored order (the capture-order run)
    t2, h2 = heldout_split(n, h, seed)
    assert np.array_equal(train, t2) and np.array_equal(held, h2)


def test_heldout_split_is_a_random_sample():
    n = 100_000
    _, held = heldout_split(n, 10_000, 0)
    # Uniform over the data, not a contiguous block: each tenth of the rows holds about 1,000 held-out rows.
    counts = np.bincount(held * 10 // n, minlength=10)
    assert counts.min() > 850 and counts.max() < 1150
    # Served in random order (the held-out set is "shuffled"): same-document neighbours as rare as uniform (0.0026).
    assert adjacent_same_doc(held, np.arange(n) // 256) < 0.01
    with pytest.raises(ValueError, match="heldout=0"):
        heldout_split(10, 0, 0)


def test_global_order_maps_shuffled_rows_back_and_drops_heldout(tmp_path):
    from shuffler.shuffling.run import shuffle
    from writers.synth import SynthConfig, synth

    raw, shuf = str(tmp_path / "raw"), str(tmp_path / "shuf")
    synth(raw, SynthConfig(rows=3000, d_model=8, docs=30, features=32, k=2))
    shuffle(raw, shuf, seed=5, progress=False)
    x, keys, doc = read_rows(raw)
    train, held = heldout_split(len(x), 300, 1)
    order = global_order(keys, shuf, train)
    assert np.array_equal(np.sort(order), train)  # every training row once, no held-out row
    assert not np.isin(order, held).any()
    sx, skeys, _ = read_rows(shuf)
    keep = np.isin(skeys, keys[train])
    assert np.array_equal(x[order], sx[keep])  # the same rows, bit for bit, in the shuffled file's order
    assert adjacent_same_doc(order, doc) < 0.1 < adjacent_same_doc(train, doc)

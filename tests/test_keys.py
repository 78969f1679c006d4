"""shuffler/keys.py: every seeded draw of the project, pinned so that a change of stream cannot pass unseen.

The pins are the point: output bytes, resume and several ranks agreeing all rest on these streams being the
same on every machine and numpy release (keys.py's rule). If a pin fails, the stream changed: that changes
every shuffle's output for a given seed, and needs a format note in docs/shuffle.md, not a new pin.
"""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shuffler import keys
from shuffler.io.dataset import Batch
from shuffler.shuffling.run import shuffle
from tests.test_shuffle import SMALL, make_dataset, read_all


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def test_streams_are_pinned():
    assert digest(keys.splitmix64(np.arange(10, dtype=np.uint64))) == "ac5b3965de311a52"
    assert digest(keys.permutation(1000, 12345)) == "f2370808d1dcc04f"
    assert digest(keys.bucket_ids(keys.stream_key(7), 0, 1000, 7)) == "52b736d462e236be"
    assert keys.mix_key(1, 2, 3) == 16923298687364769832
    assert keys.stream_key(0, (1,)) == 7900161417351659861
    assert keys.producer_key(0, "p") == 6688313510862313414
    assert keys.bucket_permutation(3, (1, 2)) == 12312723369420642409


def test_normals_are_pinned_to_float_precision():
    # float64 math (log1p, cos) may differ in the last bits between libm builds, so compare to 1e-12.
    got = keys.normals(99, np.arange(4, dtype=np.uint64))
    want = PINNED_NORMALS
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 3000), key=st.integers(0, 2**64 - 1))
def test_permutation_is_a_permutation_and_deterministic(n, key):
    p = keys.permutation(n, key)
    assert p.dtype == np.int64 and p.shape == (n,)
    assert np.array_equal(np.sort(p), np.arange(n))
    assert np.array_equal(p, keys.permutation(n, key))


def test_permutation_keys_are_unrelated():
    a, b = keys.permutation(10_000, 1), keys.permutation(10_000, 2)
    # Two independent uniform permutations agree in about 1 place; 10 would be a 1e-7 event.
    assert int((a == b).sum()) < 10


def test_bucket_draws_do_not_depend_on_how_rows_are_split():
    k = keys.stream_key(11)
    whole = keys.bucket_ids(k, 100, 5000, 13)
    parts = np.concatenate([keys.bucket_ids(k, 100 + s, min(777, 5000 - s), 13) for s in range(0, 5000, 777)])
    assert np.array_equal(whole, parts)
    assert whole.min() >= 0 and whole.max() < 13


def test_a_small_shuffle_order_is_pinned(tmp_path):
    """The order of rows a shuffle writes depends only on the inputs and the options (the row_id sequence is
    independent of zstd's bytes, so this pins the shuffle's randomness, not the codec)."""
    make_dataset(str(tmp_path / "raw"), 1000)
    shuffle(str(tmp_path / "raw"), str(tmp_path / "out"), seed=5, buckets=3, workers=1, **SMALL)
    out: Batch = read_all(str(tmp_path / "out"))
    assert digest(out.columns["row_id"].astype("<i8")) == PINNED_SHUFFLE


PINNED_NORMALS = np.array([1.0789600813686369, -0.4930912928159837, -0.7380785221629855, 0.835009362428029])
PINNED_SHUFFLE = "79d26d01760e5ace"

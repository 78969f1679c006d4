"""Permute on read: ActivationStream(scattered, permute_buckets=True) serves a uniform permutation per epoch.

Every row exactly once per epoch across ranks x workers, exact resume, a new order every epoch with the
bucket membership fixed, the same order under any memory budget (an oversize bucket is served in several
pieces), and the chi-square tests of the shuffle issue over many seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from readers import ActivationStream
from readers.buckets import piece_capacity
from shuffler.io.rolling import DEFAULT_CHUNK_BYTES
from shuffler.keys import bucket_ids, producer_key
from shuffler.shuffling.on_write import NotScatteredError
from shuffler.shuffling.plan import read_batch_bytes
from tests.test_fused import COLS, ROW, scattered_source
from tests.test_shuffle_stats import assert_adjacent_distances_uniform, assert_positions_uniform
from writers import ShardWriter

# memory that leaves room for `rows` rows per piece (two pieces, 32 B of index per row: readers/buckets.py)
SMALL = lambda rows: 3 * read_batch_bytes(DEFAULT_CHUNK_BYTES) + 2 * (ROW + 32) * rows  # noqa: E731


def ids_of(stream) -> list[np.ndarray]:
    return [b.columns["row_id"] for b in stream]


@pytest.fixture(scope="module")
def data() -> str:
    return scattered_source(1000, seed=11, buckets=5, producers=2, run_rows=150, chunk_rows=7)


def stream(url: str, **kw) -> ActivationStream:
    kw.setdefault("batch_size", 64)
    return ActivationStream(url, columns=("row_id",), permute_buckets=True, **kw)


def test_rows_match_their_activations_and_every_epoch_is_a_permutation(data):
    s = stream(data, epochs=3, seed=2)
    by_epoch: dict[int, list] = {}
    for b in s:
        assert np.array_equal(b.acts[:, 0], b.columns["row_id"].astype(np.float32))
        by_epoch.setdefault(b.epoch, []).append(b.columns["row_id"])
    orders = [np.concatenate(by_epoch[e]) for e in range(3)]
    for o in orders:
        assert np.array_equal(np.sort(o), np.arange(1000))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert len(s) == 3 * 16 and s.stats.rows == 3000


def test_every_row_once_per_epoch_across_ranks_and_workers(data):
    world, workers, epochs = 3, 2, 2
    seen = {e: [] for e in range(epochs)}
    for r in range(world):
        base = stream(data, rank=r, world_size=world, epochs=epochs, batch_size=50)
        for w in range(workers):
            for b in base.for_worker(w, workers):
                seen[b.epoch].append(b.columns["row_id"])
    for e in range(epochs):
        got = np.concatenate(seen[e])
        assert np.array_equal(np.sort(got), np.arange(1000)), f"epoch {e}"
    # and the consumers' ranges are the single-stream order cut into pieces
    one = np.concatenate(ids_of(stream(data, batch_size=50)))
    parts = [np.concatenate(ids_of(stream(data, rank=r, world_size=world, batch_size=50).for_worker(w, workers)))
             for r in range(world) for w in range(workers)]
    assert np.array_equal(np.concatenate(parts), one)


def test_drop_last_gives_every_consumer_the_same_whole_batches(data):
    counts, rows = [], []
    for r in range(4):
        s = stream(data, rank=r, world_size=4, batch_size=60, drop_last=True)
        bs = ids_of(s)
        assert all(len(b) == 60 for b in bs)
        counts.append(len(bs))
        rows.extend(bs)
    assert len(set(counts)) == 1 and counts[0] == (1000 // 4) // 60
    got = np.concatenate(rows)
    assert len(np.unique(got)) == len(got)


def test_order_does_not_depend_on_memory_oversize_buckets_are_read_in_pieces(data):
    big = stream(data, epochs=2, memory="1GiB")
    small = stream(data, epochs=2, memory=SMALL(37))  # buckets hold ~200 rows: 6 pieces each
    assert small._buckets.capacity == 37 and big._buckets.capacity > 1000
    a, b = ids_of(big), ids_of(small)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert small.stats.bytes_read > 3 * big.stats.bytes_read  # each piece re-reads its bucket's chunks
    assert small.state_dict() == big.state_dict()  # memory is not part of the order


@settings(max_examples=12, deadline=None)
@given(stop=st.integers(0, 2 * 16 - 1), world=st.sampled_from([1, 2]))
def test_resume_is_exact(data, stop, world):
    for r in range(world):
        full = ids_of(stream(data, epochs=2, seed=5, rank=r, world_size=world))
        s = stream(data, epochs=2, seed=5, rank=r, world_size=world)
        it = iter(s)
        for _ in range(min(stop, len(full))):
            next(it)
        state = s.state_dict()
        again = stream(data, epochs=2, seed=5, rank=r, world_size=world, memory=SMALL(50))  # memory may change
        again.load_state_dict(state)
        rest = ids_of(again)
        k = min(stop, len(full))
        assert len(rest) == len(full) - k
        assert all(np.array_equal(x, y) for x, y in zip(rest, full[k:], strict=True))


def test_states_of_normal_and_bucket_streams_do_not_mix(data):
    s = stream(data, epochs=2)
    it = iter(s)
    next(it)
    plain = ActivationStream(data, batch_size=64, epochs=2)
    with pytest.raises(ValueError, match="permute_buckets=True"):
        plain.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="permute_buckets=None"):
        stream(data, epochs=2).load_state_dict(plain.state_dict())


def test_bucket_membership_stays_fixed_across_epochs(data):
    """What differs across epochs: bucket order and in-bucket order. What does not: which rows share a bucket,
    so each bucket's rows are contiguous in every epoch's order."""
    cuts = np.linspace(0, 1000, 3).astype(int)
    bucket = np.empty(1000, dtype=np.int64)  # bucket of each row, from the producers' keyed draws
    for p in range(2):
        bucket[cuts[p] : cuts[p + 1]] = bucket_ids(producer_key(11, f"gpu{p}"), 0, cuts[p + 1] - cuts[p], 5)
    s = stream(data, epochs=3, batch_size=1000)
    firsts = []
    for b in s:
        pos = np.empty(1000, dtype=np.int64)
        pos[b.columns["row_id"]] = np.arange(1000)
        for j in range(5):
            p = np.sort(pos[bucket == j])
            assert p[-1] - p[0] == len(p) - 1, f"bucket {j} not contiguous in epoch {b.epoch}"
        seq = bucket[b.columns["row_id"]]
        firsts.append(tuple(seq[np.sort(np.unique(seq, return_index=True)[1])].tolist()))  # bucket order
    assert len(set(firsts)) > 1, firsts  # the bucket order is drawn per (seed, epoch)


def test_errors(tmp_path, data):
    url = str(tmp_path / "plain")
    with ShardWriter(url, d_model=1, dtype="float32", columns=COLS) as w:
        w.write(np.zeros((5, 1), np.float32), row_id=np.arange(5), pad=np.zeros(5, np.int32))
    with pytest.raises(NotScatteredError, match="not a scattered dataset"):
        stream(url)
    with pytest.raises(ValueError, match="buffer_shuffle exclude"):
        stream(data, buffer_shuffle=100)
    with pytest.raises(ValueError, match="only with permute_buckets"):
        ActivationStream(data, batch_size=4, memory="1GiB")
    with pytest.raises(ValueError, match="too small for permute_buckets"):
        stream(data, memory=1 << 20)
    with pytest.raises(ValueError, match="not a size"):
        stream(data, memory="lots")
    assert piece_capacity(ROW, SMALL(9)) == 9


# ---------------------------------------------------------------------------------------------------
# Uniformity of each epoch's order, over seeds (new scattered data per seed: membership is drawn at write)


def _read_orders(n: int, seeds, buckets: int, epochs: int) -> np.ndarray:
    """[len(seeds), epochs, n] output row order of each epoch."""
    out = []
    for s in seeds:
        url = scattered_source(n, seed=s, buckets=buckets, run_rows=n, chunk_rows=4)  # (2 producers: test_fused.py)
        bs = [b for b in ActivationStream(url, batch_size=n, columns=("row_id",), permute_buckets=True,
                                          epochs=epochs, seed=s)]
        out.append([b.columns["row_id"] for b in bs])
    return np.array(out)


def test_read_each_rows_position_is_uniform_in_every_epoch():
    n, seeds = 8, 200
    orders = _read_orders(n, range(5000, 5000 + seeds), buckets=3, epochs=2)
    for e in range(2):
        assert_positions_uniform(orders[:, e], note=f"epoch {e}")


def test_read_adjacent_rows_independent_of_input_neighbours():
    n, seeds = 64, 60
    d = assert_adjacent_distances_uniform(_read_orders(n, range(6000, 6000 + seeds), buckets=4, epochs=1)[:, 0])
    assert 70 < int(np.sum(d == 1)) < 170


def test_torch_dataset_passes_permute_buckets_through(data):
    pytest.importorskip("torch")
    from readers.torch import ActivationDataset

    ds = ActivationDataset(data, batch_size=100, columns=("row_id",), permute_buckets=True)
    got = np.concatenate([np.asarray(b.columns["row_id"]) for b in ds])
    assert np.array_equal(np.sort(got), np.arange(1000))
    assert np.array_equal(got, np.concatenate(ids_of(stream(data, batch_size=100))))


"""ActivationStream: exactly-once coverage across ranks x workers x epochs, determinism, exact resume."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from readers import ActivationStream, StreamConfig
from readers.layout import Layout, consumer_bounds
from readers.order import EpochPlan
from shuffler import Dataset
from shuffler.keys import permutation

from .readers_data import make_dataset, rids

ROWS = 3000


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("readers") / "ds")
    acts = make_dataset(url, rows=ROWS)
    return url, acts


def consumers(url, *, world_size, workers, **kw):
    """One stream per (rank, worker), in consumer order."""
    out = []
    for r in range(world_size):
        s = ActivationStream(url, rank=r, world_size=world_size, columns=("rid",), **kw)
        out.extend(s.for_worker(w, workers) for w in range(workers))
    return out


def epoch_rids(stream, epoch):
    return rids(b for b in stream if b.epoch == epoch)


# -- the split -------------------------------------------------------------------------------------------
@given(n=st.integers(0, 10_000), p=st.integers(1, 64))
def test_consumer_bounds_tile_the_rows(n, p):
    bounds = [consumer_bounds(n, p, k) for k in range(p)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_permutation_is_a_permutation_and_keyed():
    p = permutation(1000, 7)
    assert np.array_equal(np.sort(p), np.arange(1000))
    assert np.array_equal(p, permutation(1000, 7))
    assert not np.array_equal(p, permutation(1000, 8))
    assert np.array_equal(permutation(1, 3), [0]) and len(permutation(0, 3)) == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    world_size=st.integers(1, 4),
    workers=st.integers(1, 3),
    batch_size=st.integers(1, 400),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**63),
    threads=st.integers(1, 3),
    prefetch=st.integers(1, 3),
)
def test_every_row_exactly_once_per_epoch(local_ds, world_size, workers, batch_size, drop_last, seed, threads,
                                          prefetch):
    url, acts = local_ds
    streams = consumers(url, world_size=world_size, workers=workers, batch_size=batch_size, drop_last=drop_last,
                        epochs=2, seed=seed, threads=threads, prefetch=prefetch)
    per_epoch = [[], []]
    counts = []
    for s in streams:
        batches = list(s)
        counts.append(sum(1 for b in batches if b.epoch == 0))
        for b in batches:
            assert len(b) <= batch_size
            np.testing.assert_array_equal(b.acts, acts[b.columns["rid"]])  # rows arrive whole and intact
            per_epoch[b.epoch].append(b.columns["rid"])
        assert counts[-1] == s.batches_per_epoch and len(batches) == len(s)
    P = world_size * workers
    for e in range(2):
        got = np.concatenate(per_epoch[e]) if per_epoch[e] else np.zeros(0, np.int64)
        assert len(np.unique(got)) == len(got), "a row was read twice in one epoch"
        if drop_last:
            assert len(got) == P * ((ROWS // P) // batch_size * batch_size)
            assert ROWS - len(got) < P * (batch_size + 1)
            assert len(set(counts)) == 1, "drop_last must give every rank and worker the same batch count"
        else:
            assert np.array_equal(np.sort(got), np.arange(ROWS))
            assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("batch_size, prefetch", [(74, 1), (37, 1), (1, 1), (111, 2)])
def test_batches_ending_on_chunk_boundaries(local_ds, batch_size, prefetch):
    """Batches that end exactly where a chunk ends (chunks hold 37 rows), with the smallest prefetch."""
    url, acts = local_ds
    s = ActivationStream(url, batch_size=batch_size, columns=("rid",), prefetch=prefetch, threads=1,
                         shuffle_shards=False)
    got = rids(s)
    assert np.array_equal(got, np.arange(ROWS))


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(world_size=st.integers(1, 8), workers=st.integers(1, 4), batch_size=st.integers(1, 700),
       drop_last=st.booleans(), seed=st.integers(0, 2**63), buffer_shuffle=st.sampled_from([0, 0, 50, 999]))
def test_every_row_exactly_once_long(local_ds, world_size, workers, batch_size, drop_last, seed, buffer_shuffle):
    url, _ = local_ds
    streams = consumers(url, world_size=world_size, workers=workers, batch_size=batch_size, drop_last=drop_last,
                        seed=seed, buffer_shuffle=buffer_shuffle)
    got = rids(b for s in streams for b in s)
    assert len(np.unique(got)) == len(got)
    if not drop_last:
        assert len(got) == ROWS


def test_last_batch_short_unless_drop_last(local_ds):
    url, _ = local_ds
    sizes = [len(b) for b in ActivationStream(url, batch_size=128)]
    assert sizes[:-1] == [128] * (len(sizes) - 1) and sizes[-1] == ROWS % 128
    assert all(len(b) == 128 for b in ActivationStream(url, batch_size=128, drop_last=True))


# -- order -----------------------------------------------------------------------------------------------
def test_deterministic_per_seed_and_epoch_and_epochs_differ(local_ds):
    url, _ = local_ds
    a = ActivationStream(url, batch_size=100, columns=("rid",), epochs=3, seed=5)
    b = ActivationStream(url, batch_size=100, columns=("rid",), epochs=3, seed=5, threads=1, prefetch=1)
    ea = [epoch_rids(a, e) for e in range(3)]
    eb = [epoch_rids(b, e) for e in range(3)]
    for x, y in zip(ea, eb, strict=True):
        assert np.array_equal(x, y), "same (seed, epoch) must give the same order whatever threads/prefetch"
    assert not np.array_equal(ea[0], ea[1]) and not np.array_equal(ea[1], ea[2])
    other = epoch_rids(ActivationStream(url, batch_size=100, columns=("rid",), seed=6), 0)
    assert not np.array_equal(ea[0], other)
    # A stream that ran to the end starts over with the same order.
    assert np.array_equal(epoch_rids(a, 0), ea[0])


def test_order_reorders_shards_and_chunks_but_keeps_rows_inside_a_chunk(local_ds):
    url, _ = local_ds
    got = rids(ActivationStream(url, batch_size=1000, columns=("rid",), seed=1))
    runs = np.split(got, np.nonzero(np.diff(got) != 1)[0] + 1)
    assert len(runs) > 20, "chunks should be reordered"
    assert all(len(r) % 37 == 0 or r[-1] == ROWS - 1 for r in runs), "a chunk's rows stay together and in order"
    stored = rids(ActivationStream(url, batch_size=1000, columns=("rid",), shuffle_shards=False))
    assert np.array_equal(stored, np.arange(ROWS))


def test_buffer_shuffle_mixes_across_chunks_and_stays_exact(local_ds):
    url, _ = local_ds
    s = ActivationStream(url, batch_size=64, columns=("rid",), buffer_shuffle=500, shuffle_shards=False, epochs=2)
    e0, e1 = epoch_rids(s, 0), epoch_rids(s, 1)
    assert np.array_equal(np.sort(e0), np.arange(ROWS)) and np.array_equal(np.sort(e1), np.arange(ROWS))
    assert not np.array_equal(e0, e1)
    # Blocks of 500 input rows are permuted among themselves: output block k holds input rows of block k.
    for k in range(0, ROWS, 500):
        assert np.array_equal(np.sort(e0[k : k + 500]), np.arange(k, min(k + 500, ROWS)))
    adjacent = np.mean(np.abs(np.diff(e0)) == 1)
    assert adjacent < 0.05, f"{adjacent:.0%} of neighbours are stored neighbours; rows were not mixed"


def test_plan_units_cover_range_in_order(local_ds):
    url, _ = local_ds
    ds = Dataset.open(url)
    spans = Layout(num_rows=ROWS, consumers=5, batch_size=10, drop_last=False).spans(1, 2)
    plan = EpochPlan(dataset=ds, seed=3, epoch=1, spans=spans, batch_size=10)
    units = list(plan.units())
    assert units[0].pos == 0 and sum(u.hi - u.lo for u in units) == plan.rows
    assert all(a.pos + a.hi - a.lo == b.pos for a, b in zip(units, units[1:], strict=False))
    tail = list(plan.units(first=plan.rows - 5))
    assert tail[0].pos == plan.rows - 5 and sum(u.hi - u.lo for u in tail) == 5


# -- resume ----------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch_size=st.integers(4, 300),
    buffer_shuffle=st.sampled_from([0, 0, 7, 250, 1000]),
    stop=st.floats(0, 1),
    world_size=st.integers(1, 3),
    drop_last=st.booleans(),
)
def test_resume_at_any_point_gives_the_same_batches(local_ds, batch_size, buffer_shuffle, stop, world_size, drop_last):
    url, _ = local_ds
    kw = dict(batch_size=batch_size, columns=("rid",), epochs=2, seed=11, buffer_shuffle=buffer_shuffle,
              rank=world_size - 1, world_size=world_size, drop_last=drop_last)
    full = list(ActivationStream(url, **kw))
    k = int(stop * len(full))
    first = ActivationStream(url, **kw)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    state = first.state_dict()
    del it
    resumed = ActivationStream(url, **kw)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    for x, y in zip(head + tail, full, strict=True):
        assert (x.epoch, x.index) == (y.epoch, y.index)
        assert np.array_equal(x.columns["rid"], y.columns["rid"])


def test_state_from_rank_zero_resumes_other_ranks(local_ds):
    url, _ = local_ds
    kw = dict(batch_size=50, columns=("rid",), world_size=2, drop_last=True)
    r0 = ActivationStream(url, rank=0, **kw)
    it = iter(r0)
    for _ in range(7):
        next(it)
    r1 = ActivationStream(url, rank=1, **kw)
    r1.load_state_dict(r0.state_dict())
    tail = list(r1)
    assert tail[0].index == 7 and np.array_equal(rids(tail), rids(ActivationStream(url, rank=1, **kw))[350:])


def test_state_dict_is_json(local_ds):
    import json

    url, _ = local_ds
    s = ActivationStream(url, batch_size=64)
    assert json.loads(json.dumps(s.state_dict())) == s.state_dict()


# -- rank defaults, dtypes, devices ------------------------------------------------------------------------
def test_rank_and_world_size_default_from_torchrun_env(local_ds, monkeypatch):
    url, _ = local_ds
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    s = ActivationStream(url, batch_size=100, columns=("rid",))
    assert (s.config.rank, s.config.world_size) == (2, 3)
    assert np.array_equal(np.sort(rids(s)), np.sort(rids(ActivationStream(url, batch_size=100, columns=("rid",),
                                                                            rank=2, world_size=3))))
    assert len(rids(s)) == ROWS - 2 * ROWS // 3


def test_options_are_the_stream_config_fields(local_ds):
    url, _ = local_ds
    cfg = StreamConfig(batch_size=100, columns=("rid",), seed=3, epochs=2)
    by_config, by_keywords = ActivationStream(url, cfg), ActivationStream(url, batch_size=100, columns=["rid"], seed=3,
                                                                         epochs=2)
    assert by_config.config == cfg == by_keywords.config  # a list of columns is stored as a tuple
    assert np.array_equal(rids(by_config), rids(by_keywords))
    assert ActivationStream(url, cfg, seed=4, rank=None).config == dataclasses.replace(cfg, seed=4)  # keywords win
    with pytest.raises(TypeError, match=r"unknown ActivationStream option\(s\) 'batchsize'.*batch_size, columns, rank"):
        ActivationStream(url, batchsize=100)
    with pytest.raises(TypeError, match="batch_size"):
        ActivationStream(url)
    with pytest.raises(TypeError, match="config must be a StreamConfig or None, got int"):
        ActivationStream(url, 100)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_torch_device_gives_true_dtype_bits(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    url = str(tmp_path / "ds")
    acts = make_dataset(url, rows=500, d_model=6, dtype=dtype)
    s = ActivationStream(url, batch_size=64, columns=("rid",), device="cpu")
    want = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    for b in s:
        assert isinstance(b.acts, torch.Tensor) and b.acts.dtype == want and b.acts.shape == (len(b), 6)
        raw = b.acts.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else b.acts.numpy()
        np.testing.assert_array_equal(raw, acts[b.columns["rid"]])  # same bits: no float32 round trip
    numpy_batch = next(iter(ActivationStream(url, batch_size=64)))
    assert isinstance(numpy_batch.acts, np.ndarray) and numpy_batch.dtype == dtype and numpy_batch.columns == {}


def test_every_backend_exactly_once_and_resume(any_url):
    acts = make_dataset(any_url, rows=1200, chunk_rows=50, shard_chunks=5)
    kw = dict(batch_size=96, columns=("rid", "token_id"), world_size=2, epochs=2, threads=3)
    got = {0: [], 1: []}
    for r in range(2):
        for b in ActivationStream(any_url, rank=r, **kw):
            np.testing.assert_array_equal(b.acts, acts[b.columns["rid"]])
            np.testing.assert_array_equal(b.columns["token_id"], b.columns["rid"] % 7)
            got[b.epoch].append(b.columns["rid"])
    for e in range(2):
        assert np.array_equal(np.sort(np.concatenate(got[e])), np.arange(1200))
    full = list(ActivationStream(any_url, rank=1, **kw))
    s = ActivationStream(any_url, rank=1, **kw)
    it = iter(s)
    head = [next(it) for _ in range(9)]
    resumed = ActivationStream(any_url, rank=1, **kw)
    resumed.load_state_dict(s.state_dict())
    assert np.array_equal(rids(head + list(resumed)), rids(full))

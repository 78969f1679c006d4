"""Elastic resume: a stream state saved at one world size, worker count or batch size resumes at another, and
across the whole run every row of an epoch is yielded exactly once (with drop_last: at most once).

A run is simulated as DDP runs it: every rank steps in lockstep, each rank serving its DataLoader workers
round-robin exactly as readers.torch.ActivationLoader does (`Rank` below, in process, so that world 8 costs
no processes); one rank's state is saved, the world changes, and every rank of the new world loads it.
tests/test_readers_torch.py checks the same with real DataLoader workers.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from readers import ActivationStream
from readers.layout import Layout, take
from readers.state import StreamState
from tests.test_fused import scattered_source

from .readers_data import make_dataset

ROWS = 3000
EPOCHS = 2


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("elastic") / "ds")
    make_dataset(url, rows=ROWS)
    return url


@pytest.fixture(scope="module")
def scattered() -> str:
    return scattered_source(ROWS, seed=3, buckets=6, producers=2, run_rows=400, chunk_rows=23)


class Rank:
    """One rank of a run: its DataLoader workers served round-robin, as ActivationLoader serves them."""

    def __init__(self, url: str, *, rank: int, world: int, workers: int, state: dict | None, **kw):
        self.s = ActivationStream(url, rank=rank, world_size=world, epochs=EPOCHS, threads=1, **kw)
        self.n = workers
        if state is None:
            self.positions, self.next, self.base = [(0, 0)] * workers, 0, (0, ())
        else:
            st_ = self.s.parse_state(state, num_workers=workers)
            self.positions, self.next, self.base = list(st_.positions), st_.next_worker, st_.base
        # DataLoader worker i plays share (i + next) % n, so the share due next is served first (readers/torch.py)
        shares = [(i + self.next) % workers for i in range(workers)]
        self.iters = [iter(self.s.for_worker(w, workers, self.positions[w], self.base)) for w in shares]
        self.turn = 0
        self.exhausted = False

    def step(self):
        """The next batch this rank's loop gets, or None at the end of the run."""
        for _ in range(len(self.iters)):
            it = self.iters[self.turn]
            try:
                b = next(it)
            except StopIteration:
                self.exhausted = True  # DataLoader skips an exhausted worker from now on
                self.iters.pop(self.turn)
                self.turn = self.turn % len(self.iters) if self.iters else 0
                continue
            self.turn = (self.turn + 1) % len(self.iters)
            self.positions[b.worker] = (b.epoch, b.index + 1)
            self.next = (b.worker + 1) % self.n
            return b
        return None

    def state(self) -> dict:
        s = self.s
        return StreamState(fingerprint=s.manifest.fingerprint, settings=dict(s.resume_settings(), num_workers=self.n),
                           rank=s.config.rank, positions=tuple(self.positions), next_worker=self.next,
                           base=self.base).to_dict()

    def close(self) -> None:
        for it in self.iters:
            it.close()


def run(url: str, phases: list[tuple[int, int, int, int | None]], saver: int = 0, **kw):
    """Run `phases` of (world, workers, batch_size, steps or None = to the end) one after another, each
    resuming from rank `saver % world`'s state of the one before; a phase that reaches the run's last batches
    reads to the end and is the last. Returns (rows per epoch, states, steps of each rank in the last phase)."""
    seen: dict[int, list[np.ndarray]] = {e: [] for e in range(EPOCHS)}
    state, states = None, []
    col = ID[kw.get("permute_buckets", False)]
    for world, workers, batch, steps in phases:
        ranks = [Rank(url, rank=r, world=world, workers=workers, state=state, batch_size=batch, columns=(col,), **kw)
                 for r in range(world)]
        done = [0] * world
        try:
            t = 0
            while steps is None or t < steps:
                if any(r.exhausted for r in ranks):
                    steps = None  # the run's last batches: ranks no longer agree, so read to the end, save nothing
                got = [r.step() for r in ranks]
                if all(b is None for b in got):
                    break
                for i, b in enumerate(got):
                    if b is not None:
                        assert len(b) <= batch
                        seen[b.epoch].append(np.asarray(b.columns[col]))
                        done[i] += 1
                t += 1
            if steps is not None:
                state = ranks[saver % world].state()
                states.append(state)
        finally:
            for r in ranks:
                r.close()
        if steps is None:
            break
    return {e: np.concatenate(v) if v else np.zeros(0, np.int64) for e, v in seen.items()}, states, done


ID = {False: "rid", True: "row_id"}


def check_exactly_once(seen, drop_last: bool, dropped_at_most: int):
    for e, got in seen.items():
        assert len(np.unique(got)) == len(got), f"epoch {e}: a row was yielded twice"
        if drop_last:
            assert ROWS - dropped_at_most <= len(got) <= ROWS, f"epoch {e}: {ROWS - len(got)} rows dropped"
        else:
            assert np.array_equal(np.sort(got), np.arange(ROWS)), f"epoch {e}: rows missing"


def per_rank_steps(world, workers, batch, drop_last):
    """Batches one rank takes in a whole epoch of a fresh layout."""
    lay = Layout(num_rows=ROWS, consumers=world * workers, batch_size=batch, drop_last=drop_last)
    return sum(lay.batches(0, k) for k in range(workers))


MODES = {"plain": {}, "buffer_shuffle": {"buffer_shuffle": 250}, "permute_buckets": {"permute_buckets": True}}


def source(mode, plain, scattered):
    return scattered if mode == "permute_buckets" else plain


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("where", ["within one epoch", "across an epoch boundary"])
def test_world_4_3_8_and_workers_2_1_every_row_once(plain, scattered, mode, drop_last, where):
    url = source(mode, plain, scattered)
    B = 40
    n1 = per_rank_steps(4, 2, B, drop_last)  # 19 or 18 steps per epoch at world 4 x 2 workers
    if where == "within one epoch":
        stops = [n1 // 3, 2]  # both saves inside epoch 0
    else:
        stops = [n1 // 2 + 1, per_rank_steps(3, 1, B, drop_last)]  # the second save is inside epoch 1
    phases = [(4, 2, B, stops[0]), (3, 1, B, stops[1]), (8, 1, B, None)]
    seen, states, done = run(url, phases, drop_last=drop_last, **MODES[mode])
    epochs = [s["positions"][0][0] for s in states]
    assert epochs == ([0, 0] if where == "within one epoch" else [0, 1]), epochs
    assert states[0]["num_workers"] == 2 and states[1]["world_size"] == 3 and states[1]["pending"]
    check_exactly_once(seen, drop_last, dropped_at_most=(8 + 3 + 8) * B)
    if drop_last:
        assert len(set(done)) == 1, f"drop_last: every rank must take the same number of steps, got {done}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(list(MODES)),
    drop_last=st.booleans(),
    layouts=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 2), st.sampled_from([16, 40, 97])),
                     min_size=2, max_size=4),
    stops=st.lists(st.floats(0, 1), min_size=3, max_size=3),
    saver=st.integers(0, 7),
)
def test_any_sequence_of_layouts_every_row_once(plain, scattered, mode, drop_last, layouts, stops, saver):
    """Random world sizes, worker counts and batch sizes, saved at random steps by a random rank."""
    url = source(mode, plain, scattered)
    phases = []
    for i, (world, workers, batch) in enumerate(layouts):
        last = i == len(layouts) - 1
        # stop before any worker of the phase could run out (a state is exact while ranks step together)
        steps = None if last else int(stops[i] * (per_rank_steps(world, workers, batch, drop_last) - workers))
        phases.append((world, workers, batch, steps))
    seen, _, done = run(url, phases, saver=saver, drop_last=drop_last, **MODES[mode])
    check_exactly_once(seen, drop_last, dropped_at_most=sum(w * n * b for w, n, b in layouts))
    if drop_last:
        assert len(set(done)) == 1


def test_same_layout_resumes_exactly_and_a_state_from_any_rank_resumes_all(plain):
    """Without drop_last ranks hold 1 batch more or less per epoch; positions are translated through steps."""
    kw = dict(batch_size=107, columns=("rid",), epochs=EPOCHS, world_size=7)  # 428 or 429 rows: 4 or 5 batches
    full = [list(ActivationStream(plain, rank=r, **kw)) for r in range(7)]
    counts = [sum(1 for b in f if b.epoch == 0) for f in full]
    assert len(set(counts)) == 2, f"test setup: ranks should differ in batches per epoch, got {counts}"
    k = max(counts) + 2  # into epoch 1 for every rank, each a different number of batches into it
    s0 = ActivationStream(plain, rank=0, **kw)
    it = iter(s0)
    for _ in range(k):
        next(it)
    it.close()
    for r in range(7):
        again = ActivationStream(plain, rank=r, **kw)
        again.load_state_dict(s0.state_dict())
        rest = list(again)
        assert len(rest) == len(full[r]) - k
        assert all(np.array_equal(x.columns["rid"], y.columns["rid"]) for x, y in zip(rest, full[r][k:], strict=True))


def test_batch_size_and_drop_last_may_change(plain):
    seen, states, _ = run(plain, [(2, 1, 64, 9), (2, 1, 50, 7), (3, 1, 33, None)], drop_last=False)
    check_exactly_once(seen, False, 0)
    assert states[1]["batch_size"] == 50
    for a, b in [(True, False), (False, True)]:
        r0 = ActivationStream(plain, batch_size=64, world_size=2, columns=("rid",), drop_last=a)
        r1 = ActivationStream(plain, batch_size=64, world_size=2, rank=1, columns=("rid",), drop_last=a)
        i0, i1 = iter(r0), iter(r1)
        head = [next(i0) for _ in range(5)] + [next(i1) for _ in range(5)]
        i0.close()
        i1.close()
        s = ActivationStream(plain, batch_size=64, columns=("rid",), drop_last=b)
        s.load_state_dict(r0.state_dict())
        got = np.concatenate([x.columns["rid"] for x in head + list(s)])
        assert len(np.unique(got)) == len(got)
        if not b:  # the remainder is read whole; only the first layout's dropped tails may be missing
            assert ROWS - len(got) < (2 * 64 if a else 1)


def test_resumed_state_round_trips_and_refuses_what_changes_the_order(plain):
    s = ActivationStream(plain, batch_size=64, world_size=4, epochs=EPOCHS)
    it = iter(s)
    for _ in range(3):
        next(it)
    it.close()
    r = ActivationStream(plain, batch_size=64, world_size=3, epochs=EPOCHS)
    r.load_state_dict(s.state_dict())
    state = r.state_dict()
    assert state["world_size"] == 3 and state["start_epoch"] == 0 and state["positions"] == [[0, 0]]
    assert sum(hi - lo for lo, hi in state["pending"][0]) == ROWS - 4 * 3 * 64
    again = ActivationStream(plain, batch_size=64, world_size=3, epochs=EPOCHS)
    again.load_state_dict(state)
    assert again.state_dict() == state
    with pytest.raises(ValueError, match=r"seed=0, this stream has seed=1; resuming needs the same seed.*may change"):
        ActivationStream(plain, batch_size=64, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="buffer_shuffle=0, this stream has buffer_shuffle=10"):
        ActivationStream(plain, batch_size=64, buffer_shuffle=10).load_state_dict(state)
    with pytest.raises(ValueError, match=r"pending epoch 0: span \[5, 3\] must be sorted"):
        again.load_state_dict(dict(state, pending=[[[5, 3]]]))
    with pytest.raises(ValueError, match=r"pending epoch 0: span \[0, 3001\] must be sorted.*3000 rows"):
        again.load_state_dict(dict(state, pending=[[[0, ROWS + 1]]]))


def test_version_1_states_still_load(plain):
    """A state saved before layouts existed (version 1) is a layout begun at epoch 0: it resumes exactly at the
    same world size, elastically at another; with buffer_shuffle mid-epoch it is refused saying what to do."""
    kw = dict(batch_size=64, columns=("rid",), epochs=EPOCHS, world_size=2, drop_last=True)
    s = ActivationStream(plain, **kw)
    it = iter(s)
    for _ in range(30):
        next(it)
    it.close()
    v1 = {k: v for k, v in s.state_dict().items() if k not in ("start_epoch", "pending")}
    v1["version"] = 1
    same = ActivationStream(plain, **kw)
    same.load_state_dict(v1)
    assert same.state_dict() == s.state_dict()
    full = list(ActivationStream(plain, **kw))
    assert np.array_equal(np.concatenate([b.columns["rid"] for b in same]),
                          np.concatenate([b.columns["rid"] for b in full[30:]]))
    other = ActivationStream(plain, **dict(kw, world_size=3))
    other.load_state_dict(v1)
    assert other.state_dict()["pending"]
    mid = dict(v1, buffer_shuffle=100, positions=[[1, 3]])
    with pytest.raises(ValueError, match=r"version 1 with buffer_shuffle=100 stops inside epoch 1.*"
                                         r"positions=\[\[1, 0\]\] \* 1, next_worker=0"):
        ActivationStream(plain, **dict(kw, buffer_shuffle=100)).load_state_dict(mid)
    ActivationStream(plain, **dict(kw, buffer_shuffle=100)).load_state_dict(dict(mid, positions=[[1, 0]]))


@given(spans=st.lists(st.integers(0, 60), min_size=0, max_size=12, unique=True),
       cuts=st.lists(st.integers(0, 40), min_size=0, max_size=8))
def test_take_maps_ranges_of_the_concatenation(spans, cuts):
    edges = sorted(spans)
    sp = tuple((a, b) for a, b in zip(edges[::2], edges[1::2], strict=False) if a < b)
    rows = np.concatenate([np.arange(a, b) for a, b in sp]) if sp else np.zeros(0, np.int64)
    c = sorted(min(x, len(rows)) for x in cuts)
    ranges = list(zip(c[::2], c[1::2], strict=False))
    got = take(sp, ranges)
    want = np.concatenate([rows[a:b] for a, b in ranges]) if ranges else np.zeros(0, np.int64)
    flat = np.concatenate([np.arange(a, b) for a, b in got]) if got else np.zeros(0, np.int64)
    assert np.array_equal(flat, want)
    assert all(a < b for a, b in got) and all(x[1] < y[0] for x, y in zip(got, got[1:], strict=False))

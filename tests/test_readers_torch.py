"""readers.torch: DataLoader(num_workers=2) under fork and spawn, and exact resume through ActivationLoader."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from readers.stream import StreamConfig  # noqa: E402
from readers.torch import ActivationDataset, ActivationLoader  # noqa: E402

from .readers_data import make_dataset, rids  # noqa: E402

ROWS = 2500


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("readers-torch") / "ds")
    acts = make_dataset(url, rows=ROWS, dtype="bfloat16")
    return url, acts


def check_batches(batches, acts):
    for b in batches:
        assert isinstance(b.acts, torch.Tensor) and b.acts.dtype == torch.bfloat16
        np.testing.assert_array_equal(b.acts.view(torch.int16).numpy().view(np.uint16), acts[b.columns["rid"]])


@pytest.mark.parametrize("world_size", [1, 2])
def test_dataloader_fork_two_workers_reads_each_row_once_per_epoch(local_ds, world_size):
    url, acts = local_ds
    per_epoch = {0: [], 1: []}
    for rank in range(world_size):
        ds = ActivationDataset(url, batch_size=64, columns=("rid",), epochs=2, rank=rank, world_size=world_size)
        batches = list(DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork"))
        check_batches(batches, acts)
        assert {b.worker for b in batches} == {0, 1}
        for b in batches:
            per_epoch[b.epoch].append(b.columns["rid"])
    for e in (0, 1):
        got = np.concatenate(per_epoch[e])
        assert len(got) == ROWS and np.array_equal(np.sort(got), np.arange(ROWS))
    assert not np.array_equal(np.concatenate(per_epoch[0]), np.concatenate(per_epoch[1]))


def test_dataloader_spawn_two_workers(local_ds):
    """spawn pickles the dataset into fresh interpreters (slow: each imports torch, ~5 s)."""
    url, acts = local_ds
    ds = ActivationDataset(url, batch_size=100, columns=("rid",), drop_last=True)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn"))
    check_batches(batches, acts)
    got = rids(batches)
    assert len(np.unique(got)) == len(got) == 2 * ((ROWS // 2) // 100 * 100)
    assert all(len(b) == 100 for b in batches)


def test_worker_split_matches_a_plain_stream_split(local_ds):
    """Two DataLoader workers of one rank read what ranks 0 and 1 of world_size 2 would read."""
    url, _ = local_ds
    ds = ActivationDataset(url, batch_size=64, columns=("rid",), seed=4)
    by_worker = {0: [], 1: []}
    for b in DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork"):
        by_worker[b.worker].append(b)
    from readers import ActivationStream

    for w in (0, 1):
        want = rids(ActivationStream(url, batch_size=64, columns=("rid",), seed=4, rank=w, world_size=2))
        assert np.array_equal(rids(by_worker[w]), want)


@pytest.mark.parametrize("stop", [0, 1, 7, 40, 77, 78])
def test_loader_resume_gives_the_batches_an_uninterrupted_run_gives(local_ds, stop):
    url, _ = local_ds

    def loader():
        ds = ActivationDataset(url, batch_size=64, columns=("rid",), epochs=2, seed=2)
        return ActivationLoader(ds, num_workers=2, multiprocessing_context="fork")

    full = [(b.worker, b.epoch, b.index) for b in loader()]
    assert len(full) == len(loader()) == 2 * -(-ROWS // 64) + 0  # 40 batches per epoch, 20 per worker
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = first.state_dict()
    del it
    again = loader()
    again.load_state_dict(state)
    tail = [(b.worker, b.epoch, b.index) for b in again]
    assert [(b.worker, b.epoch, b.index) for b in head] + tail == full


def test_loader_resume_with_unequal_workers(local_ds):
    """3 workers with 14, 14, 13 batches per epoch: the round-robin skips the exhausted one; resume follows."""
    url, _ = local_ds

    def loader():
        ds = ActivationDataset(url, batch_size=60, columns=("rid",), epochs=2)
        return ActivationLoader(ds, num_workers=3, multiprocessing_context="fork")

    full = [rids([b]) for b in loader()]
    for stop in (13, 40, 41):
        first = loader()
        it = iter(first)
        head = [rids([next(it)]) for _ in range(stop)]
        state = first.state_dict()
        del it
        again = loader()
        again.load_state_dict(state)
        rest = [rids([b]) for b in again]
        assert len(head) + len(rest) == len(full)
        assert all(np.array_equal(x, y) for x, y in zip(head + rest, full, strict=True)), f"stop={stop}"


def test_loader_resumes_with_another_worker_count_every_row_once(local_ds):
    """Real DataLoader workers: 2 workers, then 1 (in the middle of epoch 0), then 3 (in epoch 1)."""
    url, _ = local_ds

    def loader(n, seed=3):
        ds = ActivationDataset(url, batch_size=64, columns=("rid",), epochs=2, seed=seed)
        return ActivationLoader(ds, num_workers=n, multiprocessing_context="fork")

    seen = {0: [], 1: []}
    state = None
    for n, stop in [(2, 7), (1, 36), (3, None)]:
        lo = loader(n)
        if state is not None:
            lo.load_state_dict(state)
        expect = len(lo)  # batches from this resume to the end
        it = iter(lo)
        i = -1
        for i, b in enumerate(it):
            seen[b.epoch].append(rids([b]))
            if stop is not None and i + 1 == stop:
                break
        state = lo.state_dict()
        it.close()
        if n == 1:
            assert expect == (ROWS - 7 * 64 + 63) // 64 + 40  # what 2 workers left of epoch 0, then epoch 1
            assert state["positions"][0][0] == 1, "test setup: the second save is inside epoch 1"
        if stop is None:
            assert i + 1 == expect
    for e in (0, 1):
        got = np.concatenate(seen[e])
        assert np.array_equal(np.sort(got), np.arange(ROWS)), f"epoch {e}"
    with pytest.raises(ValueError, match="seed=3, this stream has seed=4"):
        loader(2, seed=4).load_state_dict(state)


def test_loader_refuses_bad_options(local_ds):
    url, _ = local_ds
    ds = ActivationDataset(url, batch_size=64)
    with pytest.raises(ValueError, match="sets batch_size itself"):
        ActivationLoader(ds, batch_size=4)
    with pytest.raises(ValueError, match="device must be None"):
        ActivationDataset(url, batch_size=64, device="cpu")
    with pytest.raises(ValueError, match="device must be None"):
        ActivationDataset(url, StreamConfig(batch_size=64, device="cpu"))
    assert ActivationDataset(url, StreamConfig(batch_size=64), seed=5).stream.config.seed == 5


def test_loader_in_process_without_workers(local_ds):
    url, acts = local_ds
    loader = ActivationLoader(ActivationDataset(url, batch_size=500, columns=("rid",)))
    batches = list(loader)
    check_batches(batches, acts)
    assert np.array_equal(np.sort(rids(batches)), np.arange(ROWS))


def test_staged_pinned_buffers_are_reused_after_their_copy(local_ds, monkeypatch):
    """The CUDA path's logic on CPU: plain memory stands in for pinned, a logged fake for the CUDA event."""
    import readers.stream
    from readers.device import Buffers

    url, acts = local_ds
    log = []

    class Event:
        def synchronize(self):
            log.append("sync")

    class CpuStaged(Buffers):
        def __init__(self, schema, batch_size, device):
            super().__init__(schema, batch_size, device, staged=True)
            log.append(self)

        def _new_pinned(self):
            return torch.empty((self.batch_size, self.schema.d_model), dtype=torch.int16)

        def _record(self):
            return Event()

        def _transfer(self, t):
            return t.clone()  # a real GPU copy leaves the staging buffer free for reuse, as clone does

    monkeypatch.setattr(readers.stream, "Buffers", CpuStaged)
    s = readers.stream.ActivationStream(url, batch_size=100, columns=("rid",), device="cpu", prefetch=2, threads=2)
    batches = list(s)
    check_batches(batches, acts)
    assert np.array_equal(np.sort(rids(batches)), np.arange(ROWS))
    bufs = log[0]
    assert bufs.allocated <= 2 + 3 + 1, f"{bufs.allocated} staging buffers for {len(batches)} batches: no reuse"
    assert log.count("sync") >= len(batches) - bufs.allocated, "a reused buffer must wait for its copy first"


def test_docs_examples_run(tmp_path):
    """Every python block of docs/readers.md, in order, with its /tmp paths moved into a fresh folder."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "readers.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S)).replace('"/tmp/', f'"{tmp_path}/')
    exec(compile(code, "docs/readers.md", "exec"), {"__name__": "docs_example"})


def test_dataloader_fork_on_s3_after_the_parent_used_the_client(s3_url):
    """The parent has read through its s3fs client before forking; each worker must open its own."""
    acts = make_dataset(s3_url, rows=800, chunk_rows=40, shard_chunks=4, dtype="bfloat16")
    ds = ActivationDataset(s3_url, batch_size=64, columns=("rid",))
    assert len(list(ds)) == 13  # in-process pass: the parent's client is now live
    batches = list(DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork"))
    check_batches(batches, acts)
    assert np.array_equal(np.sort(rids(batches)), np.arange(800))

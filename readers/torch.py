"""torch integration: ActivationDataset (an IterableDataset) and ActivationLoader (a DataLoader that resumes).

    ds = ActivationDataset(url, batch_size=4096, drop_last=True)
    for batch in DataLoader(ds, batch_size=None, num_workers=2):   # batch.acts: [4096, d_model] CPU tensor
        ...

The dataset yields whole batches, so the DataLoader takes batch_size=None. Each worker reads its own share
of this rank's rows (plan.py: consumer = rank * num_workers + worker) with its own thread pool and its own
storage client, opened inside the worker (an s3fs client must not cross a fork; docs/benchmarks.md, "Measurements behind the design").

Resume needs to know which batches the training loop has consumed, which only the main process sees:
ActivationLoader wraps the DataLoader, records the (worker, epoch, batch) tag of each batch it hands out,
and restarts the workers at those positions. DataLoader serves workers round-robin (skipping exhausted
ones), so on resume it also rotates which worker plays which share so that the one due next comes first;
the batches after a resume are then exactly those an uninterrupted run would have produced next. A state
saved with another worker count (or world size, batch size, drop_last) is accepted too: the rows not yet
read are cut anew among the workers (readers/layout.py), each row of an epoch still read once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from readers.device import StreamBatch
from readers.state import StreamState
from readers.stream import ActivationStream, StreamConfig, stream_config


class ActivationDataset(IterableDataset):
    """A torch IterableDataset of StreamBatch (acts: CPU tensor of the stored dtype, [batch, d_model]).

    Takes ActivationStream's config and keywords except device (move batches in the training loop, or use
    DataLoader(pin_memory=True)). Works with num_workers=N under fork, spawn and forkserver.
    """

    def __init__(self, url: str, config: StreamConfig | None = None, **stream_options):
        super().__init__()
        config = stream_config(config, **stream_options)
        if config.device is not None:
            raise ValueError("ActivationDataset yields CPU tensors; move them in the loop (device must be None)")
        self.stream = ActivationStream(url, config)
        self.resume: StreamState | None = None
        """Positions to start the workers from; set by ActivationLoader."""

    def __iter__(self) -> Iterator[StreamBatch]:
        info = get_worker_info()
        worker, n = (0, 1) if info is None else (info.id, info.num_workers)
        position = (0, 0)
        if self.resume is not None:
            if len(self.resume.positions) != n:
                raise ValueError(
                    f"resume state holds {len(self.resume.positions)} worker positions, the DataLoader has {n} workers"
                )
            worker = (worker + self.resume.next_worker) % n  # the worker due next in round-robin goes first
            position = self.resume.positions[worker]
        s = self.stream.for_worker(worker, n, position, None if self.resume is None else self.resume.base)
        s._device = torch.device("cpu")  # tensors cross the worker queue through shared memory
        yield from s


class ActivationLoader:
    """DataLoader(dataset, batch_size=None, ...) plus state_dict()/load_state_dict() for exact resume.

    Keyword arguments go to torch's DataLoader (num_workers, multiprocessing_context, pin_memory,
    prefetch_factor, timeout, ...). A new DataLoader is made on each iteration, so workers start from the
    loaded positions (persistent_workers is refused for that reason).
    """

    def __init__(self, dataset: ActivationDataset, **dataloader_options):
        if not isinstance(dataset, ActivationDataset):
            raise TypeError(f"ActivationLoader needs an ActivationDataset, got {type(dataset).__name__}")
        for bad in ("batch_size", "persistent_workers", "sampler", "batch_sampler", "collate_fn", "shuffle"):
            if bad in dataloader_options:
                raise ValueError(f"ActivationLoader sets {bad} itself (the dataset yields whole batches, in its order)")
        self.dataset = dataset
        self.options = dataloader_options
        self.num_workers = max(1, int(dataloader_options.get("num_workers", 0)))
        self._positions = [(0, 0)] * self.num_workers
        self._next = 0
        self._base = (0, ())  # where the layout began (readers/layout.py): fresh
        self._finished = False

    def __len__(self) -> int:
        """Batches this rank gets from where its layout began (epoch 0, or an elastic resume) to the end,
        damaged chunks aside."""
        s = self.dataset.stream
        return sum(len(s.for_worker(w, self.num_workers, base=self._base)) for w in range(self.num_workers))

    def _state(self) -> StreamState:
        s = self.dataset.stream
        return StreamState(
            fingerprint=s.manifest.fingerprint,
            settings=dict(s.resume_settings(), num_workers=self.num_workers),
            rank=s.config.rank,
            positions=tuple(self._positions),
            next_worker=self._next,
            base=self._base,
        )

    def state_dict(self) -> dict:
        return self._state().to_dict()

    def load_state_dict(self, state: dict) -> None:
        s = self.dataset.stream.parse_state(state, num_workers=self.num_workers)
        self._positions, self._next, self._base, self._finished = list(s.positions), s.next_worker, s.base, False

    def __iter__(self) -> Iterator[StreamBatch]:
        if self._finished:
            self._positions, self._next, self._finished = [(0, 0)] * self.num_workers, 0, False
            self._base = (0, ())
        self.dataset.resume = self._state()
        try:
            loader = DataLoader(self.dataset, batch_size=None, **self.options)
            for batch in loader:
                self._positions[batch.worker] = (batch.epoch, batch.index + 1)
                self._next = (batch.worker + 1) % self.num_workers
                yield batch
        finally:
            self.dataset.resume = None
        self._finished = True

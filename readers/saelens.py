"""The stream as a data provider for SAELens's own trainer (sae-lens 6.x, the `saelens` extra).

    from readers.saelens import data_provider
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = SAETrainerConfig(total_training_samples=50_000_000, train_batch_size_samples=4096, lr=3e-4, lr_end=3e-4,
                           device="cuda")
    provider = data_provider("s3://bucket/acts-shuffled", batch_size=4096,
                             total_training_samples=cfg.total_training_samples, device="cuda")
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=provider.d_in, d_sae=16384, k=32))
    SAETrainer(cfg, sae, provider).fit()

SAELens's `SAETrainer(cfg, sae, data_provider)` takes any iterator of `[batch, d_in]` tensors
(`sae_lens.training.types.DataProvider = Iterator[torch.Tensor]`) and calls `next()` on it once per step
(`sae_lens/training/sae_trainer.py`, `fit`). `StreamProvider` is that iterator over an ActivationStream, so
every SAELens architecture (standard, TopK, BatchTopK, JumpReLU, Matryoshka) trains on our globally shuffled,
rank-sharded (torchrun's RANK/WORLD_SIZE), resumable stream. This module does not import sae_lens.
dictionary_learning's `trainSAE(data, ...)` iterates the same kind of object (docs/trainer.md).

SAELens counts samples by `batch.shape[0]` and stops at total_training_samples, so batches are whole
(`drop_last`) and `data_provider` opens enough epochs for the run; a stream that still runs out raises an
error saying so rather than the bare StopIteration `next()` would raise inside SAELens's loop. The tensor
handed over lives in the reader's reused buffers: SAELens consumes it within the step, before the next
`next()`; keep a `.clone()` if you hold batches longer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from readers.stream import ActivationStream, stream_config


class StreamProvider:
    """An endless-looking iterator of activation tensors (`batch.acts`, on the stream's device) for
    sae_lens's SAETrainer; resumable through state_dict / load_state_dict (the stream's)."""

    def __init__(self, stream: ActivationStream):
        if not isinstance(stream, ActivationStream):
            raise TypeError(f"stream must be a readers.ActivationStream, got {type(stream).__name__}")
        if stream.config.device is None:
            raise ValueError(
                f"{stream.url}: the stream gives numpy arrays (device=None); SAELens's trainer takes torch tensors, "
                "so open it with device='cpu' or 'cuda'"
            )
        self.stream = stream
        self._it: Iterator | None = None

    @property
    def d_in(self) -> int:
        """Width of the rows: SAELens's d_in."""
        return self.stream.dataset.d_model

    def __iter__(self) -> StreamProvider:
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self.stream)
        try:
            return next(self._it).acts
        except StopIteration:
            self._it = None
            c = self.stream.config
            raise RuntimeError(
                f"{self.stream.url}: the stream ended after {c.epochs} epoch(s) of {self.stream.batches_per_epoch} "
                f"batches of {c.batch_size} rows (rank {c.rank} of {c.world_size}) and SAELens's trainer asked for "
                "more; open it with more epochs (data_provider(..., total_training_samples=N) counts them)"
            ) from None

    def close(self) -> None:
        """Stop the reader's prefetch threads now rather than at garbage collection."""
        if self._it is not None:
            self._it.close()
            self._it = None

    def state_dict(self) -> dict:
        """Where the stream is: save it beside SAELens's checkpoint (SAETrainer's save_checkpoint_fn)."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: the next tensor is the one that followed it."""
        self.close()
        self.stream.load_state_dict(state)


def data_provider(url: str, *, batch_size: int, total_training_samples: int | None = None,
                  device: str = "cpu", **stream_options) -> StreamProvider:
    """A StreamProvider over the dataset at `url` with whole batches of `batch_size` rows (SAELens's
    train_batch_size_samples) and, given total_training_samples (SAELens's), enough epochs for the run.
    `stream_options` are the other fields of readers.StreamConfig (seed, rank, world_size, threads, ...)."""
    if "epochs" in stream_options and total_training_samples is not None:
        raise ValueError("give epochs or total_training_samples, not both")
    config = stream_config(batch_size=batch_size, device=device, drop_last=True, **stream_options)
    stream = ActivationStream(url, config)
    if total_training_samples is not None:
        if total_training_samples < 1:
            raise ValueError(f"total_training_samples={total_training_samples} must be >= 1")
        per_epoch = stream.batches_per_epoch
        if per_epoch < 1:
            raise ValueError(f"{url}: {stream.num_rows} rows for this rank (of {config.world_size}) do not fill one "
                             f"batch of {batch_size}")
        steps = math.ceil(total_training_samples / batch_size)
        stream = ActivationStream(url, dataclasses.replace(config, epochs=math.ceil(steps / per_epoch)))
    return StreamProvider(stream)

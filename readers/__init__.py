"""Consumers: stream a committed dataset's rows as batches, with prefetch, rank sharding and exact resume.

    from readers import ActivationStream
    for batch in ActivationStream(url, batch_size=4096, device="cuda"):
        ...

`readers.torch.ActivationDataset` wraps the same stream as a torch IterableDataset (docs/readers.md).
"""

from .device import StreamBatch
from .prefetch import ReadStats
from .stream import ActivationStream, StreamConfig

__all__ = ["ActivationStream", "StreamBatch", "StreamConfig", "ReadStats"]

"""Consumers: stream a committed dataset's rows as batches, with prefetch, rank sharding and exact resume.

    from readers import ActivationStream
    for batch in ActivationStream(url, batch_size=4096, device="cuda"):
        ...

`readers.torch.ActivationDataset` wraps the same stream as a torch IterableDataset (docs/readers.md).
"""

from readers.device import StreamBatch
from readers.prefetch import ReadStats
from readers.stream import ActivationStream, StreamConfig

__all__ = ["ActivationStream", "StreamBatch", "StreamConfig", "ReadStats"]

"""Producers: ShardWriter, capture hooks for torch models, and the synthetic producer."""

from shuffler.shuffling.on_write import ScatterSpec
from writers.capture import capture
from writers.shard_writer import ShardWriter

__all__ = ["ShardWriter", "ScatterSpec", "capture"]

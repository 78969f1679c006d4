"""Producers: ShardWriter, capture hooks for torch models, and the synthetic producer."""

from shuffler.scattered import ScatterSpec

from .capture import capture
from .shard_writer import ShardWriter

__all__ = ["ShardWriter", "ScatterSpec", "capture"]

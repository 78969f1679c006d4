"""Producers: ShardWriter, capture hooks for torch models, and the synthetic producer."""

from .shard_writer import ShardWriter

__all__ = ["ShardWriter"]

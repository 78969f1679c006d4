"""The project's exceptions. All subclass built-in types, so callers may catch either.

Every message says what was given, what was expected, and where (URL, shard, chunk).
"""

from __future__ import annotations


class FormatError(ValueError):
    """Bytes on storage do not follow docs/format.md (bad magic, truncated, inconsistent index)."""


class ChecksumError(FormatError):
    """A chunk's bytes do not match the checksum recorded when it was written."""

    def __init__(self, message: str, *, obj: str = "", chunk: int | None = None):
        super().__init__(message)
        self.obj = obj
        self.chunk = chunk


class DatasetNotFoundError(FileNotFoundError):
    """A URL holds no committed dataset (no manifest.json): never written, or still being written."""


class SchemaError(ValueError):
    """Data does not match the dataset's schema (dtype, d_model, columns) or several inputs disagree."""

"""Test data for the reader tests: rows carry their own index in a `rid` column, so coverage is checkable."""

from __future__ import annotations

import numpy as np

from writers import ShardWriter

COLUMNS = (("rid", "int64"), ("token_id", "int32"))


def expected_acts(rows: int, d_model: int, dtype: str) -> np.ndarray:
    """The stored activations of row i, [rows, d_model] in storage dtype: a fixed function of i."""
    rng = np.random.default_rng(1234)
    if dtype == "bfloat16":
        a = rng.integers(0, 1 << 16, size=(rows, d_model), dtype=np.uint16)
        a[(a & 0x7F80) == 0x7F80] &= 0x3FFF  # finite values only
        return a
    return rng.standard_normal((rows, d_model)).astype(dtype)


def make_dataset(url: str, *, rows: int = 3000, d_model: int = 4, dtype: str = "float32",
                 chunk_rows: int = 37, shard_chunks: int = 7, random: bool = True) -> np.ndarray:
    """Write `rows` rows in small chunks (many chunks, several shards). Returns the stored activations."""
    acts = expected_acts(rows, d_model, dtype) if random else np.zeros((rows, d_model), dtype=dtype)
    row_bytes = d_model * np.dtype(acts.dtype).itemsize + 12
    rid = np.arange(rows, dtype=np.int64)
    with ShardWriter(url, d_model=d_model, dtype=dtype, columns=COLUMNS, chunk_bytes=chunk_rows * row_bytes,
                     shard_bytes=chunk_rows * row_bytes * shard_chunks, threads=1) as w:
        for s in range(0, rows, 1000):
            w.write(acts[s : s + 1000], rid=rid[s : s + 1000], token_id=(rid[s : s + 1000] % 7).astype(np.int32))
    return acts


def rids(batches) -> np.ndarray:
    """Concatenated rid column of an iterable of batches. [rows] int64."""
    parts = [np.asarray(b.columns["rid"]) for b in batches]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

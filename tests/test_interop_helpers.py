"""Helpers shared by the interop tests (no tests here): build datasets, read them back whole, compare bits."""

from __future__ import annotations

import numpy as np

from shuffler.io.dataset import Batch, Dataset
from writers.shard_writer import ShardWriter

BITS = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16}


def write_dataset(url: str, acts: np.ndarray, dtype: str, columns: dict[str, np.ndarray], *,
                  chunk_bytes: int = 4096, metadata: dict | None = None) -> None:
    cols = tuple((n, str(v.dtype)) for n, v in columns.items())
    with ShardWriter(url, d_model=acts.shape[1], dtype=dtype, columns=cols, chunk_bytes=chunk_bytes,
                     shard_bytes=4 * chunk_bytes, metadata=metadata) as w:
        w.write(acts, **columns)


def read_all(url: str) -> Batch:
    ds = Dataset.open(url)
    parts = [b for _, _, b in ds.iter_chunks()]
    if not parts:
        return Batch(np.empty((0, ds.d_model), ds.schema.storage_dtype), {n: np.empty(0, t) for n, t in ds.schema.columns},
                     ds.dtype)
    return Batch.concat(parts)


def same_rows(a: Batch, b: Batch) -> None:
    """Bit-exact equality of activations (so -0.0 and NaN payloads count) and of every column."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.acts.shape == b.acts.shape, (a.acts.shape, b.acts.shape)
    bits = BITS[a.dtype]
    np.testing.assert_array_equal(np.asarray(a.acts).view(bits), np.asarray(b.acts).view(bits))
    assert sorted(a.columns) == sorted(b.columns), (sorted(a.columns), sorted(b.columns))
    for k in a.columns:
        assert a.columns[k].dtype == b.columns[k].dtype, k
        np.testing.assert_array_equal(a.columns[k], b.columns[k], err_msg=k)


def leaves_nothing(url: str) -> bool:
    """True when no dataset is visible at url and no shard object was left behind."""
    from shuffler.storage.storage import Storage

    st = Storage(url)
    return not st.exists("manifest.json") and not [n for n in st.list() if n.endswith(".shard")]

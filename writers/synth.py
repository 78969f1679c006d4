"""The synthetic producer: activations built from a planted dictionary of sparse features, in document order.

Each row is a sparse non-negative combination of `k` unit-norm features plus small Gaussian noise. Each
document favours its own small set of features (`doc_bias` of its active features come from that set), so
rows in capture order are measurably non-random: adjacent rows share features far more often than random
pairs do. The dictionary is stored with the dataset, so an SAE's recovery of it can be scored later.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from shuffler.keys import splitmix64
from shuffler.storage.storage import Storage
from writers.shard_writer import ShardWriter

PLANTED = "extras/planted_features.npy"
BLOCK_ROWS = 8192  # rows generated per step; output is the same whatever the caller's batching


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """What `shuffler synth` generates."""

    rows: int
    """Total rows (tokens)."""
    d_model: int
    """Activation width."""
    dtype: str = "float32"
    """Stored dtype: float32, float16 or bfloat16."""
    docs: int = 100
    """Number of documents; rows are split into `docs` contiguous documents of near-equal length."""
    seed: int = 0
    """Seeds the dictionary and every row."""
    features: int = 0
    """Planted dictionary size; 0 means 4 x d_model."""
    k: int = 8
    """Active features per row."""
    doc_features: int = 16
    """Size of each document's favoured feature set."""
    doc_bias: float = 0.8
    """Probability that an active feature comes from the document's favoured set."""
    noise: float = 0.05
    """Standard deviation of the Gaussian noise added to each element."""

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise ValueError(f"rows={self.rows} must be >= 1")
        if not 1 <= self.docs <= self.rows:
            raise ValueError(f"docs={self.docs} must be between 1 and rows={self.rows}")
        if self.features < 0 or (self.features and self.features < self.k):
            raise ValueError(f"features={self.features} must be 0 (auto) or >= k={self.k}")
        if not 0 <= self.doc_bias <= 1:
            raise ValueError(f"doc_bias={self.doc_bias} must be a probability in [0, 1]")
        if self.k < 1 or self.doc_features < 1:
            raise ValueError(f"k={self.k} and doc_features={self.doc_features} must be >= 1")

    @property
    def n_features(self) -> int:
        return self.features or 4 * self.d_model


def planted_dictionary(cfg: SynthConfig) -> np.ndarray:
    """[n_features, d_model] float32 unit-norm rows."""
    rng = np.random.default_rng([cfg.seed, 0xD1C7])
    d = rng.standard_normal((cfg.n_features, cfg.d_model), dtype=np.float32)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def synth_block(cfg: SynthConfig, dictionary: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, dict]:
    """Rows [start, stop) as (acts [rows, d_model] float32, columns). Deterministic per (seed, block)."""
    assert start % BLOCK_ROWS == 0 and stop - start <= BLOCK_ROWS
    n = stop - start
    rng = np.random.default_rng([cfg.seed, start // BLOCK_ROWS])
    row = np.arange(start, stop, dtype=np.int64)
    doc = row * cfg.docs // cfg.rows
    doc_start = -(-doc * cfg.rows // cfg.docs)  # first row of each row's document (ceil division)
    F = cfg.n_features
    # Each document's favoured set: doc_features hashed feature ids, vectorised (no per-doc loop).
    slot = rng.integers(0, cfg.doc_features, size=(n, cfg.k))
    key = (doc[:, None].astype(np.uint64) * np.uint64(cfg.doc_features) + slot.astype(np.uint64)) ^ np.uint64(
        cfg.seed * 0x9E3779B9 + 1
    )
    favoured = (splitmix64(key) % np.uint64(F)).astype(np.int64)
    uniform = rng.integers(0, F, size=(n, cfg.k))
    feats = np.where(rng.random((n, cfg.k)) < cfg.doc_bias, favoured, uniform)  # [n, k]
    mags = np.exp(rng.normal(0.0, 0.5, size=(n, cfg.k))).astype(np.float32)  # [n, k]
    codes = np.zeros((n, F), dtype=np.float32)  # [n, F], sparse
    np.put_along_axis(codes, feats, mags, axis=1)
    acts = codes @ dictionary + rng.normal(0.0, cfg.noise, size=(n, cfg.d_model)).astype(np.float32)
    strongest = feats[np.arange(n), np.argmax(mags, axis=1)]
    cols = {
        "token_id": strongest.astype(np.int32),
        "doc_id": doc,
        "position": (row - doc_start).astype(np.int32),
    }
    return acts, cols


def synth(url: str, cfg: SynthConfig, *, progress=None, **writer_options) -> None:
    """Write a synthetic dataset to `url` (and its planted dictionary beside the shards)."""
    dictionary = planted_dictionary(cfg)
    meta = {
        "producer": "synth",
        "synth": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "planted_features": PLANTED,
    }
    buf = io.BytesIO()
    np.save(buf, dictionary, allow_pickle=False)
    with ShardWriter(url, d_model=cfg.d_model, dtype=cfg.dtype, metadata=meta, **writer_options) as w:
        Storage(url).write(PLANTED, buf.getvalue())
        for start in range(0, cfg.rows, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, cfg.rows)
            acts, cols = synth_block(cfg, dictionary, start, stop)
            w.write(acts, **cols)
            if progress is not None:
                progress(stop - start)


def load_planted(url: str) -> np.ndarray:
    """The planted dictionary of a synthetic dataset. [n_features, d_model] float32."""
    return np.load(io.BytesIO(Storage(url).read(PLANTED)), allow_pickle=False)

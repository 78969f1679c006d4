"""All seeded randomness of the project: one generator, one rule.

Every random draw (the shuffle's bucket of each row, the permutation of each bucket, a producer's key when
scattering on write, a reader's epoch order, the SAE's initial directions) is counter-based: the i-th draw
for a key is splitmix64(key + (i + 1) * golden) or a function of it (Steele, Lea and Flood 2014, "Fast
splittable pseudorandom number generators", OOPSLA; SplitMix64 passes BigCrush). So any draw is computed
alone, in any process, task or retry, and gives the same bits on every machine and numpy release.

The rule: nothing that must be reproducible (output bytes, resume, several ranks agreeing) draws from
numpy's Generator, whose streams numpy does not promise to keep across releases (NEP 19,
https://numpy.org/neps/nep-0019-rng-policy.html). Keys of different uses are kept apart by tags.
tests/test_keys.py pins every stream. The one exception is the synthetic producer (writers/synth.py), whose
values are test data drawn from numpy's Generator: reproducible within one numpy release only.
"""

from __future__ import annotations

import hashlib

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
"""2^64 / golden ratio, odd: SplitMix64's counter increment."""
_M64 = (1 << 64) - 1
TAG_PERMUTE = 0x5045524D  # "PERM": a shuffle bucket's permutation
_PRODUCER_TAG = 0x5343415454455221  # "SCATTER!": keeps producer keys apart from stream_key's bucket paths


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al. 2014), elementwise on uint64, wrapping mod 2^64."""
    z = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z




def mix64(x: int) -> int:
    """splitmix64's finaliser on one Python int (the scalar twin of splitmix64)."""
    return int(splitmix64(np.array([x & _M64], dtype=np.uint64))[0])


def stream_key(seed: int, path: tuple[int, ...] = ()) -> int:
    """Key of the bucket draws at one level: path () is the top level, (b,) the re-shuffle of bucket b."""
    k = mix64(seed ^ 0x243F6A8885A308D3)
    for p in path:
        k = mix64(k ^ mix64((p + 1) * GOLDEN))
    return k


def bucket_ids(key: int, start: int, n: int, buckets: int) -> np.ndarray:
    """Bucket of rows start..start+n-1: [n] int32 in [0, buckets).

    Row i's 64 random bits are SplitMix64's i-th output for seed `key` (mix(key + (i+1) * golden); Steele et
    al. 2014, passes BigCrush), so any row's draw is computed alone, in any task. They map to [0, B) by the
    multiply-high floor(x * B / 2^64), done in two 32-bit halves to stay within uint64 (Lemire 2019 without
    the rejection step): bucket j gets either floor or ceil of 2^64/B of the 2^64 values, a relative bias of at
    most B / 2^64 < 1e-12. Uniformity of the permutation does not even need equal bucket odds, only the same
    odds for every row (docs/shuffle.md); the bias only affects how evenly the buckets fill.
    """
    if not 1 <= buckets < (1 << 31):
        raise ValueError(f"buckets={buckets} must be in [1, 2^31)")
    out = np.empty(n, dtype=np.int32)
    b = np.uint64(buckets)
    step = 1 << 20  # bounded temporaries: five uint64 arrays of 1M rows, whatever n is
    with np.errstate(over="ignore"):
        for s in range(0, n, step):
            m = min(step, n - s)
            i = np.arange(start + s + 1, start + s + m + 1, dtype=np.uint64)
            x = splitmix64(np.uint64(key) + i * np.uint64(GOLDEN))
            hi, lo = x >> np.uint64(32), x & np.uint64(0xFFFFFFFF)
            out[s : s + m] = (hi * b + ((lo * b) >> np.uint64(32))) >> np.uint64(32)
    return out


def mix_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, epoch, tags): chained splitmix64 over the 64-bit-masked parts."""
    h = GOLDEN
    for p in parts:
        h = mix64(h ^ (int(p) & _M64))
    return h


def producer_key(seed: int, producer: str) -> int:
    """Key of producer `producer`'s bucket draws when scattering on write. Distinct producers get unrelated keys.

    Two producers' counter sequences key + i x golden could meet only if their keys differ by a multiple of
    golden below their row counts: probability < P^2 N / 2^64 for P producers of N rows (1e-5 at 1,000
    producers of 1e9 rows), and even then two rows would draw equal buckets, never lose or repeat a row.
    """
    h = int.from_bytes(hashlib.sha256(b"activation-shuffler scatter producer\0" + producer.encode()).digest()[:8], "little")
    return mix64(stream_key(seed) ^ mix64(h ^ _PRODUCER_TAG))


def permutation(n: int, key: int) -> np.ndarray:
    """A uniform random permutation of range(n) keyed by `key`. [n] int64.

    Sorts n keys splitmix64(key + i * golden): splitmix64 is a bijection on uint64, so the keys are distinct,
    the sort's result does not depend on its algorithm, and the order is exactly reproducible on any machine
    and numpy version. Peak memory: 16 bytes per element (the keys, then the result).
    """
    with np.errstate(over="ignore"):
        counters = np.arange(n, dtype=np.uint64) * np.uint64(GOLDEN) + np.uint64(key)
    sort_keys = splitmix64(counters)
    del counters
    return np.argsort(sort_keys)


def bucket_permutation(seed: int, path: tuple[int, ...]) -> int:
    """Key of the permutation of shuffle bucket `path` ((b,) at the top level, (b, j) when recursed)."""
    return mix_key(seed, TAG_PERMUTE, len(path), *path)


def normals(key: int, counters: np.ndarray) -> np.ndarray:
    """Standard normal draws, one per uint64 counter, by Box-Muller on draws 2c and 2c + 1. float64, same shape.

    Uniforms take the top 53 bits of splitmix64(counter ^ key) (the float64 mantissa).
    """
    ctr = np.asarray(counters, dtype=np.uint64) * np.uint64(2)
    with np.errstate(over="ignore"):
        u1 = (splitmix64(ctr ^ np.uint64(key)) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        u2 = (splitmix64((ctr + np.uint64(1)) ^ np.uint64(key)) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)

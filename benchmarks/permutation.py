"""The shuffle's in-bucket permutation (shuffler.keys.permutation) against numpy's Generator.permutation.

keys.permutation sorts SplitMix64 keys, so its order is the same on every machine and numpy release
(tests/test_keys.py pins it); numpy promises no such stability for Generator.permutation (NEP 19). This prints
what that costs per bucket, in one run:

    python benchmarks/permutation.py            # buckets of 0.2M and 1.4M rows (1.4M x 1,536 B = 2 GiB)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from shuffler.keys import permutation


def best_of(f, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="200000,1400000", help="bucket sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one small size")
    args = ap.parse_args()
    sizes = [100_000] if args.quick else [int(x) for x in args.rows.split(",")]
    for n in sizes:
        ours = best_of(lambda n=n: permutation(n, 7), args.repeat)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([0, 1])))
        theirs = best_of(lambda n=n, rng=rng: rng.permutation(n), args.repeat)
        print(f"rows {n:>10,}: keys.permutation {ours * 1e3:6.1f} ms, numpy Generator.permutation "
              f"{theirs * 1e3:6.1f} ms, ratio {ours / theirs:.2f}; bucket of {n * 1536 / 2**30:.2f} GiB at 1,536 B/row")


if __name__ == "__main__":
    main()

"""`shuffler shuffle --from-scatter URL DST`: pass 2 only, over the intermediates producers already wrote.

    shuffle_from_scatter("s3://b/acts", "s3://b/shuffled", memory="16GiB")

A scattered dataset (shuffler/shuffling/on_write.py) is pass 1's output, written while capturing. This runs the
shuffle's own Run (shuffler/shuffling/run.py) on it with `scattered=`: the same reduce tasks
(shuffler/shuffling/reduce.py: one bucket at a time, permuted in memory, re-shuffled recursively when a bucket
is larger than the budget), the same lock, resume after kill -9, fingerprint check and manifest-last commit.
Only where the bucket chunks come from differs, and the bucket count, which the producers fixed.
"""

from __future__ import annotations

from shuffler.format.manifest import Manifest
from shuffler.shuffling.on_write import ScatteredDataset
from shuffler.shuffling.run import OPTIONS, Run, ShuffleConfig, check_options

#: ShuffleConfig fields that do not apply here: the producers fixed the buckets and wrote the runs, the one
#: scatter level there is (so no `levels`: docs/shuffle.md, "Two levels").
FIXED = ("buckets", "map_rows", "keep_intermediate", "levels")


def shuffle_from_scatter(
    url: str, dst: str, *, seed: int | None = None, progress: bool | None = None, stats: dict | None = None,
    **options,
) -> Manifest:
    """Write a uniformly shuffled copy of the scattered dataset `url` to `dst`, running pass 2 only.

    `seed` keys the in-bucket permutations; None uses the scatter seed (any seed is as good: the bucket draws
    were made at write time). The bucket count is the one the producers used. `options` are those of
    shuffler.shuffle but buckets, map_rows, keep_intermediate and levels: executor="ray" runs the reduce tasks as Ray
    tasks (same bytes as "local"), so `url`, `dst` and `scratch` must be URLs every Ray worker can reach.
    NotScatteredError (a ValueError) if `url` was not written with a ScatterSpec.
    """
    check_options("shuffle_from_scatter()", options, [k for k in OPTIONS if k not in FIXED])
    scattered = ScatteredDataset.open(url)
    spec = scattered.spec
    cfg = ShuffleConfig(seed=spec.seed if seed is None else seed, buckets=spec.buckets, **options)
    run = Run([url], dst, cfg, progress=progress, scattered=scattered)
    try:
        return run.execute()
    finally:
        if stats is not None:
            stats.update(run.stats)

"""`shuffler shuffle --from-scatter URL DST`: pass 2 only, over the intermediates producers already wrote.

    shuffle_from_scatter("s3://b/acts", "s3://b/shuffled", memory="16GiB")

A scattered dataset (shuffler/shuffling/on_write.py) is pass 1's output, written while capturing. This runs the
shuffle's own pass 2 on it: the same reduce tasks (permute.py: one bucket at a time, permuted in memory,
re-shuffled recursively when a bucket is larger than the budget), the same lock, resume after kill -9,
fingerprint check and manifest-last commit (shuffle.py). Only where the bucket chunks come from differs.
"""

from __future__ import annotations

import hashlib
import json

from shuffler.errors import FormatError
from shuffler.format.manifest import Manifest
from shuffler.io.rolling import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES
from shuffler.shuffling.map import MapOutput
from shuffler.shuffling.on_write import ScatteredDataset
from shuffler.shuffling.plan import DEFAULT_MEMORY
from shuffler.shuffling.reduce import Intermediates
from shuffler.shuffling.run import ShuffleConfig, _Run
from shuffler.units import parse_size


class _FromScatterRun(_Run):
    """A shuffle run whose pass 1 was done by the producers."""

    def __init__(self, url: str, dst: str, cfg: ShuffleConfig, progress: bool | None, scattered: ScatteredDataset):
        super().__init__([url], dst, cfg, progress)
        self.scattered = scattered
        # Another identity than a two-pass shuffle of the same data (which is possible too: scattered data is
        # also an ordinary dataset), so neither run mistakes the other's state or output for its own.
        self.identity["from_scatter"] = scattered.spec.to_json()
        self.run_id = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.scratch = f"{self.scratch_base}/run-{self.run_id}"  # only recursion into oversize buckets uses it
        self.stats["from_scatter"] = True

    def _pass1(self, pool, map_rows: int) -> list[MapOutput]:
        return []  # the producers wrote pass 1's output while they captured

    def _uncommit_damaged(self, e: FormatError) -> FormatError:
        return e  # the runs are the producers' data: a damaged one is named, never deleted to be redone

    def _intermediates(self, maps: list[MapOutput]) -> Intermediates | ScatteredDataset:
        return self.scattered  # .table(b): bucket b's chunks from every producer's runs


def shuffle_from_scatter(
    url: str,
    dst: str,
    *,
    seed: int | None = None,
    memory: int | str | None = None,
    workers: int | None = None,
    scratch: str | None = None,
    scratch_level: int | None = None,
    overwrite: bool = False,
    break_lock: bool = False,
    level: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    executor: str = "local",
    ray_address: str | None = None,
    progress: bool | None = None,
    stats: dict | None = None,
) -> Manifest:
    """Write a uniformly shuffled copy of the scattered dataset `url` to `dst`, running pass 2 only.

    `seed` keys the in-bucket permutations; None uses the scatter seed (any seed is as good: the bucket draws
    were made at write time). The bucket count is the one the producers used. Other options are those of
    shuffler.shuffle: executor="ray" runs the reduce tasks as Ray tasks (same bytes as "local"), so `url`,
    `dst` and `scratch` must be URLs every Ray worker can reach. NotScatteredError (a ValueError) if `url`
    was not written with a ScatterSpec.
    """
    scattered = ScatteredDataset.open(url)
    spec = scattered.spec
    cfg = ShuffleConfig(
        seed=spec.seed if seed is None else seed, memory=parse_size(memory, what="memory") if memory is not None else DEFAULT_MEMORY,
        buckets=spec.buckets, workers=workers, scratch=scratch, scratch_level=scratch_level, overwrite=overwrite,
        break_lock=break_lock, level=level, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes, executor=executor,
        ray_address=ray_address,
    )
    run = _FromScatterRun(url, dst, cfg, progress, scattered)
    try:
        return run.execute()
    finally:
        if stats is not None:
            stats.update(run.stats)

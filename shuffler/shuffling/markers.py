"""Where a shuffle keeps its state beside DST, and the commit markers of its tasks.

    .shuffle/lock                 who runs now (first writer wins: Storage.put_if_absent)
    .shuffle/run.json             what this run is: seed, sources and their fingerprints, plan; a re-run must match
    .shuffle/reduce/b-000012.json bucket 12 committed: its output shards and fingerprint
    .shuffle/reduce/b-000012.0003.json  two levels: sub-bucket 3 of super-bucket 12 committed
    .shuffle/scratch/run-<id>/    default scratch: map-000003.shard (intermediate) + map-000003.idx (its commit)

A marker is written after the objects it commits and carries a CRC of its own fields, so a damaged marker
commits nothing and the task is redone (tasks are deterministic: redoing one rewrites the same bytes).
Two copies of one task may race (array-job retries run beside the attempt they replace): both write the
same bytes under the same names, each object replaced whole by an atomic rename or PUT, so the result is
the same whichever lands last. The lock and plan.json, whose writers could differ, are first-writer-wins.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable

from shuffler.errors import FormatError
from shuffler.format.manifest import Fingerprint, ShardInfo
from shuffler.storage.storage import Storage

STATE = ".shuffle"
LOCK = f"{STATE}/lock"
RUN = f"{STATE}/run.json"
REDUCE_DONE = f"{STATE}/reduce"
DEFAULT_SCRATCH = f"{STATE}/scratch"
PLAN = f"{STATE}/plan.json"
"""Array-job mode: the plan the `plan` stage fixed, which every later stage and task reads (array_job.py)."""


def crc(obj: dict) -> int:
    """CRC-32 of a marker's fields other than "crc", in canonical JSON."""
    return zlib.crc32(json.dumps({k: v for k, v in obj.items() if k != "crc"}, sort_keys=True).encode())


Path = tuple[int, ...]
"""A bucket's path: (b,) at the top level, (b, j) for sub-bucket j of super-bucket b (reduce.shard_name)."""


def _path(b: int | Path) -> Path:
    return (b,) if isinstance(b, int) else tuple(b)


def reduce_marker(b: int | Path) -> str:
    """Name (under DST) of bucket b's commit marker; b is a bucket number or a path (b, j)."""
    p = _path(b)
    return f"{REDUCE_DONE}/b-{p[0]:06d}" + "".join(f".{q:04d}" for q in p[1:]) + ".json"


def reduce_marker_bytes(b: int | Path, shards: list[ShardInfo], fp: Fingerprint) -> bytes:
    """The commit marker of bucket b (a number or a path): its output shards and their fingerprint, with a CRC."""
    marker = {"bucket": list(_path(b)), "shards": [s.__dict__ for s in shards], "fingerprint": fp.to_json()}
    marker["crc"] = crc(marker)
    return json.dumps(marker).encode()


def read_reduce_marker(data: bytes, b: int | Path) -> tuple[list[ShardInfo], Fingerprint] | None:
    """Bucket b's commit marker, or None if it is damaged (then the bucket is redone, rewriting the same bytes)."""
    try:
        m = json.loads(data)
        if m["crc"] != crc(m) or m["bucket"] != list(_path(b)):
            return None
        return [ShardInfo(**s) for s in m["shards"]], Fingerprint.from_json(m["fingerprint"], where="marker")
    except (ValueError, TypeError, KeyError, FormatError):
        return None


def committed_paths(dst: Storage, paths: list[Path]) -> dict[Path, tuple[list[ShardInfo], Fingerprint]]:
    """Every bucket of `paths` whose marker is intact and whose shards all exist at DST (one LIST)."""
    present = set(dst.list(""))
    out: dict[Path, tuple[list[ShardInfo], Fingerprint]] = {}
    for p in paths:
        name = reduce_marker(p)
        got = read_reduce_marker(dst.read(name), p) if name in present else None
        if got is not None and all(s.name in present for s in got[0]):
            out[p] = got
    return out


def parse_reduce_marker_name(name: str) -> int | None:
    """b for a name ".shuffle/reduce/b-<b>.json", else None."""
    prefix = REDUCE_DONE + "/b-"
    if name.startswith(prefix) and name.endswith(".json") and name[len(prefix) : -5].isdigit():
        return int(name[len(prefix) : -5])
    return None


def committed_reduces(dst: Storage, buckets: int, *, only: Callable[[int], bool] | None = None
                      ) -> dict[int, tuple[list[ShardInfo], Fingerprint]]:
    """Every bucket (that `only` selects) whose marker is intact and whose shards all exist at DST."""
    present = set(dst.list(""))
    out: dict[int, tuple[list[ShardInfo], Fingerprint]] = {}
    for name in present:
        b = parse_reduce_marker_name(name)
        if b is None or b >= buckets or (only is not None and not only(b)):
            continue
        got = read_reduce_marker(dst.read(name), b)
        if got is not None and all(s.name in present for s in got[0]):
            out[b] = got
    return out


"""`shuffler verify SRC... DST`: evidence that DST holds exactly the rows of SRC, in any order.

Default checks, cheapest first: the schemas agree; every chunk of DST decodes and matches its checksum; the
fingerprint of the rows read from DST equals DST's manifest; DST's row count and fingerprint equal the sum of
the sources' (the fingerprint sums 128-bit row hashes lane by lane, so it ignores order). `full=True` also reads
every SRC chunk and compares the sorted per-row hashes, which names how many rows are missing or extra,
where a fingerprint mismatch only says that something differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from shuffler.errors import FormatError
from shuffler.format.codec import ROW_HASH, row_hash_sum_v1
from shuffler.format.manifest import Fingerprint, write_manifest
from shuffler.io.dataset import Damage, Dataset


@dataclass(frozen=True)
class Scan:
    """What reading every chunk of one dataset found."""

    url: str
    damage: tuple[Damage, ...]
    fingerprint: Fingerprint
    """Of the rows that could be read."""
    hashes: np.ndarray | None = None
    """[rows] ROW_HASH (128-bit) per-row hashes, when asked for."""


@dataclass(frozen=True)
class VerifyReport:
    """The verdict: `ok`, and one line per difference in `problems`."""

    src_urls: tuple[str, ...]
    dst_url: str
    src_rows: int
    dst_rows: int
    src_fingerprint: Fingerprint
    dst_fingerprint: Fingerprint
    full: bool
    missing_rows: int | None = None
    """(full) SRC rows with no equal row in DST, counting multiplicity."""
    extra_rows: int | None = None
    """(full) DST rows with no equal row in SRC, counting multiplicity."""
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "ok": self.ok, "src": list(self.src_urls), "dst": self.dst_url, "src_rows": self.src_rows,
            "dst_rows": self.dst_rows, "src_fingerprint": self.src_fingerprint.to_json(),
            "dst_fingerprint": self.dst_fingerprint.to_json(), "full": self.full,
            "missing_rows": self.missing_rows, "extra_rows": self.extra_rows, "problems": list(self.problems),
        }

    def report(self) -> str:
        if self.ok:
            how = "sorted row hashes, " if self.full else ""
            return (f"OK: {self.dst_url} is a permutation of {', '.join(self.src_urls)}: {self.dst_rows:,} rows; "
                    f"{how}every chunk checksum and the fingerprint {self.dst_fingerprint} match")
        return "\n".join([f"FAILED: {self.dst_url} vs {', '.join(self.src_urls)}"] + [f"  {p}" for p in self.problems])


def scan(ds: Dataset, *, hashes: bool = False, threads: int = 4,
         progress: Callable[[int, int], None] | None = None) -> Scan:
    """Read every chunk of `ds` (shards on `threads` threads): damage found, fingerprint, optional row hashes."""
    def one(i: int) -> tuple[list[Damage], Fingerprint, list[np.ndarray]]:
        return ds.check_shard(i, keep_hashes=hashes, progress=progress)

    damage: list[Damage] = []
    fp = Fingerprint()
    parts: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for d, f, h in pool.map(one, range(len(ds.shards))):
            damage.extend(d)
            fp = fp + f
            parts.extend(h)
    all_hashes = (np.concatenate(parts) if parts else np.zeros(0, ROW_HASH)) if hashes else None
    return Scan(ds.url, tuple(damage), fp, all_hashes)


def multiset_difference(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(elements of a not matched in b, elements of b not matched in a), counting repeats."""
    ua, ca = np.unique(a, return_counts=True)
    ub, cb = np.unique(b, return_counts=True)
    _, ia, ib = np.intersect1d(ua, ub, assume_unique=True, return_indices=True)
    matched = int(np.minimum(ca[ia], cb[ib]).sum())
    return len(a) - matched, len(b) - matched


def verify(src: str | Sequence[str], dst: str, *, full: bool = False,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check that DST is a permutation of the concatenated SRC datasets. Never raises for differences found:
    they go in the report (missing datasets still raise DatasetNotFoundError)."""
    srcs = [Dataset.open(u) for u in ([src] if isinstance(src, str) else list(src))]
    if not srcs:
        raise ValueError("verify needs at least one SRC dataset")
    out = Dataset.open(dst)
    try:
        return _verify(srcs, out, full, progress)
    finally:
        for d in (*srcs, out):
            d.close()  # unmap the local shards now, not when garbage collected


def _verify(srcs: list[Dataset], out: Dataset, full: bool, progress) -> VerifyReport:
    problems = []
    for d in (*srcs, out):
        d.manifest.fingerprint.require_current(d.url)  # a version-1 fingerprint is no evidence
    for s in srcs:
        if s.schema != out.schema:
            problems.append(f"schema of {s.url} differs from DST's: {s.schema.describe_difference(out.schema)}")
    src_rows = sum(s.num_rows for s in srcs)
    src_fp = sum((s.manifest.fingerprint for s in srcs), Fingerprint())
    dst_fp = out.manifest.fingerprint
    if out.num_rows != src_rows:
        problems.append(f"row count: DST has {out.num_rows:,} rows, SRC {src_rows:,}")
    if dst_fp != src_fp:
        problems.append(f"fingerprint: DST manifest says {dst_fp}, SRC manifests sum to {src_fp}")
    dscan = scan(out, hashes=full, progress=progress)
    for d in dscan.damage:
        problems.append(f"DST damaged: {d}")
    if not dscan.damage and dscan.fingerprint != dst_fp:
        problems.append(f"DST rows read fingerprint {dscan.fingerprint}, its manifest says {dst_fp} "
                        "(shards replaced or edited behind the manifest)")
    missing = extra = None
    if full:
        scans = [scan(s, hashes=True, progress=progress) for s in srcs]
        for sc, s in zip(scans, srcs, strict=True):
            problems.extend(f"SRC damaged: {s.url}: {d}" for d in sc.damage)
            if not sc.damage and sc.fingerprint != s.manifest.fingerprint:
                problems.append(f"SRC {s.url} rows read fingerprint {sc.fingerprint}, its manifest says "
                                f"{s.manifest.fingerprint}")
        src_h = np.concatenate([sc.hashes for sc in scans]) if scans else np.zeros(0, ROW_HASH)
        missing, extra = multiset_difference(src_h, dscan.hashes)
        if missing or extra:
            problems.append(f"rows: {missing:,} SRC row(s) are missing from DST and {extra:,} DST row(s) are not in "
                            "SRC (compared by sorted 128-bit row hashes)")
    return VerifyReport(
        src_urls=tuple(s.url for s in srcs), dst_url=out.url, src_rows=src_rows, dst_rows=out.num_rows,
        src_fingerprint=src_fp, dst_fingerprint=dst_fp, full=full, missing_rows=missing, extra_rows=extra,
        problems=tuple(problems),
    )


def rehash(url: str, *, progress: Callable[[int, int], None] | None = None) -> tuple[Fingerprint, Fingerprint]:
    """Give the dataset at `url` a fingerprint of the current row-hash version; returns (old, new).

    Reads every chunk (checksums checked) and rewrites the manifest atomically, keeping the old fingerprint in
    metadata "rehashed_from" (so stream states and checkpoints saved before still resume: Manifest.names).
    Refuses (FormatError, nothing written) if a chunk is damaged, if the rows do not give the old version-1
    fingerprint, or if a current-version fingerprint differs from the rows (evidence of tampering, which a
    rehash must not erase: `inspect --check` and `verify` report it).
    """
    ds = Dataset.open(url)
    try:
        old, schema = ds.manifest.fingerprint, ds.schema
        v1_sum = 0

        def add_v1(b) -> None:  # the old sum, from the same read as the new fingerprint
            nonlocal v1_sum
            cols = [b.columns[n] for n in schema.column_names]
            v1_sum = (v1_sum + row_hash_sum_v1(schema, b.acts, cols)) & ((1 << 64) - 1)

        damage, new = ds.check(progress=progress, visit=add_v1 if old.version == 1 else None)
        if damage:
            raise FormatError(f"{url}: {len(damage)} damaged shard(s) or chunk(s), nothing rewritten: "
                              + "; ".join(map(str, damage[:5])))
        if old.version == 1 and Fingerprint(new.rows, v1_sum, 1) != old:
            raise FormatError(f"{url}: its rows give the version-1 fingerprint {Fingerprint(new.rows, v1_sum, 1)}, "
                              f"its manifest says {old}: the data changed behind the manifest; nothing rewritten")
        if old.version != 1:
            if new != old:
                raise FormatError(f"{url}: its rows give fingerprint {new}, its manifest says {old}: the data "
                                  "changed behind the manifest (`shuffler inspect --check` names how); nothing rewritten")
            return old, new
        meta = dict(ds.manifest.metadata, rehashed_from=old.to_json())
        write_manifest(ds.store, dataclasses.replace(ds.manifest, fingerprint=new, metadata=meta))
        return old, new
    finally:
        ds.close()


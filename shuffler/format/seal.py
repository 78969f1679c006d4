"""`shuffler seal`: join the part manifests of many producers into one dataset manifest."""

from __future__ import annotations

from shuffler.errors import SchemaError
from shuffler.format.manifest import MANIFEST, PARTS, Fingerprint, Manifest, read_manifest, write_manifest
from shuffler.storage.storage import Storage


class UnfinishedPartError(RuntimeError):
    """A producer started writing a part and has not finished it (still running, or killed)."""


def seal(url: str, *, allow_empty: bool = False) -> Manifest:
    """Check every part and write manifest.json (last, atomically). Refuses unfinished or disagreeing parts."""
    store = Storage(url)
    if store.exists(MANIFEST):
        raise FileExistsError(f"{store.url} is already sealed: {MANIFEST} exists")
    names = store.list(PARTS)
    started = {n[len(PARTS) + 1 : -len(".started")] for n in names if n.endswith(".started")}
    finished = {n[len(PARTS) + 1 : -len(".json")] for n in names if n.endswith(".json")}
    unfinished = sorted(started - finished)
    if unfinished:
        raise UnfinishedPartError(
            f"{store.url}: {len(unfinished)} part(s) started but not finished: "
            + ", ".join(f"{PARTS}/{p} (no {PARTS}/{p}.json)" for p in unfinished)
            + "; wait for those producers, or delete their objects if they died"
        )
    if not finished and not allow_empty:
        raise FileNotFoundError(f"{store.url}: no part manifests under {PARTS}/ to seal")
    parts = [(p, read_manifest(store, f"{PARTS}/{p}.json")) for p in sorted(finished)]
    first_name, first = parts[0]
    shards, fp = [], Fingerprint(version=first.fingerprint.version)
    for p, m in parts:
        if m.schema != first.schema:
            raise SchemaError(
                f"{store.url}: part {p!r} disagrees with part {first_name!r}: {m.schema.describe_difference(first.schema)}"
            )
        if m.metadata.get("scatter") != first.metadata.get("scatter"):
            # Scattered parts must agree on seed and buckets, or pass 2 would mix two bucketings.
            raise SchemaError(
                f"{store.url}: part {p!r} was written with scatter={m.metadata.get('scatter')}, part {first_name!r} "
                f"with scatter={first.metadata.get('scatter')}; all producers of one dataset must use the same "
                "ScatterSpec (or none)"
            )
        if m.fingerprint.version != first.fingerprint.version:
            raise SchemaError(
                f"{store.url}: part {p!r} has a row-hash version {m.fingerprint.version} fingerprint, part "
                f"{first_name!r} version {first.fingerprint.version}; a dataset's parts must share one version: "
                "rewrite the older producers' parts with this version (or seal everything with the older version, "
                "then `shuffler inspect --rehash` the dataset)"
            )
        shards.extend(m.shards)
        fp = fp + m.fingerprint
    present = {n: True for n in store.list("")}
    missing = [s.name for s in shards if s.name not in present]
    if missing:
        raise FileNotFoundError(f"{store.url}: part manifests name shards that are missing: {missing[:5]}")
    common = {k: v for k, v in first.metadata.items() if all(m.metadata.get(k) == v for _, m in parts)}
    common.pop("producer", None)
    meta = dict(common, producers=[p for p, _ in parts])
    manifest = Manifest(schema=first.schema, shards=tuple(shards), fingerprint=fp, metadata=meta)
    write_manifest(store, manifest)
    # A producer that started after the listing above is not in the manifest: say so rather than let its
    # rows be left out silently (its own close() says so too, if it finishes after this commit).
    late = sorted({n[len(PARTS) + 1 : -len(".started")] for n in store.list(PARTS) if n.endswith(".started")}
                  - {p for p, _ in parts})
    if late:
        raise UnfinishedPartError(
            f"{store.url}: sealed {len(parts)} part(s), but "
            + ", ".join(f"{PARTS}/{p}" for p in late)
            + f" started during the seal and are not in the dataset; when they finish, delete {MANIFEST} and "
            "seal again"
        )
    return manifest

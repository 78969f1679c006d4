"""The dataset manifest: written last, atomically. No manifest, no dataset (docs/format.md, "Manifest")."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from shuffler.errors import DatasetNotFoundError, FormatError
from shuffler.format.schema import Schema
from shuffler.format.shard import VERSION
from shuffler.storage.storage import Storage

MANIFEST = "manifest.json"
PARTS = "parts"  # producers' part manifests and started-markers live under this prefix
FORMAT_NAME = "activation-shuffler"
MAX_MANIFEST_BYTES = 256 << 20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$")


def check_object_name(name: object, *, where: str) -> str:
    """Refuse names that could point outside the dataset: '..', absolute paths, URL schemes, odd characters."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or any(p in ("..", ".") for p in name.split("/")):
        raise FormatError(
            f"{where}: object name {name!r} is not a plain relative name inside the dataset "
            "(letters, digits, '_.=-', '/'; no '..', no absolute path, no scheme)"
        )
    return name


@dataclass(frozen=True)
class Fingerprint:
    """Order-independent content fingerprint: row count and, lane by lane, the sum mod 2^64 of the rows' 128-bit
    hashes (format/codec.py: row_hashes, version 2), held as one 128-bit int (lane b high).

    Version 1 (datasets written before version 2) summed a 64-bit linear hash that two negated activations of
    one row could leave unchanged; such fingerprints still parse (version=1), and `require_current` refuses
    them wherever a fingerprint is evidence (shuffle, verify), naming `shuffler inspect --rehash`.
    """

    rows: int = 0
    hash_sum: int = 0
    version: int = 2

    def __add__(self, other: Fingerprint) -> Fingerprint:
        if self.version != other.version:
            raise ValueError(f"cannot add fingerprints of row-hash versions {self.version} and {other.version}")
        lo = ((self.hash_sum & _LANE) + (other.hash_sum & _LANE)) & _LANE
        hi = ((self.hash_sum >> 64) + (other.hash_sum >> 64)) & _LANE
        return Fingerprint(self.rows + other.rows, lo | hi << 64, self.version)

    def to_json(self) -> dict:
        if self.version == 1:
            return {"rows": self.rows, "sum": f"{self.hash_sum:016x}"}
        return {"rows": self.rows, "sum": f"{self.hash_sum:032x}", "hash": self.version}

    @classmethod
    def from_json(cls, obj: object, *, where: str) -> Fingerprint:
        try:
            rows, s = obj["rows"], obj["sum"]  # type: ignore[index]
            version = obj.get("hash", 1)  # type: ignore[union-attr]
            if not isinstance(rows, int) or rows < 0 or version not in (1, 2):
                raise ValueError(rows)
            value = int(s, 16)
            if value >> (64 if version == 1 else 128):
                raise ValueError(s)
            return cls(rows, value, version)
        except (TypeError, KeyError, ValueError, AttributeError):
            raise FormatError(f"{where}: fingerprint must be {{'rows': int, 'sum': hex, 'hash': 2}}, got {obj!r}"[:300]) from None

    def require_current(self, where: str) -> Fingerprint:
        """This fingerprint if it is of the current row-hash version; else a FormatError saying how to re-hash."""
        if self.version != 2:
            raise FormatError(
                f"{where}: its fingerprint uses row-hash version {self.version}, which two negated activations of "
                f"one row can leave unchanged, so it proves nothing; run `shuffler inspect --rehash {where}` once "
                "(it reads every chunk and rewrites the manifest's fingerprint), then again"
            )
        return self

    def __str__(self) -> str:
        width = 16 if self.version == 1 else 32
        return f"{self.rows} rows / {self.hash_sum:0{width}x}"


_LANE = (1 << 64) - 1


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """Object name relative to the dataset URL."""
    rows: int
    bytes: int
    """Stored (compressed) size of the object."""
    chunks: int


@dataclass(frozen=True, kw_only=True)
class Manifest:
    schema: Schema
    shards: tuple[ShardInfo, ...]
    fingerprint: Fingerprint
    metadata: dict = field(default_factory=dict)

    def names(self, fp: Fingerprint) -> bool:
        """True if `fp` identifies this content: the current fingerprint, or the one `shuffler inspect --rehash`
        replaced (kept in metadata "rehashed_from"), so states and checkpoints saved before a rehash resume."""
        if fp == self.fingerprint:
            return True
        old = self.metadata.get("rehashed_from")
        try:
            return old is not None and Fingerprint.from_json(old, where="rehashed_from") == fp
        except FormatError:
            return False

    def provenance(self, key: str):
        """metadata[key], else the value every source agrees on through `shuffler shuffle`'s
        "source_metadata" (nested shuffles included), else None. A shuffle keeps its sources' metadata there,
        so a shuffled SAELens import still knows its hook_name and context_size (docs/interop.md)."""
        return provenance(self.metadata, key)

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def stored_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.schema.version,  # 1 unless several fields (docs/format.md, "Several fields")
            **self.schema.to_json(),
            "num_rows": self.num_rows,
            "fingerprint": self.fingerprint.to_json(),
            "shards": [{"name": s.name, "rows": s.rows, "bytes": s.bytes, "chunks": s.chunks} for s in self.shards],
            "metadata": self.metadata,
        }

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1) + "\n").encode()

    @classmethod
    def loads(cls, data: bytes, *, where: str) -> Manifest:
        try:
            obj = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}: not an {FORMAT_NAME} manifest (field 'format' missing or different)")
        version = obj.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
            raise FormatError(f"{where}: format_version {version!r}, this code reads versions 1 to {VERSION}")
        schema = Schema.from_json(obj, where=where)
        if schema.version != version:
            raise FormatError(f"{where}: format_version {version} with {len(schema.field_specs)} activation fields; "
                              f"that many fields are format_version {schema.version}")
        raw_shards = obj.get("shards")
        if not isinstance(raw_shards, list):
            raise FormatError(f"{where}: 'shards' must be a list")
        shards = []
        for i, s in enumerate(raw_shards):
            try:
                info = ShardInfo(
                    name=check_object_name(s["name"], where=f"{where} shard {i}"),
                    rows=s["rows"],
                    bytes=s["bytes"],
                    chunks=s["chunks"],
                )
            except (TypeError, KeyError) as e:
                raise FormatError(f"{where}: shard entry {i} lacks or mistypes a field ({e})") from None
            for k in ("rows", "bytes", "chunks"):
                v = getattr(info, k)
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise FormatError(f"{where}: shard {info.name} has {k}={v!r}; expected an integer >= 0")
            shards.append(info)
        metadata = obj.get("metadata", {})
        if not isinstance(metadata, dict):
            raise FormatError(f"{where}: 'metadata' must be a JSON object, got {type(metadata).__name__}")
        m = cls(
            schema=schema,
            shards=tuple(shards),
            fingerprint=Fingerprint.from_json(obj.get("fingerprint"), where=where),
            metadata=metadata,
        )
        if obj.get("num_rows") != m.num_rows or m.fingerprint.rows != m.num_rows:
            raise FormatError(
                f"{where}: num_rows {obj.get('num_rows')!r} and fingerprint rows {m.fingerprint.rows} must equal "
                f"the shards' row total {m.num_rows}"
            )
        return m


def provenance(metadata: dict, key: str):
    """See Manifest.provenance: the key's value here or agreed by every source, else None."""
    if metadata.get(key) is not None:
        return metadata[key]
    sources = metadata.get("source_metadata")
    if not isinstance(sources, list) or not sources:
        return None
    values = [provenance(m, key) if isinstance(m, dict) else None for m in sources]
    return values[0] if values[0] is not None and all(v == values[0] for v in values) else None


def read_manifest(store: Storage, name: str = MANIFEST) -> Manifest:
    where = store.url_of(name)
    try:
        size = store.size(name)
    except FileNotFoundError:
        raise DatasetNotFoundError(
            f"{store.url}: no {name}, so no committed dataset here (never written, or still being written; "
            "producers writing parts need `shuffler seal`)"
        ) from None
    if size > MAX_MANIFEST_BYTES:
        raise FormatError(f"{where}: {size} bytes is larger than any manifest ({MAX_MANIFEST_BYTES})")
    return Manifest.loads(store.read(name), where=where)


def write_manifest(store: Storage, manifest: Manifest, name: str = MANIFEST) -> None:
    store.write(name, manifest.dumps())


def part_manifest_name(producer: str) -> str:
    return f"{PARTS}/{producer}.json"


def part_marker_name(producer: str) -> str:
    return f"{PARTS}/{producer}.started"

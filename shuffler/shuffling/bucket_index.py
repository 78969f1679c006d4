"""The bucket index: where each bucket's chunks lie in pass 1's intermediates, written once after pass 1.

    write_index(scratch, schema, maps, buckets, run_id=...)  # the scatter task that sees every map task committed
    index = BucketIndex.open(scratch, schema, run_id=..., maps=M, buckets=B)   # a permute task; None if absent
    table = index.table(b)                                   # one small read

Without it, each permute task of an array job reads every intermediate's marker and footer to find its own
buckets' chunks: M x B of metadata per task, 2 TB of GETs for the 1 PB plan with 512 tasks (docs/scale.md,
"Where the design breaks first"). With it, one task reads one index object per bucket it owns, plus one small
`done` object. The index is written once, after the last map task commits, by the scatter task that sees it:

    <scratch>/index/b-00000012.idx   bucket 12's chunks: CHUNK entries whose "obj" is the map task's index
    <scratch>/index/done.json        written last: run id, map split, buckets, CRC; the index counts only then
                                     (with two levels also each super-bucket's rows: second_level.py's tasks)

Concurrent writers write the same bytes under the same names (the map tasks are deterministic), so the race
of two "last" scatter tasks is harmless (shuffler/shuffling/markers.py). An index object that is missing or
damaged makes BucketIndex.table raise DamagedIndex (a FormatError); the permute stage then drops the index
(`discard`) and builds the tables from the footers as before, so a damaged index costs time, never rows.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np

from shuffler.errors import FormatError
from shuffler.format.schema import Schema
from shuffler.io.chunks import CHUNK, ChunkTable, storage
from shuffler.shuffling.map import MapOutput, map_name
from shuffler.shuffling.markers import crc
from shuffler.shuffling.reduce import Intermediates

INDEX = "index"
DONE = f"{INDEX}/done.json"
_MAGIC = b"SHBI"
_HEAD = struct.Struct("<4sIQQ")  # magic, version 1, bucket, entries; then entries x CHUNK, then CRC-32 of all before


class DamagedIndex(FormatError):
    """A bucket index object is missing or damaged: use the intermediates' footers instead."""


def index_name(b: int) -> str:
    """Name (under scratch) of bucket b's index object."""
    return f"{INDEX}/b-{b:08d}.idx"


def encode(b: int, entries: np.ndarray) -> bytes:
    """Bucket b's index object: its CHUNK entries (obj = map task index), in map-task order."""
    body = _HEAD.pack(_MAGIC, 1, b, len(entries)) + entries.astype(CHUNK, copy=False).tobytes()
    return body + struct.pack("<I", zlib.crc32(body))


def decode(data: bytes, b: int, *, where: str, maps: int) -> np.ndarray:
    """The entries of bucket b's index object; DamagedIndex for anything encode() could not have written."""
    if len(data) < _HEAD.size + 4:
        raise DamagedIndex(f"{where}: {len(data)} bytes, too short for a bucket index")
    magic, version, bucket, n = _HEAD.unpack_from(data)
    if magic != _MAGIC or version != 1 or bucket != b:
        raise DamagedIndex(f"{where}: not the version-1 index of bucket {b} (magic {magic!r}, version {version}, "
                          f"bucket {bucket})")
    if len(data) != _HEAD.size + n * CHUNK.itemsize + 4:
        raise DamagedIndex(f"{where}: {len(data)} bytes, but {n} entries need {_HEAD.size + n * CHUNK.itemsize + 4}")
    if struct.unpack_from("<I", data, len(data) - 4)[0] != zlib.crc32(data[:-4]):
        raise DamagedIndex(f"{where}: checksum mismatch (damaged bucket index)")
    entries = np.frombuffer(data, dtype=CHUNK, count=n, offset=_HEAD.size)
    if n and (entries["obj"].min() < 0 or entries["obj"].max() >= maps or np.any(np.diff(entries["obj"]) < 0)):
        raise DamagedIndex(f"{where}: map task indexes outside 0..{maps - 1} or out of order")
    return entries


def write_index(scratch: str, schema: Schema, maps: list[MapOutput], buckets: int, *, run_id: str,
                map_rows: int, bucket_rows: bool = False) -> None:
    """Read every intermediate's footer once and write each bucket's index, then the `done` object (last).
    `maps`: every map task's committed output, 0..M-1. `bucket_rows`: the `done` object also lists each bucket's
    rows (two levels: S super-buckets, a few KiB), so each level-2 task learns every super-bucket's size in one
    small read instead of reading the whole index."""
    assert [o.index for o in sorted(maps, key=lambda o: o.index)] == list(range(len(maps))), "not every map task"
    store = storage(scratch)
    inter = Intermediates(schema, scratch, maps, buckets)
    rows = []
    for b in range(buckets):
        entries = inter.entries(b)
        rows.append(int(entries["rows"].sum()))
        store.write(index_name(b), encode(b, entries))
    doc = {"format": 1, "run_id": run_id, "maps": len(maps), "map_rows": map_rows, "buckets": buckets}
    if bucket_rows:
        doc["rows"] = rows
    doc["crc"] = crc(doc)
    store.write(DONE, json.dumps(doc, sort_keys=True).encode())


def discard(scratch: str) -> None:
    """Forget the index (its `done` object first, so no reader trusts the rest)."""
    storage(scratch).delete(DONE)


class BucketIndex:
    """The tables of a run's buckets, read one small object per bucket (see the module docstring)."""

    def __init__(self, scratch: str, schema: Schema, maps: int, rows: list[int] | None = None):
        self.scratch, self.store, self.schema, self.maps = scratch, storage(scratch), schema, maps
        self.rows = rows
        """Each bucket's rows, when the index was written with bucket_rows=True; else None."""

    @classmethod
    def open(cls, scratch: str, schema: Schema, *, run_id: str, maps: int, map_rows: int, buckets: int
             ) -> BucketIndex | None:
        """The run's index, or None when it is absent, damaged, or another run's or split's."""
        store = storage(scratch)
        try:
            doc = json.loads(store.read(DONE))
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("crc") != crc(doc):
            return None
        key = (doc.get("format"), doc.get("run_id"), doc.get("maps"), doc.get("map_rows"), doc.get("buckets"))
        if key != (1, run_id, maps, map_rows, buckets):
            return None
        rows = doc.get("rows")
        ok = isinstance(rows, list) and len(rows) == buckets and all(isinstance(n, int) and n >= 0 for n in rows)
        return cls(scratch, schema, maps, rows if ok else None)

    def table(self, b: int) -> ChunkTable:
        """Bucket b's chunks from every intermediate, in map-task order (so in global row order). The objects
        it names were committed when the index was written (a missing one surfaces when the task reads it)."""
        name = index_name(b)
        try:
            data = self.store.read(name)
        except FileNotFoundError:
            raise DamagedIndex(f"{self.store.url_of(name)}: missing, though {self.store.url_of(DONE)} exists") from None
        entries = decode(data, b, where=self.store.url_of(name), maps=self.maps).copy()
        used, inverse = np.unique(entries["obj"], return_inverse=True)
        entries["obj"] = inverse
        objects = tuple((self.scratch, map_name(int(m)) + ".shard") for m in used)
        return ChunkTable(self.schema, objects, entries)

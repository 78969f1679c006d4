"""The shard object: header, independent zstd chunks, footer index (byte layout in docs/format.md).

    header   8s magic "ACTSHARD" | u16 version | u16 flags | u32 schema_len | schema JSON (utf-8)
    chunks   one zstd frame each (see codec.py); version 2 (several fields): K frames each, back to back
    index    n_chunks x 24 B: u64 offset | u32 comp_len | u32 raw_len | u32 rows | u32 checksum
             version 2: then n_chunks x K frame entries of the same 24 B, chunk by chunk
    trailer  32 B: u64 index_offset | u32 n_chunks | u32 crc32(index) | u64 rows | 8s magic "ACTSEND1"

All integers little-endian. The index sits at the end so a writer can stream chunks without knowing their
count; a reader fetches the index with one ranged read of the tail and then any chunk with one more.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from shuffler.errors import FormatError
from shuffler.format.codec import combined_checksum, frame_sizes, frame_spans
from shuffler.format.schema import Schema

MAGIC = b"ACTSHARD"
END_MAGIC = b"ACTSEND1"
VERSION = 2
"""Newest shard version: 2 holds several activation fields, one frame each (docs/format.md, "Several fields");
a one-field shard is still written as version 1, byte for byte as before."""
HEADER_FIXED = struct.Struct("<8sHHI")  # 16 bytes
TRAILER = struct.Struct("<QIIQ8s")  # 32 bytes
ENTRY = np.dtype([("offset", "<u8"), ("comp_len", "<u4"), ("raw_len", "<u4"), ("rows", "<u4"), ("checksum", "<u4")])
assert ENTRY.itemsize == 24 and HEADER_FIXED.size == 16 and TRAILER.size == 32
MAX_SCHEMA_BYTES = 1 << 20
MAX_CHUNK_RAW = (1 << 32) - 1


def encode_header(schema: Schema, level: int, extra: dict | None = None) -> bytes:
    body = dict(schema.to_json(), level=level, **(extra or {}))
    js = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return HEADER_FIXED.pack(MAGIC, schema.version, 0, len(js)) + js


def decode_header(data: bytes, *, where: str) -> tuple[Schema, dict, int]:
    """Parse a shard header from the first bytes of an object. Returns (schema, header json, header length)."""
    if len(data) < HEADER_FIXED.size:
        raise FormatError(f"{where}: {len(data)} bytes is too short for a shard header ({HEADER_FIXED.size})")
    magic, version, _flags, n = HEADER_FIXED.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"{where}: bad magic {magic!r}, expected {MAGIC!r}: not a shard")
    if not 1 <= version <= VERSION:
        raise FormatError(f"{where}: shard format version {version}, this code reads versions 1 to {VERSION}")
    if n > MAX_SCHEMA_BYTES or HEADER_FIXED.size + n > len(data):
        raise FormatError(f"{where}: header claims a {n}-byte schema, object has {len(data) - 16} bytes left")
    try:
        body = json.loads(bytes(data[16 : 16 + n]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: header schema is not JSON ({e})") from None
    schema = Schema.from_json(body, where=where)
    if schema.version != version:
        raise FormatError(f"{where}: a version-{version} header holds {len(schema.field_specs)} activation fields, "
                          f"which version {schema.version} stores")
    return schema, body, HEADER_FIXED.size + n


@dataclass(frozen=True)
class ShardIndex:
    """A shard's parsed footer: one entry per chunk."""

    entries: np.ndarray  # structured [n_chunks] of ENTRY
    rows: int
    index_offset: int
    frames: np.ndarray | None = None
    """Version 2: [n_chunks, frames_per_chunk] ENTRY, each field's frame (then the columns'), so a reader can
    fetch and decode only the fields it wants; None for version 1 (the chunk entry is its one frame)."""

    @property
    def n_chunks(self) -> int:
        return len(self.entries)

    def row_starts(self) -> np.ndarray:
        """First row of each chunk within the shard. [n_chunks + 1] int64."""
        return np.concatenate([[0], np.cumsum(self.entries["rows"], dtype=np.int64)])


def encode_footer(entries: list[tuple[int, int, int, int, int]], index_offset: int,
                  frames: list[tuple[int, int, int, int, int]] | None = None) -> bytes:
    arr = np.array(entries, dtype=ENTRY) if entries else np.zeros(0, dtype=ENTRY)
    blob = arr.tobytes() + (np.array(frames, dtype=ENTRY).tobytes() if frames else b"")
    rows = int(arr["rows"].sum()) if len(arr) else 0
    return blob + TRAILER.pack(index_offset, len(arr), zlib.crc32(blob), rows, END_MAGIC)


def decode_footer(tail: bytes, object_size: int, schema: Schema, *, where: str) -> ShardIndex:
    """Parse the index from the object's last bytes (at least the trailer; ideally index plus trailer)."""
    if len(tail) < TRAILER.size or object_size < HEADER_FIXED.size + TRAILER.size:
        raise FormatError(f"{where}: {object_size} bytes is too short for a shard (truncated?)")
    index_offset, n, crc, rows, magic = TRAILER.unpack_from(tail, len(tail) - TRAILER.size)
    if magic != END_MAGIC:
        raise FormatError(f"{where}: bad trailer magic {magic!r}, expected {END_MAGIC!r}: truncated or damaged")
    per = 1 + schema.frames_per_chunk if schema.multi else 1
    index_len = n * per * ENTRY.itemsize
    if index_offset + index_len + TRAILER.size != object_size:
        raise FormatError(
            f"{where}: trailer says {n} chunks indexed at byte {index_offset}, which does not end at the object "
            f"size {object_size}: truncated or damaged"
        )
    if len(tail) < index_len + TRAILER.size:
        raise FormatError(f"{where}: internal: tail of {len(tail)} bytes lacks the {index_len}-byte index")
    blob = bytes(tail[len(tail) - TRAILER.size - index_len : len(tail) - TRAILER.size])
    if zlib.crc32(blob) != crc:
        raise FormatError(f"{where}: shard index checksum mismatch: footer damaged")
    entries = np.frombuffer(blob, dtype=ENTRY, count=n)
    if int(entries["rows"].sum()) != rows:
        raise FormatError(f"{where}: index rows sum to {int(entries['rows'].sum())}, trailer says {rows}")
    ends = entries["offset"] + entries["comp_len"]
    if n and (
        entries["offset"][0] < HEADER_FIXED.size
        or (entries["offset"][1:] < ends[:-1]).any()
        or ends[-1] > index_offset
    ):
        raise FormatError(f"{where}: chunk offsets overlap or run outside the data area")
    bad = np.nonzero(entries["raw_len"].astype(np.int64) != entries["rows"].astype(np.int64) * schema.row_bytes)[0]
    if len(bad):
        j = int(bad[0])
        raise FormatError(
            f"{where}: chunk {j} claims {entries['raw_len'][j]} uncompressed bytes for {entries['rows'][j]} rows "
            f"of {schema.row_bytes} B"
        )
    frames = None
    if schema.multi:
        frames = np.frombuffer(blob, dtype=ENTRY, offset=n * ENTRY.itemsize).reshape(n, per - 1)
        _check_frames(entries, frames, schema, where=where)
    return ShardIndex(entries=entries, rows=int(rows), index_offset=int(index_offset), frames=frames)


def _check_frames(entries: np.ndarray, frames: np.ndarray, schema: Schema, *, where: str) -> None:
    """A version-2 index's frame entries must tile their chunk, in order, with the sizes the schema gives."""
    if not len(entries):
        return
    f = frames
    ends = f["offset"] + f["comp_len"]
    sizes = np.array([frame_sizes(schema, 1)], dtype=np.int64)  # [1, K] bytes per row
    ok = (
        (f["offset"][:, 0] == entries["offset"]).all()
        and (f["offset"][:, 1:] == ends[:, :-1]).all()
        and (ends[:, -1] == entries["offset"] + entries["comp_len"]).all()
        and (f["rows"] == entries["rows"][:, None]).all()
        and (f["raw_len"].astype(np.int64) == entries["rows"].astype(np.int64)[:, None] * sizes).all()
    )
    if not ok:
        raise FormatError(f"{where}: the index's frame entries do not tile their chunks as the schema needs")
    for j in range(len(entries)):
        if combined_checksum(f["checksum"][j].tolist()) != int(entries["checksum"][j]):
            raise FormatError(f"{where}: chunk {j}'s frame checksums do not match its entry: footer damaged")


class ShardSink:
    """Writes one shard into an open binary file: header now, chunks as they come, index on finish()."""

    def __init__(self, f, schema: Schema, level: int, extra: dict | None = None):
        self.f = f
        self.schema = schema
        header = encode_header(schema, level, extra)
        f.write(header)
        self.pos = len(header)
        self.entries: list[tuple[int, int, int, int, int]] = []
        self.frames: list[tuple[int, int, int, int, int]] = []
        self.rows = 0

    def add(self, frame: bytes, rows: int, checksum: int) -> None:
        raw_len = rows * self.schema.row_bytes
        assert raw_len <= MAX_CHUNK_RAW, "chunk too large for the index"
        self.f.write(frame)
        self.entries.append((self.pos, len(frame), raw_len, rows, checksum))
        if self.schema.multi:  # each field's frame in the index, so a reader can fetch only the fields it wants
            mv = memoryview(frame)
            for (a, b), size in zip(frame_spans(mv, where="encoded chunk"), frame_sizes(self.schema, rows), strict=True):
                self.frames.append((self.pos + a, b - a, size, rows, int.from_bytes(mv[b - 4 : b], "little")))
        self.pos += len(frame)
        self.rows += rows

    def finish(self) -> int:
        """Write the index and trailer. Returns the object's total size in bytes."""
        footer = encode_footer(self.entries, self.pos, self.frames)
        self.f.write(footer)
        self.pos += len(footer)
        return self.pos


def tail_bytes(n_chunks: int | None, schema: Schema | None = None) -> int:
    """How many bytes from the end to fetch to get the whole index in one read (with a version-2 schema, the
    frame entries too)."""
    per = 1 + schema.frames_per_chunk if schema is not None and schema.multi else 1
    return (n_chunks or 0) * per * ENTRY.itemsize + TRAILER.size

"""Chunk codec: byte-plane split plus one zstd frame, and the per-row hash behind dataset fingerprints.

A chunk's uncompressed bytes are the activation byte planes (byte 0 of every element, then byte 1, ...)
followed by each provenance column's raw little-endian values, in schema order (docs/format.md).
On real activations the split lifts zstd-1 from 1.270x to 1.454x for bfloat16 and from 1.081x to 1.168x
for float16, within 2.5% of the order-0 entropy bound; higher levels gain nothing and cost 2-10x
(docs/benchmarks.md, "Measurements behind the design"). The frame carries zstd's own content checksum (low 32 bits of
XXH64 of the uncompressed bytes), so verifying a chunk costs nothing beyond decoding it.

With several activation fields (docs/format.md, "Several fields") a chunk is one such frame per field (its
byte planes) and one for the columns, back to back, so a reader can fetch and decode only some fields; in
memory such rows are packed bytes (Schema.row_dtype), every field of a row together.
"""

from __future__ import annotations

import threading
import zlib

import numpy as np
import zstandard

from shuffler.errors import ChecksumError, FormatError
from shuffler.format.schema import Schema
from shuffler.keys import splitmix64

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread and level, reused (allocation costs more than a chunk).
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _scratch(nbytes: int) -> np.ndarray:
    """A per-thread byte buffer reused across chunks (fresh buffers per chunk cost page faults)."""
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _local.scratch = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
    return buf[:nbytes]


def raw_chunk_bytes(schema: Schema, rows: int) -> int:
    return rows * schema.row_bytes


def frame_sizes(schema: Schema, rows: int) -> list[int]:
    """Uncompressed bytes of each frame of a chunk of `rows` rows: one frame (planes, then columns) for one field;
    with several fields one per field (its planes), then one for the columns if there are any."""
    if not schema.multi:
        return [rows * schema.row_bytes]
    out = [rows * d * s for _, _, d, s in schema.field_bytes()]
    if schema.columns:
        out.append(rows * (schema.row_bytes - schema.act_row_bytes))
    return out


def combined_checksum(checksums: list[int]) -> int:
    """A several-frame chunk's index checksum: CRC-32 of its frames' checksums (u32 little-endian, in order)."""
    return zlib.crc32(b"".join(int(c).to_bytes(4, "little") for c in checksums))


def _split_into(schema: Schema, buf: np.ndarray, acts: np.ndarray, columns: list[np.ndarray]) -> None:
    """Write the byte planes of every field, then the columns, into buf (the layout of docs/format.md)."""
    rows, off = acts.shape[0], 0
    for name, _, d, s in schema.field_bytes():
        n = rows * d
        src = np.ascontiguousarray(schema.field_view(acts, name)).view(np.uint8).reshape(n, s)
        np.copyto(buf[off : off + n * s].reshape(s, n), src.T)  # plane k holds byte k of every element
        off += n * s
    for (_, dt), col in zip(schema.columns, columns, strict=True):
        nb = rows * np.dtype(dt).itemsize
        buf[off : off + nb] = np.ascontiguousarray(col, dtype=np.dtype(dt).newbyteorder("<")).view(np.uint8)
        off += nb


def encode_chunk(schema: Schema, acts: np.ndarray, columns: list[np.ndarray], level: int) -> tuple[bytes, int]:
    """Encode rows into one zstd frame (several fields: one frame per field and one for the columns, back to
    back). Returns (frames, checksum): the frame's low 32 bits of XXH64, or combined_checksum of the frames'.

    acts: [rows, row_width] in schema.row_dtype; columns: one 1-D array per schema column, same rows.
    """
    rows = acts.shape[0]
    buf = _scratch(raw_chunk_bytes(schema, rows))
    _split_into(schema, buf, acts, columns)
    c = _compressor(level)
    if not schema.multi:
        frame = c.compress(buf)
        return frame, int.from_bytes(frame[-4:], "little")
    frames, off = [], 0
    for size in frame_sizes(schema, rows):
        frames.append(c.compress(buf[off : off + size]))
        off += size
    return b"".join(frames), combined_checksum([int.from_bytes(f[-4:], "little") for f in frames])


def decode_chunk(
    schema: Schema, frame: bytes | memoryview, rows: int, checksum: int, *, where: str
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decode one chunk into (acts [rows, row_width], {column: [rows]}), checking size and checksum first.

    `where` names the object and chunk for error messages.
    """
    return unsplit(schema, decompress_chunk(schema, frame, rows, checksum, where=where), rows)


def frame_spans(data: bytes | memoryview, *, where: str) -> list[tuple[int, int]]:
    """(start, end) of each zstd frame in `data`, frames back to back, found from the frame and block headers
    (RFC 8878, sections 3.1.1 and 3.1.1.2) without decoding. FormatError naming `where` if they do not tile it."""
    mv, pos, out = memoryview(data), 0, []
    while pos < len(mv):
        try:
            head = zstandard.frame_header_size(mv[pos : pos + 18])
            params = zstandard.get_frame_parameters(mv[pos : pos + 18])
        except zstandard.ZstdError as e:
            raise ChecksumError(f"{where}: no zstd frame at byte {pos} of the chunk ({e})") from None
        p = pos + head
        while True:
            if p + 3 > len(mv):
                raise ChecksumError(f"{where}: zstd frame at byte {pos} of the chunk is truncated")
            h = int.from_bytes(mv[p : p + 3], "little")
            last, kind, size = h & 1, (h >> 1) & 3, h >> 3
            if kind == 3:
                raise ChecksumError(f"{where}: reserved zstd block type at byte {p} of the chunk (damaged)")
            p += 3 + (1 if kind == 1 else size)
            if last:
                break
        p += 4 if params.has_checksum else 0
        if p > len(mv):
            raise ChecksumError(f"{where}: zstd frame at byte {pos} of the chunk runs past its end")
        out.append((pos, p))
        pos = p
    return out


def decompress_frame(frame: bytes | memoryview, expected: int, checksum: int, *, where: str) -> bytes:
    """One frame's uncompressed bytes after the size and checksum checks: it must declare `expected` bytes
    (refused before allocating otherwise) and carry `checksum`; ChecksumError or FormatError naming `where`."""
    frame = memoryview(frame)
    if len(frame) < 12:  # magic, frame header, one block header, checksum
        raise FormatError(f"{where}: chunk frame is {len(frame)} bytes, too short to be a zstd frame")
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as e:
        raise ChecksumError(f"{where}: chunk is not a valid zstd frame ({e})") from None
    # Refuse before allocating: a frame that claims more than the index allows is damaged or hostile.
    if params.content_size != expected:
        raise ChecksumError(f"{where}: frame declares {params.content_size} uncompressed bytes, the index says {expected}")
    if not params.has_checksum or int.from_bytes(frame[-4:], "little") != checksum:
        raise ChecksumError(f"{where}: frame checksum does not match the shard index (damaged chunk)")
    try:
        raw = _decompressor().decompress(frame, max_output_size=expected)
    except zstandard.ZstdError as e:
        raise ChecksumError(f"{where}: zstd refused the chunk ({e}): bytes damaged") from None
    if len(raw) != expected:
        raise ChecksumError(f"{where}: decoded {len(raw)} bytes, expected {expected}")
    return raw


def decompress_chunk(schema: Schema, frame: bytes | memoryview, rows: int, checksum: int, *, where: str) -> bytes:
    """The chunk's uncompressed bytes (every field's byte planes, then columns), after the size and checksum
    checks; ChecksumError or FormatError naming `where` for a damaged chunk."""
    if not schema.multi:
        return decompress_frame(frame, raw_chunk_bytes(schema, rows), checksum, where=where)
    if len(frame) < 12:
        raise FormatError(f"{where}: chunk is {len(frame)} bytes, too short to hold zstd frames")
    sizes = frame_sizes(schema, rows)
    spans = frame_spans(frame, where=where)
    if len(spans) != len(sizes):
        raise ChecksumError(f"{where}: chunk holds {len(spans)} zstd frames, its schema needs {len(sizes)}")
    mv = memoryview(frame)
    sums = [int.from_bytes(mv[e - 4 : e], "little") for _, e in spans]
    if combined_checksum(sums) != checksum:
        raise ChecksumError(f"{where}: frame checksums do not match the shard index (damaged chunk)")
    parts = [decompress_frame(mv[a:b], size, c, where=f"{where} frame {k}")
             for k, ((a, b), size, c) in enumerate(zip(spans, sizes, sums, strict=True))]
    return b"".join(parts)


def unsplit_field(raw: bytes | memoryview, rows: int, d: int, s: int, dst: np.ndarray) -> None:
    """Un-split one field's byte planes `raw` (rows x d elements of s bytes) into dst, [rows, d x s] bytes (may be
    a column slice of packed rows)."""
    n = rows * d
    src = np.frombuffer(raw, dtype=np.uint8, count=n * s)
    out = dst.reshape(rows, d, s)
    # One strided copy per plane: 2.5-3 GB/s, where a transposing ascontiguousarray ran at 0.2-0.4 GB/s
    # (docs/benchmarks.md, "Measurements behind the design").
    for k in range(s):
        out[:, :, k] = src[k * n : (k + 1) * n].reshape(rows, d)


def unsplit_columns(schema: Schema, raw: bytes | memoryview, rows: int, offset: int) -> dict[str, np.ndarray]:
    """The columns stored from byte `offset` of raw, each a fresh array of its dtype."""
    cols, off = {}, offset
    for name, dt in schema.columns:
        d = np.dtype(dt).newbyteorder("<")
        cols[name] = np.frombuffer(raw, dtype=d, count=rows, offset=off).astype(np.dtype(dt), copy=True)
        off += rows * d.itemsize
    return cols


def unsplit(schema: Schema, raw: bytes, rows: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(acts [rows, row_width] row_dtype, columns) from a chunk's uncompressed bytes."""
    if not schema.multi:
        n = rows * schema.d_model
        s = schema.itemsize
        src = np.frombuffer(raw, dtype=np.uint8)
        acts = np.empty((rows, schema.d_model), dtype=schema.storage_dtype)
        dst = acts.view(np.uint8).reshape(n, s)
        # One strided copy per plane: 2.5-3 GB/s, where a transposing ascontiguousarray ran at 0.2-0.4 GB/s
        # (docs/benchmarks.md, "Measurements behind the design").
        for k in range(s):
            dst[:, k] = src[k * n : (k + 1) * n]
        return acts, unsplit_columns(schema, raw, rows, n * s)
    acts = np.empty((rows, schema.row_width), dtype=np.uint8)
    mv, at = memoryview(raw), 0
    for _, off, d, s in schema.field_bytes():
        unsplit_field(mv[at : at + rows * d * s], rows, d, s, acts[:, off : off + d * s])
        at += rows * d * s
    return acts, unsplit_columns(schema, raw, rows, at)


# ---------------------------------------------------------------------------------------------------
# Row hash and fingerprint (docs/format.md, "Fingerprint"), version 2.
#
# Each 64-bit word w_j of a row (its activation bytes, zero-padded to 8, then each column's bits) is added to
# a per-position key k_j, and the two 32-bit halves of w_j + k_j are multiplied: p_j = lo * hi < 2^64
# exactly. This is NH (Black et al. 1999, "UMAC: Fast and Secure Message Authentication", CRYPTO), with the
# two halves of one keyed word as its pair: a change to any bit changes p_j unless the other half is 0, and
# how it changes depends on the data, so no pattern of changes cancels for every row (the linear version-1
# hash missed two negated activations of a row). Two lanes, sum_j p_j and sum_j p_j m_j with odd m_j, each
# through the splitmix64 finaliser, make a 128-bit row hash; a fingerprint sums each lane mod 2^64. In reused
# 1 MiB blocks it runs at 3.4-4.2 GiB/s here (version 1: 11 GiB/s), beside a zstd-1 encode of 0.6-1.4 GB/s
# (docs/benchmarks.md, "Row hash version 2").

ROW_HASH = np.dtype([("a", "<u8"), ("b", "<u8")])
"""A row's 128-bit hash: two 64-bit lanes."""
ROW_HASH_VERSION = 2
_M32 = np.uint64(0xFFFFFFFF)
_key_cache: dict[int, np.ndarray] = {}


def _keys(n: int) -> tuple[np.ndarray, np.ndarray]:
    """([n] keys k_j, [n] odd multipliers m_j) for word positions 0..n-1: splitmix64 outputs, fixed forever."""
    k = _key_cache.get(n)
    if k is None:
        with np.errstate(over="ignore"):
            base = np.arange(n, dtype=np.uint64) * np.uint64(2)
            k = (splitmix64(base + np.uint64(0x6E683231)), splitmix64(base + np.uint64(0x6E683232)) | np.uint64(1))
        _key_cache[n] = k
    return k


_BLOCK_WORDS = 1 << 17
"""Words hashed per block (1 MiB per work array): bounded memory whatever the chunk, and cache-resident."""


def _buffers(rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Two [rows, width] uint64 work arrays, reused by later calls on this thread (no fresh pages per chunk)."""
    n = rows * width
    have = getattr(_local, "hash_bufs", None)
    if have is None or have[0].size < n:
        have = _local.hash_bufs = (np.empty(n, np.uint64), np.empty(n, np.uint64))
    return have[0][:n].reshape(rows, width), have[1][:n].reshape(rows, width)


def _products(words: np.ndarray, keys: np.ndarray, a: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """NH's products p_j = ((w_j + k_j) mod 2^32) * ((w_j + k_j) >> 32) of `words` [n, W], computed in `a`."""
    np.add(words, keys, out=a)  # wraps mod 2^64
    np.right_shift(a, np.uint64(32), out=hi)
    np.bitwise_and(a, _M32, out=a)
    np.multiply(a, hi, out=a)  # < 2^64: no wrap
    return a


def row_hashes(schema: Schema, acts: np.ndarray, columns: list[np.ndarray]) -> np.ndarray:
    """128-bit hash (version 2) of each row's activation bytes and column values. [rows] ROW_HASH.

    The words of a row: its activation bytes zero-padded to a multiple of 8, then one word per column (the
    value's bits, zero-extended). Lane a = splitmix64(sum_j p_j), lane b = splitmix64(sum_j p_j m_j).
    """
    rows = acts.shape[0]
    raw = np.ascontiguousarray(acts).view(np.uint8).reshape(rows, schema.act_row_bytes)
    aw = (schema.act_row_bytes + 7) // 8
    padded = schema.act_row_bytes % 8 != 0
    cols = np.zeros((rows, len(schema.columns)), dtype=np.uint64)  # [rows, C]
    for i, ((_, dt), col) in enumerate(zip(schema.columns, columns, strict=True)):
        d = np.dtype(dt)
        cols[:, i] = np.ascontiguousarray(col, dtype=d).view(f"u{d.itemsize}")
    keys, mult = _keys(aw + len(schema.columns))
    out = np.empty(rows, dtype=ROW_HASH)
    block = max(1, _BLOCK_WORDS // aw)
    a, hi = _buffers(min(block, max(rows, 1)), aw)
    with np.errstate(over="ignore"):
        if len(schema.columns):
            c = cols + keys[aw:]  # [rows, C], small
            pc = (c & _M32) * (c >> np.uint64(32))
            col_a, col_b = pc.sum(axis=1, dtype=np.uint64), pc @ mult[aw:]
        for s in range(0, rows, block):
            e = min(rows, s + block)
            if padded:
                words = np.zeros((e - s, aw), dtype="<u8")
                words.view(np.uint8)[:, : schema.act_row_bytes] = raw[s:e]
            else:
                words = raw[s:e].view("<u8")  # [n, aw], no copy
            p = _products(words, keys[:aw], a[: e - s], hi[: e - s])  # [n, aw]
            # einsum's integer sum of products wraps mod 2^64 like matmul, at twice its speed here (uint64 matmul
            # has no BLAS path): 27 against 55 us per 1 MiB block, the same sums.
            ha, hb = np.add.reduce(p, axis=1, dtype=np.uint64), np.einsum("ij,j->i", p, mult[:aw])
            if len(schema.columns):
                ha += col_a[s:e]
                hb += col_b[s:e]
            out["a"][s:e] = splitmix64(ha)
            out["b"][s:e] = splitmix64(hb)
    return out


def fingerprint_sum(hashes: np.ndarray) -> int:
    """Each lane of the row hashes summed mod 2^64, as one 128-bit int (lane b high): independent of row order,
    additive lane by lane across chunks and shards (format/manifest.py: Fingerprint)."""
    if not hashes.size:
        return 0
    with np.errstate(over="ignore"):
        lo = int(np.add.reduce(hashes["a"], dtype=np.uint64))
        hi = int(np.add.reduce(hashes["b"], dtype=np.uint64))
    return lo | hi << 64


def row_hash_sum_v1(schema: Schema, acts: np.ndarray, columns: list[np.ndarray]) -> int:
    """Sum mod 2^64 of the version-1 row hashes (docs/format.md, "Fingerprint"), only to check a version-1
    fingerprint before `rehash` replaces it: splitmix64(sum_j w_j m_j + sum_c v_c m_{W+c}), m_j odd."""
    rows = acts.shape[0]
    raw = np.ascontiguousarray(acts).view(np.uint8).reshape(rows, schema.act_row_bytes)
    aw = (schema.act_row_bytes + 7) // 8
    words = np.zeros((rows, aw), dtype="<u8")
    words.view(np.uint8)[:, : schema.act_row_bytes] = raw
    with np.errstate(over="ignore"):
        m = splitmix64(np.arange(aw + len(schema.columns), dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        m |= np.uint64(1)
        h = words @ m[:aw]
        for i, ((_, dt), col) in enumerate(zip(schema.columns, columns, strict=True)):
            d = np.dtype(dt)
            h += np.ascontiguousarray(col, dtype=d).view(f"u{d.itemsize}").astype(np.uint64) * m[aw + i]
        return int(np.add.reduce(splitmix64(h), dtype=np.uint64)) if rows else 0


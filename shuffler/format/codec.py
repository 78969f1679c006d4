"""Chunk codec: byte-plane split plus one zstd frame, and the per-row hash behind dataset fingerprints.

A chunk's uncompressed bytes are the activation byte planes (byte 0 of every element, then byte 1, ...)
followed by each provenance column's raw little-endian values, in schema order (docs/format.md).
On real activations the split lifts zstd-1 from 1.270x to 1.454x for bfloat16 and from 1.081x to 1.168x
for float16, within 2.5% of the order-0 entropy bound; higher levels gain nothing and cost 2-10x
(docs/benchmarks.md, "Measurements behind the design"). The frame carries zstd's own content checksum (low 32 bits of
XXH64 of the uncompressed bytes), so verifying a chunk costs nothing beyond decoding it.
"""

from __future__ import annotations

import threading

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


def encode_chunk(schema: Schema, acts: np.ndarray, columns: list[np.ndarray], level: int) -> tuple[bytes, int]:
    """Encode rows into one zstd frame. Returns (frame, checksum), checksum = low 32 bits of XXH64.

    acts: [rows, d_model] in schema.storage_dtype; columns: one 1-D array per schema column, same rows.
    """
    rows = acts.shape[0]
    n = rows * schema.d_model
    s = schema.itemsize
    buf = _scratch(raw_chunk_bytes(schema, rows))
    planes = buf[: n * s].reshape(s, n)
    src = np.ascontiguousarray(acts).view(np.uint8).reshape(n, s)
    np.copyto(planes, src.T)  # [itemsize, rows*d_model]: plane k holds byte k of every element
    off = n * s
    for (_, dt), col in zip(schema.columns, columns, strict=True):
        nb = rows * np.dtype(dt).itemsize
        buf[off : off + nb] = np.ascontiguousarray(col, dtype=np.dtype(dt).newbyteorder("<")).view(np.uint8)
        off += nb
    frame = _compressor(level).compress(buf)
    return frame, int.from_bytes(frame[-4:], "little")


def decode_chunk(
    schema: Schema, frame: bytes | memoryview, rows: int, checksum: int, *, where: str
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decode one frame into (acts [rows, d_model], {column: [rows]}), checking size and checksum first.

    `where` names the object and chunk for error messages.
    """
    return unsplit(schema, decompress_chunk(schema, frame, rows, checksum, where=where), rows)


def decompress_chunk(schema: Schema, frame: bytes | memoryview, rows: int, checksum: int, *, where: str) -> bytes:
    """The frame's uncompressed bytes (byte planes, then columns), after the size and checksum checks;
    ChecksumError or FormatError naming `where` for a damaged frame."""
    expected = raw_chunk_bytes(schema, rows)
    frame = memoryview(frame)
    if len(frame) < 12:  # magic, frame header, one block header, checksum
        raise FormatError(f"{where}: chunk frame is {len(frame)} bytes, too short to be a zstd frame")
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as e:
        raise ChecksumError(f"{where}: chunk is not a valid zstd frame ({e})") from None
    # Refuse before allocating: a frame that claims more than rows x row_bytes is damaged or hostile.
    if params.content_size != expected:
        raise ChecksumError(
            f"{where}: frame declares {params.content_size} uncompressed bytes, index says {rows} rows x "
            f"{schema.row_bytes} B = {expected}"
        )
    if not params.has_checksum or int.from_bytes(frame[-4:], "little") != checksum:
        raise ChecksumError(f"{where}: frame checksum does not match the shard index (damaged chunk)")
    try:
        raw = _decompressor().decompress(frame, max_output_size=expected)
    except zstandard.ZstdError as e:
        raise ChecksumError(f"{where}: zstd refused the chunk ({e}): bytes damaged") from None
    if len(raw) != expected:
        raise ChecksumError(f"{where}: decoded {len(raw)} bytes, expected {expected}")
    return raw


def unsplit(schema: Schema, raw: bytes, rows: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    n = rows * schema.d_model
    s = schema.itemsize
    src = np.frombuffer(raw, dtype=np.uint8)
    acts = np.empty((rows, schema.d_model), dtype=schema.storage_dtype)
    dst = acts.view(np.uint8).reshape(n, s)
    # One strided copy per plane: 2.5-3 GB/s, where a transposing ascontiguousarray ran at 0.2-0.4 GB/s
    # (docs/benchmarks.md, "Measurements behind the design").
    for k in range(s):
        dst[:, k] = src[k * n : (k + 1) * n]
    cols = {}
    off = n * s
    for name, dt in schema.columns:
        d = np.dtype(dt).newbyteorder("<")
        cols[name] = np.frombuffer(raw, dtype=d, count=rows, offset=off).astype(np.dtype(dt), copy=True)
        off += rows * d.itemsize
    return acts, cols


# ---------------------------------------------------------------------------------------------------
# Row hash and fingerprint (docs/format.md, "Fingerprint"). A multilinear hash over 64-bit words with odd
# multipliers from splitmix64, then the splitmix64 finaliser. It is vectorised as one uint64 mat-vec
# per chunk (8.9 GB/s here), so computing it while writing costs a few percent of encoding.

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


_mult_cache: dict[int, np.ndarray] = {}


def _multipliers(n: int) -> np.ndarray:
    m = _mult_cache.get(n)
    if m is None:
        with np.errstate(over="ignore"):
            m = splitmix64(np.arange(n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
        _mult_cache[n] = m
    return m


def row_hashes(schema: Schema, acts: np.ndarray, columns: list[np.ndarray]) -> np.ndarray:
    """64-bit hash of each row's activation bytes and column values. [rows] uint64."""
    rows = acts.shape[0]
    raw = np.ascontiguousarray(acts).view(np.uint8).reshape(rows, schema.act_row_bytes)
    if schema.act_row_bytes % 8:
        padded = np.zeros((rows, (schema.act_row_bytes + 7) // 8 * 8), dtype=np.uint8)
        padded[:, : schema.act_row_bytes] = raw
        raw = padded
    words = raw.view("<u8")  # [rows, W]
    ncol = len(schema.columns)
    m = _multipliers(words.shape[1] + ncol)
    with np.errstate(over="ignore"):
        h = words @ m[: words.shape[1]]
        for i, ((_, dt), col) in enumerate(zip(schema.columns, columns, strict=True)):
            d = np.dtype(dt)
            bits = np.ascontiguousarray(col, dtype=d).view(f"u{d.itemsize}").astype(np.uint64)
            h += bits * m[words.shape[1] + i]
    return splitmix64(h)


def fingerprint_sum(hashes: np.ndarray) -> int:
    """Sum mod 2^64 of row hashes: independent of row order, additive across chunks and shards."""
    with np.errstate(over="ignore"):
        return int(np.add.reduce(hashes, dtype=np.uint64)) if hashes.size else 0

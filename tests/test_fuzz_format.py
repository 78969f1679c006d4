"""Fuzzing the parsers of untrusted bytes: shard header, footer index, chunk frames and the manifest.

Only the project's format errors may come out (FormatError and its subclass ChecksumError, SchemaError for
a schema that parses but is invalid); never a crash of another type, never a hang, never an allocation
sized by a hostile field (sizes are checked against the object before anything is allocated).
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shuffler.errors import FormatError, SchemaError
from shuffler.format.codec import decode_chunk, encode_chunk
from shuffler.format.manifest import Manifest
from shuffler.format.schema import Schema
from shuffler.format.shard import TRAILER, ShardSink, decode_footer, decode_header

SCHEMA = Schema(dtype="bfloat16", d_model=8, columns=(("token_id", "int32"), ("doc_id", "int64")))
ALLOWED = (FormatError, SchemaError)


def valid_shard() -> bytes:
    f = io.BytesIO()
    sink = ShardSink(f, SCHEMA, 1)
    rng = np.random.default_rng(0)
    for rows in (5, 7, 3):
        acts = rng.integers(0, 1 << 15, size=(rows, 8), dtype=np.uint16)
        frame, ck = encode_chunk(SCHEMA, acts, [np.arange(rows, dtype=np.int32), np.arange(rows, dtype=np.int64)], 1)
        sink.add(frame, rows, ck)
    sink.finish()
    return f.getvalue()


SHARD = valid_shard()
N_FUZZ = 300


@settings(max_examples=N_FUZZ, deadline=None)
@given(st.binary(max_size=400))
def test_header_parser_random_bytes(data):
    try:
        decode_header(data, where="fuzz")
    except ALLOWED:
        pass


@settings(max_examples=N_FUZZ, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 1 << 62))
def test_footer_parser_random_bytes(data, claimed_size):
    try:
        decode_footer(data, claimed_size, SCHEMA, where="fuzz")
    except ALLOWED:
        pass


@settings(max_examples=N_FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(SHARD) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_mutated_shard_never_returns_wrong_data(flips):
    data = bytearray(SHARD)
    for pos, x in flips:
        data[pos] ^= x
    data = bytes(data)
    try:
        schema, _, _ = decode_header(data, where="fuzz")
        if schema != SCHEMA:  # as Dataset.check does: the header must agree with the manifest's schema
            raise FormatError("header schema differs from the manifest's")
        idx = decode_footer(data[-(3 * 24 + 32):], len(data), schema, where="fuzz")
        out = []
        for e in idx.entries:
            frame = data[int(e["offset"]) : int(e["offset"] + e["comp_len"])]
            out.append(decode_chunk(schema, frame, int(e["rows"]), int(e["checksum"]), where="fuzz"))
    except ALLOWED:
        return
    # If every check passed, the data must be exactly the original (a flip in an ignored byte, e.g. flags).
    ref_schema, _, _ = decode_header(SHARD, where="ref")
    ref_idx = decode_footer(SHARD[-(3 * 24 + 32):], len(SHARD), ref_schema, where="ref")
    for (acts, cols), e in zip(out, ref_idx.entries, strict=True):
        frame = SHARD[int(e["offset"]) : int(e["offset"] + e["comp_len"])]
        ra, rc = decode_chunk(ref_schema, frame, int(e["rows"]), int(e["checksum"]), where="ref")
        assert np.array_equal(acts, ra) and all(np.array_equal(cols[k], rc[k]) for k in rc)


def test_header_claiming_huge_schema_is_refused_before_reading():
    data = b"ACTSHARD" + struct.pack("<HHI", 1, 0, 2**31) + b"{}"
    with pytest.raises(FormatError, match="claims a 2147483648-byte schema"):
        decode_header(data, where="x")


def test_trailer_claiming_2_to_60_rows_is_refused():
    blob = SHARD[: -TRAILER.size]
    index_offset, n, crc, rows, magic = TRAILER.unpack_from(SHARD, len(SHARD) - TRAILER.size)
    forged = blob + TRAILER.pack(index_offset, n, crc, 2**60, magic)
    with pytest.raises(FormatError, match="index rows sum to 15, trailer says 1152921504606846976"):
        decode_footer(forged[-(n * 24 + 32):], len(forged), SCHEMA, where="x")
    forged = blob + TRAILER.pack(index_offset, 2**31, crc, rows, magic)
    with pytest.raises(FormatError, match="does not end at the object size"):
        decode_footer(forged[-32:], len(forged), SCHEMA, where="x")


def test_chunk_claiming_to_expand_hugely_is_refused():
    import zstandard

    bomb = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(b"\0" * (64 << 20))  # 64 MiB of zeros
    with pytest.raises(FormatError, match="declares 67108864 uncompressed bytes"):
        decode_chunk(SCHEMA, bomb, 3, int.from_bytes(bomb[-4:], "little"), where="x")


@settings(max_examples=N_FUZZ, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.floats(allow_nan=False),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=5),
                    max_leaves=20))
def test_manifest_parser_random_json(obj):
    try:
        Manifest.loads(json.dumps(obj).encode(), where="fuzz")
    except ALLOWED:
        pass


@settings(max_examples=N_FUZZ, deadline=None)
@given(st.dictionaries(st.sampled_from(["format", "format_version", "dtype", "d_model", "columns", "num_rows",
                                        "fingerprint", "shards", "metadata"]),
                       st.none() | st.integers(-5, 10**20) | st.text(max_size=6) | st.lists(st.integers(), max_size=3)
                       | st.lists(st.dictionaries(st.sampled_from(["name", "rows", "bytes", "chunks"]),
                                                  st.integers(-3, 3) | st.text(max_size=6)), max_size=3),
                       max_size=9))
def test_manifest_parser_near_valid(fields):
    base = {"format": "activation-shuffler", "format_version": 1, "dtype": "float16", "d_model": 4,
            "columns": [], "num_rows": 0, "fingerprint": {"rows": 0, "sum": "0"}, "shards": [], "metadata": {}}
    base.update(fields)
    try:
        Manifest.loads(json.dumps(base).encode(), where="fuzz")
    except ALLOWED:
        pass


def test_manifest_with_non_utf8_is_a_format_error():
    with pytest.raises(FormatError, match="not valid JSON"):
        Manifest.loads(b"\xff\xfe{", where="m.json")

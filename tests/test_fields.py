"""Several activation fields per row (issue 19): the version-2 format, ShardWriter(fields=), Dataset.fields and
Batch.field, and the errors for bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from shuffler import Dataset, SchemaError
from shuffler.format.codec import decompress_frame, unsplit_field
from shuffler.format.convert import float32_to_bfloat16_bits
from shuffler.storage.storage import Storage
from writers import ShardWriter

FIELDS = {"layer.2": (24, "bfloat16"), "layer.4": (40, "float32"), "mlp_out.4": (16, "float16")}


def cols(n, start=0):
    r = np.arange(start, start + n)
    return {"token_id": r.astype(np.int32), "doc_id": (r // 10).astype(np.int64), "position": (r % 10).astype(np.int32)}


def field_values(n, start=0):
    """Each field's value encodes its row's index (layer.2: the index, layer.4: -index, mlp_out.4: index / 8), so
    alignment after any reordering can be checked from any one field."""
    r = np.arange(start, start + n, dtype=np.float32)[:, None]
    return {
        "layer.2": np.repeat(r, 24, axis=1) + np.arange(24, dtype=np.float32) / 64,  # rounded to bfloat16
        "layer.4": np.repeat(-r, 40, axis=1) - np.arange(40, dtype=np.float32),
        "mlp_out.4": np.repeat(r / 8, 16, axis=1),
    }


def write_fields(url, n=3000, *, chunk_bytes=1 << 14, shard_bytes=1 << 16, fields=FIELDS, **kw):
    vals = field_values(n)
    with ShardWriter(url, fields=fields, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes, **kw) as w:
        for s in range(0, n, 700):
            w.write({k: v[s : s + 700] for k, v in vals.items() if k in fields}, **cols(min(700, n - s), s))
    return vals


def bf16(x):
    return float32_to_bfloat16_bits(np.asarray(x, np.float32))


def test_fields_round_trip_and_accessors(tmp_path):
    url = str(tmp_path / "d")
    vals = write_fields(url)
    ds = Dataset.open(url)
    assert ds.fields == ("layer.2", "layer.4", "mlp_out.4")
    assert ds.field_spec("layer.4") == (40, "float32") and ds.field_spec("mlp_out.4") == (16, "float16")
    assert (ds.d_model, ds.dtype) == (24, "bfloat16")  # the first field's
    man = json.loads(Storage(url).read("manifest.json"))
    assert man["format_version"] == 2 and man["fields"][1] == ["layer.4", 40, "float32"]
    b = Dataset.open(url).read_shard(0)
    n = len(b)
    assert n > 0 and b.field_names == ds.fields
    assert b.acts is b.field("layer.2") and b.acts.dtype == np.uint16  # bfloat16 as its bits, as today
    np.testing.assert_array_equal(b.field("layer.2"), bf16(vals["layer.2"][:n]))
    np.testing.assert_array_equal(b.field("layer.4"), vals["layer.4"][:n])
    np.testing.assert_array_equal(b.field("mlp_out.4"), vals["mlp_out.4"][:n].astype(np.float16))
    np.testing.assert_array_equal(b.columns["token_id"], np.arange(n))
    t = b.take(np.array([2, 0]))
    np.testing.assert_array_equal(t.field("layer.4"), vals["layer.4"][[2, 0]])
    tt = b.to_torch()
    assert str(tt.field("layer.2").dtype) == "torch.bfloat16" and str(tt.field("layer.4").dtype) == "torch.float32"
    assert float(tt.field("layer.2")[3, 0]) == 3.0
    damage, fp = ds.check()
    assert damage == [] and fp == ds.manifest.fingerprint and fp.rows == 3000
    with pytest.raises(KeyError, match=r"no activation field 'layer\.9'; this batch has \['layer\.2'"):
        b.field("layer.9")
    with pytest.raises(KeyError, match=r"no activation field 'nope'; this dataset has \['layer\.2'"):
        ds.field_spec("nope")


def test_index_records_each_fields_frame(tmp_path):
    """Version 2: one frame per field, then the columns', each in the footer index, decodable on its own."""
    url = str(tmp_path / "d")
    vals = write_fields(url)
    ds = Dataset.open(url)
    idx = ds.index(0)
    assert idx.frames.shape == (idx.n_chunks, 4)
    e = idx.frames[0, 1]  # layer.4 of chunk 0
    rows = int(e["rows"])
    frame = ds.reader.frame(ds.shards[0].name, int(e["offset"]), int(e["offset"] + e["comp_len"]))
    raw = decompress_frame(frame, int(e["raw_len"]), int(e["checksum"]), where="t")
    out = np.empty((rows, 40 * 4), np.uint8)
    unsplit_field(raw, rows, 40, 4, out)
    np.testing.assert_array_equal(out.view(np.float32), vals["layer.4"][:rows])
    # one frame's bytes are about a field's share: layer.4 is 160 of the row's 240 activation bytes
    assert idx.frames["raw_len"][0].tolist() == [rows * 48, rows * 160, rows * 32, rows * 16]


def test_one_field_dataset_keeps_todays_bytes(tmp_path):
    """Without fields= nothing changes (version 1, no "fields" key); fields= with one name writes the same
    layout, naming the field in the schema."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    with ShardWriter(a, d_model=8, dtype="float16") as w:
        w.write(x, **cols(500))
    with ShardWriter(b, fields={"layer.3": (8, "float16")}) as w:
        w.write({"layer.3": x}, **cols(500))
    ma, mb = json.loads(Storage(a).read("manifest.json")), json.loads(Storage(b).read("manifest.json"))
    assert ma["format_version"] == mb["format_version"] == 1 and "fields" not in ma
    assert mb["fields"] == [["layer.3", 8, "float16"]] and ma["fingerprint"] == mb["fingerprint"]
    da, db = Dataset.open(a), Dataset.open(b)
    assert da.fields == ("acts",) and db.fields == ("layer.3",)
    np.testing.assert_array_equal(da.read_shard(0).field("acts"), db.read_shard(0).field("layer.3"))
    sa, sb = Storage(a).read(da.shards[0].name), Storage(b).read(db.shards[0].name)
    assert sa[8:10] == sb[8:10] == b"\x01\x00" and b'"fields"' not in sa[:4096]

    def chunks(blob, ds):  # the data area: after the header, before the index
        return hashlib.sha256(blob[16 + int.from_bytes(blob[12:16], "little") : ds.index(0).index_offset]).digest()

    assert chunks(sa, da) == chunks(sb, db)  # the same frames; only the header names the field


def test_bad_field_input_is_refused_naming_the_field(tmp_path):
    url = str(tmp_path / "d")
    v = field_values(10)
    with pytest.raises(SchemaError, match=r"missing \['mlp_out\.4'\], unknown \['layer\.9'\]"):
        with ShardWriter(url, fields=FIELDS) as w:
            w.write({"layer.2": v["layer.2"], "layer.4": v["layer.4"], "layer.9": v["layer.4"]}, **cols(10))
    with pytest.raises(SchemaError, match=r"field 'layer\.4' \(40 x float32\): acts has shape \(10, 24\); expected \[rows, d_model=40\]"):
        with ShardWriter(url, fields=FIELDS) as w:
            w.write(dict(v, **{"layer.4": v["layer.2"]}), **cols(10))
    with pytest.raises(SchemaError, match=r"field 'mlp_out\.4' \(16 x float16\): acts dtype int64 is not floating point"):
        with ShardWriter(url, fields=FIELDS) as w:
            w.write(dict(v, **{"mlp_out.4": np.zeros((10, 16), np.int64)}), **cols(10))
    with pytest.raises(SchemaError, match=r"different row counts"):
        with ShardWriter(url, fields=FIELDS) as w:
            w.write(dict(v, **{"layer.4": v["layer.4"][:9]}), **cols(10))
    with pytest.raises(SchemaError, match=r"3 activation fields \['layer\.2', 'layer\.4', 'mlp_out\.4'\]: pass a dict"):
        with ShardWriter(url, fields=FIELDS) as w:
            w.write(v["layer.2"], **cols(10))
    with pytest.raises(ValueError, match=r"NaN/inf values \(field 'layer\.4'\)"):
        with ShardWriter(url, fields=FIELDS) as w:
            bad = v["layer.4"].copy()
            bad[3, 3] = np.inf
            w.write(dict(v, **{"layer.4": bad}), **cols(10))
    assert Storage(url).list() == []  # nothing half-written is visible
    with pytest.raises(ValueError, match="either fields="):
        ShardWriter(url, fields=FIELDS, d_model=4, dtype="float32")
    with pytest.raises(SchemaError, match=r"field 'layer\.4' has dtype 'int8'"):
        ShardWriter(url, fields={"layer.2": (4, "float32"), "layer.4": (4, "int8")})
    with pytest.raises(SchemaError, match=r"field name 'bad name'"):
        ShardWriter(url, fields={"layer.2": (4, "float32"), "bad name": (4, "float32")})
    with pytest.raises(SchemaError, match=r"field 'layer\.2': expected \(d_model, dtype\)"):
        ShardWriter(url, fields={"layer.2": 4})


def test_damaged_field_frame_is_found(tmp_path):
    url = str(tmp_path / "d")
    write_fields(url)
    ds = Dataset.open(url)
    e = ds.index(0).frames[1, 2]  # chunk 1's mlp_out.4 frame
    name = ds.shards[0].name
    data = bytearray(Storage(url).read(name))
    data[int(e["offset"]) + int(e["comp_len"]) // 2] ^= 0x40
    Storage(url).write(name, bytes(data))
    damage, _ = Dataset.open(url).check()
    assert [(d.chunk, "frame 2" in d.message) for d in damage] == [(1, True)]


def _retamper_index(url, name, edit):
    """Apply edit(frames [n, K] ENTRY) to a version-2 index and fix the index CRC, so only the frame-entry
    checks can notice."""
    import zlib

    from shuffler.format.shard import ENTRY, TRAILER

    data = bytearray(Storage(url).read(name))
    index_offset, n, _, _, _ = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    blob_end = len(data) - TRAILER.size
    frames = np.frombuffer(data, ENTRY, offset=index_offset + n * ENTRY.itemsize,
                           count=(blob_end - index_offset) // ENTRY.itemsize - n).copy()
    edit(frames.reshape(n, -1))
    data[index_offset + n * ENTRY.itemsize : blob_end] = frames.tobytes()
    data[blob_end + 12 : blob_end + 16] = zlib.crc32(bytes(data[index_offset:blob_end])).to_bytes(4, "little")
    Storage(url).write(name, bytes(data))


@pytest.mark.parametrize("edit, message", [
    (lambda f: f["checksum"].__setitem__((0, 1), f["checksum"][0, 1] ^ 1), "frame checksums do not match"),
    (lambda f: f["comp_len"].__setitem__((0, 0), f["comp_len"][0, 0] - 1), "do not tile their chunks"),
    (lambda f: f["raw_len"].__setitem__((1, 2), f["raw_len"][1, 2] + 2), "do not tile their chunks"),
])
def test_forged_frame_entries_are_refused(tmp_path, edit, message):
    from shuffler.errors import FormatError

    url = str(tmp_path / "d")
    write_fields(url)
    name = Dataset.open(url).shards[0].name
    _retamper_index(url, name, edit)
    with pytest.raises(FormatError, match=message):
        Dataset.open(url).index(0)
    damage, _ = Dataset.open(url).check()
    assert len(damage) == 1 and damage[0].chunk is None and message in damage[0].message


def test_producers_write_parts_of_fields_and_seal_joins_them(tmp_path):
    from shuffler.format.seal import seal

    url = str(tmp_path / "d")
    vals = field_values(1000)
    for p, (a, z) in enumerate([(0, 400), (400, 1000)]):
        with ShardWriter(url, fields=FIELDS, producer=f"gpu{p}", chunk_bytes=1 << 14) as w:
            w.write({k: v[a:z] for k, v in vals.items()}, **cols(z - a, a))
    with pytest.raises(SchemaError, match="fields"):  # a part of other fields cannot join
        with ShardWriter(url, fields={"layer.2": (24, "bfloat16")}, producer="gpu9") as w:
            w.write({"layer.2": vals["layer.2"][:5]}, **cols(5))
        seal(url)
    Storage(url).delete("parts/gpu9.json")
    for name in Storage(url).list("gpu9/"):
        Storage(url).delete(name)
    Storage(url).delete("parts/gpu9.started")
    m = seal(url)
    assert m.schema.field_names == tuple(FIELDS) and m.num_rows == 1000
    ds = Dataset.open(url)
    ids = np.concatenate([ds.read_shard(i).columns["token_id"] for i in range(len(ds.shards))])
    got = np.concatenate([ds.read_shard(i).field("layer.4") for i in range(len(ds.shards))])
    np.testing.assert_array_equal(got, vals["layer.4"][ids])

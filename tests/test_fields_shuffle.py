"""Several fields through the shuffle (issue 19): rows move whole, so every field stays with its row; verify,
the fingerprint and `inspect --check` cover every field; scatter on write and permute on read work."""

from __future__ import annotations

import numpy as np
import pytest

from readers import ActivationStream
from shuffler import Dataset
from shuffler.io.dataset import Batch
from shuffler.shuffling.from_scatter import shuffle_from_scatter
from shuffler.shuffling.run import shuffle
from shuffler.shuffling.verify import verify
from shuffler.storage.storage import Storage
from tests.test_fields import FIELDS, bf16, cols, field_values, write_fields
from writers import ScatterSpec, ShardWriter


def read_all(url: str) -> Batch:
    ds = Dataset.open(url)
    return Batch.concat([ds.read_shard(i) for i in range(len(ds.shards))])


def assert_aligned(b, vals, n: int) -> np.ndarray:
    """Every field and column of every row belongs to the same source row; each source row appears once."""
    ids = np.asarray(b.columns["token_id"]).astype(np.int64)
    np.testing.assert_array_equal(np.asarray(b.field("layer.4")), vals["layer.4"][ids])
    np.testing.assert_array_equal(np.asarray(b.field("layer.2")), bf16(vals["layer.2"][ids]))
    np.testing.assert_array_equal(np.asarray(b.field("mlp_out.4")), vals["mlp_out.4"][ids].astype(np.float16))
    np.testing.assert_array_equal(np.asarray(b.columns["position"]), ids % 10)
    assert sorted(ids.tolist()) == list(range(n))
    return ids


def test_shuffle_moves_rows_whole_and_verify_covers_every_field(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    vals = write_fields(src, n=4000)
    m = shuffle(src, dst, seed=5, buckets=4, scratch=str(tmp_path / "scratch"), progress=False)
    assert m.schema == Dataset.open(src).schema and m.fingerprint == Dataset.open(src).manifest.fingerprint
    out = read_all(dst)
    ids = assert_aligned(out, vals, 4000)
    assert not (np.diff(ids) == 1).all()  # shuffled
    assert verify(src, dst, full=True, progress=None).ok
    # The row hash covers every field: changing one value of the last field (kept valid, checksums rewritten)
    # is seen by `verify --full` even though every column and every other field is intact.
    forged = str(tmp_path / "forged")
    with ShardWriter(forged, fields=FIELDS, chunk_bytes=1 << 14, shard_bytes=1 << 16) as w:
        f = {k: v.copy() for k, v in out.fields.items()}
        f["mlp_out.4"][17, 3] = np.float16(-1.5)
        w.write(f, **out.columns)
    report = verify(src, forged, full=True, progress=None)
    assert not report.ok and "1 rows" in " ".join(report.problems)


def test_scatter_on_write_then_reduce_or_permute_on_read(tmp_path):
    url = str(tmp_path / "scat")
    n = 3000
    vals = field_values(n)
    with ShardWriter(url, fields=FIELDS, chunk_bytes=1 << 13, scatter=ScatterSpec(seed=2, buckets=3, run_bytes=1 << 14)) as w:
        for s in range(0, n, 500):
            w.write({k: v[s : s + 500] for k, v in vals.items()}, **cols(500, s))
    # permute on read: only the fields asked for, aligned with the columns
    s = ActivationStream(url, batch_size=256, permute_buckets=True, seed=1, fields=("layer.4",), columns=("token_id",))
    got = [b for b in s]
    ids = np.concatenate([b.columns["token_id"] for b in got]).astype(np.int64)
    np.testing.assert_array_equal(np.concatenate([b.field("layer.4") for b in got]), vals["layer.4"][ids])
    assert sorted(ids.tolist()) == list(range(n)) and got[0].field_names == ("layer.4",)
    # every field, then pass 2 alone
    ids_all = np.concatenate([b.columns["token_id"] for b in ActivationStream(
        url, batch_size=256, permute_buckets=True, seed=1, columns=("token_id",))])
    np.testing.assert_array_equal(ids_all, ids)  # the order does not depend on the fields read
    dst = str(tmp_path / "dst")
    shuffle_from_scatter(url, dst, scratch=str(tmp_path / "scratch"), progress=False)
    assert_aligned(read_all(dst), vals, n)
    assert verify(url, dst, progress=None).ok


def test_inspect_check_finds_a_damaged_field_after_a_shuffle(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write_fields(src, n=2000)
    shuffle(src, dst, seed=1, buckets=2, scratch=str(tmp_path / "scratch"), progress=False)
    ds = Dataset.open(dst)
    e = ds.index(0).frames[0, 1]
    name = ds.shards[0].name
    data = bytearray(Storage(dst).read(name))
    data[int(e["offset"]) + 40] ^= 1
    Storage(dst).write(name, bytes(data))
    damage, _ = Dataset.open(dst).check()
    assert len(damage) == 1 and damage[0].chunk == 0 and "frame 1" in damage[0].message
    with pytest.raises(Exception, match="frame 1"):
        for _ in ActivationStream(dst, batch_size=100, fields=("layer.4",)):
            pass


def test_inspect_shows_the_fields(tmp_path):
    from click.testing import CliRunner

    from shuffler.cli import main

    url = str(tmp_path / "d")
    write_fields(url)
    r = CliRunner().invoke(main, ["inspect", url, "--check"])
    assert r.exit_code == 0, r.output
    assert "field        layer.4: d_model 40, float32," in r.output and "check        OK" in r.output
    info = __import__("json").loads(CliRunner().invoke(main, ["inspect", url, "--json"]).output)
    assert info["format_version"] == 2 and info["fields"][2] == ["mlp_out.4", 16, "float16"]
    stored = info["field_stored_bytes"]
    assert list(stored) == ["layer.2", "layer.4", "mlp_out.4", "(columns)"]
    assert sum(stored.values()) < info["stored_bytes"]  # headers and indexes besides
    one = str(tmp_path / "one")
    with ShardWriter(one, d_model=4, dtype="float32") as w:
        w.write(np.ones((10, 4), np.float32), **cols(10))
    r = CliRunner().invoke(main, ["inspect", one])
    assert "field " not in r.output  # a dataset written without names shows as before

"""Many producers into one dataset, joined by `seal`; unfinished or disagreeing parts are refused."""

from __future__ import annotations

import numpy as np
import pytest

from shuffler import Dataset, SchemaError
from shuffler.format.codec import fingerprint_sum, row_hashes
from shuffler.format.seal import UnfinishedPartError, seal
from writers import ShardWriter


def produce(url, name, n, seed, d=8, dtype="float16"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    with ShardWriter(url, d_model=d, dtype=dtype, producer=name, chunk_bytes=512, shard_bytes=2048,
                     metadata={"model": "m"}) as w:
        w.write(x, token_id=np.arange(n, dtype=np.int32), doc_id=np.full(n, seed, np.int64),
                position=np.arange(n, dtype=np.int32))
    return x


def test_two_producers_seal(any_url):
    produce(any_url, "gpu0", 300, 0)
    produce(any_url, "gpu1", 200, 1)
    m = seal(any_url)
    ds = Dataset.open(any_url)
    assert ds.num_rows == 500 and m.metadata["producers"] == ["gpu0", "gpu1"] and m.metadata["model"] == "m"
    damage, fp = ds.check()
    assert damage == [] and fp == ds.manifest.fingerprint
    docs = np.concatenate([ds.read_shard(i).columns["doc_id"] for i in range(len(ds.shards))])
    assert (docs == 0).sum() == 300 and (docs == 1).sum() == 200
    with pytest.raises(FileExistsError, match="already sealed"):
        seal(any_url)


def test_unfinished_part_is_named(tmp_path):
    url = str(tmp_path / "d")
    produce(url, "gpu0", 100, 0)
    w = ShardWriter(url, d_model=8, dtype="float16", producer="gpu1")  # started, never closed (killed)
    w.write(np.ones((10, 8), np.float32), token_id=np.zeros(10, np.int32), doc_id=np.zeros(10, np.int64),
            position=np.zeros(10, np.int32))
    with pytest.raises(UnfinishedPartError, match=r"parts/gpu1 \(no parts/gpu1.json\)"):
        seal(url)
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_disagreeing_parts_refused(tmp_path):
    url = str(tmp_path / "d")
    produce(url, "a", 50, 0, d=8)
    produce(url, "b", 50, 1, d=16)
    with pytest.raises(SchemaError, match="part 'b' disagrees with part 'a': d_model 16 != 8"):
        seal(url)
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_nothing_to_seal(tmp_path):
    with pytest.raises(FileNotFoundError, match="no part manifests"):
        seal(str(tmp_path / "empty"))


def test_fingerprint_of_sealed_equals_sum_of_rows(tmp_path):
    url = str(tmp_path / "d")
    xa, xb = produce(url, "a", 70, 0), produce(url, "b", 30, 1)
    m = seal(url)
    schema = m.schema
    rows = np.concatenate([xa, xb]).astype(np.float16)
    cols = [np.concatenate([np.arange(70), np.arange(30)]).astype(np.int32),
            np.concatenate([np.zeros(70), np.ones(30)]).astype(np.int64),
            np.concatenate([np.arange(70), np.arange(30)]).astype(np.int32)]
    assert m.fingerprint.hash_sum == fingerprint_sum(row_hashes(schema, rows, cols))

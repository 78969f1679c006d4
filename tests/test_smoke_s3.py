import numpy as np

from shuffler import Dataset
from writers import ShardWriter


def test_roundtrip_each_backend(any_url):
    rng = np.random.default_rng(1)
    acts = rng.standard_normal((3000, 16)).astype(np.float16)
    tok = np.arange(3000, dtype=np.int32)
    with ShardWriter(any_url, d_model=16, dtype="float16", columns=(("token_id", "int32"),), chunk_bytes=8192,
                     shard_bytes=32768) as w:
        w.write(acts, token_id=tok)
    ds = Dataset.open(any_url)
    got = [ds.read_shard(i) for i in range(len(ds.shards))]
    assert np.array_equal(np.concatenate([g.acts for g in got]), acts)
    assert np.array_equal(np.concatenate([g.columns["token_id"] for g in got]), tok)

"""ShardWriter: bad input is refused with a clear message, and nothing half-written becomes visible."""

from __future__ import annotations

import numpy as np
import pytest

from shuffler import Dataset, DatasetNotFoundError, SchemaError
from shuffler.storage.storage import Storage
from writers import ShardWriter

COLS = (("token_id", "int32"), ("doc_id", "int64"), ("position", "int32"))


def cols(n, start=0):
    r = np.arange(start, start + n)
    return {"token_id": r.astype(np.int32), "doc_id": (r // 10).astype(np.int64), "position": (r % 10).astype(np.int32)}


def test_rejects_wrong_d_model(tmp_path):
    with pytest.raises(SchemaError, match=r"shape \(5, 9\); expected \[rows, d_model=8\]"):
        with ShardWriter(str(tmp_path / "d"), d_model=8, dtype="float32") as w:
            w.write(np.zeros((5, 9), np.float32), **cols(5))
    assert Storage(str(tmp_path / "d")).list() == []


def test_rejects_bad_dtype_and_params(tmp_path):
    with pytest.raises(SchemaError, match="dtype 'int8' is not supported"):
        ShardWriter(str(tmp_path / "d"), d_model=8, dtype="int8")
    with pytest.raises(SchemaError, match="d_model 0"):
        ShardWriter(str(tmp_path / "d"), d_model=0, dtype="float32")
    with pytest.raises(ValueError, match="chunk_bytes=3"):
        ShardWriter(str(tmp_path / "d"), d_model=8, dtype="float32", chunk_bytes=3)
    with pytest.raises(ValueError, match="level=99"):
        ShardWriter(str(tmp_path / "d"), d_model=8, dtype="float32", level=99)
    with pytest.raises(SchemaError, match="column 'doc_id' must be int64"):
        ShardWriter(str(tmp_path / "d"), d_model=8, dtype="float32", columns=(("doc_id", "int32"),))


def test_rejects_mismatched_column_lengths_and_names(tmp_path):
    url = str(tmp_path / "d")
    with pytest.raises(SchemaError, match=r"column 'doc_id' has shape \(4,\); expected \[5\]"):
        with ShardWriter(url, d_model=4, dtype="float16") as w:
            c = cols(5)
            c["doc_id"] = c["doc_id"][:4]
            w.write(np.zeros((5, 4), np.float32), **c)
    with pytest.raises(SchemaError, match=r"missing \['position'\]"):
        with ShardWriter(url, d_model=4, dtype="float16") as w:
            c = cols(5)
            del c["position"]
            w.write(np.zeros((5, 4), np.float32), **c)
    with pytest.raises(SchemaError, match="outside int32's range"):
        with ShardWriter(url, d_model=4, dtype="float16") as w:
            c = cols(5)
            c["token_id"] = np.full(5, 2**40, dtype=np.int64)
            w.write(np.zeros((5, 4), np.float32), **c)
    assert Storage(url).list() == []


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_nonfinite_refused_by_default_allowed_by_option(tmp_path, dtype):
    x = np.ones((6, 4), np.float32)
    x[3, 2] = np.nan
    x[1, 0] = np.inf
    with pytest.raises(ValueError, match="holds 2 NaN/inf values; pass allow_nonfinite=True"):
        with ShardWriter(str(tmp_path / "a"), d_model=4, dtype=dtype) as w:
            w.write(x, **cols(6))
    assert not Storage(str(tmp_path / "a")).list()
    with ShardWriter(str(tmp_path / "b"), d_model=4, dtype=dtype, allow_nonfinite=True) as w:
        w.write(x, **cols(6))
    got = Dataset.open(str(tmp_path / "b")).read_shard(0).float32()
    assert np.isnan(got[3, 2]) and np.isinf(got[1, 0])


def test_exception_mid_write_leaves_nothing_visible(any_url):
    # Enough rows for several committed shards before the failure.
    with pytest.raises(RuntimeError, match="producer crashed"):
        with ShardWriter(any_url, d_model=16, dtype="float32", chunk_bytes=4096, shard_bytes=8192) as w:
            for k in range(10):
                w.write(np.ones((100, 16), np.float32), **cols(100, 100 * k))
            assert len(Storage(any_url).list()) >= 3  # shards were committed along the way
            raise RuntimeError("producer crashed")
    assert Storage(any_url).list() == []
    with pytest.raises(DatasetNotFoundError, match="no manifest.json"):
        Dataset.open(any_url)


def test_refuses_to_overwrite_existing_dataset(tmp_path):
    url = str(tmp_path / "d")
    with ShardWriter(url, d_model=2, dtype="float32") as w:
        w.write(np.ones((3, 2), np.float32), **cols(3))
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        ShardWriter(url, d_model=2, dtype="float32")
    with ShardWriter(url, d_model=2, dtype="float32", overwrite=True) as w:
        w.write(np.zeros((4, 2), np.float32), **cols(4))
    assert Dataset.open(url).num_rows == 4


def test_torch_input_any_layout(tmp_path):
    torch = pytest.importorskip("torch")
    x = torch.randn(8, 50).T  # non-contiguous [50, 8]
    with ShardWriter(str(tmp_path / "d"), d_model=8, dtype="float32") as w:
        w.write(x, token_id=torch.arange(50, dtype=torch.int32), doc_id=torch.zeros(50, dtype=torch.int64),
                position=torch.arange(50, dtype=torch.int32))
    b = Dataset.open(str(tmp_path / "d")).read_shard(0)
    assert np.array_equal(b.acts, x.numpy())
    assert np.array_equal(b.columns["token_id"], np.arange(50))


def test_metadata_and_writes_after_close(tmp_path):
    url = str(tmp_path / "d")
    w = ShardWriter(url, d_model=2, dtype="float32", metadata={"model": "m", "layer": 3})
    w.write(np.ones((3, 2), np.float32), **cols(3))
    m = w.close()
    assert m.metadata == {"model": "m", "layer": 3}
    with pytest.raises(ValueError, match="closed"):
        w.write(np.ones((3, 2), np.float32), **cols(3))
    with pytest.raises(TypeError, match="JSON-serialisable"):
        ShardWriter(str(tmp_path / "e"), d_model=2, dtype="float32", metadata={"x": object()})


def test_failed_overwrite_keeps_the_old_dataset(any_url):
    with ShardWriter(any_url, d_model=4, dtype="float32", chunk_bytes=4 * 4 * 10 + 160, shard_bytes=2000) as w:
        w.write(np.full((100, 4), 1, np.float32), **cols(100))
    old = Dataset.open(any_url).manifest
    with pytest.raises(RuntimeError, match="crash"):
        with ShardWriter(any_url, d_model=4, dtype="float32", overwrite=True, chunk_bytes=4 * 4 * 10 + 160,
                         shard_bytes=2000) as w:
            w.write(np.full((300, 4), 2, np.float32), **cols(300))
            raise RuntimeError("crash")
    ds = Dataset.open(any_url)
    assert ds.manifest == old and ds.check()[0] == []  # the old dataset is whole
    with ShardWriter(any_url, d_model=4, dtype="float32", overwrite=True, chunk_bytes=4 * 4 * 10 + 160,
                     shard_bytes=2000) as w:
        w.write(np.full((30, 4), 3, np.float32), **cols(30))
    ds = Dataset.open(any_url)
    assert ds.num_rows == 30 and ds.check()[0] == []
    shard_objects = [n for n in Storage(any_url).list() if n.endswith(".shard")]
    assert sorted(shard_objects) == sorted(s.name for s in ds.shards)  # the old shards were removed

"""SAELens activation caches: a folder built here with `datasets` exactly as SAELens's CacheActivationsRunner
builds one imports correctly, and our export is a folder `datasets` (and SAELens's cached path) loads.

Layout checked against SAELens's source (decoderesearch/SAELens, peers-sae-tooling.md section 1):
cache_activations_runner.py builds Features({hook_name: Array2D(shape=(context_size, d_in), dtype),
"token_ids": Sequence(Value("int32"), length=context_size)}) and saves shards with save_to_disk;
training_store.load_cached_activation_dataset calls datasets.load_from_disk(path), requires
features[hook_name].shape == (context_size, d_in), sets format torch on [hook_name, token_ids], and reads
consecutive rows, reshaping [batch, context, d_in] to [batch * context, d_in].
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

try:  # tests/ may or may not be a package (tests/__init__.py); work either way
    from .test_interop_helpers import read_all, same_rows, write_dataset
except ImportError:
    from test_interop_helpers import read_all, same_rows, write_dataset

from shuffler.errors import SchemaError
from shuffler.interop.exporter import ExportConfig, export_dataset
from shuffler.io.dataset import Batch
from writers.importers import ImportConfig, import_activations, to_dtype

datasets = pytest.importorskip("datasets")
HOOK = "blocks.3.hook_resid_post"


def saelens_cache(path, acts, token_ids, *, dtype="float32", num_shards=3, extra_hooks=()):
    """A cache as CacheActivationsRunner._create_shard + save_to_disk writes it. acts: [n, ctx, d]."""
    n, ctx, d = acts.shape
    feats = {HOOK: datasets.Array2D(shape=(ctx, d), dtype=dtype)}
    data = {HOOK: acts}
    for h in extra_hooks:
        feats[h] = datasets.Array2D(shape=(ctx, d), dtype=dtype)
        data[h] = acts * 2
    if token_ids is not None:
        feats["token_ids"] = datasets.Sequence(datasets.Value(dtype="int32"), length=ctx)
        data["token_ids"] = token_ids
    ds = datasets.Dataset.from_dict(data, features=datasets.Features(feats))
    ds.save_to_disk(str(path), num_shards=num_shards)
    return ds


def saelens_load(path, hook, ctx, d, batch, dtype):
    """The steps of SAELens's cached-activations path (ActivationsStore), replayed on `datasets` itself."""
    torch = pytest.importorskip("torch")
    ds = datasets.load_from_disk(str(path))
    columns = [hook] + (["token_ids"] if "token_ids" in ds.column_names else [])
    ds.set_format(type="torch", columns=columns, device=torch.device("cpu"), dtype=getattr(torch, dtype))
    assert hook in ds.column_names
    assert ds.features[hook].shape == (ctx, d)
    out, toks = [], []
    row = 0
    while row <= len(ds) - batch:
        s = ds[row : row + batch]
        assert s[hook].shape == (batch, ctx, d)
        out.append(s[hook].reshape(batch * ctx, d))
        if "token_ids" in s:
            assert s["token_ids"].shape == (batch, ctx)
            toks.append(s["token_ids"].reshape(batch * ctx))
        row += batch
    return torch.cat(out), (torch.cat(toks) if toks else None)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_import_saelens_cache(tmp_path, dtype):
    rng = np.random.default_rng(0)
    n, ctx, d = 30, 8, 12
    acts = rng.standard_normal((n, ctx, d)).astype(dtype)
    tok = rng.integers(0, 50257, (n, ctx)).astype(np.int32)
    saelens_cache(tmp_path / "cache", acts, tok, dtype=dtype)
    r = import_activations(str(tmp_path / "cache"), str(tmp_path / "ds"), ImportConfig(batch_bytes=2000))
    assert (r.format, r.column, r.rows, r.d_model, r.dtype, r.context_size) == ("saelens", HOOK, n * ctx, d, dtype, ctx)
    assert r.derived == ["position"]
    got = read_all(str(tmp_path / "ds"))
    want = Batch(acts.reshape(-1, d), {"token_id": tok.reshape(-1),
                                        "position": np.tile(np.arange(ctx, dtype=np.int32), n)}, dtype)
    same_rows(got, want)
    from shuffler.io.dataset import Dataset

    meta = Dataset.open(str(tmp_path / "ds")).metadata
    assert meta["hook_name"] == HOOK and meta["context_size"] == ctx


def test_import_saelens_without_token_ids_and_bf16_conversion(tmp_path):
    """Newer SAELens may cache no token_ids; --dtype bfloat16 rounds float32 to nearest even."""
    rng = np.random.default_rng(1)
    acts = rng.standard_normal((6, 4, 5)).astype(np.float32)
    saelens_cache(tmp_path / "cache", acts, None, num_shards=2)
    r = import_activations(str(tmp_path / "cache"), str(tmp_path / "ds"), ImportConfig(dtype="bfloat16"))
    assert r.columns == ["position"] and r.source_dtype == "float32"
    got = read_all(str(tmp_path / "ds"))
    same_rows(got, Batch(to_dtype(acts.reshape(-1, 5), "float32", "bfloat16"),
                         {"position": np.tile(np.arange(4, dtype=np.int32), 6)}, "bfloat16"))


def test_multi_hook_cache_needs_column(tmp_path):
    rng = np.random.default_rng(2)
    acts = rng.standard_normal((4, 2, 3)).astype(np.float32)
    other = "blocks.4.hook_resid_post"
    saelens_cache(tmp_path / "cache", acts, np.zeros((4, 2), np.int32), extra_hooks=(other,), num_shards=1)
    with pytest.raises(SchemaError, match=r"found 2 \(blocks.3.hook_resid_post, blocks.4.hook_resid_post\) activation columns.*--column"):
        import_activations(str(tmp_path / "cache"), str(tmp_path / "ds"))
    r = import_activations(str(tmp_path / "cache"), str(tmp_path / "ds"), ImportConfig(column=other))
    assert r.skipped == [HOOK]
    np.testing.assert_array_equal(read_all(str(tmp_path / "ds")).acts, acts.reshape(-1, 3) * 2)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_export_saelens_loads_with_datasets_and_saelens_steps(tmp_path, dtype):
    rng = np.random.default_rng(3)
    ctx, d, rows = 16, 10, 16 * 25
    acts = to_dtype(rng.standard_normal((rows, d)).astype(np.float32), "float32", dtype)
    tok = rng.integers(0, 30000, rows).astype(np.int32)
    doc = np.arange(rows, dtype=np.int64) // 37
    src = str(tmp_path / "ds")
    write_dataset(src, acts, dtype, {"token_id": tok, "doc_id": doc}, chunk_bytes=1000)
    out = tmp_path / "cache"
    r = export_dataset(src, str(out), ExportConfig(format="saelens", column=HOOK, context_size=ctx, file_bytes=5000))
    assert r.rows == rows and len(r.files) > 1  # several data-XXXXX-of-YYYYY.arrow files
    assert sorted(os.listdir(out)) == sorted([os.path.basename(f) for f in r.files]
                                             + ["dataset_info.json", "state.json", "shuffler_export.json"])
    hd = datasets.load_from_disk(str(out))
    assert len(hd) == rows // ctx
    assert hd.features[HOOK] == datasets.Array2D(shape=(ctx, d), dtype="float16" if dtype == "float16" else "float32")
    hd.set_format("numpy")
    whole = hd[:]
    f32 = Batch(acts, {}, dtype).float32()
    np.testing.assert_array_equal(whole[HOOK].astype(np.float32).reshape(-1, d), f32)
    np.testing.assert_array_equal(whole["token_ids"].reshape(-1), tok)
    np.testing.assert_array_equal(whole["doc_id"].reshape(-1), doc)
    # SAELens trains with dtype = the stored one; for bfloat16 its set_format narrows float32 back exactly
    got, toks = saelens_load(out, HOOK, ctx, d, batch=5, dtype=dtype)
    torch = pytest.importorskip("torch")
    want = Batch(acts, {}, dtype).torch_acts()
    assert got.dtype == want.dtype and torch.equal(got, want)
    # SAELens's set_format(dtype=...) casts token_ids to the activation dtype too (datasets' torch formatter
    # applies dtype to every column), so in a float16/bfloat16 run ids above 2048/256 come back rounded: the
    # cache holds them exactly (checked above), SAELens's loader rounds them.
    assert toks.dtype == want.dtype
    assert torch.equal(toks, torch.from_numpy(tok).to(want.dtype))


def test_saelens_folder_roundtrip_same_rows(tmp_path):
    """SAELens cache -> import -> export saelens -> datasets loads the same rows as the original."""
    rng = np.random.default_rng(4)
    acts = rng.standard_normal((20, 8, 6)).astype(np.float32)
    tok = rng.integers(0, 1000, (20, 8)).astype(np.int32)
    orig = saelens_cache(tmp_path / "cache", acts, tok)
    import_activations(str(tmp_path / "cache"), str(tmp_path / "ds"))
    export_dataset(str(tmp_path / "ds"), str(tmp_path / "again"), ExportConfig(format="saelens"))  # hook, ctx from metadata
    back = datasets.load_from_disk(str(tmp_path / "again"))
    assert back.features[HOOK] == orig.features[HOOK]
    assert back.features["token_ids"] == orig.features["token_ids"]
    orig.set_format("numpy")
    back.set_format("numpy")
    a, b = orig[:], back[:]
    np.testing.assert_array_equal(a[HOOK], b[HOOK])
    np.testing.assert_array_equal(a["token_ids"], b["token_ids"])
    np.testing.assert_array_equal(b["position"], np.tile(np.arange(8), (20, 1)))


def test_saelens_export_remainder_and_atomicity(tmp_path):
    acts = np.ones((50, 4), np.float32)
    src = str(tmp_path / "ds")
    write_dataset(src, acts, "float32", {"token_id": np.arange(50, dtype=np.int32)})
    dst = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"50 rows are not whole contexts of 16 rows \(2 left over\).*--drop-remainder"):
        export_dataset(src, str(dst), ExportConfig(format="saelens", column=HOOK, context_size=16))
    assert not dst.exists() and os.listdir(tmp_path) == ["ds"]  # no folder, no temporary left behind
    with pytest.raises(ValueError, match="--column"):
        export_dataset(src, str(dst), ExportConfig(format="saelens", context_size=5))
    r = export_dataset(src, str(dst), ExportConfig(format="saelens", column=HOOK, context_size=16, drop_remainder=True))
    assert (r.rows, r.dropped_rows) == (48, 2)
    assert json.loads((dst / "shuffler_export.json").read_text())["dropped_rows"] == 2
    assert len(datasets.load_from_disk(str(dst))) == 3
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_dataset(src, str(dst), ExportConfig(format="saelens", column=HOOK, context_size=5))
    export_dataset(src, str(dst), ExportConfig(format="saelens", column=HOOK, context_size=5, overwrite=True))
    assert len(datasets.load_from_disk(str(dst))) == 10
    assert sorted(os.listdir(tmp_path)) == ["cache", "ds"]


def test_import_saelens_cache_pushed_to_hub_as_parquet(tmp_path):
    """push_to_hub stores the same features as Parquet shards: nested lists, read by the parquet importer."""
    rng = np.random.default_rng(5)
    acts = rng.standard_normal((12, 4, 6)).astype(np.float32)
    tok = rng.integers(0, 1000, (12, 4)).astype(np.int32)
    ds = saelens_cache(tmp_path / "cache", acts, tok, num_shards=1)
    os.mkdir(tmp_path / "hub")
    ds.select(range(5)).to_parquet(str(tmp_path / "hub" / "train-00000-of-00002.parquet"))
    ds.select(range(5, 12)).to_parquet(str(tmp_path / "hub" / "train-00001-of-00002.parquet"))
    r = import_activations(str(tmp_path / "hub"), str(tmp_path / "ds"), ImportConfig(batch_bytes=200))
    assert (r.format, r.column, r.context_size, r.derived) == ("parquet", HOOK, 4, ["position"])
    same_rows(read_all(str(tmp_path / "ds")), Batch(acts.reshape(-1, 6), {
        "token_id": tok.reshape(-1), "position": np.tile(np.arange(4, dtype=np.int32), 12)}, "float32"))

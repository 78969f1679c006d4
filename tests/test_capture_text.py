"""The capture corpus (stdlib docstrings, text folders) and its packing into token windows with provenance."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from writers.text import (
    TextSource,
    special_tokens,
    stdlib_dir,
    stdlib_docstrings,
    text_files,
    token_batches,
)

LONG = "This docstring has more than twelve words so it is kept by the corpus reader, {}."


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from writers.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2"), local_files_only=True)


def test_stdlib_docstrings_rules(tmp_path):
    """Sorted file order, >= 12 words, deduplicated, excluded folders skipped, unparsable files skipped."""
    files = {
        "b.py": f'"""{LONG.format("b module")}"""\ndef f():\n    """{LONG.format("b.f")}"""\n',
        "a.py": f'"""{LONG.format("a module")}"""\nclass C:\n    """Too short to keep."""\n'
                f'    async def g(self):\n        """{LONG.format("b.f")}"""\n',
        "pkg/c.py": f'def h():\n    """{LONG.format("pkg.c.h")}"""\n',
        "test/t.py": f'"""{LONG.format("in test")}"""\n',
        "pkg/tests/t.py": f'"""{LONG.format("in tests")}"""\n',
        "idlelib/i.py": f'"""{LONG.format("idle")}"""\n',
        "lib2to3/l.py": f'"""{LONG.format("2to3")}"""\n',
        "site-packages/s.py": f'"""{LONG.format("third party")}"""\n',
        "bad.py": 'def (:\n    """never parsed"""\n',
        "notes.txt": f"{LONG.format('not python')}\n",
    }
    for name, src in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(src)
    got = list(stdlib_docstrings(root=tmp_path))
    # a.py first (sorted), its duplicate of b.f's docstring kept there, so b.f's copy is dropped.
    assert got == [LONG.format(x) for x in ("a module", "b.f", "b module", "pkg.c.h")]
    assert list(stdlib_docstrings(root=tmp_path, min_words=30)) == []


def test_default_source_is_real_stdlib_text():
    src = TextSource()
    docs = []
    for d in src.documents():
        docs.append(d)
        if len(docs) == 200:
            break
    assert len(docs) == 200 and len(set(docs)) == 200
    assert all(len(d.split()) >= 12 for d in docs)
    assert str(stdlib_dir()) in src.describe()
    assert src.get([3, 0, 150]) == {0: docs[0], 3: docs[3], 150: docs[150]}


def test_text_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.md").write_text("# first file")
    (tmp_path / "sub" / "c.TXT").write_text("third, in a subfolder")
    (tmp_path / "skip.py").write_text("print('not text')")
    assert [p.name for p in text_files(tmp_path)] == ["a.md", "b.txt", "c.TXT"]
    src = TextSource(text_dir=str(tmp_path))
    assert list(src.documents()) == ["# first file", "second file", "third, in a subfolder"]
    assert str(tmp_path) in src.describe()


def test_text_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*no such folder"):
        TextSource(text_dir=str(tmp_path / "nowhere"))
    (tmp_path / "x.py").write_text("")
    with pytest.raises(FileNotFoundError, match=r"holds no \.txt or \.md files"):
        TextSource(text_dir=str(tmp_path))


def _check_batches(batches, docs, tokenizer, *, context, batch_size, keep_special):
    """Every invariant of the packing, against an independent per-document tokenization."""
    prefix, suffix = special_tokens(tokenizer)
    content = context - len(prefix) - len(suffix)
    per_doc = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    exp_tok = np.array([t for toks in per_doc for t in toks], dtype=np.int64)
    exp_doc = np.array([i for i, toks in enumerate(per_doc) for _ in toks], dtype=np.int64)
    exp_pos = np.array([j for toks in per_doc for j in range(len(toks))], dtype=np.int64)
    n_windows = -(-len(exp_tok) // content)
    assert sum(b.input_ids.shape[0] for b in batches) == n_windows
    assert all(b.input_ids.shape == (batch_size, context) for b in batches[:-1])
    tok, doc, pos = [], [], []
    for bi, b in enumerate(batches):
        real = b.attention_mask.astype(bool)
        assert b.input_ids.shape[1] == context
        assert (b.input_ids[~real] == tokenizer.pad_token_id).all()
        lengths = real.sum(1)
        last_batch = bi == len(batches) - 1
        for w, n in enumerate(lengths):
            assert real[w, :n].all() and not real[w, n:].any()  # padding only at the end
            if not (last_batch and w == len(lengths) - 1):
                assert n == context  # only the very last window is short
            row = b.input_ids[w, :n]
            assert list(row[: len(prefix)]) == prefix and list(row[n - len(suffix) :]) == suffix
            assert (b.doc_id[w, : len(prefix)] == -1).all() and (b.doc_id[w, n - len(suffix) : n] == -1).all()
        if keep_special:
            assert (b.store == real).all()
            m = real & (b.doc_id >= 0)
        else:
            m = b.store
            assert (m == (real & (b.doc_id >= 0))).all()
        tok.append(b.input_ids[m])
        doc.append(b.doc_id[m])
        pos.append(b.position[m])
    np.testing.assert_array_equal(np.concatenate(tok), exp_tok)
    np.testing.assert_array_equal(np.concatenate(doc), exp_doc)
    np.testing.assert_array_equal(np.concatenate(pos), exp_pos)


words = st.text(alphabet="abcdefghij klmnop,.()XYZ\n", min_size=0, max_size=120)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(words, min_size=1, max_size=12), context=st.integers(3, 40), batch_size=st.integers(1, 5),
       keep_special=st.booleans(), group=st.integers(1, 5))
def test_token_batches_invariants(tokenizer, docs, context, batch_size, keep_special, group):
    if not any(tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs):
        assert list(token_batches(docs, tokenizer, context=context, batch_size=batch_size)) == []
        return
    batches = list(token_batches(docs, tokenizer, context=context, batch_size=batch_size,
                                 keep_special=keep_special, tokenize_group=group))
    _check_batches(batches, docs, tokenizer, context=context, batch_size=batch_size, keep_special=keep_special)


def test_token_batches_on_stdlib_text_are_lazy(tokenizer):
    """Taking two batches reads only the first few documents, not the whole standard library."""
    read = []

    def docs():
        for i, d in enumerate(TextSource().documents()):
            read.append(i)
            yield d

    it = token_batches(docs(), tokenizer, context=128, batch_size=2, tokenize_group=8)
    first = [next(it), next(it)]
    assert all(b.input_ids.shape == (2, 128) for b in first)
    assert len(read) < 100
    assert first[0].position.max() >= 0 and first[0].doc_id[first[0].store].min() == 0


def test_token_batches_errors(tokenizer):
    with pytest.raises(ValueError, match="context=2 leaves no room"):
        list(token_batches(["some text"], tokenizer, context=2, batch_size=1))
    with pytest.raises(ValueError, match="batch_size=0"):
        list(token_batches(["some text"], tokenizer, context=8, batch_size=0))
    with pytest.raises(ValueError, match="min_words=0"):
        TextSource(min_words=0)

"""Text to capture from, and its cut into model-sized token windows with provenance.

The default corpus is real English every machine has offline: the docstrings of the Python standard library of
the running interpreter (sysconfig's stdlib directory), read with ast.get_docstring. `TextSource(text_dir=...)`
reads a folder of .txt / .md files instead, one document per file.

Windows are packed: each document is tokenized on its own (no special tokens), the token streams are joined in
document order and cut into windows of `context` tokens, each wrapped in the tokenizer's special tokens
(BERT: [CLS] + context-2 content tokens + [SEP]). So a window may hold the end of one document and the start of
the next (as in LM pretraining), and no compute goes to padding
except in the very last window.

Provenance of every content token: doc_id is the document's index in TextSource order (0, 1, ...; a document that
tokenizes to nothing still uses up its id) and position is the token's index within its document's tokens: it
does NOT restart per window, so doc_id and position find the token in the text even when a document spans
several windows. Special tokens belong to no document: doc_id = position = -1 (stored only with keep_special).
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Folder names never read from the stdlib: test suites (code-heavy, odd text), IDLE and lib2to3 (excluded in
#: the shared sample too), and third-party packages installed under the stdlib directory.
EXCLUDED_DIRS = frozenset(["test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"])
TEXT_SUFFIXES = (".txt", ".md")


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder (sysconfig's 'stdlib' path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _sorted_py_files(root: Path) -> Iterator[Path]:
    """Every .py file under root except EXCLUDED_DIRS, in sorted path order (deterministic across machines)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for f in sorted(filenames):
            if f.endswith(".py"):
                yield Path(dirpath) / f


def stdlib_docstrings(*, root: Path | None = None, min_words: int = 12) -> Iterator[str]:
    """Unique docstrings (module, class, function) with >= min_words words, lazily, in sorted file order."""
    seen: set[str] = set()
    for path in _sorted_py_files(root or stdlib_dir()):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # a few stdlib files are deliberately unparsable or unreadable; they hold no docstrings we need
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words and doc not in seen:
                    seen.add(doc)
                    yield doc


def text_files(text_dir: str | os.PathLike) -> list[Path]:
    """The .txt / .md files under text_dir, recursively, sorted. Raises if the folder is missing or has none."""
    root = Path(text_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--text {str(text_dir)!r}: no such folder ({root.resolve()})")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"--text {str(text_dir)!r}: folder {root.resolve()} holds no .txt or .md files")
    return files


@dataclass(frozen=True, kw_only=True)
class TextSource:
    """Where capture text comes from. Documents come out lazily and always in the same order."""

    text_dir: str | None = None
    """Folder of .txt / .md files (one document per file, sorted path order); None = stdlib docstrings."""
    min_words: int = 12
    """Stdlib docstrings shorter than this many words are skipped (one-liners carry little context)."""

    def __post_init__(self) -> None:
        if self.min_words < 1:
            raise ValueError(f"min_words={self.min_words} must be >= 1")
        if self.text_dir is not None:
            text_files(self.text_dir)  # fail now, naming the folder, rather than mid-capture

    def documents(self) -> Iterator[str]:
        if self.text_dir is None:
            yield from stdlib_docstrings(min_words=self.min_words)
            return
        for path in text_files(self.text_dir):
            yield path.read_text(encoding="utf-8", errors="replace")

    def get(self, doc_ids: Iterable[int]) -> dict[int, str]:
        """The text of the given document ids (reads the source up to the largest id)."""
        wanted = set(int(d) for d in doc_ids)
        out: dict[int, str] = {}
        if not wanted:
            return out
        last = max(wanted)
        for i, doc in enumerate(self.documents()):
            if i in wanted:
                out[i] = doc
            if i >= last:
                break
        return out

    def describe(self) -> str:
        if self.text_dir is None:
            v = sys.version_info
            return (
                f"stdlib docstrings of Python {v.major}.{v.minor}.{v.micro} at {stdlib_dir()} (ast.get_docstring, "
                f">= {self.min_words} words, excluding {'/'.join(sorted(EXCLUDED_DIRS - {'__pycache__'}))}, "
                "deduplicated, sorted file order)"
            )
        return f"text files (*.txt, *.md, one document each, sorted) under {Path(self.text_dir).expanduser().resolve()}"


@dataclass(frozen=True)
class TokenBatch:
    """One model batch plus the provenance of every token. Arrays are numpy or torch, all [B, T]."""

    input_ids: object
    """[B, T] token ids fed to the model (padding = the tokenizer's pad id)."""
    attention_mask: object
    """[B, T] 1 for real tokens, 0 for padding; padding is never stored."""
    doc_id: object
    """[B, T] int64 document index of each token (-1 for special and padding tokens)."""
    position: object
    """[B, T] int32 index of the token within its document (-1 for special and padding tokens)."""
    store: object = None
    """[B, T] bool, tokens to store; None = every token the attention mask marks real."""


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) token ids the tokenizer wraps around a sequence, e.g. ([101], [102]) for BERT."""
    plain = list(tokenizer("hello", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("hello", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(f"cannot find the special tokens of {type(tokenizer).__name__}: {plain} is not inside {full}")


def token_batches(
    documents: Iterable[str],
    tokenizer,
    *,
    context: int,
    batch_size: int,
    keep_special: bool = False,
    tokenize_group: int = 64,
) -> Iterator[TokenBatch]:
    """Pack documents into windows of `context` tokens and yield TokenBatches of `batch_size` windows, lazily.

    Only the last batch is short, and only its last window is padded.
    """
    prefix, suffix = special_tokens(tokenizer)
    n_special = len(prefix) + len(suffix)
    content = context - n_special  # content tokens per window
    if content < 1:
        raise ValueError(f"context={context} leaves no room for content after {n_special} special token(s)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    want = content * batch_size
    ids: list[np.ndarray] = []
    docs: list[np.ndarray] = []
    pos: list[np.ndarray] = []
    have = 0

    def take(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nonlocal ids, docs, pos, have
        if len(ids) > 1:  # join what is pending once; the remainder stays one array, sliced as views after
            ids, docs, pos = [np.concatenate(ids)], [np.concatenate(docs)], [np.concatenate(pos)]
        i, d, p = ids[0], docs[0], pos[0]
        ids, docs, pos, have = [i[n:]], [d[n:]], [p[n:]], have - n
        return i[:n], d[:n], p[:n]

    def build(tok: np.ndarray, doc: np.ndarray, posn: np.ndarray) -> TokenBatch:
        n = tok.shape[0]
        windows = -(-n // content)
        t = np.full((windows, context), pad, dtype=np.int64)  # [B, T]
        d = np.full((windows, context), -1, dtype=np.int64)
        p = np.full((windows, context), -1, dtype=np.int32)
        m = np.zeros((windows, context), dtype=np.int64)
        full = n // content
        lo = len(prefix)
        if full:
            t[:full, lo : lo + content] = tok[: full * content].reshape(full, content)
            d[:full, lo : lo + content] = doc[: full * content].reshape(full, content)
            p[:full, lo : lo + content] = posn[: full * content].reshape(full, content)
            m[:full, : context] = 1
            t[:full, :lo] = prefix
            t[:full, lo + content :] = suffix
        rest = n - full * content
        if rest:  # the one partial window: [prefix, rest tokens, suffix, padding]
            t[full, :lo] = prefix
            t[full, lo : lo + rest] = tok[full * content :]
            d[full, lo : lo + rest] = doc[full * content :]
            p[full, lo : lo + rest] = posn[full * content :]
            t[full, lo + rest : lo + rest + len(suffix)] = suffix
            m[full, : lo + rest + len(suffix)] = 1
        store = m.astype(bool) if keep_special else d >= 0
        return TokenBatch(input_ids=t, attention_mask=m, doc_id=d, position=p, store=store)

    doc_index = 0
    group: list[str] = []

    def flush_group() -> None:
        nonlocal doc_index, have
        encoded = tokenizer(group, add_special_tokens=False, verbose=False)["input_ids"]
        for toks in encoded:  # per document, not per token
            k = len(toks)
            if k:
                ids.append(np.asarray(toks, dtype=np.int64))
                docs.append(np.full(k, doc_index, dtype=np.int64))
                pos.append(np.arange(k, dtype=np.int32))
                have += k
            doc_index += 1
        group.clear()

    for text in documents:
        group.append(text)
        if len(group) >= tokenize_group:
            flush_group()
            while have >= want:
                yield build(*take(want))
    if group:
        flush_group()
    while have >= want:
        yield build(*take(want))
    if have:
        yield build(*take(have))

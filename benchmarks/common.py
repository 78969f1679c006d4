"""Shared pieces of the peer, scaling and storage benchmarks: test data, shuffle-quality metrics, buffer
shuffles as other tools do them, and wall-time / peak-memory measurement of a tool run in its own process.

Quality metrics (docs/bench-peers.md explains them). Each takes `order`: the input row index of every output
row, in output order (a permutation of 0..N-1, or a subset of one when a tool drops rows):
- adjacency(order, doc): the fraction of adjacent output pairs from the same document, against its expectation
  under a uniform permutation, sum_d c_d (c_d - 1) / (N (N - 1)) (c_d = rows of document d).
- position_chi2(order, n): a chi-square test that the output positions of a tagged block of input rows (the
  contiguous middle 1%) are uniform over the output.
- displacement(order): mean |output position - input position| / N; a uniform permutation gives (N^2-1)/(3N^2).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

MiB, GiB = 1 << 20, 1 << 30
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DOC_ROWS = 256  # rows per document in the synthetic data and per 256-token window in the real sample
SAMPLE_DIR = os.path.join(ROOT, "bench-out", "sample")  # git-ignored; the capture is reused by later runs
SAMPLE_ROWS = 26_041


# ---------------------------------------------------------------------------------------------------
# Real activations: captured once with the project's own capture code, then cached


def real_sample(*, rows: int = SAMPLE_ROWS, cache_dir: str = SAMPLE_DIR, required: bool = False) -> np.ndarray | None:
    """Real activations, [rows, 384] float16 in text order: all-MiniLM-L6-v2 layer 3 (hidden_states[3], the
    output of encoder block 3 of 6) over the Python standard library's docstrings, cut into windows of 256
    tokens ([CLS] + 254 + [SEP], special tokens kept, so a window is 256 rows), run in float32 and stored as
    float16. The first run captures them offline with writers.capture.capture_text (extra `capture`, about
    10-30 s on 2 cores) into `cache_dir`; later runs load that file. Prints where the rows came from.
    Without the `capture` extra: None (or ImportError when `required`)."""
    path = os.path.join(cache_dir, f"minilm_l3_fp16_{rows}.npy")
    if os.path.exists(path):
        x = np.load(path)
        print(f"real sample: {path} ({len(x):,} x {x.shape[1]} float16, cached capture of all-MiniLM-L6-v2 layer 3)")
        return x
    try:
        from writers.capture import CaptureConfig, capture_text
        from writers.models import resolve_model

        resolve_model("all-MiniLM-L6-v2")
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except (ImportError, OSError, ValueError) as e:
        if required:
            raise ImportError(f"capturing the real sample needs the `capture` extra: {e}") from e
        print(f"real sample: not available ({type(e).__name__}: {e}); install the `capture` extra")
        return None
    from shuffler.io.dataset import Batch, Dataset
    from shuffler.storage.storage import Storage

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = os.path.join(cache_dir, f"capture-{os.getpid()}")
    t = time.perf_counter()
    try:
        _, stats = capture_text(tmp, CaptureConfig(model="all-MiniLM-L6-v2", layer=3, max_tokens=rows, context=256,
                                                   dtype="float16", keep_special=True, device="cpu", overwrite=True))
        ds = Dataset.open(tmp)
        x = Batch.concat([ds.read_shard(i) for i in range(len(ds.shards))]).acts
        source = ds.manifest.metadata.get("text", "stdlib docstrings")
    finally:
        Storage(tmp).delete_prefix("")
    part = f"{path}.{os.getpid()}.tmp.npy"
    np.save(part, x)
    os.replace(part, path)  # whole or absent: a killed capture leaves no half file to be reused
    print(f"real sample: captured now in {time.perf_counter() - t:.0f} s ({stats.tokens:,} tokens of {source}) "
          f"-> {path}, reused by later runs")
    return x


# ---------------------------------------------------------------------------------------------------
# Test data


def synth_docs(rows: int, d_model: int, *, seed: int = 1234, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, start+rows) of the peers' data generator (docs/benchmarks.md, "Measurements behind the
    design"): documents of 256 consecutive rows, each with
    its own N(0,1) mean; heavy-tailed noise N(0,1) * exp(0.8 N)_row; a per-dimension log-normal scale with 4
    "massive" dimensions x30. Returns (x [rows, d_model] float32, doc_id [rows] int64). Deterministic per row."""
    scale = np.exp(np.random.default_rng(seed).normal(0, 0.5, d_model)).astype(np.float32)
    scale[:4] *= 30
    row = np.arange(start, start + rows)
    doc = row // DOC_ROWS
    d0 = int(doc[0]) if rows else 0
    means = np.stack([np.random.default_rng([seed, d]).standard_normal(d_model, dtype=np.float32)
                      for d in range(d0, int(doc[-1]) + 1)]) if rows else np.zeros((0, d_model), np.float32)
    rng = np.random.default_rng([seed, 7, start])
    x = rng.standard_normal((rows, d_model), dtype=np.float32)
    x *= np.exp(0.8 * rng.standard_normal((rows, 1), dtype=np.float32))
    x += means[doc - d0]
    x *= scale
    return x, doc.astype(np.int64)


def write_synth(url: str, rows: int, d_model: int, *, dtype: str = "float16", seed: int = 1234,
                chunk_bytes: int = 8 * MiB, level: int = 1) -> None:
    """A dataset in document order with columns doc_id and row_id (the input row index, to score shuffles)."""
    from shuffler.format.schema import standard_columns
    from writers.shard_writer import ShardWriter

    block = 16384
    with ShardWriter(url, d_model=d_model, dtype=dtype, columns=standard_columns(("doc_id",), row_id="int64"),
                     chunk_bytes=chunk_bytes, level=level) as w:
        for s in range(0, rows, block):
            n = min(block, rows - s)
            x, doc = synth_docs(n, d_model, seed=seed, start=s)
            w.write(_cast(x, dtype), doc_id=doc, row_id=np.arange(s, s + n, dtype=np.int64))


def synth_source(folder: str, mib: int, d_model: int = 768, *, dtype: str = "float16") -> tuple[str, int]:
    """(url, rows) of `mib` MiB of write_synth rows under `folder`, kept between runs: written again only when
    no manifest says a previous run finished it."""
    rows = mib * MiB // (np.dtype(np.uint16 if dtype == "bfloat16" else dtype).itemsize * d_model)
    url = os.path.join(folder, f"src-{mib}")
    if not os.path.exists(os.path.join(url, "manifest.json")):
        shutil.rmtree(url, ignore_errors=True)
        write_synth(url, rows, d_model, dtype=dtype)
    return url, rows


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        from shuffler.format.convert import float32_to_bfloat16_bits

        return float32_to_bfloat16_bits(x.astype(np.float32))
    return x.astype(dtype)


def write_real(url: str, *, capture_tokens: int | None = None) -> str:
    """A real capture as a dataset with doc_id and row_id; returns a description. Without `capture_tokens`: the
    cached real sample (real_sample(): 26,041 x 384 float16 in text order; documents = its 256-token windows).
    With it: captures MiniLM-L6 layer 3 on the stdlib docstrings now (documents = docstrings; ~1-2k tokens/s on
    this CPU)."""
    from shuffler.format.schema import standard_columns
    from writers.shard_writer import ShardWriter

    cols = standard_columns(("doc_id",), row_id="int64")
    if not capture_tokens:
        x = real_sample(required=True)
        doc = np.arange(len(x), dtype=np.int64) // DOC_ROWS
        desc = f"MiniLM-L6 layer 3, {len(x):,} x {x.shape[1]} float16 (cached sample; documents = 256-token windows)"
    else:
        from shuffler.io.dataset import Batch, Dataset
        from writers.capture import CaptureConfig, capture_text

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tmp = url.rstrip("/") + "-capture"
        t = time.perf_counter()
        _, stats = capture_text(tmp, CaptureConfig(model="all-MiniLM-L6-v2", layer=3,
                                                   max_tokens=capture_tokens, dtype="float16", device="cpu"))
        ds = Dataset.open(tmp)
        b = Batch.concat([ds.read_shard(i) for i in range(len(ds.shards))])
        x, doc = b.acts, b.columns["doc_id"].astype(np.int64)
        desc = (f"MiniLM-L6 layer 3 captured now ({time.perf_counter() - t:.0f} s), {len(x):,} x {x.shape[1]} "
                f"float16, {len(np.unique(doc)):,} documents (stdlib docstrings)")
        from shuffler.storage.storage import Storage

        Storage(tmp).delete_prefix("")
    with ShardWriter(url, d_model=x.shape[1], dtype="float16", columns=cols) as w:
        w.write(x, doc_id=doc, row_id=np.arange(len(x), dtype=np.int64))
    return desc


# ---------------------------------------------------------------------------------------------------
# Quality metrics


def expected_adjacent(doc: np.ndarray) -> float:
    """P(two adjacent rows share a document) under a uniform permutation: sum_d c_d (c_d - 1) / (N (N - 1))."""
    n = len(doc)
    _, c = np.unique(doc, return_counts=True)
    c = c.astype(np.float64)
    return float((c * (c - 1)).sum() / (n * (n - 1))) if n > 1 else 0.0


def adjacency(order: np.ndarray, doc: np.ndarray) -> dict:
    """Same-document adjacent output pairs. `doc[i]` is input row i's document. Returns the observed fraction,
    the uniform expectation (over the rows emitted), their ratio and a Poisson z-score of the pair count."""
    d = doc[order]
    pairs = max(len(d) - 1, 1)
    k = int(np.count_nonzero(d[1:] == d[:-1]))
    exp = expected_adjacent(d)
    mu = exp * pairs
    return {"observed": k / pairs, "expected": exp, "ratio": (k / pairs) / exp if exp else float("inf"),
            "pairs": k, "z": (k - mu) / math.sqrt(mu) if mu > 0 else float("inf")}


def chi2_sf(x: float, df: int) -> float:
    """Upper tail of the chi-square distribution, Wilson-Hilferty (1931) cube-root normal approximation
    (accurate to ~1e-3 absolute for df >= 20; no scipy needed)."""
    if x <= 0:
        return 1.0
    h = 2.0 / (9.0 * df)
    z = ((x / df) ** (1.0 / 3.0) - (1.0 - h)) / math.sqrt(h)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def tagged_block(n: int) -> tuple[int, int]:
    """The tagged input rows [lo, hi): the contiguous middle 1% (at least 1,000 rows, at most n)."""
    t = min(n, max(1000, n // 100))
    lo = (n - t) // 2
    return lo, lo + t


def position_chi2(order: np.ndarray, n: int, *, bins: int | None = None) -> dict:
    """Chi-square test that the output positions of the tagged input block are uniform over the output.
    `n` is the input row count. Bins are equal slices of the output, >= 20 expected tagged rows each."""
    lo, hi = tagged_block(n)
    m = len(order)
    pos = np.flatnonzero((order >= lo) & (order < hi))  # output positions of the tagged rows
    t = len(pos)
    bins = bins or int(min(100, max(2, t // 20)))
    counts = np.bincount(pos * bins // max(m, 1), minlength=bins)
    e = t / bins
    stat = float(((counts - e) ** 2).sum() / e) if e > 0 else float("inf")
    return {"chi2": stat, "df": bins - 1, "p": chi2_sf(stat, bins - 1), "tagged": t, "bins": bins,
            "max_bin_share": float(counts.max() / t) if t else 0.0}


def displacement(order: np.ndarray) -> dict:
    """Mean |output position - input position| / N over emitted rows, against a uniform permutation's
    E = (N^2 - 1) / (3 N^2) (sum over i != j of |i - j| / N^2, divided by N)."""
    n = len(order)
    obs = float(np.abs(order - np.arange(n)).mean() / n) if n else 0.0
    exp = (n * n - 1) / (3.0 * n * n) if n else 0.0
    return {"observed": obs, "expected": exp, "ratio": obs / exp if exp else 0.0}


def quality(order: np.ndarray, doc: np.ndarray) -> dict:
    """All three metrics; `doc` is the document of every input row (len N)."""
    order = np.asarray(order, dtype=np.int64)
    return {"rows": len(order), "input_rows": len(doc), "adjacency": adjacency(order, doc),
            "chi2": position_chi2(order, len(doc)), "displacement": displacement(order),
            "is_permutation": bool(len(order) == len(doc) and
                                   np.array_equal(np.sort(order), np.arange(len(doc))))}


# ---------------------------------------------------------------------------------------------------
# Buffer shuffles, as the tools users pick instead do them. Each maps a stream of batches (tuples of arrays
# with equal first dimension, e.g. (acts, row_id)) to a stream of batches; output order does not depend on
# row contents, so running one on row ids alone gives the exact order it would give the rows.

Batches = Iterable[tuple[np.ndarray, ...]]


def _rebatch(batches: Batches, rows: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Re-cut a batch stream into batches of exactly `rows` (the last may be shorter)."""
    held: list[tuple[np.ndarray, ...]] = []
    n = 0
    for b in batches:
        held.append(b)
        n += len(b[0])
        while n >= rows:
            cat = tuple(np.concatenate([h[k] for h in held]) for k in range(len(held[0])))
            yield tuple(c[:rows] for c in cat)
            rest = tuple(c[rows:] for c in cat)
            held, n = ([rest] if len(rest[0]) else []), len(rest[0])
    if n:
        yield tuple(np.concatenate([h[k] for h in held]) for k in range(len(held[0])))


def mixing_buffer(batches: Batches, *, buffer_rows: int = 40960, batch_rows: int = 4096,
                  seed: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
    """SAELens `training/mixing_buffer.py` (v6.18, keep-half): add `batch_rows` batches until the buffer holds
    `buffer_rows`, permute it, serve the front floor(len / (2 batch_rows)) batches, keep the rest. The tail of
    fewer than one batch is dropped at the end, as in the original. SAELens' default fill is 40,960 rows
    (github.com/decoderesearch/SAELens)."""
    rng = np.random.default_rng(seed)
    buf: tuple[np.ndarray, ...] | None = None
    for b in _rebatch(batches, batch_rows):
        buf = b if buf is None else tuple(np.concatenate([x, y]) for x, y in zip(buf, b, strict=True))
        if len(buf[0]) >= buffer_rows:
            p = rng.permutation(len(buf[0]))
            buf = tuple(x[p] for x in buf)
            serve = len(buf[0]) // (2 * batch_rows) * batch_rows
            for s in range(0, serve, batch_rows):
                yield tuple(x[s : s + batch_rows] for x in buf)
            buf = tuple(x[serve:] for x in buf)
    if buf is not None and len(buf[0]):
        p = rng.permutation(len(buf[0]))
        buf = tuple(x[p] for x in buf)
        whole = len(buf[0]) // batch_rows * batch_rows
        for s in range(0, whole, batch_rows):
            yield tuple(x[s : s + batch_rows] for x in buf)


def webdataset_buffer(batches: Batches, *, bufsize: int = 1000, initial: int = 100, seed: int = 0,
                      out_rows: int = 4096) -> Iterator[tuple[np.ndarray, ...]]:
    """webdataset `filters._shuffle` (per sample, in Python, as the original): append a sample (and one more
    while under bufsize); once `initial` are held, emit a random one by swap-pop. Emitted rows are re-batched
    in `out_rows`. Default bufsize 1000 as in webdataset's `.shuffle(1000)` examples."""
    rng = random.Random(seed)
    initial = min(initial, bufsize)
    buf: list = []
    out: list = []

    def samples():
        for b in batches:
            yield from zip(*b, strict=True)  # one tuple (acts row, row id, ...) per sample, as webdataset has

    def pick():
        k = rng.randint(0, len(buf) - 1)
        s = buf[k]
        buf[k] = buf[-1]
        buf.pop()
        return s

    def flush():
        cols = list(zip(*out, strict=True))
        out.clear()
        return tuple(np.stack(c) for c in cols)

    data = samples()
    for sample in data:
        buf.append(sample)
        if len(buf) < bufsize:
            try:
                buf.append(next(data))
            except StopIteration:
                pass
        if len(buf) >= initial:
            out.append(pick())
            if len(out) == out_rows:
                yield flush()
    while buf:
        out.append(pick())
        if len(out) == out_rows:
            yield flush()
    if out:
        yield flush()


def chunk_shuffle(chunks: list, read, *, seed: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
    """LitData / MosaicML Streaming without a cross-shard block: visit chunks in a random order and permute the
    rows inside each (litdata's `shuffle=True`; streaming's py1s at shuffle_block_size = one shard). `read(c)`
    returns chunk c's batch."""
    rng = np.random.default_rng(seed)
    for i in rng.permutation(len(chunks)):
        b = read(chunks[i])
        p = rng.permutation(len(b[0]))
        yield tuple(x[p] for x in b)


def block_shuffle(batches: Batches, *, block_rows: int = 1 << 18, seed: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
    """Permute rows within consecutive blocks of `block_rows` of a stream (MosaicML Streaming's py1b applies
    this after shuffling shard order; its default shuffle_block_size is max(4e6 // 64, 2^18) = 262,144)."""
    rng = np.random.default_rng([seed, 1])
    for b in _rebatch(batches, block_rows):
        p = rng.permutation(len(b[0]))
        yield tuple(x[p] for x in b)


def order_of(batches: Batches, column: int = -1) -> np.ndarray:
    """Concatenate one column (default: the last, the row ids) of a batch stream."""
    return np.concatenate([b[column] for b in batches])


# ---------------------------------------------------------------------------------------------------
# Running a tool in its own process: wall time and peak memory of its whole process tree


@dataclass
class Measured:
    """One tool run: wall time from spawn to exit, memory peaks, and what the child printed as JSON."""

    wall: float
    max_rss: int
    """Peak RSS of the largest single process of the tree: the highest VmHWM (/proc/PID/status) sampled, bytes.
    (wait4's ru_maxrss is no good here: Linux carries the parent's high-water mark across fork+exec, so every
    child of a big parent would report at least the parent's size.)"""
    tree_rss: int
    """Peak over samples of the summed RSS of the child's process tree (double-counts shared pages), bytes."""
    tree_pss: int
    """Peak over samples of the summed PSS (shared pages split between sharers: the fair sum), bytes."""
    procs: int
    """Most processes seen in the tree at once."""
    result: dict = field(default_factory=dict)
    leftover: list = field(default_factory=list)
    """PIDs of the tree still alive after the child exited (then terminated by us)."""
    read_bytes: int = 0
    """Bytes the tree read from storage devices (wait4's ru_inblock x 512: the child and every descendant it
    reaped; O_DIRECT and page-cache misses count, page-cache hits do not)."""
    write_bytes: int = 0
    """Bytes the tree wrote to storage devices (ru_oublock x 512, the same way)."""
    returncode: int = 0
    stderr: str = ""
    """The end of the child's stderr (kept when check=False lets a failed run return)."""


def run_measured(cmd: list[str], *, env: dict | None = None, interval: float = 0.2, timeout: float = 3600,
                 pss: bool = True, check: bool = True) -> Measured:
    """Run `cmd`, sampling its process tree's RSS/PSS every `interval` s. The child's last stdout line, if JSON,
    becomes `.result`. Descendants still alive after it exits are killed by PID (TERM, then KILL)."""
    import psutil

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    seen: dict[int, psutil.Process] = {}
    peak = {"rss": 0, "pss": 0, "procs": 0, "hwm": 0}
    stop = threading.Event()

    def sample():
        try:
            root = psutil.Process(p.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            rss = ps = 0
            for q in procs:
                seen.setdefault(q.pid, q)
                try:
                    peak["hwm"] = max(peak["hwm"], _hwm(q.pid))
                    if pss:
                        m = q.memory_full_info()
                        rss, ps = rss + m.rss, ps + m.pss
                    else:
                        rss += q.memory_info().rss
                except psutil.Error:
                    pass
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], ps)
            peak["procs"] = max(peak["procs"], len(procs))
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    readers = [threading.Thread(target=lambda f=f, o=o: o.append(f.read()), daemon=True)
               for f, o in ((p.stdout, out_chunks), (p.stderr, err_chunks))]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            p.kill()
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    th.join()
    for r in readers:
        r.join()
    # Helpers such as multiprocessing's resource tracker exit on their own just after their parent: give the
    # tree 3 s, then count (and end, TERM then KILL) what is still running.
    others = [q for pid_, q in seen.items() if pid_ != p.pid]
    _, alive = psutil.wait_procs(others, timeout=3) if others else ([], [])
    leftover = []
    for q in alive:
        try:
            if q.status() != psutil.STATUS_ZOMBIE:
                leftover.append(q.pid)
                q.terminate()
        except psutil.Error:
            pass
    if leftover:
        _, alive = psutil.wait_procs([q for q in alive if q.pid in leftover], timeout=5)
        for q in alive:
            q.kill()
    stdout = "".join(out_chunks)
    if p.returncode != 0 and check:
        raise RuntimeError(f"{' '.join(cmd)} exited with status {p.returncode}:\n{''.join(err_chunks)[-3000:]}")
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    return Measured(wall=wall, max_rss=peak["hwm"], tree_rss=peak["rss"], tree_pss=peak["pss"],
                    procs=peak["procs"], result=result, leftover=leftover, read_bytes=usage.ru_inblock * 512,
                    write_bytes=usage.ru_oublock * 512, returncode=p.returncode,
                    stderr="".join(err_chunks)[-3000:])


def _hwm(pid: int) -> int:
    """VmHWM of a process (peak RSS of its current address space), bytes; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def disk_counters(path: str) -> tuple[int, int] | None:
    """(bytes read, bytes written) so far by the block device holding `path`, or None if unknown."""
    st = os.stat(path)
    try:
        with open(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat") as f:
            v = f.read().split()
        return int(v[2]) * 512, int(v[6]) * 512  # sectors read, sectors written (always 512 B units)
    except (OSError, IndexError, ValueError):
        return None


def load_note() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}" if n < 10 else f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextlib.contextmanager
def moto_bucket(bucket: str) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with one empty bucket, for the benchmarks' S3 parts; yields "s3://bucket".
    AWS_ENDPOINT_URL_S3 points shuffler's storage at it (shuffler/env.py)."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(k, v)
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        os.environ["AWS_ENDPOINT_URL_S3"] = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()


def timed_rounds(configs: dict, rounds: int, run_one, *, indent: str = "") -> dict[str, tuple[float, float]]:
    """Run `run_one(opts)` -> (wall s, CPU s) for every config once per round, the configs taking turns so that a
    change of load hits them alike; print and return each config's median (wall, CPU)."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, opts in configs.items():
            times[name].append(run_one(opts))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    width = max(22, *(len(k) for k in configs))
    for name, (wall, cpu) in med.items():
        print(f"{indent}{name:<{width}} wall {wall:6.2f} s   cpu {cpu:6.2f} s   "
              f"({', '.join(f'{w:.2f}' for w, _ in times[name])})")
    return med

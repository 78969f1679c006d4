"""Fused shuffle benchmark: bytes moved and wall time of (a) write, two-pass shuffle, read against (b) scatter on
write, permute on read, on the same rows in one run (issue 10).

    .venv/bin/python benchmarks/fused.py            # 512 MiB of float16 activations (d_model 768)
    .venv/bin/python benchmarks/fused.py --quick    # 64 MiB

The producer is the synthetic one (writers/synth.py: planted sparse features in document order), standing in
for a model capture, which would be the same in both arms. Its rows are generated once into memory before
the clock starts and replayed into the writer in both arms, so the wall times compare the storage pipeline,
not the generator (whose time is also printed, and a ratio that includes it in both arms).

(a) ShardWriter -> shuffler.shuffle (pass 1 scatter + pass 2 permute, default workers) -> ActivationStream
(b) ShardWriter(scatter=ScatterSpec.sized(...)) -> ActivationStream(permute_buckets=True)
(c) for reference, (b)'s data -> shuffler shuffle --from-scatter (pass 2 only) -> ActivationStream

Bytes are object sizes on local disk: what each step writes, and what it reads (a shuffle pass reads whole
objects; a stream counts the compressed chunk bytes it fetched, stats.bytes_read). Targets: (b)/(a) <= 0.55
for bytes moved and <= 0.6 for wall time. Both arms' read orders are checked to be permutations of the rows
and scored with benchmarks/common.py's adjacency metric.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import adjacency, fmt_bytes, load_note  # noqa: E402
from readers import ActivationStream  # noqa: E402
from shuffler import Dataset  # noqa: E402
from shuffler.shuffling.from_scatter import shuffle_from_scatter  # noqa: E402
from shuffler.shuffling.on_write import ScatterSpec  # noqa: E402
from shuffler.shuffling.run import shuffle  # noqa: E402
from writers.shard_writer import ShardWriter  # noqa: E402
from writers.synth import BLOCK_ROWS, SynthConfig, planted_dictionary, synth_block  # noqa: E402

MiB = 1 << 20
COLUMNS = ("doc_id", "position")


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def generate(cfg: SynthConfig) -> list[tuple[np.ndarray, dict]]:
    """The producer's rows, block by block (float16 activations and provenance columns)."""
    dictionary = planted_dictionary(cfg)
    out = []
    for s in range(0, cfg.rows, BLOCK_ROWS):
        acts, cols = synth_block(cfg, dictionary, s, min(s + BLOCK_ROWS, cfg.rows))
        out.append((acts.astype(np.float16), cols))
    return out


def write(url: str, blocks, cfg: SynthConfig, scatter: ScatterSpec | None) -> None:
    with ShardWriter(url, d_model=cfg.d_model, dtype=cfg.dtype, scatter=scatter) as w:
        for acts, cols in blocks:
            w.write(acts, **cols)


def read_all(stream: ActivationStream, row_of) -> np.ndarray:
    """Every row id the stream yields, in order (and the batches touched, so nothing is optimised away)."""
    ids = [row_of(b.columns["doc_id"], b.columns["position"]) for b in stream]
    return np.concatenate(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB instead of 512 MiB")
    ap.add_argument("--mib", type=int, help="uncompressed MiB of activations and columns")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--memory", default=None, help="per-task budget of the shuffle, and the reader's bucket budget")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--dir", help="working folder (default: a temporary one, deleted at the end)")
    args = ap.parse_args()
    from shuffler.units import parse_size

    memory = parse_size(args.memory or ("428MiB" if args.quick else "528MiB"))
    mib = args.mib or (64 if args.quick else 512)
    row_bytes = args.d_model * 2 + 4 + 8 + 4  # float16 acts + token_id int32, doc_id int64, position int32
    rows = mib * MiB // row_bytes
    cfg = SynthConfig(rows=rows, d_model=args.d_model, dtype="float16", docs=max(1, rows // 256), features=256)
    base = args.dir or tempfile.mkdtemp(prefix="bench-fused-")
    os.makedirs(base, exist_ok=True)
    doc_start = -(-np.arange(cfg.docs + 1, dtype=np.int64) * cfg.rows // cfg.docs)

    def row_of(doc, pos):
        return doc_start[doc] + pos

    print(f"data: {rows:,} rows x {args.d_model} float16 + 3 columns = {fmt_bytes(rows * row_bytes)} uncompressed; "
          f"memory {fmt_bytes(memory)}; {load_note()}")
    t = time.perf_counter()
    blocks = generate(cfg)
    t_gen = time.perf_counter() - t
    print(f"producer: writers/synth.py generated the rows in {t_gen:.1f} s (outside both arms' clocks)")
    doc = np.repeat(np.arange(cfg.docs), np.diff(doc_start))  # [rows] document of each input row
    try:
        # ---- (a) write, two-pass shuffle, read ----------------------------------------------------------
        raw, out = os.path.join(base, "raw"), os.path.join(base, "shuffled")
        t0 = time.perf_counter()
        write(raw, blocks, cfg, None)
        t1 = time.perf_counter()
        st: dict = {}
        shuffle(raw, out, seed=0, memory=memory, keep_intermediate=True, stats=st, progress=False)
        t2 = time.perf_counter()
        raw_b = tree_bytes(raw)
        scratch = os.path.join(out, ".shuffle")
        inter_b = tree_bytes(scratch)
        shutil.rmtree(scratch)  # kept only to be measured
        out_b = Dataset.open(out).manifest.stored_bytes
        s = ActivationStream(out, batch_size=args.batch_size, columns=COLUMNS)
        order_a = read_all(s, row_of)
        t3 = time.perf_counter()
        read_a = s.stats.bytes_read
        a_steps = [("write raw", t1 - t0, 0, raw_b), ("shuffle pass 1", st["pass2_start"] - st["pass1_start"], raw_b, inter_b),
                   ("shuffle pass 2", st["pass2_end"] - st["pass2_start"], inter_b, out_b),
                   ("shuffle other", (t2 - t1) - (st["pass2_end"] - st["pass1_start"]), 0, 0),
                   ("read shuffled", t3 - t2, read_a, 0)]
        wall_a = t3 - t0

        # ---- (b) scatter on write, permute on read -----------------------------------------------------
        scat = os.path.join(base, "scattered")
        spec = ScatterSpec.sized(seed=0, rows=rows, schema=Dataset.open(raw).schema, memory=memory)
        t0 = time.perf_counter()
        write(scat, blocks, cfg, spec)
        t1 = time.perf_counter()
        s = ActivationStream(scat, batch_size=args.batch_size, columns=COLUMNS, permute_buckets=True, memory=memory)
        order_b = read_all(s, row_of)
        t2 = time.perf_counter()
        scat_b = tree_bytes(scat)
        b_steps = [("write scattered", t1 - t0, 0, scat_b), ("read permuted", t2 - t1, s.stats.bytes_read, 0)]
        wall_b = t2 - t0

        # ---- (c) for reference: the same scattered data, pass 2 only (shuffle --from-scatter), then read --
        out_c = os.path.join(base, "from-scatter")
        t3 = time.perf_counter()
        shuffle_from_scatter(scat, out_c, memory=memory, progress=False)
        t4 = time.perf_counter()
        s = ActivationStream(out_c, batch_size=args.batch_size, columns=COLUMNS)
        order_c = read_all(s, row_of)
        t5 = time.perf_counter()
        out_c_b = Dataset.open(out_c).manifest.stored_bytes
        c_steps = [b_steps[0], ("pass 2 only", t4 - t3, scat_b, out_c_b), ("read shuffled", t5 - t4, s.stats.bytes_read, 0)]
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    def table(name, steps):
        print(f"\n{name}")
        print(f"  {'step':<18}{'wall s':>8}{'read':>12}{'written':>12}")
        for label, w, r, wr in steps:
            print(f"  {label:<18}{w:>8.2f}{fmt_bytes(r):>12}{fmt_bytes(wr):>12}")
        tot = sum(r + wr for _, _, r, wr in steps)
        print(f"  {'total':<18}{sum(w for _, w, _, _ in steps):>8.2f}   moved {fmt_bytes(tot)}")
        return tot

    moved_a = table(f"(a) write + two-pass shuffle ({st['plan']['buckets']} buckets, {st['workers']} workers) + read",
                    a_steps)
    moved_b = table(f"(b) scatter on write ({spec.buckets} buckets) + permute on read", b_steps)
    moved_c = table("(c) scatter on write + shuffle --from-scatter (pass 2 only) + read", c_steps)
    qa, qb = adjacency(order_a, doc), adjacency(order_b, doc)
    perm = lambda o: bool(len(o) == rows and np.array_equal(np.sort(o), np.arange(rows)))  # noqa: E731
    print(f"\nquality: (a) permutation {perm(order_a)}, same-document adjacent pairs {qa['observed']:.2e} "
          f"(uniform {qa['expected']:.2e}, z {qa['z']:+.1f}); (b) permutation {perm(order_b)}, "
          f"{qb['observed']:.2e} (z {qb['z']:+.1f})")
    print(f"\nbytes moved (b)/(a): {moved_b / moved_a:.3f}   (target <= 0.55)")
    print(f"wall time   (b)/(a): {wall_b / wall_a:.3f}   ({wall_b:.1f} s / {wall_a:.1f} s; target <= 0.6)")
    print(f"wall time with the producer's generation in both arms: {(wall_b + t_gen) / (wall_a + t_gen):.3f}")
    wall_c = sum(w for _, w, _, _ in c_steps)
    print(f"(c)/(a): bytes moved {moved_c / moved_a:.3f}, wall {wall_c / wall_a:.3f}; (c) output is a permutation: "
          f"{perm(order_c)}")
    print(f"after: {load_note()}")


if __name__ == "__main__":
    main()

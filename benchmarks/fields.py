"""Reading 1 of 4 activation fields against all 4 (issue 19: "reading 1 of 4 fields costs about 1/4").

A dataset with four bfloat16 fields of d_model 768 (four hook points of one token, each from the peers' data
generator with its own seed) is streamed with `ActivationStream(url, fields=...)`: every field, then one field.
A several-field chunk stores one zstd frame per field (docs/format.md, "Several fields"), so one field fetches
and decodes only its frames. The two readings alternate for `--rounds` rounds, after one warm-up of each, in
one process (the page cache holds the shards: this measures decode, not the disk). Printed: median wall
seconds, CPU seconds (this process, every thread) and compressed bytes fetched of each, and their ratios
(one / all; 0.25 would be exactly a quarter).

    python benchmarks/fields.py            # 512 MiB raw, 3 rounds
    python benchmarks/fields.py --quick    # 96 MiB raw, 2 rounds
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import MiB, load_note, synth_docs  # noqa: E402

FIELDS = ("layer.2", "layer.3", "layer.4", "layer.5")
D_MODEL = 768


def write(url: str, rows: int) -> None:
    from shuffler.format.convert import float32_to_bfloat16_bits
    from shuffler.format.schema import standard_columns
    from writers.shard_writer import ShardWriter

    block = 8192
    with ShardWriter(url, fields={f: (D_MODEL, "bfloat16") for f in FIELDS},
                     columns=standard_columns(("token_id", "doc_id", "position"))) as w:
        for s in range(0, rows, block):
            n = min(block, rows - s)
            acts = {}
            for k, f in enumerate(FIELDS):
                x, doc = synth_docs(n, D_MODEL, seed=1234 + k, start=s)
                acts[f] = float32_to_bfloat16_bits(x)
            r = np.arange(s, s + n)
            w.write(acts, token_id=(r % 50000).astype(np.int32), doc_id=doc, position=(r % 256).astype(np.int32))


def read(url: str, fields: tuple[str, ...]) -> tuple[float, float, int, int]:
    """(wall s, CPU s, compressed bytes fetched, rows) of one pass over the dataset."""
    from readers import ActivationStream

    s = ActivationStream(url, batch_size=4096, fields=fields, threads=2, seed=0)
    t, c = time.perf_counter(), time.process_time()
    rows = 0
    for b in s:
        rows += len(b)
    return time.perf_counter() - t, time.process_time() - c, s.stats.bytes_read, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="uncompressed MiB of activations, all four fields")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="96 MiB, 2 rounds")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "bench-out", "fields"))
    args = ap.parse_args()
    mib, rounds = (96, 2) if args.quick else (args.mib, args.rounds)
    rows = mib * MiB // (len(FIELDS) * D_MODEL * 2)
    url = os.path.join(args.out, f"src-{mib}")
    if not os.path.exists(os.path.join(url, "manifest.json")):
        shutil.rmtree(url, ignore_errors=True)
        t = time.perf_counter()
        write(url, rows)
        print(f"wrote {rows:,} rows x {len(FIELDS)} fields x {D_MODEL} bfloat16 in {time.perf_counter() - t:.1f} s")
    print(load_note())
    runs: dict[str, list[tuple[float, float, int, int]]] = {"all 4 fields": [], "1 field": []}
    which = {"all 4 fields": (), "1 field": ("layer.4",)}
    for name in runs:  # warm-up: page cache, threads, allocator
        read(url, which[name])
    for _ in range(rounds):
        for name in runs:
            runs[name].append(read(url, which[name]))
    med = {n: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v), v[0][2], v[0][3])
           for n, v in runs.items()}
    for n, (wall, cpu, nbytes, nrows) in med.items():
        print(f"{n:<13} wall {wall:6.2f} s   CPU {cpu:6.2f} s   fetched {nbytes / MiB:7.1f} MiB   rows {nrows:,}")
    a, o = med["all 4 fields"], med["1 field"]
    print(f"ratio 1/4     wall {o[0] / a[0]:.3f}   CPU {o[1] / a[1]:.3f}   bytes {o[2] / a[2]:.3f}   (0.25 = a quarter)")


if __name__ == "__main__":
    main()

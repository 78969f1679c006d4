"""Opening a resumed stream costs what opening a fresh one costs, at the same or another world size.

Times, best of --repeat runs interleaved (each case first in turn), of opening: `ActivationStream(url, ...)`
plus `load_state_dict(state)` for the resumed ones, then planning the first batch (its units, reading the
footers of the shards it touches); and, apart, of reading and decoding that first batch (it lands in other
chunks in each case, so it is not part of the comparison). On one dataset:
- fresh: a new stream of rank 1 of world 3;
- same layout: rank 1 of world 3 loading a state saved by rank 0 of world 3 in the middle of epoch 0;
- elastic: rank 1 of world 3 loading a state saved at world 4 (the rows left of epoch 0 are cut anew);
- after 3 changes: rank 1 of world 5 loading a state that went through worlds 4 -> 3 -> 8 inside epoch 0
  (its pending spans: 8 pieces of what 4 and 3 ranks left).
Then load_state_dict alone for a large run: a state saved by rank 0 of 512 ranks x 8 DataLoader workers after
two changes of world size (4096 consumers) loaded at 384 ranks, against opening the stream.
Local disk (page cache warm) and, unless --no-s3, a moto S3 server on 127.0.0.1, where opening costs GETs.

    python benchmarks/resume.py              # 128 MiB of bfloat16 activations, 8 MiB chunks, 32 MiB shards
    python benchmarks/resume.py --quick      # 48 MiB
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

import numpy as np  # noqa: E402

from benchmarks.common import moto_bucket  # noqa: E402
from benchmarks.read import activations  # noqa: E402
from readers import ActivationStream  # noqa: E402
from writers import ShardWriter  # noqa: E402

BATCH = 4096


def write(url: str, acts: np.ndarray) -> None:
    with ShardWriter(url, d_model=acts.shape[1], dtype="bfloat16", shard_bytes=32 << 20) as w:
        for s in range(0, len(acts), 65536):
            r = np.arange(s, min(s + 65536, len(acts)))
            w.write(acts[s : s + 65536], token_id=(r % 30000).astype(np.int32), doc_id=r // 512,
                    position=(r % 512).astype(np.int32))


def advance(url: str, state: dict | None, world: int, batches: int) -> dict:
    """Rank 0 of `world` (resumed from `state`) reads `batches` batches; its state."""
    s = ActivationStream(url, batch_size=BATCH, rank=0, world_size=world, epochs=2)
    if state is not None:
        s.load_state_dict(state)
    it = iter(s)
    for _ in range(batches):
        next(it)
    it.close()
    return s.state_dict()


def first_batch(url: str, world: int, state: dict | None) -> tuple[float, float, float]:
    """Seconds to (open the stream and load the state, plan the first batch: its units and the footers of the
    shards it touches, then read and decode it)."""
    t = time.perf_counter()
    s = ActivationStream(url, batch_size=BATCH, rank=1, world_size=world, epochs=2)
    if state is not None:
        s.load_state_dict(state)
    t1 = time.perf_counter()
    epoch, b = s.state_dict()["positions"][0]
    for u in s.epoch_plan(epoch).units(b * BATCH):  # footers are cached in the stream's Dataset
        if u.pos + u.hi - u.lo >= (b + 1) * BATCH:
            break
    t2 = time.perf_counter()
    it = iter(s)
    next(it)
    t3 = time.perf_counter()
    it.close()
    return t1 - t, t2 - t1, t3 - t2


def big_state(url: str) -> dict:
    """A state of rank 0 of 512 ranks x 8 workers, after worlds 1024 x 8 -> 768 x 8 inside epoch 0: pending
    spans left by 6144 consumers. Built from the layout arithmetic (readers/layout.py), reading no rows."""
    from readers.layout import Layout
    from readers.state import StreamState

    s = ActivationStream(url, batch_size=2, rank=0, world_size=1, epochs=2)
    base = (0, ())
    for world in (1024, 768):
        lay = Layout(num_rows=s.num_rows, consumers=world * 8, batch_size=2, drop_last=True, start=base[0],
                     pending=base[1])
        base = lay.remainder([1] * lay.consumers, epochs=2)  # every consumer read one batch of 2 rows
    settings = dict(s.resume_settings(), world_size=512, num_workers=8)
    return StreamState(fingerprint=s.manifest.fingerprint, settings=dict(settings, drop_last=True), rank=0,
                       positions=((base[0], 1),) * 8, next_worker=3, base=base).to_dict()


def measure(url: str, repeat: int, where: str) -> None:
    same = advance(url, None, 3, 2)
    a = advance(url, None, 4, 2)
    elastic = a
    b = advance(url, a, 3, 1)
    c = advance(url, b, 8, 1)
    cases = {"fresh": (3, None), "same layout": (3, same), "elastic 4 -> 3": (3, elastic),
             "after 3 changes -> 5": (5, c)}
    best = {k: [float("inf")] * 3 for k in cases}
    names = list(cases)
    for i in range(repeat):
        for name in names[i % len(names):] + names[: i % len(names)]:  # each case goes first in turn
            world, state = cases[name]
            best[name] = [min(x, y) for x, y in zip(best[name], first_batch(url, world, state), strict=True)]
    print(f"{where}: best of {repeat} (pending spans of the last state: {sum(len(p) for p in c['pending'])})")
    f = sum(best["fresh"][:2])
    for name, (t_open, t_plan, t_read) in best.items():
        print(f"  {name:21s} open + load_state_dict {t_open * 1e3:6.1f} ms, plan {t_plan * 1e3:5.1f} ms: opening "
              f"{(t_open + t_plan) / f:.2f} x fresh; first batch read {t_read * 1e3:5.1f} ms")

    big = big_state(url)
    opens, loads = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        s = ActivationStream(url, batch_size=2, rank=7, world_size=384, epochs=2, drop_last=True)
        t1 = time.perf_counter()
        s.load_state_dict(big)
        t2 = time.perf_counter()
        opens.append(t1 - t)
        loads.append(t2 - t1)
    spans = sum(len(p) for p in big["pending"])
    print(f"  load_state_dict of a 512 x 8-worker state ({spans} pending spans, {len(str(big)) >> 10} KiB) at "
          f"world 384: {min(loads) * 1e3:.1f} ms; opening the stream: {min(opens) * 1e3:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    acts, what = activations((48 if args.quick else 128) << 20)
    tmp = tempfile.mkdtemp(prefix="bench-resume-")
    try:
        url = os.path.join(tmp, "ds")
        write(url, acts)
        from shuffler import Dataset

        ds = Dataset.open(url)
        print(f"data: {what}; {len(acts)} rows x {acts.shape[1]} bfloat16, {len(ds.shards)} shards; batch {BATCH}")
        measure(url, args.repeat, "local disk")
        if not args.no_s3:
            s3(acts, args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def s3(acts: np.ndarray, repeat: int) -> None:
    """The same on a moto server on 127.0.0.1 (benchmarks/common.moto_bucket)."""
    with moto_bucket("bench") as bucket:
        url = f"{bucket}/resume"
        write(url, acts)
        measure(url, repeat, "S3 (moto on 127.0.0.1)")


if __name__ == "__main__":
    main()

"""Does the reader keep the SAE trainer busy? tokens/s and reader-wait fraction, measured in one run.

Three measurements on the same dataset, SAE shape and device:
  compute   train steps on one batch already on the device (no reader): the trainer's ceiling
  reader    ActivationStream alone, batches delivered to the device (no training): the reader's ceiling
  trained   trainer.train() fed by the stream: tokens/s and the reader-wait fraction it logs
and prints trained / compute (1.0 = the reader costs nothing) and reader / compute (headroom).

    python benchmarks/train.py --quick                                    # CPU, small (about a minute)
    python benchmarks/train.py --device cuda --d-model 768 --latents 24576 --k 32 --batch-size 4096 \\
        --rows 2000000 --tokens 20000000                                  # the issue's GPU question

Without --data, a synthetic bfloat16 dataset is written to a temporary folder first (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from readers import ActivationStream  # noqa: E402
from trainer import TrainConfig, train  # noqa: E402
from trainer import distributed as D  # noqa: E402
from trainer.train import TrainState, make_optimizer, make_sae, resolve_device, train_step, use_autocast  # noqa: E402
from writers.synth import SynthConfig, synth  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_compute(cfg: TrainConfig, d_in: int, dev: torch.device, steps: int) -> float:
    """tokens/s of train_step on one resident batch (warm-up steps excluded)."""
    sae = make_sae(cfg, d_in, D.Layout(), dev)
    opt = make_optimizer(cfg, sae)
    state = TrainState(since_fired=torch.zeros(sae.n_local, dtype=torch.int64, device=dev))
    x = torch.randn(cfg.batch_size, d_in, device=dev)
    amp = use_autocast(cfg, dev)
    for _ in range(3):
        train_step(sae, opt, x, state, cfg, D.Layout(), amp=amp)
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        train_step(sae, opt, x, state, cfg, D.Layout(), amp=amp)
    sync(dev)
    return steps * cfg.batch_size / (time.perf_counter() - t)


def bench_reader(url: str, cfg: TrainConfig, dev: torch.device, prefetch, threads, min_s: float = 3.0) -> float:
    """tokens/s of the stream alone, each batch landed on the device as float32 (what the trainer does),
    over at least `min_s` seconds and 50 batches after the first (so many chunks are decoded, not one)."""
    extra = {k: v for k, v in (("prefetch", prefetch), ("threads", threads)) if v is not None}
    stream = ActivationStream(url, batch_size=cfg.batch_size, epochs=1000, seed=cfg.seed, drop_last=True,
                              device=dev, **extra)
    it = iter(stream)
    next(it)
    sync(dev)
    n, t = 0, time.perf_counter()
    while n < 50 or time.perf_counter() - t < min_s:
        next(it).torch_acts(dev).float()
        n += 1
    sync(dev)
    dt = time.perf_counter() - t
    it.close()
    return n * cfg.batch_size / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="existing dataset URL (default: write a synthetic one)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the synthetic dataset")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--latents", type=int, default=24_576)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=10_000_000, help="tokens for the stream-fed training run")
    ap.add_argument("--compute-steps", type=int, default=50)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    ap.add_argument("--prefetch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's; --quick uses 1, see docs/bench-train.md)")
    ap.add_argument("--quick", action="store_true", help="small CPU-sized run")
    a = ap.parse_args()
    if a.quick:
        a.d_model, a.latents, a.k, a.batch_size = 64, 1024, 16, 1024
        a.rows, a.tokens, a.compute_steps = 100_000, 300_000, 30
        a.torch_threads = a.torch_threads or 1
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    dev = resolve_device(a.device)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    try:
        url = a.data
        if url is None:
            url = os.path.join(tmp, "ds")
            t = time.perf_counter()
            synth(url, SynthConfig(rows=a.rows, d_model=a.d_model, dtype=a.dtype, docs=max(a.rows // 1000, 1)))
            print(f"# wrote {a.rows:,} synthetic {a.dtype} rows x {a.d_model} in {time.perf_counter() - t:.1f} s",
                  flush=True)
        d_in = ActivationStream(url, batch_size=1).dataset.d_model
        cfg = TrainConfig(n_latents=a.latents, k=a.k, batch_size=a.batch_size, tokens=a.tokens,
                          log_every=max(a.tokens // a.batch_size // 10, 1), checkpoint_every=0,
                          reader_prefetch=a.prefetch, reader_threads=a.threads)
        gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
        print(f"# device {gpu}; d_in {d_in}, latents {a.latents}, k {a.k}, batch {a.batch_size}, "
              f"autocast {use_autocast(cfg, dev)}", flush=True)
        compute = bench_compute(cfg, d_in, dev, a.compute_steps)
        reader = bench_reader(url, cfg, dev, a.prefetch, a.threads)
        res = train(url, os.path.join(tmp, "run"), cfg, device=dev, progress=False)
        last = res.last
        # The first record includes start-up (threads, first reads); the steady state is the later ones.
        recs = [json.loads(ln) for ln in open(os.path.join(tmp, "run", "log.jsonl"))]
        steady = recs[1:] or recs
        tps = sum(r["tokens_per_s"] for r in steady) / len(steady)
        wait = sum(r["reader_wait"] for r in steady) / len(steady)
        out = {
            "compute_tokens_per_s": round(compute),
            "reader_tokens_per_s": round(reader),
            "trained_tokens_per_s": round(tps),
            "reader_wait_fraction": round(wait, 4),
            "reader_wait_fraction_whole_run": round(last["reader_wait_total"], 4),
            "trained_over_compute": round(tps / compute, 3),
            "reader_over_compute": round(reader / compute, 3),
            "final_fvu": round(last["fvu"], 4),
            "steps": res.steps,
        }
        print(json.dumps(out))
        verdict = "keeps the trainer busy" if wait < 0.05 else "does NOT keep the trainer busy"
        print(f"# reader-wait {100 * wait:.1f}% of wall time (steady state): the reader {verdict} (bar: < 5%)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

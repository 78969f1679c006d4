"""Capture throughput on CPU: `capture()` of all-MiniLM-L6-v2 activations, as a ratio of the bare model forward.

Everything runs in one process on the same token windows (stdlib docstrings, --context tokens, --batch windows
per pass), so the ratios hold on a noisy shared machine:
- text: reading stdlib docstrings, tokenizing and packing them into windows, alone;
- bare forward: `model(input_ids, attention_mask, output_hidden_states=True)` over every batch (all 6 blocks),
  nothing stored: the cost of the model itself;
- capture hidden_states[3]: the full capture path (text, forward stopped after block 3 by the hook, masking,
  provenance columns, ShardWriter to local disk with zstd) in float32 and bfloat16;
- capture hidden_states[6]: the same at the last layer, so the whole model runs: capture / bare forward is then
  the overhead of everything that is not the model.
Each figure is the best of --repeat runs.

    python benchmarks/capture.py            # 20,000 tokens
    python benchmarks/capture.py --quick    # 5,000 tokens
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time

import torch

from writers import ShardWriter, capture
from writers.models import load_model
from writers.text import TextSource, token_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="5,000 tokens, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeat = 5_000, 1
    loaded = load_model("all-MiniLM-L6-v2", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    tmp = tempfile.mkdtemp(prefix="bench_capture_")

    def windows():
        return token_batches(TextSource().documents(), tok, context=args.context, batch_size=args.batch)

    n_batches = -(-args.tokens // ((args.context - 2) * args.batch))
    fixed = list(itertools.islice(windows(), n_batches))
    tokens = sum(int(b.store.sum()) for b in fixed)

    def text_only():
        list(itertools.islice(windows(), n_batches))
        return tokens

    def bare():
        with torch.inference_mode():
            for b in fixed:
                model(input_ids=torch.as_tensor(b.input_ids), attention_mask=torch.as_tensor(b.attention_mask),
                      output_hidden_states=True)
        return tokens

    def cap(layer, dtype):
        def go():
            url = os.path.join(tmp, f"l{layer}_{dtype}")
            with ShardWriter(url, d_model=384, dtype=dtype, overwrite=True) as w:
                stats = capture(model, windows(), w, layer=layer, max_tokens=tokens)
            return stats.tokens

        return go

    cases = {
        "text (read, tokenize, pack)": text_only,
        "bare forward, 6 blocks": bare,
        "capture hidden_states[3] float32": cap(3, "float32"),
        "capture hidden_states[3] bfloat16": cap(3, "bfloat16"),
        "capture hidden_states[6] float32": cap(6, "float32"),
    }
    with torch.inference_mode():  # warm-up: the first passes after loading pay one-off kernel and allocator setup
        for b in fixed[:2]:
            model(input_ids=torch.as_tensor(b.input_ids), attention_mask=torch.as_tensor(b.attention_mask))
    best = {k: float("inf") for k in cases}
    for _ in range(args.repeat):  # interleaved, so a burst of load hits every case alike
        for name, fn in cases.items():
            t0 = time.perf_counter()
            n = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            assert n == tokens, (name, n, tokens)
    shutil.rmtree(tmp, ignore_errors=True)
    base = tokens / best["bare forward, 6 blocks"]
    print(f"all-MiniLM-L6-v2 on CPU ({torch.get_num_threads()} torch threads), {tokens:,} tokens, "
          f"context {args.context}, {args.batch} windows/batch, best of {args.repeat}, load {os.getloadavg()[0]:.1f}")
    print(f"{'case':<36} {'tokens/s':>10} {'x bare forward':>15}")
    for name in cases:
        rate = tokens / best[name]
        print(f"{name:<36} {rate:>10,.0f} {rate / base:>15.2f}")


if __name__ == "__main__":
    main()

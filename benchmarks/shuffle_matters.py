"""Does shuffling matter? The same TopK SAE trained on the same tokens in three orders.

    python benchmarks/shuffle_matters.py            # real capture + synthetic, 3 seeds (~10-15 min on 2 cores)
    python benchmarks/shuffle_matters.py --quick    # small, 1 seed (~1-2 min), what `make bench` runs

Orders (every one serves each training row exactly `passes` times; same tokens, same steps):
- capture: the rows in stored (document) order, as a reader with shuffle_shards=False and no buffer gives them;
- mixing:  SAELens's keep-half mixing buffer (sae_lens/training/mixing_buffer.py, v6.18) over the capture order:
           add one training batch of consecutive rows at a time until the buffer holds `buffer_rows` (default
           40,960: SAELens's default fill), permute the whole buffer, serve the front half in
           whole batches, keep the rest to mix with the next fill. SAELens drops a last partial batch; here the
           final flush serves it too, so every row is served and all three orders hold the same rows;
- global:  `shuffler.shuffle` of the whole capture (a fresh seed per run), read in its stored order.

Rows are identified by their provenance key (doc_id, position): the held-out rows (a uniform random sample,
disjoint from training) are removed from all three orders, and each order is an index array into one
in-memory copy of the capture, so the SAE sees bit-identical rows in each order. Same init seed, same
hyper-parameters, same b_dec init rule as trainer.train (geometric median of the first init_tokens rows of the
stream the SAE is trained on: that is part of what an order does). Reported on the held-out rows: FVU (SSE /
total variance about the held-out mean), L0, and dead latents (fraction that never fire on any held-out row);
on the synthetic data also feature recovery: the mean over planted features of the max cosine similarity to a
decoder row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import expected_adjacent, load_note  # noqa: E402
from shuffler.io.dataset import Batch, Dataset  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.distributed import Layout  # noqa: E402
from trainer.train import TrainState, make_optimizer, make_sae, train_step  # noqa: E402

ORDERS = ("capture", "mixing", "global")
SAELENS_BUFFER = 40_960  # 20 batches/2 x 32 prompts x 128 tokens (SAELens defaults, github.com/decoderesearch/SAELens)


# ---------------------------------------------------------------------------------------------------
# The orders


def mixing_order(n: int, *, buffer_rows: int = SAELENS_BUFFER, batch_rows: int, seed: int,
                 passes: int = 1) -> np.ndarray:
    """The order SAELens's keep-half mixing buffer serves rows 0..n-1 (read consecutively, `passes` times).

    Returns [n * passes] int64 row indices. One batch of consecutive rows is added at a time; when the buffer
    holds >= buffer_rows it is permuted and floor(len / (2 batch_rows)) whole batches are served from its front.
    At the end what is left is permuted and served whole (SAELens drops the last partial batch).
    """
    if n < 1 or batch_rows < 1 or buffer_rows < 1 or passes < 1:
        raise ValueError(f"mixing_order: n={n}, batch_rows={batch_rows}, buffer_rows={buffer_rows}, passes={passes} "
                         "must all be >= 1")
    rng = np.random.default_rng([seed, 0x5AE1])
    total = n * passes
    out: list[np.ndarray] = []
    buf = np.empty(0, dtype=np.int64)
    for pos in range(0, total, batch_rows):  # one iteration per batch, not per row
        buf = np.concatenate([buf, np.arange(pos, min(pos + batch_rows, total), dtype=np.int64) % n])
        if len(buf) >= buffer_rows:
            buf = buf[rng.permutation(len(buf))]
            serve = len(buf) // (2 * batch_rows) * batch_rows
            out.append(buf[:serve])
            buf = buf[serve:]
    out.append(buf[rng.permutation(len(buf))])
    return np.concatenate(out)


def heldout_split(n: int, heldout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows in stored order [n - heldout], held-out rows in random order [heldout]): a uniform sample."""
    if not 0 < heldout < n:
        raise ValueError(f"heldout={heldout} must be between 1 and n - 1 = {n - 1}")
    perm = np.random.default_rng([seed, 0x4E1D]).permutation(n)
    return np.sort(perm[heldout:]), perm[:heldout]


def provenance_key(doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return (doc.astype(np.int64) << 32) | (pos.astype(np.int64) & 0xFFFFFFFF)


def read_rows(url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(acts [N, d] float32, provenance key [N] int64, doc_id [N]) in stored order."""
    ds = Dataset.open(url)
    b = Batch.concat([ds.read_shard(i) for i in range(len(ds.shards))])
    doc, pos = b.columns["doc_id"], b.columns["position"]
    return b.float32(), provenance_key(doc, pos), np.asarray(doc)


def global_order(raw_keys: np.ndarray, shuffled_url: str, train_rows: np.ndarray) -> np.ndarray:
    """The shuffled dataset's stored order as row indices of the capture, held-out rows removed."""
    _, keys, _ = read_rows(shuffled_url)
    sorter = np.argsort(raw_keys, kind="stable")
    at = np.searchsorted(raw_keys, keys, sorter=sorter)
    at = np.minimum(at, len(raw_keys) - 1)
    idx = sorter[at]
    if len(keys) != len(raw_keys) or not np.array_equal(raw_keys[idx], keys) or len(np.unique(idx)) != len(idx):
        raise RuntimeError(f"{shuffled_url}: the shuffled rows are not a permutation of the capture's provenance keys")
    keep = np.zeros(len(raw_keys), dtype=bool)
    keep[train_rows] = True
    return idx[keep[idx]]


def adjacent_same_doc(order: np.ndarray, doc: np.ndarray) -> float:
    d = doc[order]
    return float((d[1:] == d[:-1]).mean()) if len(d) > 1 else 0.0


# ---------------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def evaluate(sae, x: torch.Tensor, planted: np.ndarray | None, rows: int = 4096) -> dict:
    """Held-out FVU, L0 and dead fraction (never fires on x [H, d]); recovery of a planted dictionary [F, d]."""
    sse, active = 0.0, 0
    fired = torch.zeros(sae.n_latents, dtype=torch.int64)
    for s in range(0, x.shape[0], rows):
        xb = x[s : s + rows]
        out = sae(xb)
        sse += float((xb - out.recon).double().pow(2).sum())
        on = out.acts > 0
        active += int(on.sum())
        fired += torch.bincount(out.idx[on], minlength=sae.n_latents)
    xd = x.double()
    sst = float((xd - xd.mean(0)).pow(2).sum())
    res = {"fvu": sse / sst, "l0": active / x.shape[0], "dead": float((fired == 0).float().mean())}
    if planted is not None:
        cos = torch.from_numpy(planted) @ sae.W_dec.detach().T  # [F, n_latents], both unit-norm rows
        best = cos.max(dim=1).values
        res["recovery"] = float(best.mean())
        res["recovered_09"] = float((best > 0.9).float().mean())
    return res


def train_order(x: torch.Tensor, order: np.ndarray, cfg: TrainConfig) -> object:
    """Train a fresh SAE (cfg.seed) on x[order] in batches of cfg.batch_size for cfg.steps steps."""
    if len(order) < cfg.steps * cfg.batch_size:
        raise ValueError(f"order has {len(order)} rows; {cfg.steps} steps x {cfg.batch_size} need more")
    dev = torch.device("cpu")
    layout = Layout()
    sae = make_sae(cfg, x.shape[1], layout, dev)
    sae.init_b_dec(x[torch.from_numpy(order[: cfg.init_tokens])], cfg.b_dec_init)  # as trainer.train: stream head
    opt = make_optimizer(cfg, sae)
    state = TrainState(since_fired=torch.zeros(sae.n_local, dtype=torch.int64))
    idx = torch.from_numpy(order)
    for step in range(cfg.steps):
        xb = x[idx[step * cfg.batch_size : (step + 1) * cfg.batch_size]]  # [B, d]
        train_step(sae, opt, xb, state, cfg, layout)
    return sae


@dataclass
class Data:
    name: str
    url: str
    x: torch.Tensor  # [N, d] float32
    keys: np.ndarray  # [N] int64 provenance
    doc: np.ndarray  # [N]
    planted: np.ndarray | None
    describe: str


def run_dataset(data: Data, args, work: str) -> list[dict]:
    from shuffler.shuffling.run import shuffle

    n = data.x.shape[0]
    results = []
    for seed in range(args.seeds):
        train_rows, held = heldout_split(n, args.heldout, seed)
        shuf = os.path.join(work, f"{data.name}-shuffled-{seed}")
        t = time.perf_counter()
        shuffle(data.url, shuf, seed=seed, overwrite=True, progress=False)
        t_shuffle = time.perf_counter() - t
        capture = np.tile(train_rows, args.passes)
        mixing = train_rows[mixing_order(len(train_rows), buffer_rows=args.buffer, batch_rows=args.batch,
                                         seed=seed, passes=args.passes)]
        glob = np.tile(global_order(data.keys, shuf, train_rows), args.passes)
        shutil.rmtree(shuf, ignore_errors=True)
        k, lr = (args.synth_k, args.synth_lr) if data.planted is not None else (args.k, args.lr)
        tokens = len(train_rows) * args.passes // args.batch * args.batch
        cfg = TrainConfig(n_latents=args.latents, k=k, lr=lr, batch_size=args.batch, tokens=tokens, seed=seed,
                          dead_tokens=args.dead_tokens, init_tokens=min(32_768, len(train_rows)), checkpoint_every=0)
        held_x = data.x[torch.from_numpy(held)]
        for name, order in zip(ORDERS, (capture, mixing, glob), strict=True):
            t = time.perf_counter()
            sae = train_order(data.x, order, cfg)
            r = {"data": data.name, "order": name, "seed": seed, "tokens": cfg.steps * cfg.batch_size,
                 "adjacent_same_doc": adjacent_same_doc(order[: cfg.steps * cfg.batch_size], data.doc),
                 **evaluate(sae, held_x, data.planted), "train_s": time.perf_counter() - t}
            results.append(r)
            rec = f"  recovery {r['recovery']:.3f}" if "recovery" in r else ""
            print(f"  {data.name} seed {seed} {name:<8} FVU {r['fvu']:.4f}  dead {r['dead']:6.1%}  L0 {r['l0']:5.1f}"
                  f"{rec}  adj {r['adjacent_same_doc']:.3f}  ({r['train_s']:.0f} s train, shuffle {t_shuffle:.1f} s)",
                  flush=True)
    return results


def load_real(args, cache: str) -> Data:
    from writers.capture import CaptureConfig, capture_text

    url = os.path.join(cache, f"minilm-l3-{args.real_tokens}")
    if not os.path.exists(os.path.join(url, "manifest.json")):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        t = time.perf_counter()
        capture_text(url, CaptureConfig(max_tokens=args.real_tokens, layer=3, dtype="float16", device="cpu",
                                        overwrite=True))
        print(f"captured {args.real_tokens:,} tokens in {time.perf_counter() - t:.0f} s -> {url}", flush=True)
    x, keys, doc = read_rows(url)
    desc = (f"all-MiniLM-L6-v2 layer 3 on stdlib docstrings: {len(x):,} tokens x {x.shape[1]} float16, "
            f"{len(np.unique(doc)):,} documents")
    return Data("real", url, torch.from_numpy(x), keys, doc, None, desc)


def load_synth(args, work: str) -> Data:
    from writers.synth import SynthConfig, load_planted, synth

    url = os.path.join(work, "synth")
    cfg = SynthConfig(rows=args.synth_rows, d_model=args.synth_d, docs=args.synth_docs, features=args.synth_features,
                      k=args.synth_k, doc_features=16, doc_bias=0.9, seed=1)
    synth(url, cfg)
    x, keys, doc = read_rows(url)
    desc = (f"shuffler synth: {cfg.rows:,} rows x {cfg.d_model}, {cfg.n_features} planted features, k={cfg.k}, "
            f"{cfg.docs} documents of ~{cfg.rows // cfg.docs} rows, each drawing 90% of its features from its own "
            f"{cfg.doc_features}")
    return Data("synth", url, torch.from_numpy(x), keys, doc, load_planted(url), desc)


def summarize(results: list[dict]) -> list[str]:
    """A markdown table: mean +- sample std over seeds, per dataset and order."""
    lines = ["| data | order | adj. same doc | held-out FVU | FVU / global | dead latents | L0 | planted recovery "
             "(mean max cos) | recovered > 0.9 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(vals, fmt):
        v = np.asarray(vals, dtype=np.float64)
        sd = v.std(ddof=1) if len(v) > 1 else 0.0
        return f"{fmt.format(v.mean())} ± {fmt.format(sd)}"

    for data in dict.fromkeys(r["data"] for r in results):
        glob = {r["seed"]: r["fvu"] for r in results if r["data"] == data and r["order"] == "global"}
        for order in ORDERS:
            rs = [r for r in results if r["data"] == data and r["order"] == order]
            rel = [r["fvu"] / glob[r["seed"]] for r in rs]
            rec = (ms([r["recovery"] for r in rs], "{:.3f}"), ms([r["recovered_09"] for r in rs], "{:.3f}")) \
                if "recovery" in rs[0] else ("-", "-")
            lines.append(f"| {data} | {order} | {np.mean([r['adjacent_same_doc'] for r in rs]):.3f} | "
                         f"{ms([r['fvu'] for r in rs], '{:.4f}')} | {ms(rel, '{:.3f}')} | "
                         f"{ms([100 * r['dead'] for r in rs], '{:.1f}')} % | {ms([r['l0'] for r in rs], '{:.1f}')} | "
                         f"{rec[0]} | {rec[1]} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small data, 1 seed (~1-2 min)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--real-tokens", type=int, default=200_000)
    p.add_argument("--synth-rows", type=int, default=300_000)
    p.add_argument("--synth-docs", type=int, default=600)
    p.add_argument("--synth-d", type=int, default=64)
    p.add_argument("--synth-features", type=int, default=256)
    p.add_argument("--synth-k", type=int, default=4, help="planted active features per row, and the SAE's k on synth")
    p.add_argument("--heldout", type=int, default=16_384)
    p.add_argument("--latents", type=int, default=1536)
    p.add_argument("--k", type=int, default=32, help="SAE k on the real capture")
    p.add_argument("--lr", type=float, default=None, help="Adam lr on the real capture (default: trainer's 2e-4 / "
                   "sqrt(latents / 2**14))")
    p.add_argument("--synth-lr", type=float, default=4e-3,
                   help="Adam lr on synth (the default lr leaves the planted features unlearned in ~140 steps)")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--buffer", type=int, default=SAELENS_BUFFER, help="mixing-buffer rows (SAELens default 40,960)")
    p.add_argument("--dead-tokens", type=int, default=100_000, help="AuxK: a latent is dead after this many tokens")
    p.add_argument("--data", choices=("both", "real", "synth"), default="both")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "shuffle-matters-cache"),
                   help="folder that keeps the real capture between runs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="also write every run's numbers here")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.real_tokens, args.synth_rows, args.synth_docs = 1, 40_000, 60_000, 120
        args.heldout, args.latents, args.batch, args.buffer, args.dead_tokens = 4096, 768, 1024, 8192, 20_000
    torch.set_num_threads(args.threads)
    print(f"# shuffle_matters: {args.seeds} seed(s), SAE {args.latents} latents, batch {args.batch}, "
          f"{args.passes} pass(es), mixing buffer {args.buffer:,} rows, held-out {args.heldout:,} rows; {load_note()}",
          flush=True)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="shuffle-matters-") as work:
        datas = []
        if args.data in ("both", "real"):
            datas.append(load_real(args, args.cache))
        if args.data in ("both", "synth"):
            datas.append(load_synth(args, work))
        for d in datas:
            print(f"\n{d.name}: {d.describe}; adjacent rows from the same document: capture order "
                  f"{adjacent_same_doc(np.arange(len(d.doc)), d.doc):.3f}, uniform {expected_adjacent(d.doc):.4f}",
                  flush=True)
            results += run_dataset(d, args, work)
    print()
    print("\n".join(summarize(results)))
    print(f"\nSAE k: real {args.k}, synth {args.synth_k}. mean ± sample std over {args.seeds} seed(s). "
          f"total {time.perf_counter() - t0:.0f} s; {load_note()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

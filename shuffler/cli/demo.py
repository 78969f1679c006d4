"""The main job, end to end on local disk: capture, shuffle, verify, train, and show what the SAE learned.

    shuffler demo demo-out          # what `make demo` runs (about 200k tokens, a few minutes)

1. capture activations of all-MiniLM-L6-v2 (layer 3, and layer 4 for the transcoder, both in one forward
   pass) over the Python standard library's docstrings, with token_id, doc_id and position per row
   (writers.capture_text);
2. shuffle them globally with a small memory budget (several buckets, the real two-pass path);
3. verify that the output is a permutation of the input (fingerprint and, with --full, every row hash);
4. train a TopK SAE on the shuffled stream;
5. for a dozen learned features, find their top-activating tokens in the shuffled data and trace each one
   back to its text through the provenance columns (doc_id, position) carried through the shuffle;
6. train a TopK transcoder from layer 3 to layer 4 of the same rows (--no-transcoder skips it, and the
   capture then holds layer 3 alone) and show its features the same way;
7. write report.md with a training-curve plot and those examples.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from shuffler import Dataset
from shuffler.cli.options import option, options


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo runs; the defaults are `make demo`'s."""

    out: str
    """Local folder for every output (datasets, checkpoints, report)."""
    capture_tokens: int = 200_000
    """Tokens captured from the model."""
    layer: int = 3
    """hidden_states index captured (3 = output of encoder block 3 of 6)."""
    memory: str = "1GiB"
    """Shuffle memory budget."""
    buckets: int = 4
    """Shuffle buckets; more than the budget needs, so the demo shows the real two-pass path at work."""
    latents: int = 2048
    """SAE latents (about 5 x d_model: small enough to train in a few CPU minutes)."""
    k: int = 32
    """Active latents per token."""
    batch_size: int = 2048
    """Tokens per optimizer step."""
    train_tokens: int = 600_000
    """Training tokens (3 passes over the capture)."""
    dead_tokens: int = 400_000
    """A latent is dead when it has not fired for this many tokens."""
    features: int = 12
    """Learned features shown with their top-activating tokens."""
    examples: int = 5
    """Examples shown per feature."""
    seed: int = 0
    """Shuffle, reader and SAE seed."""
    transcoder: bool = True
    """Also capture `transcoder_layer` in the same forward pass and train a TopK transcoder from `layer` to it
    (same latents, k and tokens as the SAE)."""
    transcoder_layer: int = 4
    """hidden_states index the transcoder predicts (4 = output of encoder block 4 of 6)."""

    def __post_init__(self) -> None:
        for name in ("capture_tokens", "latents", "k", "batch_size", "train_tokens", "features", "examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.transcoder and self.transcoder_layer == self.layer:
            raise ValueError(f"transcoder_layer={self.transcoder_layer} is the SAE's layer; a transcoder maps one "
                             "layer to another")


def banner(text: str) -> None:
    click.secho(f"\n== {text}", bold=True)


def run(cfg: DemoConfig) -> dict:
    """Run every stage; returns the summary that report.md and the terminal show."""
    from shuffler.progress import Progress
    from shuffler.shuffling.run import shuffle
    from shuffler.shuffling.verify import verify
    from trainer.config import TrainConfig
    from trainer.train import train
    from writers.capture import CaptureConfig, capture_text

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    raw, shuffled, run_dir, tc_dir = str(out / "raw"), str(out / "shuffled"), out / "sae", out / "transcoder"
    for old in (raw, shuffled, run_dir, tc_dir):  # a fresh run every time: the stage timings mean something
        shutil.rmtree(old, ignore_errors=True)
    stages: dict[str, dict] = {}
    n = 6 if cfg.transcoder else 5
    layers = (cfg.layer, cfg.transcoder_layer) if cfg.transcoder else cfg.layer
    field_in, field_out = f"layer.{cfg.layer}", f"layer.{cfg.transcoder_layer}"

    which = f"layers {cfg.layer} and {cfg.transcoder_layer}" if cfg.transcoder else f"layer {cfg.layer}"
    banner(f"1/{n} capture {cfg.capture_tokens:,} tokens of all-MiniLM-L6-v2 {which} (stdlib docstrings)")
    t = time.perf_counter()
    with Progress("capture", cfg.capture_tokens) as bar:
        manifest, cstats = capture_text(raw, CaptureConfig(max_tokens=cfg.capture_tokens, layer=layers,
                                                           dtype="bfloat16", overwrite=True), progress=bar.update)
    stages["capture"] = {"seconds": time.perf_counter() - t, "rows": manifest.num_rows}
    ds_raw = Dataset.open(raw)
    click.echo(f"captured {ds_raw.num_rows:,} rows x {len(ds_raw.fields)} field(s) {', '.join(ds_raw.fields)} of "
               f"{ds_raw.d_model} bfloat16, {ds_raw.manifest.stored_bytes / 2**20:.1f} MiB stored")

    banner(f"2/{n} shuffle globally (seed {cfg.seed}, {cfg.buckets} buckets, memory budget {cfg.memory})")
    t = time.perf_counter()
    shuffle_stats: dict = {}
    shuffle(raw, shuffled, seed=cfg.seed, memory=cfg.memory, buckets=cfg.buckets, overwrite=True, stats=shuffle_stats)
    stages["shuffle"] = {"seconds": time.perf_counter() - t, "rows": ds_raw.num_rows}
    plan = shuffle_stats.get("plan") or {}
    click.echo(f"{plan.get('buckets')} buckets, {plan.get('map_tasks')} map tasks, "
               f"{shuffle_stats.get('workers')} worker process(es)")

    banner(f"3/{n} verify: the output is a permutation of the input (every row hash compared)")
    t = time.perf_counter()
    report = verify(raw, shuffled, full=True)
    stages["verify"] = {"seconds": time.perf_counter() - t, "rows": ds_raw.num_rows}
    if not report.ok:
        raise RuntimeError(f"verify failed: {report}")
    click.echo("OK: same rows, same fingerprint, every chunk checksum intact")
    adjacency = same_doc_adjacency(raw), same_doc_adjacency(shuffled)
    click.echo(f"adjacent rows from the same document: capture order {adjacency[0]:.3f}, "
               f"shuffled {adjacency[1]:.5f}")

    banner(f"4/{n} train a TopK SAE ({cfg.latents} latents, k={cfg.k}) on {cfg.train_tokens:,} shuffled tokens")
    t = time.perf_counter()
    tcfg = TrainConfig(n_latents=cfg.latents, k=cfg.k, batch_size=cfg.batch_size, tokens=cfg.train_tokens,
                       dead_tokens=cfg.dead_tokens, seed=cfg.seed, log_every=10, checkpoint_every=0,
                       input=field_in if cfg.transcoder else None)
    result = train(shuffled, run_dir, tcfg, device=None, overwrite=True)  # make demo re-runs replace the run
    stages["train"] = {"seconds": time.perf_counter() - t, "rows": result.tokens}
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]

    banner(f"5/{n} what the SAE learned: {cfg.features} features, top tokens traced back to the text")
    t = time.perf_counter()
    features = feature_examples(result.sae, raw, shuffled, n_features=cfg.features, n_examples=cfg.examples)
    stages["features"] = {"seconds": time.perf_counter() - t, "rows": ds_raw.num_rows}

    last = log[-1] if log else result.last
    summary = {
        "rows": ds_raw.num_rows, "d_model": ds_raw.d_model, "fvu": last.get("fvu"), "l0": last.get("l0"),
        "dead_fraction": last.get("dead_fraction"), "reader_wait": last.get("reader_wait_total"),
        "adjacent_same_doc": {"capture": adjacency[0], "shuffled": adjacency[1]},
    }
    transcoder = None
    if cfg.transcoder:
        banner(f"6/{n} train a TopK transcoder from {field_in} to {field_out} of the same rows, and its features")
        t = time.perf_counter()
        tc = train(shuffled, tc_dir, dataclasses.replace(tcfg, target=field_out), device=None, overwrite=True)
        tc_log = [json.loads(line) for line in (tc_dir / "log.jsonl").read_text().splitlines() if line.strip()]
        tc_last = tc_log[-1] if tc_log else tc.last
        tc_features = feature_examples(tc.sae, raw, shuffled, n_features=max(cfg.features // 2, 1),
                                       n_examples=cfg.examples)
        stages["transcoder"] = {"seconds": time.perf_counter() - t, "rows": tc.tokens}
        transcoder = {"input": field_in, "target": field_out, "fvu": tc_last.get("fvu"), "l0": tc_last.get("l0"),
                      "dead_fraction": tc_last.get("dead_fraction"), "log": tc_log, "features": tc_features}
    summary["stages"] = {k: dict(v, rows_per_s=v["rows"] / max(v["seconds"], 1e-9)) for k, v in stages.items()}
    print_summary(summary, features, transcoder)
    write_report(out, summary, features, log, transcoder)
    brief = None if transcoder is None else {k: v for k, v in transcoder.items() if k != "log"}
    (out / "summary.json").write_text(json.dumps({"summary": summary, "features": features, "transcoder": brief},
                                                 indent=1))
    click.echo(f"\nreport: {out / 'report.md'}")
    return {"summary": summary, "features": features, "transcoder": brief}


def same_doc_adjacency(url: str) -> float:
    """Fraction of adjacent stored rows that share a doc_id (uniform shuffle: about sum c^2 / N^2)."""
    ds = Dataset.open(url)
    docs = np.concatenate([ds.read_shard(i).columns["doc_id"] for i in range(len(ds.shards))])
    return float((docs[1:] == docs[:-1]).mean()) if len(docs) > 1 else 0.0


def token_lookup(raw_url: str):
    """Sorted (doc_id, position) keys and token ids of the capture: the text, recovered from provenance."""
    ds = Dataset.open(raw_url)
    cols = [ds.read_shard(i).columns for i in range(len(ds.shards))]
    doc = np.concatenate([c["doc_id"] for c in cols])
    pos = np.concatenate([c["position"] for c in cols])
    tok = np.concatenate([c["token_id"] for c in cols])
    key = (doc.astype(np.int64) << 32) | (pos.astype(np.int64) & 0xFFFFFFFF)
    order = np.argsort(key, kind="stable")
    return key[order], tok[order], doc[order]


def feature_examples(sae, raw_url: str, shuffled_url: str, *, n_features: int, n_examples: int) -> list[dict]:
    """Top-activating tokens of n_features latents (spread over firing frequency), each shown in context."""
    import torch

    from writers.models import load_model

    ds = Dataset.open(shuffled_url)
    device = next(sae.parameters()).device
    vals, idxs, docs, poss = [], [], [], []
    with torch.no_grad():
        for _, _, b in ds.iter_chunks():
            x = b.torch_acts().to(device=device, dtype=torch.float32)  # [rows, d_model]: the first field, the
            # SAE's and the transcoder's input
            o = sae(x)
            vals.append(o.acts.float().cpu().numpy())  # [rows, k]
            idxs.append(o.idx.cpu().numpy())  # [rows, k]
            docs.append(b.columns["doc_id"])
            poss.append(b.columns["position"])
    acts, idx = np.concatenate(vals), np.concatenate(idxs)
    doc, pos = np.concatenate(docs), np.concatenate(poss)
    fired = acts > 0
    counts = np.bincount(idx[fired], minlength=sae.n_latents)
    alive = np.nonzero(counts >= n_examples)[0]
    alive = alive[np.argsort(-counts[alive], kind="stable")]
    chosen = alive[np.linspace(0, len(alive) - 1, min(n_features, len(alive))).round().astype(int)] if len(alive) else []
    keys, toks, kdocs = token_lookup(raw_url)
    tokenizer = load_model(Dataset.open(raw_url).metadata.get("model", "all-MiniLM-L6-v2")).tokenizer
    out = []
    for f in chosen:
        rows, slots = np.nonzero((idx == f) & fired)
        top = np.argsort(-acts[rows, slots], kind="stable")[:n_examples]
        examples = []
        for r, s in zip(rows[top], slots[top], strict=True):
            at = int(np.searchsorted(keys, (int(doc[r]) << 32) | int(pos[r])))
            lo, hi = max(at - 10, 0), min(at + 4, len(keys))
            same = kdocs[lo:hi] == doc[r]
            window = toks[lo:hi][same]
            centre = int(np.nonzero(np.arange(lo, hi)[same] == at)[0][0])
            pieces = tokenizer.convert_ids_to_tokens(window.tolist())
            pieces[centre] = f"[[{pieces[centre]}]]"
            examples.append({"activation": round(float(acts[r, s]), 3), "doc_id": int(doc[r]), "position": int(pos[r]),
                             "text": join_wordpieces(pieces)})
        out.append({"feature": int(f), "frequency": float(counts[f] / len(acts)), "examples": examples})
    return out


def join_wordpieces(pieces: list[str]) -> str:
    """BERT wordpieces back to text: '##' marks a piece that continues the previous word."""
    text = ""
    for p in pieces:
        bare = p.replace("[[##", "[[").removeprefix("##")
        text += bare if (p.startswith("##") or p.startswith("[[##")) and text else " " + bare
    return text.strip()


def print_summary(summary: dict, features: list[dict], transcoder: dict | None = None) -> None:
    click.secho("\nsummary", bold=True)
    click.echo(f"  FVU {summary['fvu']:.3f}   L0 {summary['l0']:.1f}   dead latents {summary['dead_fraction']:.1%}   "
               f"reader wait {summary['reader_wait']:.1%} of training time")
    if transcoder is not None:
        click.echo(f"  transcoder {transcoder['input']} -> {transcoder['target']}: FVU {transcoder['fvu']:.3f} (of "
                   f"{transcoder['target']})   L0 {transcoder['l0']:.1f}   dead latents "
                   f"{transcoder['dead_fraction']:.1%}")
    for name, s in summary["stages"].items():
        click.echo(f"  {name:<10} {s['seconds']:7.1f} s   {s['rows_per_s']:>10,.0f} rows/s")
    shown = [("", features)] + ([("transcoder ", transcoder["features"])] if transcoder is not None else [])
    for what, fs in shown:
        for f in fs:
            click.secho(f"\n{what}feature {f['feature']} (fires on {f['frequency']:.2%} of tokens)", fg="cyan")
            for e in f["examples"]:
                click.echo(f"  {e['activation']:7.2f}  {e['text']}")


def write_report(out: Path, summary: dict, features: list[dict], log: list[dict],
                 transcoder: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    tokens = [r["tokens"] for r in log]
    ax[0].plot(tokens, [r["fvu"] for r in log], label="SAE")
    ax[0].set(xlabel="training tokens", ylabel="FVU", title="fraction of variance unexplained", yscale="log")
    ax[1].plot(tokens, [r["dead_fraction"] for r in log], label="SAE")
    ax[1].set(xlabel="training tokens", ylabel="fraction", title="dead latents")
    if transcoder is not None:
        tc_tokens = [r["tokens"] for r in transcoder["log"]]
        what = f"transcoder {transcoder['input']} -> {transcoder['target']}"
        ax[0].plot(tc_tokens, [r["fvu"] for r in transcoder["log"]], label=what)
        ax[1].plot(tc_tokens, [r["dead_fraction"] for r in transcoder["log"]], label=what)
        ax[0].legend()
    fig.tight_layout()
    fig.savefig(out / "training_curve.png", dpi=110)
    plt.close(fig)
    lines = [
        "# activation-shuffler demo report", "",
        f"{summary['rows']:,} tokens of all-MiniLM-L6-v2 activations (d_model {summary['d_model']}), captured in "
        "document order, globally shuffled, verified, and used to train a TopK SAE.", "",
        f"- FVU **{summary['fvu']:.3f}**, L0 **{summary['l0']:.1f}**, dead latents **{summary['dead_fraction']:.1%}**,"
        f" reader wait {summary['reader_wait']:.1%} of training time",
        f"- adjacent rows from the same document: {summary['adjacent_same_doc']['capture']:.3f} in capture order, "
        f"{summary['adjacent_same_doc']['shuffled']:.5f} after the shuffle", "",
        "| stage | seconds | rows/s |", "|---|---:|---:|",
        *[f"| {k} | {v['seconds']:.1f} | {v['rows_per_s']:,.0f} |" for k, v in summary["stages"].items()], "",
        "![training curve](training_curve.png)", "",
        "## Features and their top-activating tokens", "",
        "Each example is found in the *shuffled* data and traced back to its text through the `doc_id` and "
        "`position` columns that travelled with the row; the activating token is in [[brackets]].", "",
    ]
    lines.extend(feature_lines(features))
    if transcoder is not None:
        lines += [
            f"## Transcoder: {transcoder['input']} -> {transcoder['target']}", "",
            f"A TopK transcoder with the SAE's size and settings, trained on the same shuffled rows: its encoder reads "
            f"`{transcoder['input']}` and its decoder predicts `{transcoder['target']}` of the same token (both fields "
            "were captured in one forward pass and shuffled together).", "",
            f"- FVU of {transcoder['target']} **{transcoder['fvu']:.3f}**, L0 **{transcoder['l0']:.1f}**, dead latents "
            f"**{transcoder['dead_fraction']:.1%}**", "",
            "Its features, found and traced back the same way (the activating token is the input's):", "",
        ]
        lines.extend(feature_lines(transcoder["features"]))
    (out / "report.md").write_text("\n".join(lines))


def feature_lines(features: list[dict]) -> list[str]:
    lines = []
    for f in features:
        lines.append(f"### feature {f['feature']} (fires on {f['frequency']:.2%} of tokens)")
        lines.append("")
        lines.extend(f"- {e['activation']:.2f}: `{e['text']}`" for e in f["examples"])
        lines.append("")
    return lines


@click.command("demo")
@click.argument("out", default="demo-out")
@options(DemoConfig, "capture_tokens", "train_tokens", "latents", "k", "batch_size", "memory")
@option(DemoConfig, "transcoder", "--transcoder/--no-transcoder")
def demo_cmd(out, capture_tokens, train_tokens, latents, k, batch_size, memory, transcoder):
    """Capture, shuffle, verify and train on real activations, then show what the SAE (and a transcoder from
    layer 3 to layer 4) learned.

    Needs the `capture` and `torch` extras (what `make demo` installs). Writes OUT/report.md.

    \b
      shuffler demo demo-out
      shuffler demo demo-out --no-transcoder
    """
    run(DemoConfig(out=out, capture_tokens=capture_tokens, train_tokens=train_tokens, latents=latents, k=k,
                   batch_size=batch_size, memory=memory, transcoder=transcoder))


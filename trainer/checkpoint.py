"""Checkpoints that let `--resume` continue a run exactly.

Layout under the run's folder (local disk):

    latest.json                          {"step": S, "dir": "checkpoints/step-000000S"}; replaced atomically, last
    checkpoints/step-000000S/
        shard-00000.pt                   latent shard 0: weights, Adam state, dead counters, step (written by
                                         replica 0; the other replicas hold bit-identical copies, checked)
        reader-00000.json                rank 0's reader.state_dict() (one per rank)
        meta.json                        config, world layout, dataset fingerprint; written after every rank

Each file is written under a temporary name and renamed; `latest.json` moves only after every rank's files
and meta.json exist, so a crash at any moment leaves the previous checkpoint intact and current. Older
checkpoint folders are removed after `latest.json` moves. Weights are loaded with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from shuffler.format.manifest import Fingerprint
from trainer import distributed as D
from trainer.config import TrainConfig

LATEST = "latest.json"
# Fields that may change between a run and its resume: they do not change the result.
RESUMABLE_CHANGES = ("tokens", "log_every", "checkpoint_every", "reader_prefetch", "reader_threads")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _to_json(obj):
    """Reader state as JSON: numpy scalars and arrays become plain numbers and lists."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_json(v) for v in obj]
    return obj


def latest(out: Path) -> Path | None:
    """The folder of the newest complete checkpoint in `out`, or None."""
    p = Path(out) / LATEST
    if not p.exists():
        return None
    d = Path(out) / json.loads(p.read_text())["dir"]
    if not (d / "meta.json").exists():
        raise FileNotFoundError(f"{p} points at {d}, which has no meta.json (checkpoint folder damaged)")
    return d


def remove_run(out: Path) -> None:
    """Remove a previous run's latest.json, checkpoints and log (for overwrite=True); the pointer goes first."""
    out = Path(out)
    (out / LATEST).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "log.jsonl").unlink(missing_ok=True)


def save(out: Path, cfg: TrainConfig, layout: D.Layout, *, d_in: int, dataset, sae, opt, state, stream) -> Path:
    out = Path(out)
    d = out / "checkpoints" / f"step-{state.step:09d}"
    d.mkdir(parents=True, exist_ok=True)
    D.check_replicas_agree(sae, layout)
    if layout.data_rank == 0:  # replicas are identical: one copy of each shard is enough
        blob = {"sae": sae.state_dict(), "opt": opt.state_dict(), "since_fired": state.since_fired,
                "step": state.step, "tokens": state.tokens}
        name = f"shard-{layout.shard:05d}.pt"
        tmp = d / f".{name}.tmp"
        torch.save(blob, tmp)
        os.replace(tmp, d / name)
    r = layout.rank
    _atomic_write(d / f"reader-{r:05d}.json", json.dumps(_to_json(stream.state_dict())).encode())
    layout.barrier()  # every rank's files exist before meta.json and latest.json name them
    if layout.is_main:
        meta = {"step": state.step, "tokens": state.tokens, "world": layout.world,
                "latent_shards": layout.latent_shards, "d_in": d_in, "d_out": sae.d_out, "dataset": dataset.url,
                "fingerprint": dataset.manifest.fingerprint.to_json(), "config": cfg.to_json()}
        _atomic_write(d / "meta.json", json.dumps(meta, indent=1).encode())
        _atomic_write(out / LATEST, json.dumps({"step": state.step, "dir": f"checkpoints/{d.name}"}).encode())
        for old in (out / "checkpoints").iterdir():
            if old.is_dir() and old.name != d.name and old.name.startswith("step-"):
                shutil.rmtree(old, ignore_errors=True)
    layout.barrier()
    return d


def load(d: Path, cfg: TrainConfig, layout: D.Layout, *, d_in: int, dataset, sae, opt, state, stream) -> dict:
    """Restore this rank's part of checkpoint folder `d`, after checking it belongs to this run."""
    meta = json.loads((d / "meta.json").read_text())
    if (meta["world"], meta["latent_shards"]) != (layout.world, layout.latent_shards):
        raise ValueError(
            f"{d}: checkpoint was written by {meta['world']} process(es) with latent_shards="
            f"{meta['latent_shards']}; this run has {layout.world} with latent_shards={layout.latent_shards}"
        )
    old = TrainConfig.from_json(meta["config"])
    changed = old.differs_from(cfg, ignore=RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f"{d}: cannot resume with changed {changed} (checkpoint: "
                         f"{ {n: getattr(old, n) for n in changed} }, now: { {n: getattr(cfg, n) for n in changed} })")
    saved = Fingerprint.from_json(meta["fingerprint"], where=f"{d}/meta.json")
    d_out = meta.get("d_out", meta["d_in"])  # checkpoints from before transcoders hold SAEs
    if meta["d_in"] != d_in or d_out != sae.d_out or not dataset.manifest.names(saved):
        raise ValueError(f"{d}: checkpoint was trained on {meta['dataset']} (d_in={meta['d_in']}, d_out={d_out}, "
                         f"fingerprint {meta['fingerprint']}), not on {dataset.url} (d_in={d_in}, "
                         f"d_out={sae.d_out}); refusing to resume")
    r = layout.rank
    blob = torch.load(d / f"shard-{layout.shard:05d}.pt", map_location=state.since_fired.device, weights_only=True)
    sae.load_state_dict(blob["sae"])
    opt.load_state_dict(blob["opt"])
    state.since_fired.copy_(blob["since_fired"])
    state.step, state.tokens = int(blob["step"]), int(blob["tokens"])
    stream.load_state_dict(json.loads((d / f"reader-{r:05d}.json").read_text()))
    return meta

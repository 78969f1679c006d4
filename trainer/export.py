"""Export to, and load from, SAELens's on-disk layout, so SAELens users can load our SAEs.

    DIR/cfg.json                    {"architecture": "topk", "d_in", "d_sae", "k", "dtype", ...}
    DIR/sae_weights.safetensors     W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]

Key names and shapes follow SAELens's sae_lens/constants.py and saes/sae.py (SAEConfig fields d_in, d_sae,
dtype, device, apply_b_dec_to_input, normalize_activations, reshape_activations, meta; TopKSAEConfig adds k).
Our model is exactly SAELens's TopKSAE: encode is TopK then ReLU of (x - b_dec) @ W_enc + b_enc, decode is
acts @ W_dec + b_dec. Training details SAELens does not model go under "activation_shuffler", a key SAELens's
config loader filters out. The weights file is written first and cfg.json last, each atomically, so a
folder with a cfg.json holds a complete export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer import distributed as D
from trainer.sae import TopKSAE

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")


def full_state(sae: TopKSAE, layout: D.Layout | None = None) -> dict[str, torch.Tensor] | None:
    """The whole SAE's tensors on the CPU in SAELens layout; latent shards are gathered. Every shard of
    replica 0 must call this; other replicas (identical copies) get None without communicating."""
    if layout is not None and layout.data_rank != 0:
        return None
    g = sae.latent_group
    return {
        "W_enc": D.gather_latents(sae.W_enc.detach(), 1, g).float().cpu().contiguous(),  # [d_in, d_sae]
        "W_dec": D.gather_latents(sae.W_dec.detach(), 0, g).float().cpu().contiguous(),  # [d_sae, d_in]
        "b_enc": D.gather_latents(sae.b_enc.detach(), 0, g).float().cpu().contiguous(),  # [d_sae]
        "b_dec": sae.b_dec.detach().float().cpu().contiguous(),  # [d_in]
    }


def saelens_cfg(sae: TopKSAE, *, cfg=None, dataset: str | None = None) -> dict:
    return {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "k": sae.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "meta": {"dataset_path": dataset},
        "activation_shuffler": {"k_aux": sae.k_aux, "train_config": cfg.to_json() if cfg is not None else None},
    }


def export_saelens(sae: TopKSAE, path: str | Path, *, cfg=None, layout: D.Layout | None = None,
                   dataset: str | None = None) -> Path:
    """Write `sae` (gathering latent shards) to folder `path` in SAELens's layout; rank 0 writes."""
    path = Path(path)
    state = full_state(sae, layout)
    if state is not None and (layout is None or layout.is_main):
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{WEIGHTS}.tmp-{os.getpid()}"
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / WEIGHTS)
        tmp = path / f".{CFG}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(saelens_cfg(sae, cfg=cfg, dataset=dataset), indent=2))
        os.replace(tmp, path / CFG)
    if layout is not None:
        layout.barrier()
    return path


def load_saelens(path: str | Path, *, device: str | torch.device | None = None) -> TopKSAE:
    """A TopKSAE from a SAELens-layout folder (ours, or a SAELens "topk" export)."""
    path = Path(path)
    try:
        c = json.loads((path / CFG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path / CFG}: no SAELens cfg.json here (is {path} an exported SAE folder?)") from None
    if c.get("architecture") != "topk":
        raise ValueError(f"{path / CFG}: architecture {c.get('architecture')!r}; only 'topk' SAEs load as TopKSAE")
    for key in ("d_in", "d_sae", "k"):
        if not isinstance(c.get(key), int):
            raise ValueError(f"{path / CFG}: {key} must be an integer, got {c.get(key)!r}")
    if c.get("normalize_activations", "none") != "none":
        raise ValueError(f"{path / CFG}: normalize_activations={c['normalize_activations']!r} is not supported")
    w = load_file(str(path / WEIGHTS))
    want = {"W_enc": (c["d_in"], c["d_sae"]), "W_dec": (c["d_sae"], c["d_in"]), "b_enc": (c["d_sae"],),
            "b_dec": (c["d_in"],)}
    for key, shape in want.items():
        if key not in w:
            raise ValueError(f"{path / WEIGHTS}: tensor {key} missing; found {sorted(w)}")
        if tuple(w[key].shape) != shape:
            raise ValueError(f"{path / WEIGHTS}: {key} has shape {tuple(w[key].shape)}; cfg.json implies {shape}")
    k_aux = (c.get("activation_shuffler") or {}).get("k_aux", 0)
    sae = TopKSAE(c["d_in"], c["d_sae"], c["k"], k_aux=k_aux, device=device)
    sae.load_state_dict({key: w[key].float() for key in KEYS})
    return sae

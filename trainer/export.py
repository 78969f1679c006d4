"""Export to, and load from, SAELens's on-disk layout, so SAELens users can load our SAEs and transcoders.

    DIR/cfg.json                    {"architecture": "topk", "d_in", "d_sae", "k", "dtype", ...}
    DIR/sae_weights.safetensors     W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]

A transcoder is written in the layout of SAELens's Transcoder (sae_lens/saes/transcoder.py, TranscoderConfig):
cfg.json adds d_out and sets apply_b_dec_to_input false (its encoder reads x @ W_enc + b_enc), W_dec is
[d_sae, d_out] and b_dec [d_out], and metadata carries hook_name (the input's hook) and hook_name_out (the
target's, as SAELens's own transcoder loaders write it: loading/pretrained_sae_loaders.py). SAELens 6.x's
"transcoder" architecture applies a ReLU, not a TopK, so the architecture written is "topk_transcoder", which
trainer.saelens_transcoder registers with SAELens (a Transcoder with SAELens's own TopK activation);
`SAE.load_from_disk` loads it once that module is imported.

Key names and shapes follow SAELens's sae_lens/constants.py and saes/sae.py (SAEConfig fields d_in, d_sae,
dtype, device, apply_b_dec_to_input, normalize_activations, reshape_activations, metadata; TopKSAEConfig adds k
and rescale_acts_by_decoder_norm). "metadata" carries sae_lens_version (SAELens's loader treats a config
without one as pre-6.0 and rewrites it: loading/pretrained_sae_loaders.py handle_config_defaulting), the
hook_name that HookedSAETransformer.add_sae attaches the SAE at, and the dataset path.
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

from shuffler.format.manifest import provenance
from trainer import distributed as D
from trainer.sae import TopKSAE

#: The SAELens config layout these files follow (v6: "metadata" holds hook_name and friends).
SAELENS_VERSION = "6.0.0"
CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")


TRANSCODER = "topk_transcoder"


def full_state(sae: TopKSAE, layout: D.Layout | None = None) -> dict[str, torch.Tensor] | None:
    """The whole SAE's tensors on the CPU in SAELens layout; latent shards are gathered. Every shard of
    replica 0 must call this; other replicas (identical copies) get None without communicating."""
    if layout is not None and layout.data_rank != 0:
        return None
    g = sae.latent_group
    return {
        "W_enc": D.gather_latents(sae.W_enc.detach(), 1, g).float().cpu().contiguous(),  # [d_in, d_sae]
        "W_dec": D.gather_latents(sae.W_dec.detach(), 0, g).float().cpu().contiguous(),  # [d_sae, d_out]
        "b_enc": D.gather_latents(sae.b_enc.detach(), 0, g).float().cpu().contiguous(),  # [d_sae]
        "b_dec": sae.b_dec.detach().float().cpu().contiguous(),  # [d_out]
    }


def hook_name(source: dict, field: str | None) -> str | None:
    """The hook a field was captured at: a multi-layer capture's "hook_names" {field: hook}, else the
    dataset's one "hook_name" (for the first field, or when the field is not listed)."""
    hooks = provenance(source, "hook_names")
    if field is not None and isinstance(hooks, dict) and field in hooks:
        return hooks[field]
    return provenance(source, "hook_name")


def saelens_cfg(sae: TopKSAE, *, cfg=None, dataset: str | None = None, source: dict | None = None) -> dict:
    """cfg.json's contents. `source`: the training dataset's manifest metadata, where the hook name, model and
    context size are looked up (through shuffles' source_metadata: shuffler.format.manifest.provenance)."""
    source = source or {}
    field_in, field_out = (cfg.input, cfg.target) if cfg is not None else (None, None)
    meta = {"sae_lens_version": SAELENS_VERSION, "dataset_path": dataset, "hook_name": hook_name(source, field_in)}
    if sae.transcoder:
        meta["hook_name_out"] = hook_name(source, field_out)
    for key, ours in (("model_name", "model"), ("context_size", "context_size")):
        value = provenance(source, ours)
        if value is not None:
            meta[key] = value
    out = {
        "architecture": TRANSCODER if sae.transcoder else "topk",
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "k": sae.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not sae.transcoder,
        "rescale_acts_by_decoder_norm": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        "activation_shuffler": {"k_aux": sae.k_aux, "train_config": cfg.to_json() if cfg is not None else None},
    }
    if sae.transcoder:
        out["d_out"] = sae.d_out
    return out


def export_saelens(sae: TopKSAE, path: str | Path, *, cfg=None, layout: D.Layout | None = None,
                   dataset: str | None = None, source: dict | None = None) -> Path:
    """Write `sae` (gathering latent shards) to folder `path` in SAELens's layout; rank 0 writes.
    `dataset`: the training data's URL; `source`: its manifest metadata (hook names, model, context size)."""
    path = Path(path)
    state = full_state(sae, layout)
    if state is not None and (layout is None or layout.is_main):
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{WEIGHTS}.tmp-{os.getpid()}"
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / WEIGHTS)
        tmp = path / f".{CFG}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(saelens_cfg(sae, cfg=cfg, dataset=dataset, source=source), indent=2))
        os.replace(tmp, path / CFG)
    if layout is not None:
        layout.barrier()
    return path


def load_saelens(path: str | Path, *, device: str | torch.device | None = None) -> TopKSAE:
    """A TopKSAE from a SAELens-layout folder (ours, or a SAELens "topk" export) computing what SAELens's
    TopKSAE computes from it; a "topk_transcoder" folder gives the transcoder (a TopKSAE with d_out).

    SAELens options our model lacks are folded into the weights (exact in real arithmetic; float32 rounding
    aside): apply_b_dec_to_input false (pre = x @ W_enc + b_enc) becomes b_enc + b_dec @ W_enc;
    rescale_acts_by_decoder_norm true (pre scaled by each decoder row's norm n, decoded through W_dec / n,
    sae_lens/saes/topk_sae.py) becomes W_enc * n, b_enc * n, W_dec / n. Options that cannot be folded
    (normalize_activations, reshape_activations) are refused."""
    path = Path(path)
    c = saelens_config(path, ("topk", TRANSCODER))
    for key in ("d_in", "d_sae", "k"):
        if not isinstance(c.get(key), int):
            raise ValueError(f"{path / CFG}: {key} must be an integer, got {c.get(key)!r}")
    w = saelens_weights(path, c)
    k_aux = (c.get("activation_shuffler") or {}).get("k_aux", 0)
    d_out = c["d_out"] if is_transcoder(c) else None
    sae = TopKSAE(c["d_in"], c["d_sae"], c["k"], d_out=d_out, k_aux=k_aux, device=device)
    sae.load_state_dict(w)
    return sae


def saelens_config(path: Path, architectures: tuple[str, ...]) -> dict:
    """cfg.json of a SAELens folder, checked: one of `architectures`, options our models can honour."""
    try:
        c = json.loads((path / CFG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path / CFG}: no SAELens cfg.json here (is {path} an exported SAE folder?)") from None
    if c.get("architecture") not in architectures:
        raise ValueError(f"{path / CFG}: architecture {c.get('architecture')!r}; only "
                         f"{' or '.join(map(repr, architectures))} SAEs load here")
    for key in ("d_in", "d_sae") + (("d_out",) if is_transcoder(c) else ()):
        if not isinstance(c.get(key), int):
            raise ValueError(f"{path / CFG}: {key} must be an integer, got {c.get(key)!r}")
    if is_transcoder(c) and c.get("apply_b_dec_to_input", False):
        raise ValueError(f"{path / CFG}: apply_b_dec_to_input is true, which a transcoder cannot honour (b_dec is "
                         "the output's bias; SAELens's TranscoderConfig refuses it too)")
    if c.get("normalize_activations", "none") != "none":
        raise ValueError(f"{path / CFG}: normalize_activations={c['normalize_activations']!r} is not supported "
                         "(only 'none'; SAELens folds its scaling into the weights at the end of training)")
    if c.get("reshape_activations", "none") != "none":
        raise ValueError(f"{path / CFG}: reshape_activations={c['reshape_activations']!r} is not supported "
                         "(only 'none': rows are flat [d_in] activations)")
    for key, default in (("apply_b_dec_to_input", not is_transcoder(c)), ("rescale_acts_by_decoder_norm", False)):
        if not isinstance(c.get(key, default), bool):
            raise ValueError(f"{path / CFG}: {key} must be true or false, got {c.get(key)!r}")
    return c


def is_transcoder(c: dict) -> bool:
    """A transcoder's cfg.json (ours or SAELens's "transcoder", "jumprelu_transcoder", ...): its decoder
    writes another space (d_out) than the encoder reads, and its input is never shifted by b_dec."""
    return str(c.get("architecture", "")).endswith("transcoder")


def saelens_weights(path: Path, c: dict, extra: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """The folder's tensors as float32, shapes checked against cfg.json `c`, with apply_b_dec_to_input and
    rescale_acts_by_decoder_norm folded in (see load_saelens), so x -> (x - b_dec) @ W_enc + b_enc (a
    transcoder's x -> x @ W_enc + b_enc, no folding needed)."""
    w = load_file(str(path / WEIGHTS))
    d_out = c["d_out"] if is_transcoder(c) else c["d_in"]
    want = {"W_enc": (c["d_in"], c["d_sae"]), "W_dec": (c["d_sae"], d_out), "b_enc": (c["d_sae"],),
            "b_dec": (d_out,), **(extra or {})}
    for key, shape in want.items():
        if key not in w:
            raise ValueError(f"{path / WEIGHTS}: tensor {key} missing; found {sorted(w)}")
        if tuple(w[key].shape) != shape:
            raise ValueError(f"{path / WEIGHTS}: {key} has shape {tuple(w[key].shape)}; cfg.json implies {shape}")
    t = {key: w[key].double() for key in want}  # fold in float64, round once
    if not is_transcoder(c) and not c.get("apply_b_dec_to_input", True):
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    if c.get("rescale_acts_by_decoder_norm", False):
        n = t["W_dec"].norm(dim=1)  # [d_sae]
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]
        if "threshold" in t:
            t["threshold"] = t["threshold"] * n
    return {key: v.float().contiguous() for key, v in t.items()}

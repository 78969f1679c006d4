"""Our TopK transcoders as a SAELens architecture, so `sae_lens.SAE.load_from_disk` loads their exports.

    import trainer.saelens_transcoder  # registers "topk_transcoder" with SAELens (the `saelens` extra)
    from sae_lens import SAE
    tc = SAE.load_from_disk("runs/tc/saelens")      # a TopKTranscoder: tc(x) predicts the target field

SAELens 6.x (checked against sae-lens 6.54.12) ships "transcoder", "skip_transcoder", "jumprelu_transcoder"
and "jumprelu_skip_transcoder" (sae_lens/saes/transcoder.py), all ReLU or JumpReLU, and no TopK transcoder.
Its registry (sae_lens/registry.py, `register_sae_class`) is how an architecture is added: it takes an SAE
class and its config class. TopKTranscoder is SAELens's own Transcoder (same weights, same files, no b_dec on
the input) with the activation of SAELens's own TopKSAE (`TopK(k)`, sae_lens/saes/topk_sae.py: ReLU of the
top k pre-activations); TopKTranscoderConfig is TranscoderConfig plus `k`. They subclass SAELens's classes
because its registry takes classes; nothing of ours is shared through them. Importing this module registers
the architecture once; importing it again is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import Transcoder, TranscoderConfig, register_sae_class
from sae_lens.registry import SAE_CLASS_REGISTRY
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopK
from sae_lens.util import filter_valid_dataclass_fields

from trainer.export import TRANSCODER


@dataclass
class TopKTranscoderConfig(TranscoderConfig):
    """SAELens's TranscoderConfig (d_in, d_sae, d_out, ...) with the TopK's k."""

    k: int = 100

    @classmethod
    def architecture(cls) -> str:
        return TRANSCODER

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> TopKTranscoderConfig:
        res = cls(**filter_valid_dataclass_fields(config_dict, cls))
        if "metadata" in config_dict:
            res.metadata = SAEMetadata(**config_dict["metadata"])
        return res

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "k": self.k}


class TopKTranscoder(Transcoder):
    """SAELens's Transcoder whose activation is TopK(k) then ReLU, as trainer.sae.TopKSAE computes it."""

    cfg: TopKTranscoderConfig

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return TopK(self.cfg.k)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> TopKTranscoder:
        return cls(TopKTranscoderConfig.from_dict(config_dict))


def register() -> None:
    """Register "topk_transcoder" with SAELens, unless it already is."""
    if TRANSCODER not in SAE_CLASS_REGISTRY:
        register_sae_class(TRANSCODER, TopKTranscoder, TopKTranscoderConfig)


register()

"""Which activation fields a run reads: the encoder's input and the decoder's target, and their widths.

An SAE reads one field (by default the dataset's first, `batch.acts`); a transcoder reads two fields of the
same rows, decoded together by one stream (readers.ActivationStream's `fields` option), so input and target
are always the same tokens. Used by the training loop (trainer/train.py) and evaluation (trainer/evaluate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shuffler.io.dataset import Dataset


@dataclass(frozen=True)
class Fields:
    """Which activation fields a run reads, and their widths. A name None is the dataset's first field."""

    input: str | None
    target: str | None
    d_in: int
    d_out: int

    @property
    def transcoder(self) -> bool:
        return self.target is not None and self.target != self.input

    @property
    def stream_fields(self) -> tuple[str, ...] | None:
        """The reader's `fields` option: only what the run reads is decoded (None: the first field)."""
        if self.transcoder:
            return (self.input, self.target)
        return None if self.input is None else (self.input,)

    def read(self, batch, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input [B, d_in], target [B, d_out]) of a batch as float32 (on `device`, if given); the same tensor
        twice for an SAE. A batch of numpy rows (a stream without a device) is viewed as torch first, each
        field in its true dtype (bfloat16 reinterpreted, not cast)."""
        b = batch.to_torch()  # tensors stay where they are
        x = (b.torch_acts(device) if self.input is None else _on(b.field(self.input), device)).float()
        return x, (_on(b.field(self.target), device).float() if self.transcoder else x)


def _on(t: torch.Tensor, device) -> torch.Tensor:
    return t if device is None else t.to(device)


def resolve_fields(ds: Dataset, input: str | None, target: str | None) -> Fields:
    """The fields named `input` (None: the dataset's first) and `target` (None: the input) checked against
    `ds`'s. A one-field dataset is read as before (no `fields` option)."""
    names = ds.fields
    inp = names[0] if input is None else input
    tgt = inp if target is None else target
    for role, name in (("input", inp), ("target", tgt)):
        if name not in names:
            raise ValueError(f"{ds.url}: no activation field {name!r} (the {role}); its fields are {list(names)}")
    d_in, d_out = ds.field_spec(inp)[0], ds.field_spec(tgt)[0]
    if tgt == inp:  # an SAE; on a several-field dataset the stream decodes its one field, not all of them
        return Fields(None if len(names) == 1 else inp, None, d_in, d_in)
    return Fields(inp, tgt, d_in, d_out)

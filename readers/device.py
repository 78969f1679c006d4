"""The batches a stream yields, their buffers, and the move to a torch device.

On CUDA, batches are decoded straight into page-locked (pinned) staging buffers, then copied to the GPU with
non_blocking=True, so the copy overlaps the next batch's decoding. Pinned allocations are slow (a
cudaHostAlloc each), so the buffers are reused: each one goes back to a free list with a CUDA event recorded
after its copy, and is only overwritten once that event has completed. bfloat16 (stored as raw uint16) is
reinterpreted as torch.bfloat16, never passing through float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shuffler.format.schema import Schema
from shuffler.io.dataset import Batch


@dataclass
class StreamBatch(Batch):
    """A Batch that also says where it sits in the stream (what resume and DataLoader bookkeeping use)."""

    epoch: int = 0
    index: int = 0
    """Planned batch index within the epoch."""
    worker: int = 0
    """The DataLoader worker (consumer within this rank) that produced it; 0 outside a DataLoader."""

    def pin_memory(self) -> StreamBatch:
        """Called by DataLoader(pin_memory=True) on CUDA machines."""
        pin = lambda a: a.pin_memory() if hasattr(a, "pin_memory") else a  # noqa: E731
        fields = {n: pin(a) for n, a in self.fields.items()}
        acts = next(iter(fields.values())) if fields else pin(self.acts)
        return StreamBatch(acts, self.columns, self.dtype, fields, self.field_dtypes, self.epoch, self.index,
                           self.worker)


def torch_device(device):
    """torch.device for `device`, or None; a clear error for CUDA on a machine without it."""
    if device is None:
        return None
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device; pass device='cpu' or None")
    return dev


class Buffers:
    """Allocates batch buffers and moves filled ones to the device. One per iteration, consumer thread only.

    staged (default: device is CUDA) uses the reused pinned buffers described above; otherwise each batch
    gets a fresh numpy array, which the caller may keep (torch.from_numpy shares it on device="cpu").
    """

    def __init__(self, schema: Schema, batch_size: int, device, *, staged: bool | None = None):
        self.schema, self.batch_size, self.device = schema, batch_size, device
        self.staged = (device is not None and device.type == "cuda") if staged is None else staged
        self.free: list = []  # [(pinned tensor, event)], oldest first, reusable once the event completes
        self.lent: dict[int, object] = {}  # address of a handed-out numpy view -> its pinned tensor
        self.allocated = 0  # pinned buffers created (stays near prefetch + 2 when reuse works)

    # Hooks, overridden by the CPU test of this logic (tests/test_readers_torch.py).
    def _new_pinned(self):
        import torch

        tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.int16}[self.schema.dtype]
        if self.schema.multi:
            tdt = torch.uint8  # packed rows of several fields (Schema.row_dtype), split on the device
        return torch.empty((self.batch_size, self.schema.row_width), dtype=tdt, pin_memory=True)

    def _record(self):
        import torch

        ev = torch.cuda.Event()
        ev.record()
        return ev

    def _transfer(self, t):
        return t.to(self.device, non_blocking=True)

    def alloc(self, rows: int) -> np.ndarray:
        """A [rows, row_width] buffer in schema.row_dtype, rows <= batch_size."""
        if not self.staged:
            return np.empty((rows, self.schema.row_width), dtype=self.schema.row_dtype)
        if self.free:
            buf, ev = self.free.pop(0)
            ev.synchronize()  # its previous copy to the GPU must be done before it is overwritten
        else:
            buf = self._new_pinned()
            self.allocated += 1
        arr = buf.numpy().view(self.schema.row_dtype)[:rows]
        self.lent[arr.ctypes.data] = buf
        return arr

    def to_device(self, acts: np.ndarray):
        """numpy as is (device None), else a torch tensor of the stored dtype on the device."""
        if self.device is None:
            return acts
        import torch

        buf = self.lent.pop(acts.ctypes.data, None) if self.staged else None
        t = torch.from_numpy(acts) if buf is None else buf[: acts.shape[0]]
        if self.schema.dtype == "bfloat16" and not self.schema.multi:
            t = t.view(torch.bfloat16)  # same 16 bits: no float32 round trip
        if buf is None:
            return t.to(self.device)
        out = self._transfer(t)
        self.free.append((buf, self._record()))
        return out

    def fields(self, acts) -> dict:
        """{field: [rows, d_model]} of a batch from to_device(), each contiguous in its true dtype (numpy storage
        dtype without a device); empty when the schema does not name its fields."""
        s = self.schema
        if not s.fields:
            return {}
        if not s.multi:
            return {s.field_names[0]: acts}
        if self.device is None:
            return {n: np.ascontiguousarray(s.field_view(acts, n)) for n in s.field_names}
        import torch

        tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        return {n: acts[:, off : off + d * b].contiguous().view(tdt[t])
                for (n, off, d, b), (_, _, t) in zip(s.field_bytes(), s.field_specs, strict=True)}

    def batch(self, acts, cols: dict, *, epoch: int, index: int, worker: int) -> StreamBatch:
        """The StreamBatch of a filled buffer: on the device, each field split out, `acts` the first field."""
        t = self.to_device(acts)
        fields = self.fields(t)
        s = self.schema
        return StreamBatch(next(iter(fields.values())) if fields else t, cols, s.dtype, fields,
                           {n: dt for n, _, dt in s.field_specs} if fields else {}, epoch, index, worker)

    def discard(self, acts: np.ndarray) -> None:
        """Give back a buffer that will not be sent (its batch was compacted after a skipped chunk)."""
        buf = self.lent.pop(acts.ctypes.data, None)
        if buf is not None:
            self.free.append((buf, self._record()))

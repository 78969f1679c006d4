"""Activation caches other SAE tools write as tensor files: Activault megabatches and Llamascopium chunks.

Both are read into pieces (acts, columns, rows per record, nested: the fields of `importers.Piece`; rows in
file order, with token_id and position columns), which
`importers.import_activations` writes through ShardWriter like any other import. Files are read one at a
time, whole (a megabatch or a chunk is one object: torch.load and safetensors need all its bytes), so the
import holds one source file in memory plus the --batch-bytes piece being written.

Activault (https://github.com/tilde-research/activault, pipeline/vault/hook_uploader.py), one folder per
hook under the run on S3:

    RUN/HOOK/metadata.json                       {"batch_size", "sequence_length", "d_in", "dtype": "torch.bfloat16",
                                                  "batches_per_file", "shape", "input_ids_shape", "bytes_per_file"}
    RUN/HOOK/{uuid}--{attempt}_{slurm_job}.saved.pt   torch.save({"states": [N, seq, d_in], "input_ids": [N, seq],
                                                                  "tensor_bytes": int})

Each file is read with `torch.load(weights_only=True)`, which rebuilds tensors and plain containers and
refuses any other pickled object (https://pytorch.org/docs/stable/generated/torch.load.html), so an
untrusted bucket cannot run code here. Files are taken in name order (uuid order; Activault's own reader
shuffles megabatches anyway); every token of every sequence becomes a row.

Llamascopium (https://github.com/OpenMOSS/Llamascopium, formerly lm-saes: its ActivationWriter and
activation/processors/cached_activation.py), one folder per hook point:

    CACHE/HOOK/chunk-{N:08d}.safetensors          (or shard-{S}-chunk-{N:08d}.safetensors, several writers)
        "activation" [samples, context, d] or [context, d], "tokens" [samples, context] or [context],
        "mask" (the tokens training uses), "attention_mask"
    CACHE/HOOK/chunk-{N:08d}.meta.json            optional per-sample metadata (not imported)

Chunks are taken in (shard, chunk) order as Llamascopium's loader sorts them. Only tokens whose `mask` is
set become rows (Llamascopium trains on exactly those: padding and special tokens are masked out), with
their index in the context as position. `.pt` chunks are read with torch.load(weights_only=True) too.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

import numpy as np

from shuffler.errors import SchemaError
from shuffler.interop.sources import Source

ACTIVAULT_SUFFIX = ".saved.pt"
_CHUNK = re.compile(r"^(?:shard-(\d+)-)?chunk-(\d+)\.(pt|safetensors)$")
_TORCH_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16",
                 "torch.float64": "float64"}


def activault_files(src: Source) -> list[Source]:
    """The megabatch files of an Activault hook folder, in name order."""
    names = [n for n in src.names() if n.endswith(ACTIVAULT_SUFFIX)]
    if not names:
        raise FileNotFoundError(f"{src.url}: no Activault megabatches (*{ACTIVAULT_SUFFIX}) in this folder")
    return [src.child(n) for n in names]


def llamascopium_files(src: Source) -> list[Source]:
    """The chunk files of a Llamascopium hook folder, in (shard, chunk) order."""
    found = []
    for n in src.names():
        m = _CHUNK.match(n)
        if m:
            found.append((int(m.group(1) or 0), int(m.group(2)), n))
    if not found:
        raise FileNotFoundError(f"{src.url}: no Llamascopium chunks (chunk-N.safetensors, shard-S-chunk-N."
                                "safetensors) in this folder")
    return [src.child(n) for _, _, n in sorted(found)]


def load_tensors(src: Source) -> dict:
    """A .pt (torch.load, weights_only: tensors and plain containers only) or .safetensors file's tensors."""
    import torch

    data = src.read()
    if src.basename.endswith(".safetensors"):
        from safetensors.torch import load

        try:
            return load(data)
        except Exception as e:  # safetensors raises its own SafetensorError for damaged headers
            raise ValueError(f"{src.url}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        out = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for objects weights_only refuses, RuntimeError for damage
        raise ValueError(f"{src.url}: not a torch.save file of tensors that torch.load(weights_only=True) reads "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(out, dict):
        raise SchemaError(f"{src.url}: holds a {type(out).__name__}; expected a dict of tensors")
    return out


def storage_form(t, where: str) -> tuple[np.ndarray, str]:
    """A torch tensor as (numpy array in storage form, dtype name): bfloat16 as its uint16 bits."""
    import torch

    dtype = _TORCH_DTYPES.get(str(t.dtype))
    if dtype is None:
        raise SchemaError(f"{where}: activations are {t.dtype}; expected float32, float16, bfloat16 or float64")
    t = t.detach().cpu().contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16), dtype
    return t.numpy(), dtype


def _tensor(d: dict, key: str, where: str, ndim: tuple[int, ...]):
    import torch

    t = d.get(key)
    if not isinstance(t, torch.Tensor):
        raise SchemaError(f"{where}: no tensor {key!r}; found {sorted(d)}")
    if t.ndim not in ndim:
        raise SchemaError(f"{where}: {key!r} has shape {tuple(t.shape)}; expected {' or '.join(f'{n} dims' for n in ndim)}")
    return t


def _ids(t, where: str, key: str) -> np.ndarray:
    a = t.detach().cpu().numpy()
    if a.dtype.kind not in "iu":
        raise SchemaError(f"{where}: {key!r} holds {a.dtype}; expected integer token ids")
    if a.size and (int(a.min()) < np.iinfo(np.int32).min or int(a.max()) > np.iinfo(np.int32).max):
        raise SchemaError(f"{where}: {key!r} values do not fit int32 token ids")
    return a.astype(np.int32)


class Expect:
    """What every file must agree on with the first: width and dtype (and Activault's sequence length)."""

    def __init__(self):
        self.d: int | None = None
        self.dtype: str | None = None
        self.ctx: int | None = None

    def check(self, where: str, d: int, dtype: str, ctx: int | None = None) -> None:
        if self.d is None:
            self.d, self.dtype, self.ctx = d, dtype, ctx
            return
        if (d, dtype) != (self.d, self.dtype) or (ctx is not None and ctx != self.ctx):
            raise SchemaError(f"{where}: holds d_model={d} {dtype} (context {ctx}); the first file held "
                              f"d_model={self.d} {self.dtype} (context {self.ctx})")


def activault_metadata(src: Source) -> dict:
    """metadata.json of an Activault hook folder ({} if absent), its dtype checked against the files later."""
    meta = src.child("metadata.json")
    if not meta.exists():
        return {}
    try:
        out = json.loads(meta.read())
    except ValueError as e:
        raise ValueError(f"{meta.url}: not JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{meta.url}: expected a JSON object")
    return out


def activault_pieces(src: Source, batch_bytes: int, report) -> Iterator:
    """(acts, columns, per, nested) pieces of an Activault hook folder: every token of every sequence."""
    meta = activault_metadata(src)
    expect = Expect()
    report.column = src.basename
    for f in activault_files(src):
        d = load_tensors(f)
        states = _tensor(d, "states", f.url, (3,))
        acts, dtype = storage_form(states, f.url)
        n, ctx, width = acts.shape
        expect.check(f.url, width, dtype, ctx)
        if meta.get("dtype") not in (None, str(states.dtype)) or meta.get("d_in") not in (None, width):
            raise SchemaError(f"{f.url}: holds {states.dtype} d_in={width}; {src.url}/metadata.json says "
                              f"{meta.get('dtype')} d_in={meta.get('d_in')}")
        ids = _ids(_tensor(d, "input_ids", f.url, (2,)), f.url, "input_ids")
        if ids.shape != (n, ctx):
            raise SchemaError(f"{f.url}: input_ids has shape {ids.shape}; states imply {(n, ctx)}")
        report.source_dtype = dtype
        per = max(1, batch_bytes // max(ctx * width * acts.itemsize, 1))  # sequences per piece
        pos = np.arange(ctx, dtype=np.int32)
        for s in range(0, n, per):
            a = acts[s : s + per]
            k = len(a)
            yield a.reshape(k * ctx, width), {"token_id": ids[s : s + per].reshape(-1),
                                               "position": np.tile(pos, k)}, ctx, True


def llamascopium_pieces(src: Source, batch_bytes: int, report) -> Iterator:
    """(acts, columns, per, nested) pieces of a Llamascopium hook folder: the masked-in tokens of every context."""
    expect = Expect()
    report.column = src.basename
    for f in llamascopium_files(src):
        d = load_tensors(f)
        act = _tensor(d, "activation", f.url, (2, 3))
        acts, dtype = storage_form(act, f.url)
        if acts.ndim == 2:
            acts = acts[None]  # one context per chunk
        n, ctx, width = acts.shape
        expect.check(f.url, width, dtype)
        toks = _ids(_tensor(d, "tokens", f.url, (1, 2)), f.url, "tokens").reshape(-1)
        mask = _tensor(d, "mask", f.url, (1, 2)).detach().cpu().numpy().astype(bool).reshape(-1)
        if toks.shape != (n * ctx,) or mask.shape != (n * ctx,):
            raise SchemaError(f"{f.url}: tokens {tuple(d['tokens'].shape)} and mask {tuple(d['mask'].shape)} must "
                              f"match activation {tuple(act.shape)}")
        report.source_dtype = dtype
        flat = acts.reshape(n * ctx, width)
        pos = np.tile(np.arange(ctx, dtype=np.int32), n)
        keep = np.flatnonzero(mask)
        step = max(1, batch_bytes // max(width * acts.itemsize, 1))
        for s in range(0, len(keep), step):
            rows = keep[s : s + step]
            yield flat[rows], {"token_id": toks[rows], "position": pos[rows]}, 1, False

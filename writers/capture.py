"""Capture activations from a running torch model into a ShardWriter, batch by batch.

`capture(model, batches, writer, layer=...)` hooks one layer, runs the model on each TokenBatch and writes the
hooked activations of every stored token (never padding) with its token_id, doc_id and position. Only one batch
is in memory at a time; the writer streams chunks out as they fill. The forward pass stops at the hooked layer
(the hook raises), so capturing layer 3 of 6 costs about half a full forward. Several layers (layer=(2, 4)) are
hooked in the same forward pass, which stops after the deepest, and stored as one activation field each
("layer.2", "layer.4") of the same rows: every row holds each layer's activation of one token.

A layer is either
  - a Hugging Face hidden_states index i (int, or a string of digits such as "3" or "-1"): hidden_states[i] as
    `model(..., output_hidden_states=True)` returns it. For i < num_hidden_layers that is the input of block i,
    taken with a forward pre-hook on that block (for BERT: hidden_states[0] = embeddings output, hidden_states[3]
    = output of block 3 of 6); for the last index it is the model's own hidden_states[-1] (after a final norm,
    where the model has one, exactly as transformers defines it).
  - a module path such as "encoder.layer.2" or "encoder.layer.2.attention.output" (see model.named_modules()):
    that module's output (the first element when it returns a tuple), which must be [batch, seq, width].

`capture_text(url, CaptureConfig(...))` is the whole job behind `shuffler capture`: load a model offline,
cut text into windows (writers/text.py), capture, and commit a dataset whose manifest records where it came from.
"""

from __future__ import annotations

import datetime
import difflib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from shuffler.errors import SchemaError
from shuffler.format.manifest import Manifest
from shuffler.format.schema import ACT_DTYPES
from shuffler.io.rolling import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES
from writers.shard_writer import ShardWriter
from writers.text import TextSource, TokenBatch, token_batches


class _Stop(Exception):
    """Raised by the hook once the layer's output is in hand: the rest of the forward pass is not needed."""


@dataclass(frozen=True)
class Layer:
    """A resolved capture point."""

    spec: str
    """What the user gave, as text ("3", "encoder.layer.2")."""
    module: object
    """The torch module the hook sits on (None for the last hidden_states index, read from the outputs)."""
    index: int | None
    """The hidden_states index (non-negative), or None for a module path."""
    pre: bool
    """True: take the module's input (hidden_states[i] is block i's input); False: its output."""

    def describe(self) -> str:
        return f"hidden_states[{self.index}]" if self.index is not None else f"module {self.spec}"

    def hook_name(self) -> str:
        """The name SAELens metadata gives this point: TransformerLens's `blocks.{i}.hook_resid_pre` for block
        i's input (what hidden_states[i] is, i < num_hidden_layers), else the module path or index as given."""
        return f"blocks.{self.index}.hook_resid_pre" if self.index is not None and self.pre else self.spec


def _blocks(model, n: int):
    """The model's list of n transformer blocks: the first torch ModuleList of length n (encoder.layer for BERT)."""
    import torch

    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"{type(model).__name__} has no ModuleList of its {n} blocks; name the layer by module path")


def _unknown_module(model, path: str) -> ValueError:
    names = [n for n, _ in model.named_modules() if n]
    parent, parts = model, path.split(".")
    found: list[str] = []
    for part in parts:
        child = dict(parent.named_children()).get(part)
        if child is None:
            break
        parent, found = child, found + [part]
    children = [n for n, _ in parent.named_children()]
    where = f"'{'.'.join(found)}'" if found else f"the top of {type(model).__name__}"
    shown = ", ".join(children[:24]) + (" ..." if len(children) > 24 else "") if children else "(no children)"
    close = difflib.get_close_matches(path, names, n=3)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    hint = f" or a hidden_states index 0..{n_layers}" if isinstance(n_layers, int) else ""
    return ValueError(
        f"layer {path!r} is not a module of {type(model).__name__}: {where} has children {shown}"
        + (f"; close matches: {', '.join(close)}" if close else "")
        + f". Give a module path from model.named_modules(){hint}"
    )


def resolve_layer(model, layer: int | str) -> Layer:
    """Turn a hidden_states index or a module path into a Layer. Raises ValueError naming what exists."""
    text = str(layer).strip()
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    as_index = isinstance(layer, int | np.integer) or (text.lstrip("-").isdigit() and isinstance(n, int))
    if as_index:  # digits name a module (e.g. "2" in an nn.Sequential) when the model is not a Hugging Face one
        i = int(text)
        if not isinstance(n, int):
            raise ValueError(
                f"layer {text}: a hidden_states index needs a Hugging Face model (config.num_hidden_layers); "
                f"{type(model).__name__} has none, so name the layer by module path"
            )
        if not -(n + 1) <= i <= n:
            raise ValueError(
                f"layer {text}: hidden_states index out of range; {type(model).__name__} has {n} layers, so "
                f"hidden_states has {n + 1} entries: 0 (embeddings) .. {n} (last block), or -{n + 1} .. -1"
            )
        i %= n + 1
        if i == n:
            return Layer(spec=text, module=None, index=i, pre=False)
        return Layer(spec=text, module=_blocks(model, n)[i], index=i, pre=True)
    if not text:
        raise ValueError("layer is empty; give a module path such as encoder.layer.2 or a hidden_states index")
    try:
        module = model.get_submodule(text)
    except AttributeError:
        raise _unknown_module(model, text) from None
    import torch

    if isinstance(module, torch.nn.ModuleList | torch.nn.ModuleDict):
        kids = [f"{text}.{k}" for k, _ in module.named_children()]
        raise ValueError(
            f"layer {text!r} is a {type(module).__name__}, a container that never runs itself; name one of its "
            f"children: {', '.join(kids[:3])}{' ... ' + kids[-1] if len(kids) > 3 else ''}"
        )
    return Layer(spec=text, module=module, index=None, pre=False)


def _first_tensor(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, tuple | list) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "to_tuple"):  # transformers ModelOutput
        return _first_tensor(x.to_tuple())
    return None


def default_forward(model, input_ids, attention_mask, **kwargs):
    """How capture runs a model on one batch: the Hugging Face calling convention."""
    return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class _Grab:
    """Hook one or more layers for one forward pass; `run` returns their activations, each [B, T, d] (on the
    model's device), in the order given. The pass stops once every hooked layer has run, unless a layer is the
    last hidden_states entry (read from the model's outputs, so the pass runs to the end)."""

    def __init__(self, model, layers: Layer | tuple[Layer, ...], forward: Callable):
        self.model, self.forward = model, forward
        self.layers = layers if isinstance(layers, tuple) else (layers,)
        self.values: dict[int, object] = {}
        self.to_end = any(lay.module is None for lay in self.layers)

    def _hook(self, i: int, pre: bool):
        hooked = sum(lay.module is not None for lay in self.layers)

        def keep(value):
            self.values.setdefault(i, value)  # the first call: a module run twice keeps its first output
            if len(self.values) == hooked and not self.to_end:
                raise _Stop

        if pre:
            return lambda module, args, kwargs: keep(args[0] if args else kwargs.get("hidden_states"))
        return lambda module, args, output: keep(output)

    def run(self, input_ids, attention_mask) -> list:
        self.values = {}
        handles = []
        try:
            for i, lay in enumerate(self.layers):
                if lay.module is None:
                    continue
                if lay.pre:
                    handles.append(lay.module.register_forward_pre_hook(self._hook(i, True), with_kwargs=True))
                else:
                    handles.append(lay.module.register_forward_hook(self._hook(i, False)))
            kwargs = {"output_hidden_states": True} if self.to_end else {}
            try:
                out = self.forward(self.model, input_ids, attention_mask, **kwargs)
            except _Stop:
                out = None
        finally:
            for h in handles:
                h.remove()
        for i, lay in enumerate(self.layers):
            if lay.module is None:  # the last hidden_states entry: the model's own output
                self.values[i] = out.hidden_states[lay.index]
        return [self._check(lay, self.values.get(i), input_ids) for i, lay in enumerate(self.layers)]

    @staticmethod
    def _check(lay: Layer, value, input_ids):
        if value is None:
            raise RuntimeError(f"layer {lay.spec!r} ({lay.describe()}) did not run during the forward pass")
        acts = _first_tensor(value)
        shape = tuple(input_ids.shape)
        if acts is None or acts.ndim != 3 or tuple(acts.shape[:2]) != shape:
            got = tuple(acts.shape) if acts is not None else type(value).__name__
            raise ValueError(
                f"layer {lay.spec!r} ({lay.describe()}) gives {got}; capture needs [batch, seq, width] "
                f"with [batch, seq] = {list(shape)}"
            )
        return acts  # [B, T, d]


def layer_width(model, layer: int | str | Layer, *, forward: Callable = default_forward) -> int:
    """Width (d_model) of the activations at `layer`, from a 2-token probe forward pass."""
    import torch

    lay = layer if isinstance(layer, Layer) else resolve_layer(model, layer)
    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)  # [1, 2]
    with torch.inference_mode():
        return int(_Grab(model, lay, forward).run(ids, torch.ones_like(ids))[0].shape[-1])


@dataclass(frozen=True)
class CaptureStats:
    """What one capture did."""

    tokens: int
    """Rows written (stored tokens)."""
    batches: int
    """Model forward passes (= writer.write calls that carried rows)."""
    seconds: float
    """Wall time of the capture loop."""


def resolve_layers(model, layer) -> tuple[Layer, ...]:
    """One layer (int, str, Layer) or a sequence of them, resolved; a layer named twice is refused."""
    specs = layer if isinstance(layer, tuple | list) else (layer,)
    if not specs:
        raise ValueError("no layer given; name one or more (a hidden_states index or a module path)")
    layers = tuple(x if isinstance(x, Layer) else resolve_layer(model, x) for x in specs)
    names = [field_name(lay) for lay in layers]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"layers {[lay.spec for lay in layers]} name {twice} more than once; capture each layer once")
    return layers


def field_name(lay: Layer) -> str:
    """The activation field a layer is stored as when several are captured: "layer.N" for hidden_states[N],
    else the module path."""
    return f"layer.{lay.index}" if lay.index is not None else lay.spec


def capture(
    model,
    batches: Iterable[TokenBatch],
    writer: ShardWriter,
    *,
    layer: int | str | Layer | tuple,
    max_tokens: int | None = None,
    forward: Callable = default_forward,
    progress: Callable[[int, int], None] | None = None,
) -> CaptureStats:
    """Run `model` over `batches` and write the activations at `layer` into `writer`, one batch at a time.

    Stored per token (where batch.store, default the attention mask, is true; padding never): the activation
    row and the columns token_id (= input id), doc_id and position from the batch. Stops after exactly
    max_tokens rows (the last batch is cut) or when batches run out. The writer is not closed here.

    `layer` may be a tuple of layers: all are hooked in the same forward pass (which stops after the deepest)
    and written as the writer's fields, in order (ShardWriter(fields=...), one field per layer), so each row
    holds every layer's activation of the same token.
    """
    import torch

    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1 (or None for all of the text)")
    layers = resolve_layers(model, layer)
    want_cols = {"token_id", "doc_id", "position"}
    if not want_cols <= set(writer.schema.column_names):
        raise SchemaError(f"{writer.url}: capture writes columns {sorted(want_cols)}; writer has "
                          f"{list(writer.schema.column_names)}")
    specs = writer.schema.field_specs  # (name, d_model, dtype) per field
    if len(specs) != len(layers):
        raise SchemaError(f"{writer.url}: {len(layers)} layer(s) {[lay.spec for lay in layers]} need as many "
                          f"activation fields; the writer has {[n for n, _, _ in specs]}")
    device = next(model.parameters()).device
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    grab = _Grab(model, layers, forward)
    written = n_batches = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            ids = torch.as_tensor(batch.input_ids, dtype=torch.long)  # [B, T]
            mask = torch.as_tensor(batch.attention_mask)  # [B, T]
            store = mask.bool() if batch.store is None else torch.as_tensor(batch.store, dtype=torch.bool)
            store = store & mask.bool()  # padding is never stored, whatever store says
            outs = grab.run(ids.to(device), mask.to(device))  # per layer [B, T, d]
            on_dev = store.to(device)
            rows = []
            for lay, acts, (name, width, dtype) in zip(layers, outs, specs, strict=True):
                if acts.shape[-1] != width:
                    what = "d_model" if len(specs) == 1 else f"field {name!r} of d_model"
                    raise SchemaError(
                        f"layer {lay.spec!r} ({lay.describe()}) is {acts.shape[-1]} wide; the writer at "
                        f"{writer.url} holds {what}={width}"
                    )
                rows.append(acts[on_dev].to(dtypes[dtype]))  # [N, d], in token order within the batch
            doc = torch.as_tensor(batch.doc_id)[store]  # [N]
            pos = torch.as_tensor(batch.position)[store]  # [N]
            tok = ids[store]  # [N]
            n = rows[0].shape[0]
            if max_tokens is not None and written + n > max_tokens:
                n = max_tokens - written
                rows, doc, pos, tok = [r[:n] for r in rows], doc[:n], pos[:n], tok[:n]
            if n:
                acts_in = rows[0] if len(rows) == 1 else {name: r for (name, _, _), r in zip(specs, rows, strict=True)}
                writer.write(acts_in, token_id=tok, doc_id=doc, position=pos)
                written += n
                n_batches += 1
                if progress is not None:
                    progress(int(n), int(n) * writer.schema.row_bytes)
            if max_tokens is not None and written >= max_tokens:
                break  # before pulling another batch: no text is read or tokenized beyond what is stored
    return CaptureStats(tokens=written, batches=n_batches, seconds=time.perf_counter() - t0)


@dataclass(frozen=True, kw_only=True)
class CaptureConfig:
    """Everything `shuffler capture` needs besides the output URL."""

    model: str = "all-MiniLM-L6-v2"
    """Model name or local folder (writers/models.py resolves it offline)."""
    layer: int | str | tuple[int | str, ...] = 3
    """hidden_states index (int or digits) or module path, e.g. "encoder.layer.2"; several (a tuple) are captured
    in one forward pass as fields layer.N (a module path keeps its name)."""
    max_tokens: int = 200_000
    """Exactly this many tokens are stored, unless the text runs out first."""
    context: int = 256
    """Tokens per window fed to the model, special tokens included (at most the model's position limit)."""
    text_dir: str | None = None
    """Folder of .txt / .md files; None = the Python standard library's docstrings."""
    batch_size: int = 16
    """Windows per forward pass."""
    dtype: str = "float32"
    """Stored activation dtype: float32, float16 or bfloat16 (the model itself runs in float32)."""
    device: str = "auto"
    """torch device for the model; "auto" = cuda when available, else cpu."""
    keep_special: bool = False
    """Also store special tokens ([CLS], [SEP]); they get doc_id = position = -1."""
    overwrite: bool = False
    """Replace a dataset already at the output URL."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not 2 <= self.context <= 1 << 20:
            raise ValueError(f"context={self.context} must be in [2, 2**20] tokens")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.dtype not in ACT_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(ACT_DTYPES)}")
        if isinstance(self.layer, tuple | list) and not self.layer:
            raise ValueError("layer=() names no layer; give one or more")

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device {self.device!r} is not a torch device ({e})") from None
        return self.device


def capture_text(
    url: str,
    cfg: CaptureConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    scatter=None,
) -> tuple[Manifest, CaptureStats]:
    """Load cfg.model offline, capture cfg.layer over the text and commit a dataset at `url` (several layers:
    one field per layer, all from the same forward pass).

    `scatter`: None, a ScatterSpec (write scattered, shuffler/shuffling/on_write.py), or a function of the dataset's
    Schema returning one (the layer's width is known only once the model is loaded, and sizes the buckets).

    The manifest's metadata records model, layer, context, text source and capture time. On any error the
    writer removes what it wrote, so nothing half-written is visible.
    """
    from writers.models import load_model

    source = TextSource(text_dir=cfg.text_dir)
    loaded = load_model(cfg.model, device=cfg.torch_device())
    model, tokenizer = loaded.model, loaded.tokenizer
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.context > limit:
        raise ValueError(f"context={cfg.context} exceeds {cfg.model}'s max_position_embeddings={limit}")
    layers = resolve_layers(model, cfg.layer)
    widths = [layer_width(model, lay) for lay in layers]
    lay, width = layers[0], widths[0]
    metadata = {
        "model": cfg.model,
        "model_path": str(loaded.path),
        "model_class": type(model).__name__,
        "layer": lay.spec,
        "layer_is": lay.describe(),
        "hook_name": lay.hook_name(),
        "context": cfg.context,
        "text": source.describe(),
        "captured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "keep_special": cfg.keep_special,
        "position": "token index within its document (does not restart per window); doc_id = document index",
    }
    fields = None
    if len(layers) > 1:  # one field per layer, named layer.N; hook_names says where each came from
        fields = {field_name(x): (w, cfg.dtype) for x, w in zip(layers, widths, strict=True)}
        metadata["layers"] = [x.spec for x in layers]
        metadata["hook_names"] = {field_name(x): x.hook_name() for x in layers}
    batches = token_batches(
        source.documents(), tokenizer, context=cfg.context, batch_size=cfg.batch_size, keep_special=cfg.keep_special
    )
    if callable(scatter):
        from shuffler.format.schema import Schema, standard_columns

        scatter = scatter(Schema(dtype=cfg.dtype, d_model=width, columns=standard_columns()) if fields is None
                          else Schema.of_fields(fields, columns=standard_columns()))
    shape = {"d_model": width, "dtype": cfg.dtype} if fields is None else {"fields": fields}
    with ShardWriter(url, **shape, metadata=metadata, overwrite=cfg.overwrite, chunk_bytes=chunk_bytes,
                     shard_bytes=shard_bytes, scatter=scatter) as writer:
        stats = capture(model, batches, writer, layer=layers, max_tokens=cfg.max_tokens, progress=progress)
        if stats.tokens == 0:
            raise ValueError(f"text source produced no tokens: {source.describe()}")
        writer.metadata["tokens"] = stats.tokens
    return writer.manifest, stats

"""Turning user arrays (numpy or torch, any device) into the stored representation, with checks."""

from __future__ import annotations

import numpy as np

from shuffler.errors import SchemaError
from shuffler.format.schema import Schema


def to_numpy(x, *, what: str) -> np.ndarray:
    """numpy view or copy of a numpy array or torch tensor (moved to CPU; bfloat16 as raw uint16 bits)."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(np.uint16)
        return t.numpy()
    try:
        return np.asarray(x)
    except Exception as e:
        raise TypeError(f"{what}: expected a numpy array or torch tensor, got {type(x).__name__}") from e


def float32_to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest, ties to even, as torch does); NaN stays NaN. Returns uint16."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def acts_to_storage(schema: Schema, acts, *, is_bf16_bits: bool = False) -> np.ndarray:
    """Convert activations to schema.storage_dtype, [rows, d_model]. Raises SchemaError on shape mismatch."""
    a = to_numpy(acts, what="acts")
    torch_bf16 = type(acts).__module__.startswith("torch") and str(getattr(acts, "dtype", "")) == "torch.bfloat16"
    if a.ndim != 2 or a.shape[1] != schema.d_model:
        raise SchemaError(f"acts has shape {tuple(a.shape)}; expected [rows, d_model={schema.d_model}]")
    if schema.dtype == "bfloat16":
        if torch_bf16 or is_bf16_bits or a.dtype == np.uint16:
            return np.ascontiguousarray(a.view(np.uint16) if a.dtype != np.uint16 else a)
        if a.dtype.kind != "f":
            raise SchemaError(f"acts dtype {a.dtype} cannot be stored as bfloat16; give floats or raw uint16 bits")
        return float32_to_bfloat16_bits(a.astype(np.float32, copy=False))
    if torch_bf16:
        a = (a.astype(np.uint32) << 16).view(np.float32)
    if a.dtype.kind != "f":
        raise SchemaError(f"acts dtype {a.dtype} is not floating point; dataset dtype is {schema.dtype}")
    return np.ascontiguousarray(a, dtype=schema.storage_dtype)


def fields_to_storage(schema: Schema, given) -> np.ndarray:
    """Rows of every activation field in memory form, [rows, row_width] schema.row_dtype (packed bytes with
    several fields). `given` is {field name: [rows, d_model] array} (or one array for a one-field schema);
    SchemaError naming the field for a missing, unknown or misshapen one."""
    names = schema.field_names
    if not isinstance(given, dict):
        if schema.multi:
            raise SchemaError(f"this dataset has {len(names)} activation fields {list(names)}: pass a dict of "
                              f"field name -> [rows, d_model] array, got {type(given).__name__}")
        return acts_to_storage(schema, given)
    if set(given) != set(names):
        missing, extra = sorted(set(names) - set(given)), sorted(set(given) - set(names))
        raise SchemaError(f"activation fields given {sorted(given)} do not match the dataset's {list(names)} "
                          f"(missing {missing}, unknown {extra})")
    parts = []
    for name, d, t in schema.field_specs:
        try:
            parts.append(acts_to_storage(Schema(dtype=t, d_model=d), given[name]))
        except SchemaError as e:
            raise SchemaError(f"field {name!r} ({d} x {t}): {e}") from None
    rows = {p.shape[0] for p in parts}
    if len(rows) != 1:
        raise SchemaError(f"activation fields hold different row counts {dict(zip(names, [p.shape[0] for p in parts], strict=True))}; "
                          "every field needs one row per token")
    if not schema.multi:
        return parts[0]
    out = np.empty((parts[0].shape[0], schema.row_width), np.uint8)
    for (_, off, d, s), p in zip(schema.field_bytes(), parts, strict=True):
        out[:, off : off + d * s] = p.view(np.uint8)
    return out


def nonfinite_fields(schema: Schema, acts: np.ndarray) -> dict[str, int]:
    """{field: NaN or infinite values} of rows in memory form, for the fields that hold any."""
    out = {}
    for name, d, t in schema.field_specs:
        bad = nonfinite_count(Schema(dtype=t, d_model=d), schema.field_view(acts, name))
        if bad:
            out[name] = bad
    return out


_EXP_MASK = {"float32": (np.uint32, 0x7FFFFFFF, 0x7F800000), "float16": (np.uint16, 0x7FFF, 0x7C00),
             "bfloat16": (np.uint16, 0x7FFF, 0x7F80)}


def nonfinite_count(schema: Schema, a: np.ndarray) -> int:
    """Number of NaN or infinite values in stored-representation activations.

    On the raw bits: |x| >= the all-ones exponent means inf or NaN. Blockwise through a small reused buffer
    (one AND and one max per block, in cache) in the common all-finite case; np.isfinite on float16 ran 10x
    slower here (it widens every element), and a full-size temporary costs page faults.
    """
    if a.size == 0:
        return 0
    utype, mag, inf = _EXP_MASK[schema.dtype]
    flat = np.ascontiguousarray(a).view(utype).reshape(-1)
    block = 1 << 18
    tmp = np.empty(min(block, flat.size), dtype=utype)
    bad = 0
    for s in range(0, flat.size, block):
        part = flat[s : s + block]
        t = tmp[: part.size]
        np.bitwise_and(part, utype(mag), out=t)
        if t.max() >= inf:
            bad += int(np.count_nonzero(t >= inf))
    return bad


def columns_to_storage(schema: Schema, rows: int, columns: dict) -> list[np.ndarray]:
    """Check and convert provenance columns to schema order and dtypes."""
    given = set(columns)
    wanted = set(schema.column_names)
    if given != wanted:
        missing, extra = sorted(wanted - given), sorted(given - wanted)
        raise SchemaError(
            f"columns given {sorted(given)} do not match the dataset's {sorted(wanted)} "
            f"(missing {missing}, unexpected {extra})"
        )
    out = []
    for name, dt in schema.columns:
        c = to_numpy(columns[name], what=name)
        if c.ndim != 1 or c.shape[0] != rows:
            raise SchemaError(f"column {name!r} has shape {tuple(c.shape)}; expected [{rows}] to match acts")
        if c.dtype.kind not in "iuf" or (np.dtype(dt).kind in "iu" and c.dtype.kind == "f"):
            raise SchemaError(f"column {name!r} has dtype {c.dtype}; expected {dt}")
        if np.dtype(dt).kind in "iu" and c.size and c.dtype != np.dtype(dt):
            info = np.iinfo(np.dtype(dt))
            lo, hi = int(c.min()), int(c.max())
            if lo < info.min or hi > info.max:
                raise SchemaError(f"column {name!r} holds values in [{lo}, {hi}], outside {dt}'s range")
        out.append(np.ascontiguousarray(c, dtype=np.dtype(dt)))
    return out

"""Arrow views of activations, both ways: zero-copy Batch -> RecordBatch, and checked Arrow columns -> numpy.

Layout written (and preferred when read):
- activations are one `fixed_size_list<float32 | float16 | uint16>[d_model]` column; bfloat16 has no Arrow
  type, so it travels as its raw 16 bits (uint16) and the field metadata says `shuffler.dtype: bfloat16`
  (every activation field records its dtype the same way);
- each provenance column is a plain primitive column of its schema dtype.

Reading also accepts what other tools write: variable-size lists of one width (Parquet has no fixed-size
list, SAELens stores `Array2D` as list<list<float>>), fixed-size binary holding packed elements, and one more
level of nesting (a record of [context, d_model] that expands to `context` rows). Every check is on offsets
(one integer per record), never a per-row Python loop; data buffers are viewed, not copied.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from shuffler.errors import SchemaError

ACTS = "acts"
"""Name of the activation column in what we export."""
DTYPE_KEY = b"shuffler.dtype"
"""Field (and schema) metadata key recording the activation dtype."""
D_MODEL_KEY = b"shuffler.d_model"

_VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}
_NP_OF = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float64": np.dtype("<f8")}


# -- numpy -> Arrow (zero copy) ----------------------------------------------------------------------------
def numpy_to_arrow(a: np.ndarray, type_: pa.DataType | None = None) -> pa.Array:
    """A 1-D C-contiguous numpy array as an Arrow array over the same memory (no copy, no nulls)."""
    if a.ndim != 1 or not a.flags.c_contiguous:
        raise ValueError(f"numpy_to_arrow needs a 1-D contiguous array, got shape {a.shape}")
    t = type_ or pa.from_numpy_dtype(a.dtype)
    return pa.Array.from_buffers(t, len(a), [None, pa.py_buffer(a)])


def acts_field(dtype: str, d_model: int, name: str = ACTS) -> pa.Field:
    return pa.field(
        name,
        pa.list_(_VALUE_TYPES[dtype], d_model),
        nullable=False,
        metadata={DTYPE_KEY: dtype.encode(), D_MODEL_KEY: str(d_model).encode()},
    )


def acts_to_arrow(acts: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """[rows, d_model] storage-form activations as a fixed-size-list array over the same buffer."""
    rows, d = acts.shape  # acts: [rows, d_model]
    if not acts.flags.c_contiguous:
        acts = np.ascontiguousarray(acts)  # only strided views copy; decoded chunks are contiguous
    flat = acts.reshape(-1)  # a view
    return pa.FixedSizeListArray.from_arrays(numpy_to_arrow(flat, _VALUE_TYPES[dtype]), d)


def batch_to_arrow(batch, *, name: str = ACTS) -> pa.RecordBatch:
    """shuffler.io.dataset.Batch -> pyarrow.RecordBatch without copying the activations (or the columns)."""
    from shuffler.format.convert import to_numpy

    acts = to_numpy(batch.acts, what="acts")  # a torch CPU tensor is viewed; bfloat16 becomes its uint16 bits
    if not acts.flags.c_contiguous:
        acts = np.ascontiguousarray(acts)  # only a strided view (e.g. Batch.take with a step) needs a copy
    d = int(acts.shape[1])
    fields = [acts_field(batch.dtype, d, name)]
    arrays: list[pa.Array] = [acts_to_arrow(acts, batch.dtype)]
    for col, values in batch.columns.items():
        v = np.ascontiguousarray(to_numpy(values, what=col))
        fields.append(pa.field(col, pa.from_numpy_dtype(v.dtype), nullable=False))
        arrays.append(numpy_to_arrow(v))
    schema = pa.schema(fields, metadata={DTYPE_KEY: batch.dtype.encode(), D_MODEL_KEY: str(d).encode()})
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# -- Arrow -> numpy (checked, viewed) ----------------------------------------------------------------------
def _null_check(arr: pa.Array, *, where: str, base: int) -> None:
    if arr.null_count:
        first = int(np.flatnonzero(~np.asarray(arr.is_valid().to_numpy(zero_copy_only=False)))[0])
        raise SchemaError(f"{where}: row {base + first} is null; expected a value in every row")


def _list_width(arr: pa.Array, *, where: str, base: int, expect: int | None) -> tuple[pa.Array, int]:
    """(flattened child, width) of a list-like array whose every entry has the same length."""
    _null_check(arr, where=where, base=base)
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        width = t.list_size
    else:
        size = 8 if pa.types.is_large_list(t) else 4
        offsets = np.frombuffer(arr.buffers()[1], dtype=f"<i{size}", count=len(arr) + 1, offset=arr.offset * size)
        lens = np.diff(offsets)
        width = int(lens[0]) if len(lens) else (expect or 0)
        want = expect if expect is not None else width
        bad = np.flatnonzero(lens != want)
        if bad.size:
            r = int(bad[0])
            raise SchemaError(
                f"{where}: row {base + r} holds {int(lens[r])} values; expected {want} in every row "
                f"(ragged lists cannot be activations)"
            )
    if expect is not None and width != expect:
        raise SchemaError(f"{where}: rows hold {width} values; expected width {expect} (as in earlier rows)")
    return arr.flatten(), width


def is_list_like(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)


def storage_type(t: pa.DataType) -> pa.DataType:
    return t.storage_type if isinstance(t, pa.BaseExtensionType) else t


def looks_like_acts(t: pa.DataType) -> bool:
    """True for a list (or list of lists) of floats, or fixed-size binary: shapes an activation column takes."""
    t = storage_type(t)
    if pa.types.is_fixed_size_binary(t):
        return True
    if not is_list_like(t):
        return False
    v = t.value_type
    if is_list_like(v):
        v = v.value_type
    return pa.types.is_floating(v) or pa.types.is_uint16(v)


def leaf_dtype(t: pa.DataType, metadata: dict | None, source_dtype: str | None, *, where: str) -> str:
    """The element dtype name of an activation column: float32, float16, float64 or bfloat16."""
    meta = (metadata or {}).get(DTYPE_KEY)
    declared = meta.decode() if meta else source_dtype
    t = storage_type(t)
    while is_list_like(t):
        t = t.value_type
    if pa.types.is_fixed_size_binary(t):
        if declared not in _NP_OF:
            raise SchemaError(
                f"{where}: fixed-size binary of {t.byte_width} bytes per row does not say its element type; "
                f"expected field metadata shuffler.dtype or --source-dtype (one of {sorted(_NP_OF)})"
            )
        return declared
    if pa.types.is_float32(t) or pa.types.is_float16(t) or pa.types.is_float64(t):
        name = {pa.float32(): "float32", pa.float16(): "float16", pa.float64(): "float64"}[t]
        if declared and declared != name:
            raise SchemaError(f"{where}: holds {name} values but is declared {declared}")
        return name
    if pa.types.is_uint16(t) and declared == "bfloat16":
        return "bfloat16"
    raise SchemaError(
        f"{where}: holds {t} values; expected float32, float16 or float64 lists, or bfloat16 bits as uint16 "
        "with field metadata shuffler.dtype=bfloat16 (or --source-dtype bfloat16)"
    )


def _values(child: pa.Array, np_dtype: np.dtype, *, where: str, base: int) -> np.ndarray:
    _null_check(child, where=f"{where} (values)", base=0)
    buf = child.buffers()[1]
    return np.frombuffer(buf, dtype=np_dtype, count=len(child), offset=child.offset * np_dtype.itemsize)


def arrow_to_acts(
    arr: pa.Array, dtype: str, *, where: str, base: int = 0, d_model: int | None = None, context: int | None = None
) -> tuple[np.ndarray, int]:
    """Activations of one Arrow column as ([rows, d_model] numpy view, rows per record).

    dtype: element dtype from `leaf_dtype`. A record holding [context, d_model] expands to `context` rows.
    d_model / context: widths seen in earlier batches; a batch that differs is refused.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks != 1 else arr.chunk(0)
    if isinstance(arr.type, pa.BaseExtensionType):
        arr = arr.storage
    npd = _NP_OF[dtype]
    t = arr.type
    if pa.types.is_fixed_size_binary(t):
        _null_check(arr, where=where, base=base)
        if t.byte_width % npd.itemsize:
            raise SchemaError(
                f"{where}: fixed-size binary of {t.byte_width} bytes is not a whole number of {dtype} values"
            )
        d = t.byte_width // npd.itemsize
        if d_model is not None and d != d_model:
            raise SchemaError(f"{where}: rows hold {d} values; expected width {d_model} (as in earlier rows)")
        flat = np.frombuffer(arr.buffers()[1], dtype=npd, count=len(arr) * d, offset=arr.offset * t.byte_width)
        return flat.reshape(len(arr), d), 1
    if not is_list_like(t):
        raise SchemaError(f"{where}: type {t} is not a list or fixed-size binary column of activations")
    per = 1
    if is_list_like(t.value_type):
        arr, per = _list_width(arr, where=where, base=base, expect=context)
        if per == 0:
            raise SchemaError(f"{where}: records hold 0 rows; expected [context, d_model] arrays")
    child, d = _list_width(arr, where=where, base=base * per if per > 1 else base, expect=d_model)
    if d == 0 and len(arr):
        raise SchemaError(f"{where}: rows hold 0 values; expected d_model >= 1")
    flat = _values(child, npd, where=where, base=base)
    return flat.reshape(len(arr), d), per


def arrow_to_column(arr: pa.Array, *, where: str, base: int, per: int, nested: bool) -> np.ndarray:
    """A numeric provenance column as a 1-D numpy array with one value per activation row.

    nested: records hold [per, d_model] activations; then a scalar per record is repeated `per` times and
    a list per record must hold exactly `per` values.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks != 1 else arr.chunk(0)
    if isinstance(arr.type, pa.BaseExtensionType):
        arr = arr.storage
    t = arr.type
    if is_list_like(t):
        if not nested:
            raise SchemaError(f"{where}: holds lists ({t}); expected one number per row")
        arr, _ = _list_width(arr, where=where, base=base, expect=per)
        t = arr.type
        per_out = 1
    else:
        per_out = per
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise SchemaError(f"{where}: type {t} is not numeric; expected integer or float values")
    _null_check(arr, where=where, base=base)
    v = _values(arr, np.dtype(t.to_pandas_dtype()), where=where, base=base)
    return np.repeat(v, per_out) if per_out > 1 else v

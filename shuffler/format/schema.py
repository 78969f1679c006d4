"""What a dataset holds: activation dtype, width and provenance columns. Shared by every shard and manifest."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from shuffler.errors import SchemaError

#: Activation dtypes and the numpy dtype each is stored as. bfloat16 has no numpy dtype: it is kept as its raw
#: 16 bits (uint16) and only becomes torch.bfloat16 at the torch boundary, never passing through float32.
ACT_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}

#: The provenance columns every tool knows, with their fixed dtypes (issue 2).
STANDARD_COLUMNS: dict[str, str] = {"token_id": "int32", "doc_id": "int64", "position": "int32"}

#: Fixed-width numeric dtypes a user-named column may have.
COLUMN_DTYPES = frozenset(
    ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"]
)

#: A column name: letters, digits and underscore, at most 64, not starting with a digit.
COLUMN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

#: An activation field name (issue 19): a hook point such as "layer.4" or "blocks.4.hook_resid_post".
FIELD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")

#: The name of the one activation field of a dataset written without `fields=`.
DEFAULT_FIELD = "acts"

#: Most activation fields a row may hold.
MAX_FIELDS = 64


@dataclass(frozen=True, kw_only=True)
class Schema:
    """The layout of every row of a dataset."""

    dtype: str
    """Activation dtype: "float32", "float16" or "bfloat16"."""
    d_model: int
    """Width of one activation row (the model's hidden size)."""
    columns: tuple[tuple[str, str], ...] = field(default=())
    """Provenance columns as (name, numpy dtype name) pairs, in storage order."""
    fields: tuple[tuple[str, int, str], ...] = field(default=())
    """Named activation fields as (name, d_model, dtype), in storage order; empty for a dataset written without
    names (one field, "acts"). `dtype` and `d_model` above are the first field's. Two or more fields make a
    version-2 layout (docs/format.md, "Several fields")."""

    def __post_init__(self) -> None:
        if self.fields:
            self._check_fields()
        if self.dtype not in ACT_DTYPES:
            raise SchemaError(f"dtype {self.dtype!r} is not supported; expected one of {sorted(ACT_DTYPES)}")
        if not isinstance(self.d_model, int | np.integer) or isinstance(self.d_model, bool) or not (
            1 <= self.d_model <= 1 << 20
        ):
            raise SchemaError(f"d_model {self.d_model!r} must be an integer in [1, 2**20]")
        object.__setattr__(self, "d_model", int(self.d_model))
        cols = tuple((str(n), str(t)) for n, t in self.columns)
        seen = set()
        for name, dt in cols:
            if not COLUMN_NAME.match(name):
                raise SchemaError(f"column name {name!r} must match {COLUMN_NAME.pattern} (letters, digits, underscore)")
            if name in seen:
                raise SchemaError(f"column {name!r} appears twice in {cols}")
            seen.add(name)
            if dt not in COLUMN_DTYPES:
                raise SchemaError(f"column {name!r} has dtype {dt!r}; expected one of {sorted(COLUMN_DTYPES)}")
            if name in STANDARD_COLUMNS and dt != STANDARD_COLUMNS[name]:
                raise SchemaError(f"column {name!r} must be {STANDARD_COLUMNS[name]}, got {dt}")
        object.__setattr__(self, "columns", cols)

    def _check_fields(self) -> None:
        fl = tuple(self.fields)
        if len(fl) > MAX_FIELDS:
            raise SchemaError(f"{len(fl)} activation fields given; at most {MAX_FIELDS} are allowed")
        out, seen = [], set()
        for f in fl:
            if not isinstance(f, tuple | list) or len(f) != 3:
                raise SchemaError(f"activation field {f!r} must be (name, d_model, dtype)")
            name, d, dt = f
            if not isinstance(name, str) or not FIELD_NAME.match(name):
                raise SchemaError(f"field name {name!r} must match {FIELD_NAME.pattern}")
            if name in seen:
                raise SchemaError(f"field {name!r} appears twice in {[x[0] for x in fl]}")
            seen.add(name)
            if dt not in ACT_DTYPES:
                raise SchemaError(f"field {name!r} has dtype {dt!r}; expected one of {sorted(ACT_DTYPES)}")
            if not isinstance(d, int | np.integer) or isinstance(d, bool) or not 1 <= d <= 1 << 20:
                raise SchemaError(f"field {name!r} has d_model {d!r}; expected an integer in [1, 2**20]")
            out.append((name, int(d), dt))
        if (out[0][1], out[0][2]) != (self.d_model, self.dtype):
            raise SchemaError(f"first field {out[0]} must match dtype={self.dtype!r}, d_model={self.d_model}")
        object.__setattr__(self, "fields", tuple(out))

    @classmethod
    def of_fields(cls, fields: dict, *, columns: tuple[tuple[str, str], ...] = ()) -> Schema:
        """A schema from {name: (d_model, dtype)}, in the dict's order."""
        if not isinstance(fields, dict) or not fields:
            raise SchemaError(f"fields must be a non-empty dict of name: (d_model, dtype), got {fields!r}"[:300])
        fl = []
        for name, spec in fields.items():
            if not isinstance(spec, tuple | list) or len(spec) != 2:
                raise SchemaError(f"field {name!r}: expected (d_model, dtype), got {spec!r}")
            fl.append((name, spec[0], spec[1]))
        first = fl[0]
        if first[2] not in ACT_DTYPES:
            raise SchemaError(f"field {first[0]!r} has dtype {first[2]!r}; expected one of {sorted(ACT_DTYPES)}")
        if not isinstance(first[1], int | np.integer) or isinstance(first[1], bool) or not 1 <= first[1] <= 1 << 20:
            raise SchemaError(f"field {first[0]!r} has d_model {first[1]!r}; expected an integer in [1, 2**20]")
        return cls(dtype=first[2], d_model=first[1], columns=columns, fields=tuple(fl))

    # -- activation fields ---------------------------------------------------------------------------------
    @property
    def field_specs(self) -> tuple[tuple[str, int, str], ...]:
        """(name, d_model, dtype) of every activation field, in storage order; ("acts", ...) if unnamed."""
        return self.fields or ((DEFAULT_FIELD, self.d_model, self.dtype),)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f[0] for f in self.field_specs)

    @property
    def multi(self) -> bool:
        """Two or more fields: rows are held packed (row_dtype uint8) and chunks hold one frame per field."""
        return len(self.fields) > 1

    @property
    def version(self) -> int:
        """Shard and manifest format version: 2 for several fields, else 1 (unchanged bytes)."""
        return 2 if self.multi else 1

    @property
    def frames_per_chunk(self) -> int:
        """zstd frames in each chunk: 1, or one per field plus one for the columns (if any) with several fields."""
        return len(self.fields) + (1 if self.columns else 0) if self.multi else 1

    def field_spec(self, name: str) -> tuple[int, str]:
        """(d_model, dtype) of field `name`; KeyError naming the fields there are."""
        for n, d, t in self.field_specs:
            if n == name:
                return d, t
        raise KeyError(f"no activation field {name!r}; this dataset has {list(self.field_names)}")

    def field_bytes(self) -> list[tuple[str, int, int, int]]:
        """(name, byte offset in a packed row, d_model, itemsize) of each field."""
        out, off = [], 0
        for n, d, t in self.field_specs:
            s = ACT_DTYPES[t].itemsize
            out.append((n, off, d, s))
            off += d * s
        return out

    def field_view(self, acts: np.ndarray, name: str) -> np.ndarray:
        """Field `name`'s [rows, d_model] storage-dtype view of rows in memory form (`row_dtype`; no copy)."""
        d, t = self.field_spec(name)
        if not self.multi:
            return acts
        for n, off, _, s in self.field_bytes():
            if n == name:
                return acts[:, off : off + d * s].view(ACT_DTYPES[t])
        raise AssertionError(name)

    def select(self, names: tuple[str, ...] | list[str]) -> Schema:
        """The schema of rows holding only fields `names` (in that order) and every column: what a reader that
        asks for some fields holds in memory. ValueError naming the fields there are for an unknown name."""
        names = tuple(names)
        if not names or names == self.field_names:
            return self
        unknown = [n for n in names if n not in self.field_names]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"fields {list(names)}: {'unknown ' + str(unknown) if unknown else 'a name repeats'}; "
                             f"the dataset has {list(self.field_names)}")
        fl = tuple((n, *self.field_spec(n)) for n in names)
        return Schema(dtype=fl[0][2], d_model=fl[0][1], columns=self.columns, fields=fl)

    def project(self, acts: np.ndarray, sub: Schema) -> np.ndarray:
        """Rows in memory form (this schema) as rows of `sub` (from select()): the selected fields' bytes."""
        if sub is self or sub == self:
            return acts
        out = np.empty((acts.shape[0], sub.row_width), sub.row_dtype)
        dst = out.view(np.uint8)
        src = acts.view(np.uint8)
        at = {n: off for n, off, _, _ in self.field_bytes()}
        for n, off, d, s in sub.field_bytes():
            dst[:, off : off + d * s] = src[:, at[n] : at[n] + d * s]
        return out

    @property
    def row_width(self) -> int:
        """Width of the in-memory activation array of rows: d_model, or the packed row's bytes (several fields)."""
        return self.act_row_bytes if self.multi else self.d_model

    @property
    def row_dtype(self) -> np.dtype:
        """dtype of the in-memory activation array: the storage dtype, or uint8 packed bytes (several fields).
        With several fields a row's activations are each field's stored bytes back to back, so every mechanism
        that moves rows (gathers, copies, the row hash) moves all fields together."""
        return np.dtype(np.uint8) if self.multi else self.storage_dtype

    @property
    def storage_dtype(self) -> np.dtype:
        """numpy dtype of the stored activations (uint16 for bfloat16)."""
        return ACT_DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.storage_dtype.itemsize

    @property
    def act_row_bytes(self) -> int:
        """Stored activation bytes of one row, every field."""
        return sum(d * ACT_DTYPES[t].itemsize for _, d, t in self.field_specs)

    @property
    def row_bytes(self) -> int:
        """Uncompressed bytes of one row: activations plus every column."""
        return self.act_row_bytes + sum(np.dtype(t).itemsize for _, t in self.columns)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.columns)

    def to_json(self) -> dict:
        out = {"dtype": self.dtype, "d_model": self.d_model, "columns": [list(c) for c in self.columns]}
        if self.fields:
            out["fields"] = [list(f) for f in self.fields]
        return out

    @classmethod
    def from_json(cls, obj: object, *, where: str) -> Schema:
        if not isinstance(obj, dict):
            raise SchemaError(f"{where}: schema must be a JSON object, got {type(obj).__name__}")
        try:
            cols = obj.get("columns", [])
            if not isinstance(cols, list) or not all(isinstance(c, list) and len(c) == 2 for c in cols):
                raise SchemaError(f"columns must be a list of [name, dtype] pairs, got {cols!r}"[:300])
            fl = obj.get("fields", [])
            if not isinstance(fl, list) or not all(isinstance(f, list) and len(f) == 3 for f in fl):
                raise SchemaError(f"fields must be a list of [name, d_model, dtype] triples, got {fl!r}"[:300])
            return cls(dtype=obj["dtype"], d_model=obj["d_model"], columns=tuple(tuple(c) for c in cols),
                       fields=tuple(tuple(f) for f in fl))
        except KeyError as e:
            raise SchemaError(f"{where}: schema lacks field {e}") from None
        except (SchemaError, TypeError) as e:
            raise SchemaError(f"{where}: {e}") from None

    def describe_difference(self, other: Schema) -> str:
        parts = []
        for attr in ("dtype", "d_model", "columns", "fields"):
            a, b = getattr(self, attr), getattr(other, attr)
            if a != b:
                parts.append(f"{attr} {a!r} != {b!r}")
        return "; ".join(parts)


def standard_columns(names: tuple[str, ...] | list[str] = ("token_id", "doc_id", "position"), **extra: str):
    """Build a columns tuple from standard names plus user-named columns given as name=dtype."""
    cols = []
    for n in names:
        if n not in STANDARD_COLUMNS:
            raise SchemaError(f"{n!r} is not a standard column ({sorted(STANDARD_COLUMNS)}); pass it as name=dtype")
        cols.append((n, STANDARD_COLUMNS[n]))
    cols.extend(extra.items())
    return tuple(cols)

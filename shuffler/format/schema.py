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


@dataclass(frozen=True, kw_only=True)
class Schema:
    """The layout of every row of a dataset."""

    dtype: str
    """Activation dtype: "float32", "float16" or "bfloat16"."""
    d_model: int
    """Width of one activation row (the model's hidden size)."""
    columns: tuple[tuple[str, str], ...] = field(default=())
    """Provenance columns as (name, numpy dtype name) pairs, in storage order."""

    def __post_init__(self) -> None:
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

    @property
    def storage_dtype(self) -> np.dtype:
        """numpy dtype of the stored activations (uint16 for bfloat16)."""
        return ACT_DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.storage_dtype.itemsize

    @property
    def act_row_bytes(self) -> int:
        return self.d_model * self.itemsize

    @property
    def row_bytes(self) -> int:
        """Uncompressed bytes of one row: activations plus every column."""
        return self.act_row_bytes + sum(np.dtype(t).itemsize for _, t in self.columns)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.columns)

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "d_model": self.d_model, "columns": [list(c) for c in self.columns]}

    @classmethod
    def from_json(cls, obj: object, *, where: str) -> Schema:
        if not isinstance(obj, dict):
            raise SchemaError(f"{where}: schema must be a JSON object, got {type(obj).__name__}")
        try:
            cols = obj.get("columns", [])
            if not isinstance(cols, list) or not all(isinstance(c, list) and len(c) == 2 for c in cols):
                raise SchemaError(f"columns must be a list of [name, dtype] pairs, got {cols!r}"[:300])
            return cls(dtype=obj["dtype"], d_model=obj["d_model"], columns=tuple(tuple(c) for c in cols))
        except KeyError as e:
            raise SchemaError(f"{where}: schema lacks field {e}") from None
        except (SchemaError, TypeError) as e:
            raise SchemaError(f"{where}: {e}") from None

    def describe_difference(self, other: Schema) -> str:
        parts = []
        for attr in ("dtype", "d_model", "columns"):
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

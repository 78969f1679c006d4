"""Reading primitives: Dataset.open(url), read_shard(i), read_chunk(i, j), and the Batch they return."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from shuffler.errors import ChecksumError, FormatError, SchemaError
from shuffler.format.codec import decode_chunk, fingerprint_sum, row_hashes, unsplit
from shuffler.format.manifest import MANIFEST, Fingerprint, Manifest, ShardInfo, read_manifest
from shuffler.format.schema import DEFAULT_FIELD, Schema
from shuffler.format.shard import ShardIndex, decode_footer, decode_header, tail_bytes
from shuffler.io.chunks import ChunkReader
from shuffler.storage.storage import Storage


@dataclass
class Batch:
    """Rows of activations with their provenance columns.

    acts: [rows, d_model] numpy (bfloat16 as raw uint16) or a torch tensor (true dtype) after `.to_torch()`;
    with several activation fields, the first field. `field(name)` returns any field.
    """

    acts: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    dtype: str = "float32"
    fields: dict[str, np.ndarray] = field(default_factory=dict)
    """Every activation field by name, [rows, d_model] each (`acts` is the first), for a dataset that names its
    fields; empty for one written without names, whose one field is "acts"."""
    field_dtypes: dict[str, str] = field(default_factory=dict)
    """Each named field's dtype ("float32", "float16", "bfloat16")."""

    def __len__(self) -> int:
        return int(self.acts.shape[0])

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(self.fields) or (DEFAULT_FIELD,)

    def field(self, name: str):
        """Field `name`'s rows, [rows, d_model] (numpy storage dtype, or torch after `.to_torch()`)."""
        if self.fields:
            if name not in self.fields:
                raise KeyError(f"no activation field {name!r}; this batch has {list(self.fields)}")
            return self.fields[name]
        if name != DEFAULT_FIELD:
            raise KeyError(f"no activation field {name!r}; this batch has [{DEFAULT_FIELD!r}]")
        return self.acts

    def torch_acts(self, device=None, *, non_blocking: bool = False):
        """The activations as a torch tensor of the dataset's true dtype; bfloat16 is reinterpreted, not cast."""
        import torch

        a = self.acts
        if isinstance(a, torch.Tensor):
            return a.to(device, non_blocking=non_blocking) if device is not None else a
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)  # same 16 bits, no float32 round trip
        return t.to(device, non_blocking=non_blocking) if device is not None else t

    def to_torch(self, device=None, *, non_blocking: bool = False) -> Batch:
        fields = {n: Batch(a, dtype=self.field_dtypes[n]).torch_acts(device, non_blocking=non_blocking)
                  for n, a in self.fields.items()}
        acts = next(iter(fields.values())) if fields else self.torch_acts(device, non_blocking=non_blocking)
        return Batch(acts, self.columns, self.dtype, fields, self.field_dtypes)

    def float32(self) -> np.ndarray:
        """Activations widened to float32 numpy (bfloat16 by shifting its bits into the high half)."""
        a = np.asarray(self.acts)
        if self.dtype == "bfloat16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)

    def take(self, index: np.ndarray | slice) -> Batch:
        fields = {k: v[index] for k, v in self.fields.items()}
        acts = next(iter(fields.values())) if fields else self.acts[index]
        return Batch(acts, {k: v[index] for k, v in self.columns.items()}, self.dtype, fields, self.field_dtypes)

    @staticmethod
    def of_rows(schema: Schema, acts: np.ndarray, columns: dict[str, np.ndarray]) -> Batch:
        """A Batch of rows in memory form (schema.row_dtype: packed bytes with several fields), each field
        contiguous."""
        if not schema.fields:
            return Batch(acts, columns, schema.dtype)
        fields = {n: np.ascontiguousarray(schema.field_view(acts, n)) for n in schema.field_names}
        dtypes = {n: t for n, _, t in schema.field_specs}
        return Batch(fields[schema.field_names[0]], columns, schema.dtype, fields, dtypes)

    def to_arrow(self):
        """A pyarrow.RecordBatch over the same memory: `acts` as fixed_size_list[d_model] (bfloat16 as its
        uint16 bits, dtype in the field metadata) plus one column per provenance column. See shuffler/interop/arrow.py."""
        from shuffler.interop.arrow import batch_to_arrow

        return batch_to_arrow(self)

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        if not batches:
            raise ValueError("cannot concatenate zero batches")
        if len(batches) == 1:
            return batches[0]
        fields = {k: np.concatenate([b.fields[k] for b in batches]) for k in batches[0].fields}
        return Batch(
            next(iter(fields.values())) if fields else np.concatenate([b.acts for b in batches]),
            {k: np.concatenate([b.columns[k] for b in batches]) for k in batches[0].columns},
            batches[0].dtype,
            fields,
            batches[0].field_dtypes,
        )


@dataclass(frozen=True)
class Damage:
    """One damaged object or chunk found by a check."""

    shard: str
    chunk: int | None
    message: str

    def __str__(self) -> str:
        where = self.shard if self.chunk is None else f"{self.shard} chunk {self.chunk}"
        return f"{where}: {self.message}"


class Dataset:
    """A committed dataset: a manifest plus the shards it names. Shard indexes are read lazily and cached."""

    def __init__(self, store: Storage, manifest: Manifest):
        self.store = store
        self.manifest = manifest
        self._indexes: dict[int, ShardIndex] = {}
        self._lock = threading.Lock()
        # Local shards are read through memory maps: a pread copy costs 17-20% of the decode time for float16
        # chunks (benchmarks/codec.py), a mapped read 0-2%.
        self.reader = ChunkReader(store)
        """Reads and checks this dataset's chunk frames (shuffler/io/chunks.py)."""

    @classmethod
    def open(cls, url: str | Storage, *, manifest: str = MANIFEST) -> Dataset:
        store = url if isinstance(url, Storage) else Storage(url)
        return cls(store, read_manifest(store, manifest))

    def __repr__(self) -> str:
        return f"Dataset({self.url!r}, rows={self.num_rows}, d_model={self.d_model}, dtype={self.dtype})"

    # -- the manifest's facts --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.store.url

    @property
    def schema(self) -> Schema:
        return self.manifest.schema

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    @property
    def d_model(self) -> int:
        """The first field's d_model."""
        return self.schema.d_model

    @property
    def fields(self) -> tuple[str, ...]:
        """The activation fields' names, in the writer's order ("acts" for a dataset written without names)."""
        return self.schema.field_names

    def field_spec(self, name: str) -> tuple[int, str]:
        """(d_model, dtype) of field `name`; KeyError naming the fields there are."""
        return self.schema.field_spec(name)

    @property
    def dtype(self) -> str:
        return self.schema.dtype

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return self.manifest.shards

    @property
    def metadata(self) -> dict:
        return self.manifest.metadata

    # -- reading ---------------------------------------------------------------------------------------
    def _where(self, i: int, j: int | None = None) -> str:
        s = self.store.url_of(self.shards[i].name)
        return s if j is None else f"{s} chunk {j}"

    def index(self, i: int) -> ShardIndex:
        """The footer index of shard i (one ranged read of the tail, then cached)."""
        idx = self._indexes.get(i)
        if idx is not None:
            return idx
        info = self.shards[i]
        where = self._where(i)
        n = tail_bytes(info.chunks, self.schema)
        if info.bytes < n:
            raise FormatError(f"{where}: manifest says {info.bytes} bytes, too small for {info.chunks} chunks")
        try:
            tail = self.store.read_range(info.name, info.bytes - n, info.bytes)
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: shard named in the manifest is missing") from None
        if len(tail) != n:
            raise FormatError(f"{where}: object is shorter than the manifest's {info.bytes} bytes (truncated)")
        idx = decode_footer(tail, info.bytes, self.schema, where=where)
        if idx.rows != info.rows or idx.n_chunks != info.chunks:
            raise FormatError(
                f"{where}: shard holds {idx.rows} rows in {idx.n_chunks} chunks, manifest says "
                f"{info.rows} rows in {info.chunks} chunks"
            )
        with self._lock:
            self._indexes[i] = idx
        return idx

    def decode(self, i: int, j: int, frame: bytes) -> Batch:
        e = self.index(i).entries[j]
        acts, cols = decode_chunk(self.schema, frame, int(e["rows"]), int(e["checksum"]), where=self._where(i, j))
        return Batch.of_rows(self.schema, acts, cols)

    def chunk_range(self, i: int, j: int) -> tuple[int, int]:
        e = self.index(i).entries[j]
        return int(e["offset"]), int(e["offset"] + e["comp_len"])

    def read_chunk(self, i: int, j: int) -> Batch:
        """Chunk j of shard i: one ranged read (a view of the memory map if local), checksum checked."""
        return Batch.of_rows(self.schema, *self.read_rows(i, j))

    def read_rows(self, i: int, j: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Chunk j of shard i in memory form: (acts [rows, row_width] schema.row_dtype, columns)."""
        idx = self.index(i)
        if not 0 <= j < idx.n_chunks:
            raise IndexError(f"{self._where(i)} has {idx.n_chunks} chunks; chunk {j} does not exist")
        e = idx.entries[j]
        start, end = self.chunk_range(i, j)
        rows = int(e["rows"])
        raw = self.reader.read(self.schema, self.shards[i].name, start, end, rows, int(e["checksum"]), where=self._where(i, j))
        return unsplit(self.schema, raw, rows)

    def close(self) -> None:
        """Unmap the local shards this dataset mapped (they are also unmapped when it is garbage collected).
        The dataset stays usable: a later read maps its shard again."""
        self.reader.close()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_shard(self, i: int) -> Batch:
        """Every row of shard i, in stored order: one read of the whole object, each chunk checked."""
        info = self.shards[i]
        blob = self.reader.frame(info.name, 0, info.bytes)
        if len(blob) != info.bytes:
            raise FormatError(f"{self._where(i)}: read {len(blob)} bytes, manifest says {info.bytes} (truncated)")
        idx = self.index(i)
        mv = memoryview(blob)
        parts = []
        for j, e in enumerate(idx.entries):
            a, b, rows = int(e["offset"]), int(e["offset"] + e["comp_len"]), int(e["rows"])
            raw = self.reader.check(self.schema, mv[a:b], a, b, rows, int(e["checksum"]), where=self._where(i, j))
            parts.append(unsplit(self.schema, raw, rows))
        del mv
        self.reader.release(blob, 0)
        if not parts:
            return Batch.of_rows(self.schema, np.empty((0, self.schema.row_width), self.schema.row_dtype),
                                 self._empty_columns())
        if len(parts) == 1:
            return Batch.of_rows(self.schema, *parts[0])
        return Batch.of_rows(self.schema, np.concatenate([a for a, _ in parts]),
                             {n: np.concatenate([c[n] for _, c in parts]) for n in self.schema.column_names})

    def _empty_columns(self) -> dict[str, np.ndarray]:
        return {n: np.empty(0, dtype=t) for n, t in self.schema.columns}

    def iter_chunks(self) -> Iterator[tuple[int, int, Batch]]:
        """(shard, chunk, batch) for every chunk in stored order."""
        for i in range(len(self.shards)):
            for j in range(self.index(i).n_chunks):
                yield i, j, self.read_chunk(i, j)

    # -- checking --------------------------------------------------------------------------------------
    def check_shard(
        self, i: int, *, keep_hashes: bool = False, progress=None, visit=None
    ) -> tuple[list[Damage], Fingerprint, list[np.ndarray]]:
        """Read every chunk of shard i: (damage found, fingerprint of the readable rows, row hashes if kept).
        visit(batch), if given, sees each readable chunk's rows in the same pass.

        The header must agree with the manifest's schema; a shard whose header or index is unreadable is one
        Damage with chunk None, and each damaged chunk is one Damage naming it.
        """
        info = self.shards[i]
        try:
            head = self.store.read_range(info.name, 0, min(info.bytes, 1 << 16))
            schema, _, _ = decode_header(head, where=self._where(i))
            if schema != self.schema:
                raise SchemaError(f"header schema differs from manifest: {schema.describe_difference(self.schema)}")
            idx = self.index(i)
        except (FormatError, SchemaError, FileNotFoundError) as e:
            return [Damage(info.name, None, str(e))], Fingerprint(), []
        damage: list[Damage] = []
        fp, kept = Fingerprint(), []
        for j in range(idx.n_chunks):
            try:
                acts, cols = self.read_rows(i, j)
            except (ChecksumError, FormatError) as e:
                damage.append(Damage(info.name, j, str(e)))
                continue
            h = row_hashes(self.schema, acts, [cols[n] for n in self.schema.column_names])  # every field
            fp = fp + Fingerprint(len(acts), fingerprint_sum(h))
            if visit is not None:
                visit(Batch.of_rows(self.schema, acts, cols))
            if keep_hashes:
                kept.append(h)
            if progress is not None:
                progress(len(acts), int(idx.entries[j]["raw_len"]))
        return damage, fp, kept

    def check(self, *, progress=None, visit=None) -> tuple[list[Damage], Fingerprint]:
        """Read every chunk; return every damaged shard or chunk found and the fingerprint of what was readable.
        visit(batch), if given, sees each readable chunk's rows in the same pass (shard by shard, in order)."""
        damage: list[Damage] = []
        fp = Fingerprint()
        for i in range(len(self.shards)):
            d, f, _ = self.check_shard(i, progress=progress, visit=visit)
            damage.extend(d)
            fp = fp + f
        return damage, fp

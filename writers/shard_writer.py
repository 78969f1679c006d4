"""ShardWriter: the producer-side context manager that turns activation batches into a committed dataset."""

from __future__ import annotations

import json
import re
import time
import uuid

from shuffler.errors import SchemaError
from shuffler.format.convert import columns_to_storage, fields_to_storage, nonfinite_fields
from shuffler.format.manifest import (
    MANIFEST,
    Manifest,
    part_manifest_name,
    part_marker_name,
    read_manifest,
    write_manifest,
)
from shuffler.format.schema import Schema, standard_columns
from shuffler.io.rolling import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES, RollingShardWriter
from shuffler.shuffling.on_write import ScatterSink, ScatterSpec
from shuffler.storage.storage import Storage

_PRODUCER = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class ShardWriter:
    """Write activations plus provenance columns as compressed, chunked, checksummed shards.

    With `producer=None` the dataset manifest is written on close. With a producer name, many producers
    (one per GPU, say) write into one URL at once, each closing with a part manifest; `shuffler seal URL`
    then joins the parts. If an exception escapes the `with` block, every object this writer made is
    removed again, so nothing half-written becomes visible. A batch refused by its checks (shape, dtype, NaN/inf)
    leaves the writer as it was, so a caller may catch the error and write on; after any other error inside
    write() (storage, an encode thread) the writer refuses to go on, and close() removes what it wrote.

        with ShardWriter("s3://bucket/acts", d_model=768, dtype="bfloat16") as w:
            w.write(acts, token_id=tok, doc_id=doc, position=pos)
    """

    def __init__(
        self,
        url: str,
        *,
        d_model: int | None = None,
        dtype: str | None = None,
        fields: dict[str, tuple[int, str]] | None = None,
        columns: tuple[tuple[str, str], ...] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        level: int = 1,
        metadata: dict | None = None,
        producer: str | None = None,
        allow_nonfinite: bool = False,
        overwrite: bool = False,
        threads: int = 2,
        scatter: ScatterSpec | None = None,
    ):
        cols = standard_columns() if columns is None else columns
        if fields is not None:
            # Several activation fields per row (issue 19): {name: (d_model, dtype)}, stored in this order.
            if d_model is not None or dtype is not None:
                raise ValueError("give either fields={name: (d_model, dtype), ...} or d_model= and dtype=, not both")
            self.schema = Schema.of_fields(fields, columns=cols)
        else:
            if d_model is None or dtype is None:
                raise ValueError("ShardWriter needs d_model= and dtype= (or fields={name: (d_model, dtype), ...})")
            self.schema = Schema(dtype=dtype, d_model=d_model, columns=cols)
        if chunk_bytes < self.schema.row_bytes or chunk_bytes > (1 << 31):
            raise ValueError(f"chunk_bytes={chunk_bytes} must hold at least one {self.schema.row_bytes}-byte row and be < 2 GiB")
        if shard_bytes < chunk_bytes:
            raise ValueError(f"shard_bytes={shard_bytes} must be >= chunk_bytes={chunk_bytes}")
        if not -7 <= level <= 22:
            raise ValueError(f"level={level}: zstd levels run from -7 (fastest) to 22")
        if producer is not None and not _PRODUCER.match(producer):
            raise ValueError(f"producer={producer!r} must be 1-128 of letters, digits, '_', '.', '-'")
        if scatter is not None and not isinstance(scatter, ScatterSpec):
            raise TypeError(f"scatter={scatter!r} must be a writers.ScatterSpec(seed=..., buckets=...) or None")
        try:
            json.dumps(metadata or {})
        except TypeError as e:
            raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
        self.store = Storage(url)
        self.url = self.store.url
        self.producer = producer
        self.metadata = dict(metadata or {})
        self.allow_nonfinite = allow_nonfinite
        manifest_name = MANIFEST if producer is None else part_manifest_name(producer)
        if producer is not None and self.store.exists(MANIFEST):
            raise FileExistsError(f"{self.url} is already sealed ({MANIFEST}): a part written now would not be in it")
        self._replaced: Manifest | None = None
        if self.store.exists(manifest_name):
            if not overwrite:
                raise FileExistsError(
                    f"{self.url} already holds a dataset ({MANIFEST}); pass overwrite=True to replace it"
                    if producer is None else
                    f"{self.url}: producer {producer!r} already finished a part; choose another name"
                )
            # Replacing: write under fresh names and delete the old shards only after the new manifest is
            # committed, so a failed overwrite leaves the old dataset whole.
            self._replaced = read_manifest(self.store, manifest_name)
        prefix = f"{producer}/" if producer else ""
        if self._replaced is not None:
            prefix += f"v{uuid.uuid4().hex[:8]}-"
        if producer is not None:
            # Marks the part as started: `seal` refuses while a started part has no part manifest. First writer
            # wins, so two producers of one name can never mix their shards into one part.
            marker = json.dumps({"started": time.time()}).encode()
            if not self.store.put_if_absent(part_marker_name(producer), marker):
                if not overwrite:
                    raise FileExistsError(
                        f"{self.url}: producer {producer!r} already started a part ({part_marker_name(producer)}) "
                        "that is not finished: another producer of that name is writing, or one died; pass "
                        "overwrite=True to replace it"
                    )
                self.store.write(part_marker_name(producer), marker)
        if scatter is not None:
            # Pass-1 intermediates instead of shards (shuffler/shuffling/on_write.py), in a folder per producer (and
            # per overwrite), since run names are map-NNNNNN.shard as pass 2 expects.
            folder = f"{producer}/" if producer else ""
            if self._replaced is not None:
                folder += f"v{uuid.uuid4().hex[:8]}/"
            self.metadata["scatter"] = scatter.to_json()
            self._rolling = ScatterSink(self.store, self.schema, spec=scatter, folder=folder, producer=producer or "",
                                        chunk_bytes=chunk_bytes, level=level, threads=threads)
        else:
            self._rolling = RollingShardWriter(
                self.store,
            self.schema,
                name_of=lambda k: f"{prefix}shard-{k:06d}.shard",
                chunk_bytes=chunk_bytes,
                shard_bytes=shard_bytes,
                level=level,
                threads=threads,
                # The writer's callers wait on its encode threads (a capture, an import): hashing beside them, and
                # encoding whole chunks of a large batch in place while the batch is checked, keeps a float16
                # writer within 0.9 of raw encode (docs/benchmarks.md, "Writer fixed costs").
                hash_thread=True,
                borrow=True,
            )
        self._done = False
        self._failed: BaseException | None = None
        self.rows_written = 0

    # -- context manager -------------------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, acts, **columns) -> None:
        """Append rows. acts: [rows, d_model] numpy or torch (any device), or with fields= a dict
        {field name: [rows, d_model] array} naming every field; one 1-D array per column."""
        if self._done:
            raise ValueError(f"ShardWriter for {self.url} is closed")
        self._refuse_if_failed()
        a = fields_to_storage(self.schema, acts)
        cols = columns_to_storage(self.schema, a.shape[0], columns)
        after, refused = self.rows_written, []

        def refuse_nonfinite() -> None:
            bad = nonfinite_fields(self.schema, a)
            if bad:
                where = "" if not self.schema.fields else f" (field {', '.join(map(repr, bad))})"
                refused.append(ValueError(
                    f"{self.url}: batch after row {after} holds {sum(bad.values())} NaN/inf values"
                    f"{where}; pass allow_nonfinite=True to store them (nothing of this batch was written)"
                ))
                raise refused[0]

        # The check runs before any row of the batch is kept; a refused batch leaves the writer as it was. Any
        # other error on the way (a storage write, an encode thread's) may have kept part of the batch, or lost
        # an earlier chunk: the writer then refuses to go on, so that no dataset with holes can be committed.
        try:
            self._rolling.append(a, cols, check=None if self.allow_nonfinite else refuse_nonfinite)
            self.rows_written += a.shape[0]
        except BaseException as e:
            if not (refused and e is refused[0]):
                self._failed = e
            raise

    def _refuse_if_failed(self) -> None:
        if self._failed is not None:
            raise RuntimeError(
                f"ShardWriter for {self.url}: an earlier write failed ({type(self._failed).__name__}: {self._failed}), "
                "so the rows written so far may be incomplete: it commits nothing, and close() or abort() removes "
                "what it wrote"
            )

    def close(self) -> Manifest:
        """Commit the last shard, then the manifest (or part manifest) last. Returns the manifest."""
        if self._done:
            raise ValueError(f"ShardWriter for {self.url} is already closed")
        if self._failed is not None:
            self.abort()  # nothing of a writer with holes stays visible
            self._refuse_if_failed()
        try:
            shards = self._rolling.close()
            meta = dict(self.metadata)
            if self.producer is not None:
                meta.setdefault("producer", self.producer)
            manifest = Manifest(
                schema=self.schema, shards=tuple(shards), fingerprint=self._rolling.fingerprint, metadata=meta
            )
            if self.producer is None:
                write_manifest(self.store, manifest)
            else:
                write_manifest(self.store, manifest, part_manifest_name(self.producer))
        except BaseException:
            self.abort()  # the shards and a producer's start marker: nothing of a failed close stays visible
            raise
        self._done = True
        self.manifest = manifest
        if self._replaced is not None:
            keep = {sh.name for sh in shards}
            for sh in self._replaced.shards:
                if sh.name not in keep:
                    self.store.delete(sh.name)
                    if sh.name.endswith(".shard") and sh.name.rpartition("/")[2].startswith("map-"):
                        self.store.delete(sh.name[: -len(".shard")] + ".idx")  # a scattered run's marker
        if self.producer is not None and self.store.exists(MANIFEST):
            if self.producer not in read_manifest(self.store).metadata.get("producers", []):
                raise FileExistsError(
                    f"{self.url} was sealed while producer {self.producer!r} wrote its part: the part "
                    f"({part_manifest_name(self.producer)}) is complete but not in the dataset; delete {MANIFEST} "
                    "and run `shuffler seal` again to include it"
                )
        return manifest

    def abort(self) -> None:
        """Remove everything this writer made (called when an exception escapes the with block)."""
        if self._done:
            return
        self._done = True
        self._rolling.abort()
        if self.producer is not None:
            self.store.delete(part_marker_name(self.producer))


def check_schema_match(expected: Schema, got: Schema, *, where: str) -> None:
    if expected != got:
        raise SchemaError(f"{where}: {got.describe_difference(expected)}")

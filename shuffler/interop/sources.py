"""Where `shuffler import` reads from: a local path, or any fsspec URL (s3://, memory://, ...).

A `Source` is one file or folder of SRC. Local paths are read as before the URL support: Arrow IPC and
SAELens files memory-mapped (zero copy), Parquet by path, .npy memory-mapped. Remote objects are read
through the fsspec filesystem of `storage.Storage` (the one every other command uses, with its S3 endpoint,
retries and error messages):
- Parquet: `ParquetFile` over an fsspec file, page-wise (`pre_buffer=False`, 1 MiB buffers);
- Arrow IPC (file or stream format) and SAELens files: pyarrow's IPC readers over an fsspec file, one record
  batch at a time (a record batch is read whole, so remote memory holds one of the source's record batches);
- .npy: the header parsed from the first bytes, then one ranged read per block of rows (`NpyArray`), since
  np.load cannot memory-map a remote object.
Files are opened with a 4 MiB read-ahead: s3fs's default block is 50 MiB, which would be the memory bound.
"""

from __future__ import annotations

import copy
import io
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from shuffler.storage.storage import Storage, explain

FORMATS = ("auto", "saelens", "parquet", "arrow", "npy", "activault", "llamascopium")
EXTS = {"parquet": (".parquet", ".pq"), "arrow": (".arrow", ".feather", ".ipc", ".arrows")}
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow",
             ".arrows": "arrow", ".npy": "npy"}
#: Read-ahead of remote files: big enough for few requests, small enough not to matter for memory.
READ_AHEAD = 4 << 20
#: Bytes fetched to parse a remote .npy header: numpy refuses headers over 10,000 bytes (max_header_size).
_NPY_HEAD = 16 << 10


@dataclass(frozen=True)
class Source:
    """One file or folder of SRC: the object `name` under a Storage (a local folder or an fsspec prefix)."""

    url: str  # what messages name: the local path as given, or the full URL
    store: Storage
    name: str = ""

    @classmethod
    def of(cls, src: str | os.PathLike) -> Source:
        src = os.fspath(src)
        if src.startswith("file://"):
            src = src[len("file://"):]
        store = Storage(src)
        return cls(src if store.is_local else store.url, store)

    @property
    def local(self) -> bool:
        return self.store.is_local

    @property
    def path(self) -> str:
        return self.url if self.local else self.store.path(self.name)

    @property
    def basename(self) -> str:
        return os.path.basename(self.url.rstrip("/"))

    def child(self, name: str) -> Source:
        url = os.path.join(self.url, name) if self.local else f"{self.url}/{name}"
        return Source(url, self.store, posixpath.join(self.name, name) if self.name else name)

    def exists(self) -> bool:
        return self.store.exists(self.name)

    def isdir(self) -> bool:
        with explain(self.url, "checking"):
            return bool(self.store.fs.isdir(self.store.path(self.name)))

    def names(self) -> list[str]:
        """Names of the entries of this folder, sorted."""
        with explain(self.url, "listing"):
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.store.fs.ls(self.store.path(self.name),
                                                                                       detail=False))

    def read(self) -> bytes:
        return self.store.read(self.name)

    def size(self) -> int:
        return self.store.size(self.name)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end) (fewer at the end of the file), in one request."""
        return self.store.read_range(self.name, start, end)

    @contextmanager
    def open(self) -> Iterator:
        """A seekable binary file for pyarrow: a memory map locally, an fsspec file with READ_AHEAD remotely."""
        if self.local:
            with pa.memory_map(self.url, "r") as f:
                yield f
            return
        with explain(self.url, "reading"):
            f = self.store.fs.open(self.path, "rb", block_size=READ_AHEAD, cache_type="readahead")
        with f:
            yield f


# -- finding the files -------------------------------------------------------------------------------------
def detect_format(src: Source) -> str:
    """saelens for a datasets folder, else by suffix of the file (or the files in a folder), else magic bytes."""
    if src.isdir():
        if src.child("state.json").exists():
            return "saelens"
        names = src.names()
        # Activault megabatches and Llamascopium chunks (writers/tensor_caches.py): known by their file names
        if any(n.endswith(".saved.pt") for n in names):
            return "activault"
        if any(re.match(r"^(shard-\d+-)?chunk-\d+\.(pt|safetensors)$", n) for n in names):
            return "llamascopium"
        if src.child("dataset_dict.json").exists():
            raise ValueError(
                f"{src.url} is a datasets DatasetDict; point at one split's folder (e.g. {src.url}/train) instead"
            )
        kinds = {_SUFFIXES.get(os.path.splitext(n)[1].lower()) for n in names if not n.startswith(".")}
        kinds.discard(None)
        if len(kinds) == 1 and kinds != {"npy"}:
            return kinds.pop()
        raise ValueError(
            f"{src.url}: cannot tell the format from the folder's files (found {sorted(kinds) or 'none known'}); "
            "expected a SAELens/datasets folder (state.json), an Activault or Llamascopium hook folder, or "
            ".parquet / .arrow files; pass --format"
        )
    suffix = os.path.splitext(src.basename)[1].lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    head = src.read_range(0, 8)
    for magic, fmt in ((b"PAR1", "parquet"), (b"ARROW1", "arrow"), (b"\x93NUMPY", "npy"), (b"\xff\xff\xff\xff", "arrow")):
        if head.startswith(magic):
            return fmt
    raise ValueError(
        f"{src.url}: unknown format (suffix {suffix or 'none'!r}, first bytes {head!r}); expected one of "
        f"{', '.join(FORMATS[1:])}; pass --format"
    )


def files(src: Source, suffixes: tuple[str, ...]) -> list[Source]:
    """SRC itself if it is a file, else the folder's files with one of `suffixes`, in name order."""
    if not src.isdir():
        if not src.exists():
            raise FileNotFoundError(f"{src.url}: no such file or folder")
        return [src]
    out = [src.child(n) for n in src.names() if n.lower().endswith(suffixes)]
    if not out:
        raise FileNotFoundError(f"{src.url}: folder holds no {' / '.join(suffixes)} files")
    return out


def saelens_files(src: Source) -> list[Source]:
    """The Arrow files of a datasets folder, in row order (state.json's `_data_files`)."""
    where = src.child("state.json")
    try:
        state = json.loads(where.read())
        names = [d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where.url}: not a datasets state.json with _data_files ({type(e).__name__}: {e})") from None
    for n in names:
        if not isinstance(n, str) or "/" in n or "\\" in n or n in ("", ".", ".."):
            raise ValueError(f"{where.url}: data file name {n!r} is not a plain file name inside the folder")
    return [src.child(n) for n in names]


def exported_dtype(src: Source, dtypes: tuple[str, ...]) -> str | None:
    """The dtype a folder written by `shuffler export --format saelens` came from (bfloat16 was widened to
    float32 for datasets; narrowing those values back is exact), or None for any other folder."""
    try:
        dt = json.loads(src.child("shuffler_export.json").read()).get("dtype")
    except (OSError, ValueError, AttributeError):
        return None
    return dt if dt in dtypes else None


# -- Arrow-based files (parquet, arrow IPC, saelens) -----------------------------------------------------------
def read_schema(src: Source, fmt: str) -> pa.Schema:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        if src.local:
            return pq.read_schema(src.url)
        with src.open() as f:
            return pq.read_schema(f)
    with src.open() as f:
        try:
            return pa.ipc.open_file(f).schema
        except pa.ArrowInvalid:
            f.seek(0)
            return pa.ipc.open_stream(f).schema


def record_batches(src: Source, fmt: str, batch_bytes: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The file's record batches: Parquet `columns` about `batch_bytes` at a time; IPC batches as stored."""
    if fmt == "parquet":
        if src.local:
            yield from _parquet_batches(src.url, batch_bytes, columns)
        else:
            with src.open() as f:
                yield from _parquet_batches(f, batch_bytes, columns)
        return
    with src.open() as f:
        if fmt != "saelens":  # datasets writes the stream format; other IPC files may be either
            try:
                reader = pa.ipc.open_file(f)
            except pa.ArrowInvalid:
                f.seek(0)
            else:
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
                return
        yield from pa.ipc.open_stream(f)


def _parquet_batches(where, batch_bytes: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(where, buffer_size=1 << 20, pre_buffer=False)  # page-wise reads: memory bounded
    md = pf.metadata
    rg_rows = max(md.row_group(0).num_rows, 1) if md.num_row_groups else 1
    rg_bytes = md.row_group(0).total_byte_size if md.num_row_groups else 1
    batch = max(1, int(batch_bytes * rg_rows // max(rg_bytes, 1)))
    yield from pf.iter_batches(batch_size=batch, columns=columns)


# -- .npy ------------------------------------------------------------------------------------------------------
class NpyArray:
    """A .npy array read a block of rows at a time: memory-mapped locally; on object stores the header is
    parsed from the first bytes and each block is one ranged read (np.load cannot map a remote object)."""

    def __init__(self, src: Source):
        self.url = src.url
        self._src = src
        if not src.exists():
            raise FileNotFoundError(f"{src.url}: no such file")
        if src.local:
            self._mm = np.load(src.url, mmap_mode="r")
            self.shape, self.dtype = tuple(self._mm.shape), self._mm.dtype
            return
        from numpy.lib import format as npf

        size = src.size()
        head = io.BytesIO(src.read_range(0, min(size, _NPY_HEAD)))
        try:
            version = npf.read_magic(head)
            # 3.0 is 2.0 with a UTF-8 header; the headers numeric arrays have are ASCII, so 2.0's reader reads them
            read_header = {(1, 0): npf.read_array_header_1_0, (2, 0): npf.read_array_header_2_0,
                           (3, 0): npf.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"format version {version} is not read here; expected 1.0, 2.0 or 3.0")
            shape, fortran, dtype = read_header(head)
        except ValueError as e:
            raise ValueError(f"{src.url}: not a readable .npy file ({e})") from None
        if dtype.hasobject:
            raise ValueError(f"{src.url}: holds Python objects (dtype {dtype}); expected a numeric array")
        if fortran and len(shape) > 1:
            raise ValueError(
                f"{src.url}: Fortran-ordered array {shape}; rows cannot be read in blocks from object storage. "
                "Save it C-ordered (np.save(path, np.ascontiguousarray(a))) or copy it locally first"
            )
        self._offset = head.tell()
        data = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size - self._offset < data:
            raise ValueError(
                f"{src.url}: .npy file is truncated: its header says {shape} {dtype} ({data} bytes of data), "
                f"the file holds {size - self._offset}"
            )
        self.shape, self.dtype = tuple(shape), dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def view(self, dtype: np.dtype) -> NpyArray:
        """The same bytes read as `dtype` (of the same item size), like ndarray.view."""
        assert np.dtype(dtype).itemsize == self.dtype.itemsize
        out = copy.copy(self)
        out.dtype = np.dtype(dtype)
        if self._src.local:
            out._mm = self._mm.view(dtype)
        return out

    def reader(self, shape: tuple[int, ...]) -> Callable[[int, int], np.ndarray]:
        """read(start, stop): rows [start, stop) of this array seen as `shape` (C order), e.g. [rows, d_model]."""
        if self._src.local:
            v = self._mm.reshape(shape)  # a view: np.save writes C order
            return lambda s, e: np.asarray(v[s:e])
        tail = tuple(shape[1:])
        row_bytes = int(np.prod(tail, dtype=np.int64)) * self.dtype.itemsize
        rows = shape[0]

        def read(s: int, e: int) -> np.ndarray:
            e = min(e, rows)
            buf = self._src.read_range(self._offset + s * row_bytes, self._offset + e * row_bytes)
            if len(buf) != (e - s) * row_bytes:
                raise ValueError(f"{self.url}: .npy file ended early: rows {s}-{e} need {(e - s) * row_bytes} "
                                 f"bytes at offset {self._offset + s * row_bytes}, got {len(buf)}")
            return np.frombuffer(buf, self.dtype).reshape((e - s, *tail))  # one block, freed when written

        return read

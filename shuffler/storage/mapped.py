"""Local shard files read through read-only memory maps, so zstd decodes chunks straight from the page cache.

Used by the chunk reader (shuffler/io/chunks.py: ChunkReader, behind Dataset.read_chunk/read_shard, the
readers' prefetch pool and iter_decoded) for local stores; object stores are read with ranged GETs instead.
"""

from __future__ import annotations

import mmap
import os
import threading

_FAULT_AROUND = 64 << 10  # Linux fault_around_bytes default


class LocalMaps:
    """Read-only memory maps of local shard files, so zstd reads chunks straight from the page cache.

    A pread copy into a fresh bytes object cost 12% of the zstd decode time here (0.119 s vs 0.106 s for
    110 MiB of frames; mapped: 0.107 s), and 17-20% for float16 chunks, the fastest to decode
    (benchmarks/codec.py: the chunk reader went from 0.87-0.94 of raw decode to 0.94-1.05). The map's length is the file's size when it is opened, and reads
    never go past it, so a file truncated before it is mapped gives a short read (an error naming the chunk).
    (Truncating a shard in place while it is mapped would raise SIGBUS; committed shards are immutable and
    every writer here replaces objects by rename, which leaves a mapped file intact.)
    Decoded chunks' pages are dropped from this process's mappings (MADV_DONTNEED; the page cache keeps
    them), so RSS does not grow with the bytes read. At most `keep` files stay mapped.
    """

    def __init__(self, store, keep: int = 8):
        self.store, self.keep = store, keep
        self.maps: dict[str, mmap.mmap | None] = {}
        self.lock = threading.Lock()

    def read(self, name: str, start: int, end: int):
        with self.lock:
            mm = self.maps.get(name, False)
            if mm is False:
                with open(self.store.path(name), "rb") as f:  # FileNotFoundError when the shard is missing
                    size = os.fstat(f.fileno()).st_size
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
                self.maps[name] = mm
                while len(self.maps) > self.keep:
                    self._close(self.maps.pop(next(iter(self.maps))))
            if mm is None:
                return b""
            # The view is taken under the lock: once it exists, another thread evicting this map cannot close
            # it (close() raises BufferError and the map is unmapped when the last view goes).
            return memoryview(mm)[start : min(end, len(mm))]

    @staticmethod
    def release(frame, start: int) -> None:
        """Drop the pages of a decoded chunk from this process's mapping (the page cache keeps them)."""
        if isinstance(frame, memoryview) and isinstance(frame.obj, mmap.mmap) and len(frame):
            # The kernel maps a fault's neighbours too (fault-around, 64 KiB by default), so reading a chunk
            # also maps pages of the chunks beside it; dropping only the chunk's own pages left ~28 KiB per
            # chunk resident (tests/test_mapped.py). Widen by that window: a page another thread still reads
            # is simply faulted in again from the page cache.
            mm = frame.obj
            a = max(0, start - _FAULT_AROUND) // mmap.PAGESIZE * mmap.PAGESIZE
            b = min(len(mm), start + len(frame) + _FAULT_AROUND)
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    @staticmethod
    def _close(mm) -> None:
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a thread still reads it; it is unmapped when that thread's view is released

    def close(self) -> None:
        with self.lock:
            for mm in self.maps.values():
                self._close(mm)
            self.maps.clear()

"""ActivationStream: batches of activations streamed from a dataset, for training loops.

    stream = ActivationStream("s3://bucket/acts-shuffled", batch_size=4096, device="cuda", epochs=2)
    for batch in stream:              # batch.acts: [4096, d_model] torch tensor of the stored dtype, on the GPU
        loss = sae(batch.acts)
        ...
        ckpt["data"] = stream.state_dict()   # later: stream.load_state_dict(ckpt["data"]) resumes exactly

The order of an epoch is order.py; which rows go to which rank, worker and batch is layout.py; the background
decode is prefetch.py; the resume state, at any world size, is state.py; readers/torch.py wraps this for
torch's DataLoader.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from readers.device import Buffers, StreamBatch, torch_device
from readers.layout import Layout, Spans
from readers.order import TAG_BLOCK, EpochPlan
from readers.prefetch import Assembler, ReadStats
from readers.state import StreamState, parse_state
from shuffler import env
from shuffler.format.manifest import Manifest
from shuffler.io.dataset import Dataset
from shuffler.keys import mix_key, permutation
from shuffler.storage.storage import Storage


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """How an ActivationStream reads. Every field is a keyword of ActivationStream."""

    batch_size: int
    """Rows per batch. The last batch of an epoch is shorter unless drop_last."""
    columns: tuple[str, ...] = ()
    """Provenance columns to return in batch.columns (names from the dataset's schema)."""
    rank: int = 0
    """This process's rank; ActivationStream defaults it from torchrun's RANK."""
    world_size: int = 1
    """Number of ranks; defaults from torchrun's WORLD_SIZE."""
    epochs: int = 1
    """Passes over the data; each has its own order, keyed by (seed, epoch)."""
    seed: int = 0
    """Keys the order of every epoch."""
    shuffle_shards: bool = True
    """Reorder shards, and chunks inside each shard, every epoch. False reads in stored order."""
    drop_last: bool = False
    """Only whole batches, and the same number on every rank and worker (what DDP needs)."""
    prefetch: int = 4
    """Batches decoded ahead of the consumer (at least threads + 1 chunks are kept in flight). Memory stays
    about max(prefetch batches, threads + 1 chunks) plus one chunk, however slow the consumer."""
    threads: int = 2
    """Threads doing ranged reads and zstd decoding (zstd releases the GIL). More helps on object stores."""
    device: str | None = None
    """None: batch.acts is numpy (bfloat16 as raw uint16). Else a torch device: a tensor of the stored dtype;
    on CUDA it is staged in reused pinned buffers and copied with non_blocking=True."""
    buffer_shuffle: int = 0
    """0: off. N > 0: the epoch's order is also permuted within consecutive blocks of N rows of it, mixing rows
    across chunks, for data that was not shuffled with `shuffler shuffle`. Costs ~3 N rows of RAM."""
    on_damaged: str = "raise"
    """"raise": a damaged chunk raises ChecksumError naming shard and chunk. "skip": it is skipped and counted
    in stats.skipped_chunks / stats.damaged; the batches it fell in are shorter by its rows."""
    permute_buckets: bool = False
    """Read scattered data (written with a ScatterSpec) in a uniformly shuffled order: one bucket at a time,
    permuted in memory per (seed, epoch, bucket) (readers/buckets.py). No `shuffler shuffle` needed."""
    memory: int | str | None = None
    """With permute_buckets: bytes for the bucket being served and the one prefetched (default 2 GiB)."""
    fields: tuple[str, ...] = ()
    """Activation fields to decode, by name (default: every field). Only their frames are fetched and decoded
    (docs/format.md, "Several fields"); batch.field(name) returns each, and batch.acts is the first named."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "prefetch", "threads", "world_size", "rank", "buffer_shuffle", "seed"):
            v = getattr(self, name)
            if isinstance(v, np.integer):
                object.__setattr__(self, name, int(v))  # numpy integers are welcome; stored as int (JSON state)
        for name in ("batch_size", "epochs", "prefetch", "threads", "world_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank!r} must be in 0..{self.world_size - 1} (world_size={self.world_size})")
        if not isinstance(self.buffer_shuffle, int) or self.buffer_shuffle < 0:
            raise ValueError(f"buffer_shuffle={self.buffer_shuffle!r} must be 0 (off) or a row count >= 1")
        if self.on_damaged not in ("raise", "skip"):
            raise ValueError(f"on_damaged={self.on_damaged!r} must be 'raise' or 'skip'")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        if self.permute_buckets and self.buffer_shuffle:
            raise ValueError("permute_buckets and buffer_shuffle exclude each other: permute_buckets already "
                             "serves a uniform permutation")
        if not isinstance(self.fields, tuple) or not all(isinstance(f, str) for f in self.fields):
            raise ValueError(f"fields={self.fields!r} must be a tuple of field names")
        if self.memory is not None and not self.permute_buckets:
            raise ValueError(f"memory={self.memory!r} applies only with permute_buckets=True")


def stream_config(config: StreamConfig | None = None, /, **options) -> StreamConfig:
    """The StreamConfig that ActivationStream(url, config, **options) reads with.

    Without a config, rank and world_size that are left out or None come from torchrun's RANK and WORLD_SIZE.
    columns may be any sequence and device any torch device spelling (stored as str).
    """
    valid = [f.name for f in dataclasses.fields(StreamConfig)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown ActivationStream option(s) {', '.join(map(repr, unknown))}; the options are the "
                        f"fields of StreamConfig: {', '.join(valid)}")
    if config is not None and not isinstance(config, StreamConfig):
        raise TypeError(f"config must be a StreamConfig or None, got {type(config).__name__} {config!r}; pass "
                        "options by keyword (batch_size=...)")
    if "columns" in options:
        options["columns"] = tuple(options["columns"])
    if "fields" in options:
        f = options["fields"]
        options["fields"] = (f,) if isinstance(f, str) else tuple(f)
    if options.get("device") is not None:
        options["device"] = str(options["device"])
    for name in ("rank", "world_size"):
        if name in options and options[name] is None:
            del options[name]
    if config is not None:
        return dataclasses.replace(config, **options)
    env_rank, env_world = env.torchrun_rank_world()
    return StreamConfig(**{"rank": env_rank, "world_size": env_world, **options})


class ActivationStream:
    """An iterable of StreamBatch (a shuffler Batch) over a committed dataset at `url`.

    Iterating continues from the current position (the start, or a loaded state); after an iteration that
    ran to the end, the next one starts again at epoch 0. Not for use from two threads at once.
    """

    def __init__(self, url: str, config: StreamConfig | None = None, **options):
        """Read `url` as `config` says, or as StreamConfig(**options); options given beside a config replace
        its fields. rank and world_size left out (or None) come from torchrun's RANK and WORLD_SIZE."""
        self.config = stream_config(config, **options)
        self._device = torch_device(self.config.device)
        self._dataset: Dataset | None = Dataset.open(url)
        self._pid = os.getpid()
        self.url = self._dataset.url
        self.manifest: Manifest = self._dataset.manifest
        missing = [c for c in self.config.columns if c not in self.manifest.schema.column_names]
        if missing:
            raise ValueError(
                f"{self.url}: columns {missing} are not in the dataset; it has {list(self.manifest.schema.column_names)}"
            )
        try:
            self.read_schema = self.manifest.schema.select(self.config.fields)
            """The rows this stream decodes: the fields asked for (Schema.select), every column."""
        except ValueError as e:
            raise ValueError(f"{self.url}: {e}") from None
        self._buckets = None
        if self.config.permute_buckets:
            from readers.buckets import Buckets

            if self.config.on_damaged != "raise":
                raise ValueError("on_damaged='skip' is not supported with permute_buckets")
            self._buckets = Buckets(self._dataset, self.config.memory)
        self.stats = ReadStats()
        self._worker: tuple[int, int] | None = None  # (worker, num_workers) when set by readers.torch
        self._epoch = 0
        self._batch = 0
        self._base: tuple[int, tuple[Spans, ...]] = (0, ())  # where the layout began (layout.py): fresh
        self._finished = False  # set when an iteration ran to the end; the next one starts over

    def __repr__(self) -> str:
        c = self.config
        w, n = self._split()
        return (f"ActivationStream({self.url!r}, batch_size={c.batch_size}, rank={c.rank}/{c.world_size}, "
                f"worker={w}/{n}, epoch={self._epoch}, batch={self._batch})")

    # -- pickling and fork: each process opens its own storage client (never share sockets across fork) ---
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_dataset"] = None
        state["_device"] = None if self._device is None else str(self._device)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._device = torch_device(self._device)

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None or self._pid != os.getpid():
            self._dataset = Dataset(Storage(self.url), self.manifest)
            self._pid = os.getpid()
        return self._dataset

    # -- sizes -----------------------------------------------------------------------------------------
    def _split(self) -> tuple[int, int]:
        """(worker, num_workers) of this rank: set by readers.torch, else torch's worker info, else (0, 1)."""
        if self._worker is not None:
            return self._worker
        if "torch" in sys.modules:
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            if info is not None:
                return info.id, info.num_workers
        return 0, 1

    def layout(self, base: tuple[int, tuple[Spans, ...]] | None = None) -> Layout:
        """How this rank's consumers and the other ranks' share the epochs (readers/layout.py)."""
        c = self.config
        start, pending = self._base if base is None else base
        return Layout(num_rows=self.manifest.num_rows, consumers=c.world_size * self._split()[1],
                      batch_size=c.batch_size, drop_last=c.drop_last, start=start, pending=pending)

    def consumer(self, worker: int | None = None) -> int:
        """This consumer's index among all ranks' workers: rank * num_workers + worker."""
        w, n = self._split()
        return self.config.rank * n + (w if worker is None else worker)

    def epoch_plan(self, epoch: int, worker: int | None = None) -> EpochPlan:
        """The order of `epoch` and this consumer's share of it (readers/order.py, readers/layout.py)."""
        c = self.config
        return EpochPlan(
            dataset=self.dataset,
            seed=c.seed,
            epoch=epoch,
            spans=self.layout().spans(epoch, self.consumer(worker)),
            batch_size=c.batch_size,
            shuffle=c.shuffle_shards,
        )

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    @property
    def batches_per_epoch(self) -> int:
        """Batches this stream (this rank, this worker) yields in a whole epoch, damaged chunks aside."""
        return self.layout((0, ())).batches(0, self.consumer())

    def __len__(self) -> int:
        """Batches from where the layout began (epoch 0, or an elastic resume) to the end."""
        return self.layout().steps(self.consumer(), (self.config.epochs, 0))

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    # -- resume ----------------------------------------------------------------------------------------
    def resume_settings(self) -> dict:
        """What a state records: the settings that fix the order (a resume must match them) and those that fix
        the layout (world, workers, batch size, drop_last: a resume may change them)."""
        c = self.config
        return {
            "world_size": c.world_size, "num_workers": self._split()[1], "batch_size": c.batch_size, "seed": c.seed,
            "shuffle_shards": c.shuffle_shards, "drop_last": c.drop_last, "buffer_shuffle": c.buffer_shuffle,
            **(self._buckets.settings() if self._buckets is not None else {}),
        }

    def state_dict(self) -> dict:
        """Where the stream is: the next batch it yields, and the layout it is in. JSON-serialisable; small."""
        return StreamState(
            fingerprint=self.manifest.fingerprint,
            settings=self.resume_settings(),
            rank=self.config.rank,
            positions=((self._epoch, self._batch),),
            base=self._base,
        ).to_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(), saved at this or any other world size, worker count or batch size.

        Same world size, workers, batch size and drop_last: the next batches are those the saving run would have
        yielded next. Otherwise the rows of each epoch that no consumer has read are cut anew among this
        stream's consumers (readers/layout.py), so every row of an epoch is still read exactly once. Refuses
        (ValueError) a state from another dataset, seed or order setting. Any rank may load any rank's state,
        since ranks step in lockstep under DDP.
        """
        s = self.parse_state(state)
        self._base = s.base
        self._epoch, self._batch = s.positions[self._split()[0]]
        self._finished = False

    def parse_state(self, state: dict, num_workers: int | None = None) -> StreamState:
        """Validate a state against this stream (read with `num_workers` DataLoader workers) and translate it to
        this stream's layout."""
        n = self._split()[1] if num_workers is None else num_workers
        return parse_state(state, manifest=self.manifest, settings=dict(self.resume_settings(), num_workers=n),
                           url=self.url, epochs=self.config.epochs, rank=self.config.rank)

    def for_worker(self, worker: int, num_workers: int, position: tuple[int, int] = (0, 0),
                   base: tuple[int, tuple[Spans, ...]] | None = None) -> ActivationStream:
        """A copy that reads only worker `worker` of `num_workers`'s share of this rank, from `position` of the
        layout that began at `base` (default: this stream's)."""
        import copy

        if not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} must be in 0..{num_workers - 1}")
        other = copy.copy(self)
        other.stats = ReadStats()
        other._worker = (worker, num_workers)
        other._epoch, other._batch = position
        if base is not None:
            other._base = base
        other._finished = False
        return other

    # -- iteration -------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StreamBatch]:
        c = self.config
        if self._finished:
            self._epoch, self._batch, self._base, self._finished = 0, 0, (0, ()), False
        ds = self.dataset
        bufs = Buffers(self.read_schema, c.batch_size, self._device)
        worker = self._split()[0]
        col_bytes = sum(np.dtype(dict(ds.schema.columns)[n]).itemsize for n in c.columns)
        while self._epoch < c.epochs:
            plan = self.epoch_plan(self._epoch)
            for b, acts, cols, keep in self._epoch_batches(ds, plan, self._batch, bufs):
                if keep is not None:
                    whole, acts, cols = acts, acts[keep], {k: v[keep] for k, v in cols.items()}
                    bufs.discard(whole)
                self._batch = b + 1
                if len(acts) == 0:
                    continue  # every row of this batch was in skipped damaged chunks
                self.stats.batches += 1
                self.stats.rows += len(acts)
                self.stats.bytes_decoded += len(acts) * (self.read_schema.act_row_bytes + col_bytes)
                yield bufs.batch(acts, cols, epoch=self._epoch, index=b, worker=worker)
            self._epoch += 1
            self._batch = 0
        self._finished = True

    def _assembler(self, ds: Dataset, prefetch: int, alloc) -> Assembler:
        c = self.config
        return Assembler(
            ds, columns=c.columns, threads=c.threads, prefetch=prefetch,
            skip_damaged=c.on_damaged == "skip", stats=self.stats, alloc=alloc, read=self.read_schema,
        )

    def _epoch_batches(self, ds: Dataset, plan: EpochPlan, first: int, bufs: Buffers):
        """(batch index, acts, columns, keep-mask or None) for batches first.. of this epoch."""
        B = self.config.batch_size
        if first >= plan.n_batches:
            return
        if self._buckets is not None:
            from readers.buckets import bucket_batches

            yield from bucket_batches(self._buckets, plan, first, columns=self.config.columns,
                                      threads=self.config.threads, stats=self.stats, alloc=bufs.alloc,
                                      read=self.read_schema)
            return
        if not self.config.buffer_shuffle:
            asm = self._assembler(ds, self.config.prefetch, bufs.alloc)
            try:
                for b, slot, keep in asm.batches(plan.units(first * B), rows=plan.rows, batch_rows=B, first=first):
                    yield b, slot.acts, slot.cols, keep
            finally:
                asm.close()
            return
        yield from self._shuffled_batches(ds, plan, first, bufs)

    def _shuffled_batches(self, ds: Dataset, plan: EpochPlan, first: int, bufs: Buffers):
        """buffer_shuffle=N: position p of the epoch's order, in block k = p // N, holds position
        k*N + perm_k[p - k*N] of the shard and chunk order. This consumer decodes the blocks its spans touch,
        in order, and gathers its rows from them."""
        B, N, total = self.config.batch_size, self.config.buffer_shuffle, self.num_rows
        need: list[int] = []  # blocks touched by rows first*B.., in order, each once
        for g0, g1, _ in plan.sequence(first * B):
            for k in range(g0 // N, (g1 - 1) // N + 1):
                if not need or need[-1] != k:
                    need.append(k)
        if not need:
            return
        size = lambda k: min(N, total - k * N)  # noqa: E731  rows of block k (the epoch's last one is short)
        units = (u for i, k in enumerate(need) for u in plan.range_units(k * N, k * N + size(k), i * N))
        alloc_np = lambda n: np.empty((n, self.read_schema.row_width), dtype=self.read_schema.row_dtype)  # noqa: E731
        asm = self._assembler(ds, 2, alloc_np)  # 2 blocks: the next one decodes while this one is served
        blocks = asm.batches(units, rows=(len(need) - 1) * N + size(need[-1]), batch_rows=N, first=0)
        pieces = plan.sequence(first * B)
        g, g1 = 0, 0  # the piece of the epoch's order being served: positions [g, g1)
        cache: dict[int, tuple] = {}
        try:
            for b in range(first, plan.n_batches):
                t0, t1 = b * B, min((b + 1) * B, plan.rows)
                acts = bufs.alloc(t1 - t0)  # [t1 - t0, d_model]
                cols = {n: np.empty(t1 - t0, dtype=dict(ds.schema.columns)[n]) for n in self.config.columns}
                keep = None
                at = 0
                while at < t1 - t0:
                    if g >= g1:
                        g, g1, _ = next(pieces)
                    k = g // N
                    while k not in cache:
                        i, slot, kp = next(blocks)
                        kk = need[i]
                        key = mix_key(self.config.seed, plan.epoch, TAG_BLOCK, kk)
                        cache[kk] = (slot, kp, permutation(slot.rows, key))
                    for old in [x for x in cache if x < k]:
                        del cache[old]
                    slot, kp, perm = cache[k]
                    m = min(t1 - t0 - at, g1 - g, (k + 1) * N - g)
                    idx = perm[g - k * N : g - k * N + m]
                    np.take(slot.acts, idx, axis=0, out=acts[at : at + m])
                    for n in cols:
                        np.take(slot.cols[n], idx, out=cols[n][at : at + m])
                    if kp is not None:
                        keep = np.ones(t1 - t0, dtype=bool) if keep is None else keep
                        keep[at : at + m] = kp[idx]
                    at += m
                    g += m
                yield b, acts, cols, keep
        finally:
            blocks.close()
            asm.close()

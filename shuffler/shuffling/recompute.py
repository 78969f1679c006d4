"""Store or recompute: what keeping activations costs against generating them again for every training run.

    c = compare(Workload(tokens=4 * 10**9, d_model=3584, dtype="bfloat16", reads=8),
                Economics(capture_rate=20_000), shuffle=estimate(plan, cluster))
    print(c.report())

Two ways to feed R training runs (SAEs, sweeps, epochs) that each read every activation once:
    store      capture once on GPUs, write, shuffle globally (shuffler/shuffling/costmodel.py's estimate: requests
               plus node-hours, plus the storage of source, intermediates and output while it runs), keep for
               `months`, then read R times (GET requests)
                   store(R) = capture + write + shuffle + hold + keep + R x read
    recompute  run the model again for every run, as Llama Scope did (He et al. 2024, arXiv:2410.20526, section
               on infrastructure: 8 KB per token made storage the bottleneck)
                   recompute(R) = R x capture             (x hooks without shared_forward)
Storing pays from the break-even R* = (capture + write + shuffle + hold + keep) / (regenerate - read) runs on,
where regenerate is one capture (x hooks without shared_forward), and never when a read costs as much. One forward pass yields every hook point at once, so `hooks`
multiplies what is stored but not what a capture costs; it multiplies what recomputing costs only when each
hook's SAEs train in runs of their own (shared_forward off).

Left out, and why: the SAE's own training compute (the same either way); egress (reads stay in the region);
the source after the shuffle (deleted after `verify`); and the quality difference: recomputing shuffles only inside a buffer, which docs/bench-shuffle-matters.md measures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from shuffler.format.schema import ACT_DTYPES, Schema
from shuffler.progress import human_bytes
from shuffler.shuffling.costmodel import Estimate
from shuffler.shuffling.plan import DTYPE_RATIO, read_batch_bytes

STORAGE_PRICE_SOURCE = "AWS S3 Standard, first 50 TB/month, us-east-1 pricing page; check current prices"


@dataclass(frozen=True, kw_only=True)
class Workload:
    """The activations and how often they are read."""

    tokens: int
    """Tokens (rows per hook point) that one training run reads."""
    d_model: int
    """Activation width."""
    dtype: str = "bfloat16"
    """Activation dtype as stored."""
    hooks: int = 1
    """Hook points captured per forward pass and stored; one forward pass yields all of them."""
    reads: int = 1
    """Training runs (SAEs, sweeps, epochs) that each read every stored activation once."""
    shared_forward: bool = True
    """Recomputing, one forward pass feeds every hook's SAEs at once (they train together, as in Llama Scope); off:
    each hook's SAEs train in runs of their own, so recomputing runs the model once per hook and run."""
    compression: float | None = None
    """Stored compression ratio; None: the dtype's measured zstd-1 ratio (docs/benchmarks.md)."""

    def __post_init__(self) -> None:
        for name in ("tokens", "d_model", "hooks", "reads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if self.dtype not in ACT_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(sorted(ACT_DTYPES))}")
        if self.compression is not None and not self.compression > 0:
            raise ValueError(f"compression={self.compression!r} must be a ratio > 0 (raw bytes / stored bytes)")

    @property
    def ratio(self) -> float:
        return self.compression if self.compression is not None else DTYPE_RATIO[self.dtype]

    @property
    def raw_bytes(self) -> int:
        """Uncompressed bytes of every hook's rows, provenance columns included."""
        return self.tokens * self.hooks * Schema(dtype=self.dtype, d_model=self.d_model).row_bytes

    @property
    def stored_bytes(self) -> int:
        return round(self.raw_bytes / self.ratio)


@dataclass(frozen=True, kw_only=True)
class Economics:
    """What GPUs, storage and CPU nodes cost."""

    capture_rate: float
    """Tokens per second one GPU runs through the model while capturing (benchmarks/capture.py measures it)."""
    gpu_price: float = 2.5
    """Dollars per GPU-hour (an assumption: on-demand H100s ran $2-4 per hour in 2025-26; give yours)."""
    storage_price: float = 0.023
    """Dollars per GB-month of object storage (S3 Standard's first 50 TB, us-east-1)."""
    months: float = 1.0
    """Months the stored activations are kept (they are read within that time)."""
    node_price: float = 1.0
    """Dollars per node-hour of the CPU nodes that run the shuffle (an assumption; give yours)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.capture_rate, (int, float)) and self.capture_rate > 0):
            raise ValueError(f"capture_rate={self.capture_rate!r} must be > 0 tokens per second per GPU")
        for name in ("gpu_price", "storage_price", "months", "node_price"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name}={v!r} must be a number >= 0")


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Dollars of each side; `store` and `recompute` are for `workload.reads` runs."""

    workload: Workload
    economics: Economics
    gpu_hours: float
    """GPU-hours of one capture."""
    capture: float
    write: float
    shuffle: float
    hold: float
    """Dollars of storage while the shuffle runs: source, intermediates at their peak and output."""
    keep: float
    read: float
    """Dollars of one run's reads."""

    @property
    def store(self) -> float:
        return self.capture + self.write + self.shuffle + self.hold + self.keep + self.workload.reads * self.read

    @property
    def regenerate(self) -> float:
        """Dollars of the forward passes that recomputing runs per training run."""
        return self.capture * (1 if self.workload.shared_forward else self.workload.hooks)

    @property
    def recompute(self) -> float:
        return self.workload.reads * self.regenerate

    @property
    def break_even(self) -> int | None:
        """The fewest runs from which storing costs no more than recomputing; None: never."""
        margin = self.regenerate - self.read
        if margin <= 0:
            return None
        return max(1, math.ceil((self.capture + self.write + self.shuffle + self.hold + self.keep) / margin))

    @property
    def verdict(self) -> str:
        return "store" if self.store <= self.recompute else "recompute"

    def to_json(self) -> dict:
        return {
            "workload": asdict(self.workload), "economics": asdict(self.economics),
            "stored_bytes": self.workload.stored_bytes, "gpu_hours": self.gpu_hours,
            "dollars": {"capture": self.capture, "write": self.write, "shuffle": self.shuffle, "hold": self.hold,
                        "keep": self.keep,
                        "read": self.read, "store": self.store, "recompute": self.recompute},
            "regenerate_per_run": self.regenerate, "break_even_reads": self.break_even, "verdict": self.verdict,
        }

    def report(self) -> str:
        w, e = self.workload, self.economics
        r = w.reads
        be = self.break_even
        lines = [
            f"data        {w.tokens:,} tokens x {w.hooks} hook(s) x {w.d_model} {w.dtype}: "
            f"{human_bytes(w.raw_bytes)} raw, {human_bytes(w.stored_bytes)} stored at {w.ratio:.3g}x",
            f"capture     {self.gpu_hours:,.0f} GPU-hours at {e.capture_rate:,.0f} tokens/s/GPU, "
            f"${e.gpu_price}/GPU-hour = ${self.capture:,.0f} per capture",
            f"store       capture ${self.capture:,.0f} + write ${self.write:,.0f} + shuffle ${self.shuffle:,.0f} "
            f"(+ storage meanwhile ${self.hold:,.0f}) + keep {e.months:g} month(s) ${self.keep:,.0f} + {r} x read "
            f"${self.read:,.2f} = ${self.store:,.0f}",
            f"recompute   {r} x {'capture' if w.shared_forward else f'{w.hooks} captures'} "
            f"${self.regenerate:,.0f} = ${self.recompute:,.0f}",
            f"break-even  {'never: a read costs as much as a capture' if be is None else f'{be} run(s)'}; "
            f"at {r} run(s): {self.verdict} (saves ${abs(self.recompute - self.store):,.0f})",
            f"assumed     storage ${e.storage_price}/GB-month ({STORAGE_PRICE_SOURCE}); shuffle nodes "
            f"${e.node_price}/node-hour",
        ]
        return "\n".join(lines)


def compare(workload: Workload, economics: Economics, *, shuffle: Estimate) -> Comparison:
    """Store against recompute for `workload`; `shuffle` is the cost model's estimate of shuffling it once."""
    w, e = workload, economics
    gpu_hours = w.tokens / e.capture_rate / 3600
    p1, p2 = shuffle.passes
    req = shuffle.plan.request
    # Writing the capture is the same objects pass 2 writes (one shard layout), so its PUTs price it.
    write = p2.puts / 1000 * shuffle.prices.put
    node_hours = shuffle.wall_s / 3600 * shuffle.cluster.nodes
    gets = math.ceil(w.stored_bytes / read_batch_bytes(req.chunk_bytes))
    # While it runs the source, the intermediates (at their peak) and the output all sit in storage: at PiB
    # scale a shuffle takes days, so that is not negligible. 730 hours make a month.
    held = 2 * w.stored_bytes + shuffle.scratch_bytes
    return Comparison(
        workload=w, economics=e, gpu_hours=gpu_hours, capture=gpu_hours * e.gpu_price, write=write,
        shuffle=shuffle.dollars + node_hours * e.node_price,
        hold=held / 1e9 * e.storage_price * shuffle.wall_s / 3600 / 730,
        keep=w.stored_bytes / 1e9 * e.storage_price * e.months, read=gets / 1000 * shuffle.prices.get,
    )

"""The training loop: stream batches, step the SAE (or transcoder), measure, log, checkpoint, resume, export.

A transcoder run (TrainConfig.target names another field than .input) reads both fields of each row from one
stream, so input and target are the same tokens; everything else is the SAE's loop, with the target in the
place of the reconstructed input.

One step on each rank: read this replica's batch (timed: the reader-wait fraction is the time blocked in
next(stream) over wall time), forward under bfloat16 autocast on CUDA, loss (sae.loss_and_stats), backward,
sum gradients over data-parallel ranks, project the decoder gradient, Adam, renormalise the decoder, then
update the tokens-since-fired counters that define dead latents. Metrics stay on the device between log
records; on CUDA the CPU runs one step ahead of the GPU (StepFence) and reads back only the dead-latent
count (the AuxK branch needs it) and the log records.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shuffler import env
from shuffler.io.dataset import Dataset
from shuffler.progress import Progress
from trainer import checkpoint as ckpt
from trainer import distributed as D
from trainer.config import TrainConfig
from trainer.fields import Fields, resolve_fields
from trainer.sae import TopKSAE, loss_and_stats

LOG = "log.jsonl"
METRICS = ("loss", "sse", "sst", "rows", "active")  # summed on the device between log records


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resume must restore."""

    step: int = 0
    tokens: int = 0
    since_fired: torch.Tensor | None = None  # [n_local] int64: tokens since each latent last fired


@dataclass
class TrainResult:
    sae: TopKSAE
    steps: int
    tokens: int
    last: dict = field(default_factory=dict)  # the last log record


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: CUDA if present (this rank's GPU under torchrun), else CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU (CPU build or no driver)")
        if dev.index is None:
            dev = torch.device("cuda", env.torchrun_local_rank())
        torch.cuda.set_device(dev)
    return dev


def use_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.autocast if cfg.autocast is not None else device.type == "cuda"


def lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.lr_warmup_steps
    return cfg.learning_rate


def make_sae(cfg: TrainConfig, d_in: int, layout: D.Layout, device: torch.device, *,
             d_out: int | None = None) -> TopKSAE:
    """The SAE, or with `d_out` the transcoder, that `cfg` describes: this rank's latent shard of it."""
    return TopKSAE(d_in, cfg.n_latents, cfg.k, d_out=d_out, k_aux=cfg.resolved_k_aux(d_out or d_in), seed=cfg.seed,
                   shard=layout.shard, n_shards=cfg.latent_shards, latent_group=layout.latent_group, device=device)


def make_optimizer(cfg: TrainConfig, sae: TopKSAE) -> torch.optim.Adam:
    # fused: one kernel for all parameters on CUDA (openai/sparse_autoencoder also uses fused Adam).
    fused = sae.W_dec.device.type == "cuda"
    return torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
                            fused=fused or None)


def train_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: torch.Tensor, state: TrainState, cfg: TrainConfig,
               layout: D.Layout, *, amp: bool = False, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step on this rank's rows x [B_local, d_in] with targets y [B_local, d_out] (None: x, an
    SAE); returns detached statistics."""
    dead = state.since_fired >= cfg.dead_tokens  # [n_local] bool
    n_dead = 0
    if cfg.auxk_coef > 0 and state.tokens >= cfg.dead_tokens:  # before that no latent can be dead: no GPU sync
        n_dead = int(D.all_reduce_sum(dead.sum(), layout.latent_group))  # same branch on every shard
    use_aux = n_dead > 0
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = sae(x, dead=dead if use_aux else None)
    # Fewer dead latents than k_aux: scale the AuxK term down (sparsify; SAELens topk_sae.py).
    loss, stats = loss_and_stats(sae, x if y is None else y, out, auxk_coef=cfg.auxk_coef,
                                 aux_scale=min(n_dead / sae.k_aux, 1.0),
                                 data_group=layout.data_group)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    D.all_reduce_grads(sae.parameters(), layout.data_group)
    sae.project_decoder_grad()
    for g in opt.param_groups:
        g["lr"] = lr_at(cfg, state.step)
    opt.step()
    sae.normalize_decoder()
    with torch.no_grad():
        fired = torch.zeros(sae.n_local, device=x.device).index_add_(
            0, out.idx.reshape(-1), (out.acts > 0).reshape(-1).float())  # [n_local] firing counts
        D.all_reduce_sum(fired, layout.data_group)
        rows = x.shape[0] * layout.data_world  # every replica's batch is the same size (drop_last); no GPU sync
        state.since_fired += rows
        state.since_fired.masked_fill_(fired > 0, 0)
    state.step += 1
    state.tokens += rows
    stats["loss"] = loss.detach().double()
    return stats


class StepFence:
    """Keeps the CPU at most one step ahead of the GPU, outside the timed next(stream).

    Without it the CPU queues steps ahead until the reader, inside next(), blocks on the pinned buffer whose
    copy the GPU has not reached yet: GPU-bound time would then be counted as reader wait. After launching
    step t we wait for step t-1 (not t), so the GPU always has a step queued while the next batch is fetched.
    `make_event` is injectable so the CPU tests can check the ordering without a GPU.
    """

    def __init__(self, device: torch.device, make_event: Callable[[], object] | None = None):
        if make_event is None and device.type == "cuda":
            def make_event():
                ev = torch.cuda.Event()
                ev.record()
                return ev
        self.make_event = make_event
        self.pending: list = []

    def step_launched(self) -> None:
        if self.make_event is None:
            return
        self.pending.append(self.make_event())
        if len(self.pending) > 1:
            self.pending.pop(0).synchronize()


class Meter:
    """Sums step statistics on the device; `record()` turns them into one JSON-lines log record."""

    def __init__(self, device: torch.device, n_latents: int, d_out: int):
        self.sums = torch.zeros(len(METRICS), dtype=torch.float64, device=device)
        self.n_latents, self.d_out = n_latents, d_out
        self.steps = 0
        self.wait = 0.0
        self.t0 = time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        self.sums += torch.stack([stats[m].to(torch.float64) for m in METRICS])
        self.steps += 1

    def record(self, state: TrainState, cfg: TrainConfig, layout: D.Layout, total_wait: float, t_start: float) -> dict:
        # loss and active are per replica; sse, sst and rows are already summed over replicas.
        s = self.sums.clone()
        part = D.all_reduce_sum(s[[0, 4]].contiguous(), layout.data_group)
        dead = int(D.all_reduce_sum((state.since_fired >= cfg.dead_tokens).sum(), layout.latent_group))
        loss, sse, sst, rows, active = float(part[0]), float(s[1]), float(s[2]), float(s[3]), float(part[1])
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        # The slowest rank's reader stalls every rank at the next collective: report the worst one.
        waits = D.all_reduce_max(torch.tensor([self.wait, total_wait], dtype=torch.float64, device=s.device),
                                 layout.world)
        rec = {
            "step": state.step,
            "tokens": state.tokens,
            "lr": lr_at(cfg, state.step - 1),
            "loss": loss / self.steps,
            "mse": sse / max(rows * self.d_out, 1),
            "fvu": sse / sst if sst > 0 else float("nan"),
            "l0": active / max(rows, 1),
            "dead_fraction": dead / self.n_latents,
            "tokens_per_s": rows / dt,
            "reader_wait": float(waits[0]) / dt,
            "reader_wait_total": float(waits[1]) / max(now - t_start, 1e-9),
            "elapsed_s": now - t_start,
        }
        self.sums.zero_()
        self.steps, self.wait, self.t0 = 0, 0.0, now
        return rec


def epochs_needed(num_rows: int, data_world: int, local_batch: int, steps: int, where: str) -> int:
    """Epochs the reader must offer for `steps` full batches per rank (drop_last keeps ranks in step)."""
    per_epoch = (num_rows // data_world) // local_batch
    if per_epoch < 1:
        raise ValueError(
            f"{where} holds {num_rows} rows: too few for {data_world} data-parallel rank(s) x batch of {local_batch}"
        )
    return math.ceil(steps / per_epoch)


def open_stream(url: str, cfg: TrainConfig, *, batch_size: int, rank: int, world_size: int, epochs: int,
                device: torch.device | None, prefetch: int | None = None, fields: Fields | None = None):
    from readers import ActivationStream

    extra = {}
    if fields is not None and fields.stream_fields is not None:
        extra["fields"] = fields.stream_fields
    prefetch = prefetch or cfg.reader_prefetch
    if prefetch is not None:
        extra["prefetch"] = prefetch
    if cfg.reader_threads is not None:
        extra["threads"] = cfg.reader_threads
    return ActivationStream(url, batch_size=batch_size, rank=rank, world_size=world_size, epochs=epochs,
                            seed=cfg.seed, drop_last=True, device=device, **extra)


def init_sample(url: str, cfg: TrainConfig, num_rows: int, device: torch.device,
                fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
    """The first init_tokens rows of the stream as rank 0 of 1 would read them: every rank gets the same
    sample, so the biases are identical everywhere without a broadcast. (inputs [N, d_in], targets [N, d_out])
    float32, copied out of the reader's buffers; one tensor twice for an SAE."""
    n = min(cfg.init_tokens, num_rows)
    stream = open_stream(url, cfg, batch_size=n, rank=0, world_size=1, epochs=1, device=None, prefetch=1,
                         fields=fields)
    it = iter(stream)
    try:
        x, y = fields.read(next(it), None)
        x, y = x[:n].clone(), (y[:n].clone() if fields.transcoder else None)
    finally:
        it.close()  # stops the reader's prefetch threads
    x = x.to(device)
    return x, (x if y is None else y.to(device))


def train(url: str, out: str | Path, config: TrainConfig, *, device: str | torch.device | None = None,
          resume: bool = False, overwrite: bool = False, export_saelens: str | Path | None = None,
          on_step: Callable[[int], None] | None = None, progress: bool = True) -> TrainResult:
    """Train a TopK SAE on the dataset at `url` (a transcoder when config.target names another field than
    config.input); checkpoints and log.jsonl go to the local folder `out`.

    Under torchrun the processes form replicas x latent_shards (see distributed.py). `resume=True` continues
    from `out`'s latest checkpoint exactly (same weights, optimizer, dead counters and reader position);
    without it, a folder that already holds a run is refused unless `overwrite=True` (which removes it).
    `on_step(step)` is called after each step (and after its checkpoint, if one was due).
    """
    cfg = config
    dev = resolve_device(device)
    owns_group = D.init_from_env(dev)
    try:
        layout = D.make_layout(cfg.latent_shards)
        return _train(url, Path(out), cfg, dev, layout, resume, overwrite, export_saelens, on_step, progress)
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def _train(url, out: Path, cfg: TrainConfig, dev, layout: D.Layout, resume, overwrite, export_dir, on_step,
           progress):
    ds = Dataset.open(url)
    fields = resolve_fields(ds, cfg.input, cfg.target)
    d_in = fields.d_in
    if cfg.batch_size % layout.data_world:
        raise ValueError(f"batch_size={cfg.batch_size} must divide evenly among {layout.data_world} data-parallel ranks")
    local_batch = cfg.batch_size // layout.data_world
    epochs = epochs_needed(ds.num_rows, layout.data_world, local_batch, cfg.steps, ds.url)
    sae = make_sae(cfg, d_in, layout, dev, d_out=fields.d_out if fields.transcoder else None)
    opt = make_optimizer(cfg, sae)
    state = TrainState(since_fired=torch.zeros(sae.n_local, dtype=torch.int64, device=dev))
    stream = open_stream(url, cfg, batch_size=local_batch, rank=layout.data_rank, world_size=layout.data_world,
                         epochs=epochs, device=dev, fields=fields)
    found = ckpt.latest(out)
    if found is not None and not resume:
        if not overwrite:
            raise FileExistsError(f"{out} already holds a run (checkpoint {found.name}); pass resume=True "
                                  "(--resume) to continue it, overwrite=True (--overwrite) to start again, or "
                                  "choose another output folder")
        layout.barrier()  # every rank has seen the old run before rank 0 removes it
        if layout.is_main:
            ckpt.remove_run(out)
        layout.barrier()
        found = None
    if resume and found is None and layout.is_main:
        print(f"no checkpoint in {out}; starting from scratch", flush=True)
    if found is not None:
        ckpt.load(found, cfg, layout, d_in=d_in, dataset=ds, sae=sae, opt=opt, state=state, stream=stream)
    else:
        x0, y0 = init_sample(url, cfg, ds.num_rows, dev, fields)
        sae.init_b_dec(y0, cfg.b_dec_init, inputs=x0)
        if layout.is_main:
            out.mkdir(parents=True, exist_ok=True)
    log = _open_log(out, state.step, layout)
    amp = use_autocast(cfg, dev)
    meter = Meter(dev, cfg.n_latents, sae.d_out)
    last: dict = {}
    total_wait, t_start = 0.0, time.perf_counter()
    bar = Progress("train", cfg.steps * cfg.batch_size, enabled=None if progress and layout.is_main else False)
    bar.update(state.tokens)
    fence = StepFence(dev)
    it = iter(stream)
    try:
        while state.step < cfg.steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(
                    f"{ds.url}: the stream ended after {state.tokens} of {cfg.steps * cfg.batch_size} tokens"
                ) from None
            waited = time.perf_counter() - t0
            meter.wait += waited
            total_wait += waited
            x, y = fields.read(batch, dev)  # [B_local, d_in], [B_local, d_out] (the same tensor for an SAE)
            if x.shape[0] != local_batch:
                raise RuntimeError(f"reader gave a batch of {x.shape[0]} rows; expected {local_batch}")
            meter.add(train_step(sae, opt, x, state, cfg, layout, amp=amp, y=y if fields.transcoder else None))
            fence.step_launched()
            bar.update(cfg.batch_size)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                last = meter.record(state, cfg, layout, total_wait, t_start)
                if log is not None:
                    log.write(json.dumps(last) + "\n")
                    log.flush()
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or state.step == cfg.steps:
                ckpt.save(out, cfg, layout, d_in=d_in, dataset=ds, sae=sae, opt=opt, state=state, stream=stream)
            if on_step is not None:
                on_step(state.step)
    finally:
        it.close()  # stops the reader's prefetch threads now, not at garbage collection
        bar.close()
        if log is not None:
            log.close()
    if export_dir is not None:
        from trainer.export import export_saelens

        export_saelens(sae, export_dir, cfg=cfg, layout=layout, dataset=ds.url, source=ds.metadata)
    return TrainResult(sae, state.step, state.tokens, last)


def _open_log(out: Path, step: int, layout: D.Layout):
    """log.jsonl on rank 0, cut back to the resumed step (records a crashed run wrote after its last
    checkpoint would otherwise appear twice)."""
    if not layout.is_main:
        return None
    path = out / LOG
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))
    return path.open("a")

"""Across processes: data parallelism, latent sharding, and the collectives that make both exact.

The world is a grid of `data_world` replicas x `latent_shards` shards (OpenAI's n_replicas x n_op_shards).
Rank r is shard r % latent_shards of replica r // latent_shards.

- Data parallel: each replica reads its own share of the stream (the reader's rank sharding, with
  rank = replica index); the gradients of ranks holding the same shard are summed (see sae.loss_and_stats
  for why a sum, not a mean, gives exactly the global batch's gradient).
- Latent sharding: the shards of one replica read the same batch; each holds n_latents / latent_shards
  latents. The global top-k is the top-k of the shards' local top-k candidates (a latent in the global top-k
  is in its own shard's local top-k), and the decoder's partial outputs are summed. Two autograd functions
  from Megatron-LM's tensor parallelism (Shoeybi et al. 2019, the "f" and "g" operators) make the
  gradients exact: copy_to_shards is the identity forward and sums gradients backward (b_dec's encoder
  gradient has a part in every shard); sum_over_shards sums forward and is the identity backward (the loss
  after it is computed identically on every shard).

Everything here runs on CPU with gloo as well as on GPUs with NCCL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shuffler import env


@dataclass(frozen=True)
class Layout:
    """This process's place in the replicas x shards grid, and the groups it talks to (None: alone)."""

    rank: int = 0
    world: int = 1
    latent_shards: int = 1
    data_group: Any = None
    latent_group: Any = None

    @property
    def shard(self) -> int:
        return self.rank % self.latent_shards

    @property
    def data_rank(self) -> int:
        return self.rank // self.latent_shards

    @property
    def data_world(self) -> int:
        return self.world // self.latent_shards

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def make_layout(latent_shards: int = 1) -> Layout:
    """The layout of an initialised process group (or of a lone process), creating the sub-groups.

    Every rank creates every group, in the same order, as torch.distributed.new_group requires.
    """
    if not dist.is_available() or not dist.is_initialized():
        if latent_shards != 1:
            raise ValueError(f"latent_shards={latent_shards} needs that many processes; this one runs alone")
        return Layout()
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % latent_shards:
        raise ValueError(f"world size {world} must be a multiple of latent_shards={latent_shards}")
    replicas = world // latent_shards
    data_group = latent_group = None
    if latent_shards == 1:
        data_group = dist.group.WORLD if world > 1 else None
    elif replicas == 1:
        latent_group = dist.group.WORLD
    else:
        for s in range(latent_shards):  # ranks holding shard s, one per replica
            g = dist.new_group([d * latent_shards + s for d in range(replicas)])
            if rank % latent_shards == s:
                data_group = g
        for d in range(replicas):  # the shards of replica d
            g = dist.new_group([d * latent_shards + s for s in range(latent_shards)])
            if rank // latent_shards == d:
                latent_group = g
    return Layout(rank, world, latent_shards, data_group, latent_group)


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT); False when alone.

    NCCL for CUDA tensors, gloo for CPU ones. Returns True only if this call initialised the group.
    """
    _, world = env.torchrun_rank_world()
    if world <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


# -- collectives -----------------------------------------------------------------------------------------
def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_max(t: torch.Tensor, world: int) -> torch.Tensor:
    """Elementwise max over every rank (a no-op alone)."""
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_grads(params, group) -> None:
    """Sum gradients over the data-parallel group, all tensors in flight at once."""
    if group is None:
        return
    works = [dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group, async_op=True)
             for p in params if p.grad is not None]
    for w in works:
        w.wait()


def check_replicas_agree(module: torch.nn.Module, layout: Layout) -> None:
    """Raise if data-parallel replicas hold different weights (they must be bit-identical: every replica
    applies the same summed gradient). Compares per-parameter sums and sums of squares by min and max."""
    if layout.data_group is None:
        return
    with torch.no_grad():
        v = torch.stack([t for p in module.parameters() for t in (p.double().sum(), p.double().pow(2).sum())])
    hi, lo = v.clone(), -v
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=layout.data_group)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX, group=layout.data_group)
    if not torch.equal(hi, -lo):
        raise RuntimeError(
            f"data-parallel replicas diverged (rank {layout.rank}): parameter checksums differ by up to "
            f"{float((hi + lo).abs().max()):.3g}; a rank saw a different batch size or skipped a step"
        )


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the latent group (Megatron's "f")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


class _SumOverShards(torch.autograd.Function):
    """Sum forward over the latent group; identity backward (Megatron's "g")."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def copy_to_shards(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToShards.apply(x, group)


def sum_over_shards(x: torch.Tensor, group) -> torch.Tensor:
    return _SumOverShards.apply(x, group)


def sharded_topk(pre: torch.Tensor, k: int, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ReLU of the global top-k over the shards of `pre` [B, n_local] -> (acts, local idx [B, kk], active).

    Each shard offers its local top-kk (kk = min(k, n_local)); all candidates are gathered ([B, R*kk], a
    few floats per row, never [B, n_latents]) and every shard picks the same global top-k from them. A
    shard's acts are zero where its candidate lost, so it decodes only what it won.
    """
    R, r = dist.get_world_size(group), dist.get_rank(group)
    B, n_local = pre.shape
    kk = min(k, n_local)
    vals, idx = pre.topk(kk, dim=1, sorted=False)  # [B, kk]
    with torch.no_grad():
        parts = [torch.empty_like(vals) for _ in range(R)]
        dist.all_gather(parts, vals.detach().contiguous(), group=group)
        mine, active = winners(torch.stack(parts, dim=1), k, r)
    acts = torch.where(mine, torch.relu(vals), torch.zeros((), dtype=vals.dtype, device=vals.device))
    return acts, idx, active


def winners(cand: torch.Tensor, k: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of shard r's candidates are in the global top-k. cand [B, R, kk]: every shard's local top-kk
    values. Returns (mask [B, kk], number of positive values in the global top-k)."""
    B, R, kk = cand.shape
    top = cand.reshape(B, R * kk).topk(k, dim=1, sorted=False)  # shard q's candidates at [q*kk, (q+1)*kk)
    won = torch.zeros(B, R * kk, dtype=torch.bool, device=cand.device).scatter_(1, top.indices, True)
    return won.view(B, R, kk)[:, r], (top.values > 0).sum()


def gather_latents(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every shard's slice of a latent-indexed tensor along `dim` (for export)."""
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)

"""Latent sharding and data parallelism equal the single-process SAE: 2 real processes on gloo (127.0.0.1).

One spawn runs several checks (process start-up costs seconds): the sharded forward, loss and gradients
against the whole SAE; data-parallel steps against single-process steps on the same global batch (both
again for a transcoder, whose target is not its input); and a
whole latent-sharded train() run, crashed and resumed, against the same run on one process.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer import TopKSAE, TrainConfig, load_saelens, train
from trainer import distributed as D
from trainer.sae import loss_and_stats
from trainer.train import TrainState, make_optimizer, train_step
from writers import ShardWriter
from writers.synth import SynthConfig, synth


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def seeded_pair(rank: int, n_shards: int, group, *, d=16, n=64, k=5, k_aux=6, d_out=None):
    """A whole SAE (a transcoder to d_out, if given) with non-trivial biases and this rank's shard holding
    exactly its latents."""
    torch.manual_seed(0)
    full = TopKSAE(d, n, k, k_aux=k_aux, seed=7, d_out=d_out)
    with torch.no_grad():
        full.b_enc.normal_(std=0.3)
        full.b_dec.normal_(std=0.1)
    part = TopKSAE(d, n, k, k_aux=k_aux, seed=7, shard=rank % n_shards, n_shards=n_shards, latent_group=group,
                   d_out=d_out)
    lo, hi = part.lo, part.lo + part.n_local
    with torch.no_grad():
        part.W_enc.copy_(full.W_enc[:, lo:hi])
        part.b_enc.copy_(full.b_enc[lo:hi])
        part.W_dec.copy_(full.W_dec[lo:hi])
        part.b_dec.copy_(full.b_dec)
    return full, part, lo, hi


def check_sharded_equals_whole(rank: int, d_out: int | None = None) -> None:
    """Latent-sharded forward, loss and gradients equal the whole model's; with d_out, a transcoder's (the
    loss on a target y [40, d_out] that is not the input)."""
    full, part, lo, hi = seeded_pair(rank, 2, dist.group.WORLD, d_out=d_out)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 16, generator=g) * 2
    y = x if d_out is None else torch.randn(40, d_out, generator=g) + 0.5
    dead = torch.rand(64, generator=g) < 0.5
    out_f, out_p = full(x, dead=dead), part(x, dead=dead[lo:hi])
    torch.testing.assert_close(out_p.recon, out_f.recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_p.aux_recon, out_f.aux_recon, rtol=1e-5, atol=1e-5)
    assert int(out_p.active) == int(out_f.active)
    torch.testing.assert_close(part.encode_dense(x), full.encode_dense(x)[:, lo:hi], rtol=1e-5, atol=1e-6)
    loss_f, _ = loss_and_stats(full, y, out_f, auxk_coef=1 / 32, aux_scale=0.7)
    loss_p, _ = loss_and_stats(part, y, out_p, auxk_coef=1 / 32, aux_scale=0.7)
    torch.testing.assert_close(loss_p, loss_f, rtol=1e-5, atol=1e-6)
    loss_f.backward()
    loss_p.backward()
    torch.testing.assert_close(part.W_enc.grad, full.W_enc.grad[:, lo:hi], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(part.W_dec.grad, full.W_dec.grad[lo:hi], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(part.b_enc.grad, full.b_enc.grad[lo:hi], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(part.b_dec.grad, full.b_dec.grad, rtol=1e-4, atol=1e-6)  # summed over shards
    assert full.W_dec.grad[lo:hi].abs().sum() > 0 and full.b_dec.grad.abs().sum() > 0


def check_steps_equal(rank: int, layout: D.Layout, steps: int = 4, d_out: int | None = None) -> None:
    """`steps` optimizer steps under `layout` equal single-process steps on the same global batches (of a
    transcoder to d_out, if given). dead_tokens is small, so the AuxK branch runs from the second step on."""
    full, part, lo, hi = seeded_pair(rank, layout.latent_shards, layout.latent_group, d_out=d_out)
    cfg = TrainConfig(n_latents=64, k=5, batch_size=80, tokens=800, lr=1e-2, dead_tokens=50,
                      latent_shards=layout.latent_shards)
    opt_f, opt_p = make_optimizer(cfg, full), make_optimizer(cfg, part)
    st_f = TrainState(since_fired=torch.zeros(64, dtype=torch.int64))
    st_p = TrainState(since_fired=torch.zeros(part.n_local, dtype=torch.int64))
    g = torch.Generator().manual_seed(2)
    rows = cfg.batch_size // layout.data_world
    for _ in range(steps):
        x = torch.randn(cfg.batch_size, 16, generator=g) * 2 + 1  # the global batch
        y = None if d_out is None else torch.randn(cfg.batch_size, d_out, generator=g) - 1
        sf = train_step(full, opt_f, x, st_f, cfg, D.Layout(), y=y)
        mine = slice(layout.data_rank * rows, (layout.data_rank + 1) * rows)
        sp = train_step(part, opt_p, x[mine], st_p, cfg, layout, y=None if y is None else y[mine])
        torch.testing.assert_close(sp["sse"], sf["sse"], rtol=1e-5, atol=1e-6)
    assert st_p.tokens == st_f.tokens == steps * cfg.batch_size
    assert torch.equal(st_p.since_fired, st_f.since_fired[lo:hi])
    assert bool((st_f.since_fired >= 50).any())  # AuxK was exercised
    torch.testing.assert_close(part.W_enc, full.W_enc[:, lo:hi], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(part.W_dec, full.W_dec[lo:hi], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(part.b_enc, full.b_enc[lo:hi], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(part.b_dec, full.b_dec, rtol=1e-4, atol=1e-5)


def check_divergence_is_caught(rank: int) -> None:
    layout = D.Layout(rank, 2, 1, data_group=dist.group.WORLD)
    sae = TopKSAE(8, 16, 2, seed=0)
    D.check_replicas_agree(sae, layout)  # identical replicas pass
    with torch.no_grad():
        sae.b_dec[0] += 1e-6 * rank  # one replica drifts by one ulp-sized step
    try:
        D.check_replicas_agree(sae, layout)
    except RuntimeError as e:
        assert "replicas diverged" in str(e)
    else:
        raise AssertionError("diverged replicas were not detected")


def run_cfg(latent_shards: int, **kw) -> TrainConfig:
    return TrainConfig(n_latents=64, k=4, batch_size=256, tokens=256 * 12, lr=4e-3, dead_tokens=600,
                       checkpoint_every=5, log_every=4, latent_shards=latent_shards, **kw)


TC = {"input": "x", "target": "y"}  # the transcoder run's fields


class Crash(Exception):
    pass


def crash_after_7(step: int) -> None:
    if step == 7:
        raise Crash


def two_rank_worker(rank: int, port: int, url: str, out: str, tc_url: str) -> None:
    join_group(rank, 2, port)
    try:
        check_sharded_equals_whole(rank)
        check_steps_equal(rank, D.Layout(rank, 2, 1, data_group=dist.group.WORLD))  # data parallel
        check_divergence_is_caught(rank)
        check_steps_equal(rank, D.Layout(rank, 2, 2, latent_group=dist.group.WORLD))  # latent sharded
        check_sharded_equals_whole(rank, d_out=12)  # the same for a transcoder
        check_steps_equal(rank, D.Layout(rank, 2, 1, data_group=dist.group.WORLD), d_out=12)
        check_steps_equal(rank, D.Layout(rank, 2, 2, latent_group=dist.group.WORLD), d_out=12)
        # A latent-sharded run that crashes after step 7 (last checkpoint: step 5), then resumes.
        try:
            train(url, f"{out}/sharded", run_cfg(2), device="cpu", progress=False, on_step=crash_after_7)
        except Crash:
            pass
        train(url, f"{out}/sharded", run_cfg(2), device="cpu", progress=False, resume=True,
              export_saelens=f"{out}/sharded-sae")
        # A latent-sharded transcoder run (fields x -> y), exported: its shards are gathered like an SAE's.
        train(tc_url, f"{out}/tc", run_cfg(2, **TC), device="cpu", progress=False, export_saelens=f"{out}/tc-sae")
    finally:
        dist.destroy_process_group()


def grid_worker(rank: int, port: int) -> None:
    join_group(rank, 4, port)
    try:
        layout = D.make_layout(2)
        assert (layout.data_rank, layout.shard) == (rank // 2, rank % 2)
        check_steps_equal(rank, layout)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("dist") / "ds")
    synth(url, SynthConfig(rows=8192, d_model=16, docs=8192, seed=3, k=3, features=48))
    return url


@pytest.fixture(scope="module")
def two_fields(tmp_path_factory):
    """8192 rows of fields x [16] and y [12]: y a fixed linear map of x plus noise."""
    url = str(tmp_path_factory.mktemp("dist") / "tc")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8192, 16, generator=g)
    y = x @ torch.randn(16, 12, generator=g) + 0.1 * torch.randn(8192, 12, generator=g)
    ids = torch.arange(8192)
    with ShardWriter(url, fields={"x": (16, "float32"), "y": (12, "float32")}, chunk_bytes=1 << 16,
                     shard_bytes=1 << 18) as w:
        w.write({"x": x, "y": y}, token_id=ids, doc_id=ids, position=ids * 0)
    return url


def test_two_processes_equal_one(small_synth, two_fields, tmp_path):
    mp.spawn(two_rank_worker, args=(free_port(), small_synth, str(tmp_path), two_fields), nprocs=2, join=True)
    # The whole latent-sharded run (12 steps, AuxK active after step 3, crashed after step 7 and resumed
    # from step 5) equals one uninterrupted process.
    torch.set_num_threads(1)
    single = train(small_synth, tmp_path / "single", run_cfg(1), device="cpu", progress=False)
    sharded = load_saelens(tmp_path / "sharded-sae")
    for name, p in single.sae.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], p, rtol=1e-4, atol=1e-5, msg=name)
    ck = tmp_path / "sharded" / "checkpoints" / "step-000000012"
    assert sorted(p.name for p in ck.iterdir()) == ["meta.json", "reader-00000.json", "reader-00001.json",
                                                   "shard-00000.pt", "shard-00001.pt"]
    meta = json.loads((ck / "meta.json").read_text())
    assert (meta["world"], meta["latent_shards"], meta["step"]) == (2, 2, 12)
    half = torch.load(ck / "shard-00001.pt", weights_only=True)["sae"]["W_dec"]
    assert half.shape == (32, 16)  # each rank saved only its own latents
    torch.testing.assert_close(half, single.sae.W_dec.detach()[32:], rtol=1e-4, atol=1e-5)
    # The sharded transcoder equals one process's, weights and export alike.
    tc = train(two_fields, tmp_path / "tc-single", run_cfg(1, **TC), device="cpu", progress=False)
    sharded_tc = load_saelens(tmp_path / "tc-sae")
    assert sharded_tc.transcoder and sharded_tc.W_dec.shape == (64, 12)
    for name, p in tc.sae.state_dict().items():
        torch.testing.assert_close(sharded_tc.state_dict()[name], p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_grid_of_two_replicas_by_two_shards():
    mp.spawn(grid_worker, args=(free_port(),), nprocs=4, join=True)

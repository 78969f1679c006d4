"""Many readers on S3 (issue 18, part 3): `torchrun --nproc-per-node 4`, 2 DataLoader workers per rank (gloo,
master on 127.0.0.1), reads a shuffled dataset from S3 (moto, the root conftest's `s3_endpoint`) through
readers.torch; each rank is tests/cluster/torchrun_reader.py, which logs the row ids of every batch it consumes.

- Uninterrupted: every row exactly once per epoch across the 8 consumers (4 ranks x 2 workers), each consumer
  reading a share, and the ranks' all_reduce agrees.
- One rank killed with SIGKILL mid-epoch: torchrun's agent stops the others and restarts all four
  (--max-restarts 1); each resumes from its last checkpoint (ActivationLoader.state_dict). The batches read
  after the restart are exactly those the uninterrupted run read from that checkpoint on, rank by rank.

Every connection stays on loopback; the one wildcard listener is torchrun's own store (see the assertion).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

pytest.importorskip("torch")

from shuffler.shuffling.run import shuffle  # noqa: E402
from tests.readers_data import make_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READER = os.path.join(ROOT, "tests", "cluster", "torchrun_reader.py")
ROWS, BATCH, EPOCHS, RANKS = 12_000, 100, 2, 4
PER_RANK_EPOCH = ROWS // BATCH // RANKS  # 30 batches of each rank in each epoch


@pytest.fixture(scope="module")
def shuffled(s3_endpoint):
    """A shuffled dataset on S3: rows with ids 0..ROWS-1 written in order, then `shuffler shuffle`d there."""
    import uuid

    base = f"s3://test-bucket/torchrun-{uuid.uuid4().hex[:8]}"
    make_dataset(f"{base}/raw", rows=ROWS, d_model=32, chunk_rows=250, shard_chunks=8)
    shuffle(f"{base}/raw", f"{base}/shuffled", seed=9, buckets=4, workers=1, chunk_bytes=32 << 10,
            shard_bytes=256 << 10)
    return f"{base}/shuffled"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(url: str, out: str, *extra: str, step_seconds: float = 0.0, port: int | None = None) -> subprocess.Popen:
    """torchrun of 4 ranks of torchrun_reader.py, master on 127.0.0.1; `extra`: more torchrun options."""
    env = dict(os.environ, PYTHONPATH=ROOT, SHUFFLER_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")  # gloo's pairs on the loopback device
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(RANKS),
           "--master-addr", "127.0.0.1", "--master-port", str(port or free_port()), "--monitor-interval", "0.2",
           *extra, READER, url, out, "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
           "--step-seconds", str(step_seconds)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{out[-4000:]}"
    return out


def read_log(path: str) -> tuple[dict, list[dict], dict | None]:
    """(header, batches, end) of one rank's log: its pid and checkpoint step, every batch, the final line."""
    with open(path) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    end = lines[-1] if "done" in lines[-1] else None
    return lines[0], [x for x in lines[1:] if "step" in x], end


def key(b: dict) -> tuple:
    return b["epoch"], b["worker"], b["index"], tuple(b["rids"])


LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def sockets(root: psutil.Process) -> tuple[set[tuple[str, int]], set[str]]:
    """The job's listening (address, port)s and the remote addresses of its open connections."""
    listen, remote = set(), set()
    for p in [root, *root.children(recursive=True)]:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    listen.add((c.laddr.ip, c.laddr.port))
                elif c.raddr:
                    remote.add(c.raddr.ip)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return listen, remote


def test_torchrun_four_ranks_two_workers_each_row_once_then_exact_resume(shuffled, tmp_path):
    # The uninterrupted run.
    full_dir = str(tmp_path / "full")
    t0 = time.monotonic()
    port = free_port()
    proc = torchrun(shuffled, full_dir, port=port)
    listen, remote = set(), set()
    while proc.poll() is None and time.monotonic() - t0 < 150:
        more = sockets(psutil.Process(proc.pid))
        listen, remote = listen | more[0], remote | more[1]
        time.sleep(0.3)
    finish(proc)
    print(f"\nuninterrupted torchrun: {time.monotonic() - t0:.1f} s; listening on {sorted(listen)}, "
          f"connected to {sorted(remote)}")
    full = {}
    for r in range(RANKS):
        head, batches, end = read_log(f"{full_dir}/attempt-0/rank-{r}.jsonl")
        assert head["resumed_at"] == 0 and end is not None and end["done"] == len(batches)
        assert end["rows_all_ranks_this_attempt"] == ROWS * EPOCHS
        assert len(batches) == EPOCHS * PER_RANK_EPOCH
        full[r] = batches
    for e in range(EPOCHS):
        consumers = {}
        for r, batches in full.items():
            for b in batches:
                if b["epoch"] == e:
                    consumers.setdefault((r, b["worker"]), []).extend(b["rids"])
        assert len(consumers) == RANKS * 2 and all(len(v) > 0 for v in consumers.values()), sorted(consumers)
        every = np.sort(np.concatenate([np.asarray(v) for v in consumers.values()]))
        assert np.array_equal(every, np.arange(ROWS)), f"epoch {e}: not every row exactly once"
    orders = [[x for r in range(RANKS) for b in full[r] if b["epoch"] == e for x in b["rids"]] for e in range(EPOCHS)]
    assert orders[0] != orders[1], "both epochs read in the same order"
    # Every connection is to loopback. Every listener is on loopback but torchrun's TCPStore (the rendezvous
    # store on --master-port), which torch binds to the wildcard address whatever --master-addr says: torch
    # 2.13 has no option to bind it elsewhere; the ranks still reach it at 127.0.0.1.
    assert remote and set(remote) <= set(LOOPBACK), remote
    assert {(ip, p) for ip, p in listen if ip not in LOOPBACK} <= {("::", port), ("0.0.0.0", port)}, listen

    # The same job, one rank killed mid-epoch, restarted from the checkpoints.
    kill_dir = str(tmp_path / "kill")
    t1 = time.monotonic()
    proc = torchrun(shuffled, kill_dir, "--max-restarts", "1", step_seconds=0.05)  # slow enough to be caught
    victim, log0 = 1, f"{kill_dir}/attempt-0/rank-1.jsonl"
    killed_at = None
    while proc.poll() is None and time.monotonic() - t1 < 120:
        if os.path.exists(log0):
            head, batches, _ = read_log(log0)
            if len(batches) >= 10:  # a third of the way into epoch 0, past two checkpoints
                os.kill(head["pid"], signal.SIGKILL)
                killed_at = len(batches)
                break
        time.sleep(0.01)
    assert killed_at is not None, "rank 1 finished or never started before it could be killed"
    out = finish(proc)
    print(f"interrupted torchrun: {time.monotonic() - t1:.1f} s; rank {victim} killed after {killed_at} batches")
    assert os.path.isdir(f"{kill_dir}/attempt-1"), f"torchrun did not restart the ranks:\n{out[-3000:]}"
    for r in range(RANKS):
        _, before, _ = read_log(f"{kill_dir}/attempt-0/rank-{r}.jsonl")
        head, after, end = read_log(f"{kill_dir}/attempt-1/rank-{r}.jsonl")
        c = head["resumed_at"]
        assert end is not None and end["done"] == EPOCHS * PER_RANK_EPOCH
        assert [key(b) for b in before[:c]] == [key(b) for b in full[r][:c]]
        # The restart reads exactly what the uninterrupted run read from the checkpoint on.
        assert [key(b) for b in after] == [key(b) for b in full[r][c:]], f"rank {r} resumed at {c}"
        if r == victim:
            assert 0 < c <= killed_at and full[r][c]["epoch"] == 0, (c, killed_at)  # mid-epoch, from a checkpoint
    print(f"resumed at steps {[read_log(f'{kill_dir}/attempt-1/rank-{r}.jsonl')[0]['resumed_at'] for r in range(RANKS)]}")


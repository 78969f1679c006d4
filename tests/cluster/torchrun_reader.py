"""One rank of the torchrun job in tests/cluster/test_torchrun_s3.py: read a shuffled dataset on S3 through
readers.torch (ActivationDataset + ActivationLoader, 2 DataLoader workers), as a training loop would.

    torchrun --nproc-per-node 4 ... tests/cluster/torchrun_reader.py URL OUT --epochs 2 --batch-size 100

Every batch's (epoch, worker, index, row ids) goes to OUT/attempt-A/rank-R.jsonl as it is consumed (A is
torchrun's restart count). Every --every batches the loader's state_dict goes to OUT/ckpt/rank-R.json,
replaced atomically, beside the count of batches consumed: the checkpoint a restarted rank resumes from.
The ranks meet over gloo (a barrier at the start, an all_reduce of the rows read at the end), so a lost rank
stops the job and torchrun's agent restarts every rank, as it does for a real training job.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from readers.torch import ActivationDataset, ActivationLoader


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--every", type=int, default=4, help="checkpoint every N batches")
    p.add_argument("--step-seconds", type=float, default=0.0, help="a training step's time, per batch")
    a = p.parse_args()

    # torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT and keeps it across restarts, with the old
    # ranks' keys in it: a restarted rank that joins under the same key names dials the dead ranks' gloo
    # addresses ("Gloo connectFullMesh failed ... Connection refused", torch 2.13, static and c10d rendezvous
    # alike). Keys under a per-attempt prefix keep each attempt to its own ranks.
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt-{attempt}", store), rank=rank,
                            world_size=world)
    os.makedirs(f"{a.out}/attempt-{attempt}", exist_ok=True)
    os.makedirs(f"{a.out}/ckpt", exist_ok=True)
    ckpt = f"{a.out}/ckpt/rank-{rank}.json"

    ds = ActivationDataset(a.url, batch_size=a.batch_size, columns=("rid",), epochs=a.epochs, seed=a.seed)
    loader = ActivationLoader(ds, num_workers=2, multiprocessing_context="fork")
    step = 0
    if os.path.exists(ckpt):
        with open(ckpt) as f:
            saved = json.load(f)
        loader.load_state_dict(saved["loader"])
        step = saved["step"]
    log = open(f"{a.out}/attempt-{attempt}/rank-{rank}.jsonl", "w")
    log.write(json.dumps({"pid": os.getpid(), "resumed_at": step, "master": [os.environ["MASTER_ADDR"],
                                                                         int(os.environ["MASTER_PORT"])]}) + "\n")
    log.flush()
    dist.barrier()

    rows = 0
    for batch in loader:
        rids = [int(x) for x in batch.columns["rid"]]
        rows += len(rids)
        if a.step_seconds:
            time.sleep(a.step_seconds)
        step += 1
        log.write(json.dumps({"step": step, "epoch": batch.epoch, "worker": batch.worker, "index": batch.index,
                              "rids": rids}) + "\n")
        log.flush()
        if step % a.every == 0:
            tmp = f"{ckpt}.tmp"
            with open(tmp, "w") as f:
                json.dump({"step": step, "loader": loader.state_dict()}, f)
            os.replace(tmp, ckpt)

    total = torch.tensor([rows], dtype=torch.int64)
    dist.all_reduce(total)
    log.write(json.dumps({"done": step, "rows_all_ranks_this_attempt": int(total.item())}) + "\n")
    log.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

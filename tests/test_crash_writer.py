"""kill -9 a producer mid-write: no dataset becomes visible, and `seal` names the unfinished part."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shuffler import Dataset, DatasetNotFoundError
from shuffler.format.seal import UnfinishedPartError, seal
from shuffler.storage.storage import Storage

PRODUCER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from writers import ShardWriter
    url, producer = sys.argv[1], sys.argv[2] or None
    rng = np.random.default_rng(0)
    with ShardWriter(url, d_model=64, dtype="float16", producer=producer, chunk_bytes=16384,
                     shard_bytes=65536) as w:
        for i in range(100000):
            w.write(rng.standard_normal((100, 64)).astype(np.float32), token_id=np.zeros(100, np.int32),
                    doc_id=np.full(100, i, np.int64), position=np.arange(100, dtype=np.int32))
            if i == 20:
                print("committed-some", flush=True)
            time.sleep(0.001)
""")


def start_and_kill(url: str, producer: str) -> None:
    p = subprocess.Popen([sys.executable, "-c", PRODUCER, url, producer], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "committed-some"
    time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL


@pytest.mark.parametrize("producer", ["", "gpu3"])
def test_killed_writer_leaves_no_visible_dataset(tmp_path, producer):
    url = str(tmp_path / "d")
    start_and_kill(url, producer)
    names = Storage(url).list()
    assert any(n.endswith(".shard") for n in names)  # it had committed shards ...
    with pytest.raises(DatasetNotFoundError):  # ... but no dataset is visible
        Dataset.open(url)
    if producer:
        with pytest.raises(UnfinishedPartError, match="parts/gpu3 \\(no parts/gpu3.json\\)"):
            seal(url)
        assert not Storage(url).exists("manifest.json")

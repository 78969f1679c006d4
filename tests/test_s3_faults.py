"""Storage faults on S3, injected by a proxy in front of the local endpoint: throttling (503 SlowDown), 500s,
connection resets and slow answers. Transient faults are retried with backoff and the job completes with
exact data; a permanent fault ends with a clear error, leaves nothing visible, and the job succeeds later.
"""

from __future__ import annotations

import numpy as np
import pytest

from shuffler import Dataset
from shuffler.storage.storage import Storage
from writers import ShardWriter

from .faultproxy import FaultProxy


def write_and_read(url, n=2000, d=32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    with ShardWriter(url, d_model=d, dtype="float16", chunk_bytes=64 * 200, shard_bytes=64 * 800) as w:
        w.write(x, token_id=np.arange(n, dtype=np.int32), doc_id=np.zeros(n, np.int64),
                position=np.arange(n, dtype=np.int32))
    ds = Dataset.open(url)
    got = np.concatenate([ds.read_chunk(i, j).acts for i in range(len(ds.shards)) for j in range(ds.index(i).n_chunks)])
    assert np.array_equal(got, x.astype(np.float16))
    return ds


FAULTS_PER_CASE = 6


@pytest.mark.parametrize("fault", ["503", "500", "reset", "slow"])
def test_transient_faults_are_retried(s3_endpoint, monkeypatch, fault):
    # Every third request fails once (each retry of it goes through), FAULTS_PER_CASE times: writes and reads
    # both meet faults. More faults prove nothing more and cost much: after each 503 SlowDown botocore's
    # adaptive mode lowers its send rate (to 0.5 requests/s at worst), so ~15 throttles made this case take
    # ~40 s on a loaded machine.
    methods = []

    def plan(n, method, path):
        if n % 3 == 0 and len(methods) < FAULTS_PER_CASE:
            methods.append(method)
            return fault
        return None

    with FaultProxy(s3_endpoint, plan) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        write_and_read(f"s3://test-bucket/faults-{fault}")
    assert proxy.injected.get(fault, 0) == FAULTS_PER_CASE  # faults were really injected, and survived
    assert {"PUT", "GET"} <= set(methods), methods  # on writes and on reads


def test_permanent_fault_is_clear_and_job_resumes_later(s3_endpoint, monkeypatch):
    monkeypatch.setenv("SHUFFLER_S3_MAX_ATTEMPTS", "2")
    url = "s3://test-bucket/permanent"
    state = {"broken": False}

    def plan(n, method, path):
        return "500" if state["broken"] and method == "PUT" else None

    with FaultProxy(s3_endpoint, plan) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        state["broken"] = True
        with pytest.raises(OSError) as info:
            write_and_read(url)
        assert "s3://test-bucket/permanent" in str(info.value) and "internal error" in str(info.value)
        state["broken"] = False
        assert not Storage(url).exists("manifest.json")
        ds = write_and_read(url)  # the same job, later: completes
        assert ds.num_rows == 2000

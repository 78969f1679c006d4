"""Shared fixtures: storage URLs for every backend, including a real S3 endpoint (moto's server on 127.0.0.1).

The S3 endpoint is moto's ThreadedMotoServer bound to 127.0.0.1 on an ephemeral port, started once per
session (infra-check.md 4.2). Dummy credentials are set and instance metadata disabled, so botocore never
looks beyond loopback.
"""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("SHUFFLER_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="run the long versions of fault and statistics tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="long version; run with --slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a real S3 endpoint on 127.0.0.1 (moto), with one bucket 'test-bucket'."""
    from moto.server import ThreadedMotoServer

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        os.environ[k] = v
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL_S3")
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="test-bucket")
    yield endpoint
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    else:
        os.environ["AWS_ENDPOINT_URL_S3"] = old
    server.stop()


@pytest.fixture
def s3_url(s3_endpoint):
    """A fresh, empty s3:// prefix on the local endpoint."""
    return f"s3://test-bucket/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def memory_url():
    url = f"memory://t-{uuid.uuid4().hex[:12]}"
    yield url
    import fsspec

    fs = fsspec.filesystem("memory")
    if fs.exists(url[len("memory://"):]):
        fs.rm(url[len("memory://"):], recursive=True)


@pytest.fixture(params=["local", "memory", "s3"])
def any_url(request, tmp_path):
    """One fresh dataset URL on each backend: local disk, memory:// and S3 (moto)."""
    if request.param == "local":
        return str(tmp_path / "ds")
    if request.param == "memory":
        return request.getfixturevalue("memory_url")
    return request.getfixturevalue("s3_url")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests: they share 2 cores with other suites, and torch's spinning
    worker threads slowed a loaded machine 3x. Use: pytestmark = pytest.mark.usefixtures("one_torch_thread")."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


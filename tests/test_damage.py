"""Damaged, truncated or inconsistent data is found and named; no wrong data is returned."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from shuffler import ChecksumError, Dataset, FormatError
from shuffler.cli import main
from writers import ShardWriter


@pytest.fixture
def dataset(tmp_path):
    url = str(tmp_path / "d")
    rng = np.random.default_rng(0)
    with ShardWriter(url, d_model=32, dtype="bfloat16", chunk_bytes=64 * 80, shard_bytes=64 * 80 * 3) as w:
        n = 1000
        w.write(rng.standard_normal((n, 32)).astype(np.float32), token_id=np.arange(n, dtype=np.int32),
                doc_id=np.arange(n, dtype=np.int64), position=np.arange(n, dtype=np.int32))
    return url


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def test_every_flipped_byte_in_chunk_data_is_caught(dataset):
    ds = Dataset.open(dataset)
    path = os.path.join(dataset, ds.shards[1].name)
    e = ds.index(1).entries
    rng = np.random.default_rng(1)
    for _ in range(40):
        j = int(rng.integers(len(e)))
        off = int(e["offset"][j] + rng.integers(e["comp_len"][j]))
        flip(path, off)
        fresh = Dataset.open(dataset)
        with pytest.raises(ChecksumError) as info:
            fresh.read_chunk(1, j)
        assert f"{ds.shards[1].name} chunk {j}" in str(info.value)
        flip(path, off)  # restore
    assert Dataset.open(dataset).check()[0] == []


def test_truncated_shard_is_named(dataset):
    ds = Dataset.open(dataset)
    path = os.path.join(dataset, ds.shards[0].name)
    with open(path, "r+b") as f:
        f.truncate(ds.shards[0].bytes - 10)
    with pytest.raises(FormatError, match=r"shard-000000.shard: .*truncated"):
        Dataset.open(dataset).read_chunk(0, 0)


def test_damaged_footer_and_header(dataset):
    ds = Dataset.open(dataset)
    path = os.path.join(dataset, ds.shards[2].name)
    flip(path, ds.shards[2].bytes - 40)  # inside the index
    with pytest.raises(FormatError, match="index checksum mismatch"):
        Dataset.open(dataset).read_chunk(2, 0)
    flip(path, ds.shards[2].bytes - 40)
    flip(path, 1)  # magic
    damage, _ = Dataset.open(dataset).check()
    assert [d.shard for d in damage] == [ds.shards[2].name] and "bad magic" in damage[0].message


def test_manifest_that_does_not_match_shards(dataset):
    mpath = os.path.join(dataset, "manifest.json")
    m = json.load(open(mpath))
    m["shards"][0]["rows"] += 1
    m["num_rows"] += 1
    m["fingerprint"]["rows"] += 1
    json.dump(m, open(mpath, "w"))
    with pytest.raises(FormatError, match=r"shard holds 192 rows in 3 chunks, manifest says 193 rows"):
        Dataset.open(dataset).read_chunk(0, 0)


@pytest.mark.parametrize("bad_name", ["../escape.shard", "/etc/passwd", "s3://other/x.shard", "a/../../b"])
def test_manifest_cannot_point_outside(dataset, bad_name):
    mpath = os.path.join(dataset, "manifest.json")
    m = json.load(open(mpath))
    m["shards"][0]["name"] = bad_name
    json.dump(m, open(mpath, "w"))
    with pytest.raises(FormatError, match="not a plain relative name"):
        Dataset.open(dataset)


def test_inspect_check_lists_every_damaged_chunk(dataset):
    ds = Dataset.open(dataset)
    targets = [(0, 1), (1, 0), (1, 2)]
    for i, j in targets:
        e = ds.index(i).entries[j]
        flip(os.path.join(dataset, ds.shards[i].name), int(e["offset"] + e["comp_len"] // 2))
    r = CliRunner().invoke(main, ["inspect", dataset, "--check"])
    assert r.exit_code == 1
    for i, j in targets:
        assert f"DAMAGED {ds.shards[i].name} chunk {j}:" in r.output
    assert r.output.count("DAMAGED") == 3


def test_inspect_check_catches_swapped_shard(tmp_path):
    # Two datasets of the same byte layout (same activations, token_id 5 or 6 everywhere); a shard of one
    # copied over the other passes every checksum but not the fingerprint.
    urls = []
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    for k in range(2):
        url = str(tmp_path / f"d{k}")
        with ShardWriter(url, d_model=4, dtype="float32", chunk_bytes=4 * 4 * 20 + 20 * 16) as w:
            w.write(x, token_id=np.full(50, 5 + k, np.int32),
                    doc_id=np.zeros(50, np.int64), position=np.zeros(50, np.int32))
        urls.append(url)
    name = Dataset.open(urls[0]).shards[0].name
    assert os.path.getsize(os.path.join(urls[1], name)) == os.path.getsize(os.path.join(urls[0], name))
    os.replace(os.path.join(urls[1], name), os.path.join(urls[0], name))
    r = CliRunner().invoke(main, ["inspect", urls[0], "--check"])
    assert r.exit_code == 1 and "FINGERPRINT MISMATCH" in r.output

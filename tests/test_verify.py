"""`verify`: passes real shuffles, and names what differs for every way a DST can be wrong."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from shuffler.cli import main
from shuffler.errors import DatasetNotFoundError
from shuffler.shuffling.run import shuffle
from shuffler.shuffling.verify import multiset_difference, verify
from writers.shard_writer import ShardWriter

from .test_shuffle import CHUNK, COLUMNS, SHARD, SMALL, make_dataset, read_all


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("v")
    a, b = str(base / "a"), str(base / "b")
    make_dataset(a, 1200)
    make_dataset(b, 800, start=1200, seed=1)
    out = str(base / "out")
    shuffle([a, b], out, seed=0, buckets=3, workers=1, **SMALL)
    return a, b, out


def write_rows(url: str, batch) -> None:
    with ShardWriter(url, d_model=batch.acts.shape[1], dtype=batch.dtype, columns=COLUMNS, chunk_bytes=CHUNK,
                     shard_bytes=SHARD) as w:
        w.write(batch.acts, **batch.columns)


def test_a_real_shuffle_verifies(data):
    a, b, out = data
    for full in (False, True):
        rep = verify([a, b], out, full=full)
        assert rep.ok, rep.report()
        assert rep.dst_rows == rep.src_rows == 2000
        assert (rep.missing_rows, rep.extra_rows) == ((0, 0) if full else (None, None))


def test_missing_source_is_a_difference(data):
    a, _, out = data
    rep = verify(a, out, full=True)
    assert not rep.ok
    text = rep.report()
    assert "row count: DST has 2,000 rows, SRC 1,200" in text
    assert "fingerprint" in text
    assert rep.missing_rows == 0 and rep.extra_rows == 800


def test_one_row_changed_is_named(data, tmp_path):
    a, b, out = data
    rows = read_all(out)
    rows.acts = rows.acts.copy()
    rows.acts[17, 3] += np.float16(1)
    bad = str(tmp_path / "bad")
    write_rows(bad, rows)
    rep = verify([a, b], bad)
    assert not rep.ok and any("fingerprint" in p for p in rep.problems)
    assert not any("row count" in p for p in rep.problems)
    rep = verify([a, b], bad, full=True)
    assert (rep.missing_rows, rep.extra_rows) == (1, 1)
    assert "1 SRC row(s) are missing from DST and 1 DST row(s) are not in SRC" in rep.report()


def test_duplicated_row_is_named(data, tmp_path):
    a, b, out = data
    rows = read_all(out)
    keep = np.concatenate([np.arange(len(rows) - 1), [0]])  # last row replaced by a copy of the first
    bad = str(tmp_path / "dup")
    write_rows(bad, rows.take(keep))
    rep = verify([a, b], bad, full=True)
    assert (rep.missing_rows, rep.extra_rows) == (1, 1)


def test_shard_swapped_behind_the_manifest(data, tmp_path):
    a, b, out = data
    bad = str(tmp_path / "swapped")
    shutil.copytree(out, bad)
    other = str(tmp_path / "other")
    shuffle([a, b], other, seed=1, buckets=3, workers=1, **SMALL)
    m = json.load(open(os.path.join(bad, "manifest.json")))
    o = json.load(open(os.path.join(other, "manifest.json")))
    same = [(s, t) for s, t in zip(m["shards"], o["shards"], strict=False) if s["bytes"] == t["bytes"]]
    if not same:  # sizes differ: copy the other run's shard and its size in, keeping the manifest's fingerprint
        same = [(m["shards"][0], o["shards"][0])]
        m["shards"][0] = dict(o["shards"][0], name=m["shards"][0]["name"])
        open(os.path.join(bad, "manifest.json"), "w").write(json.dumps(m))
    s, t = same[0]
    shutil.copy(os.path.join(other, t["name"]), os.path.join(bad, s["name"]))
    rep = verify([a, b], bad)
    assert not rep.ok
    assert any("behind the manifest" in p for p in rep.problems), rep.problems


def test_schema_difference_and_missing(data, tmp_path):
    a, _, out = data
    wide = str(tmp_path / "wide")
    make_dataset(wide, 10, d_model=8)
    rep = verify(wide, out)
    assert any("schema of" in p and "d_model" in p for p in rep.problems)
    with pytest.raises(DatasetNotFoundError):
        verify(a, str(tmp_path / "absent"))


def test_cli_json_and_exit_codes(data, tmp_path):
    a, b, out = data
    r = CliRunner().invoke(main, ["verify", a, b, out, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["ok"] is True
    r = CliRunner().invoke(main, ["verify", a, out, "--full"])
    assert r.exit_code == 1 and "FAILED" in r.output and "800 DST row(s) are not in SRC" in r.output
    r = CliRunner().invoke(main, ["verify", a, str(tmp_path / "absent")])
    assert r.exit_code == 1 and "absent" in r.output


def test_multiset_difference():
    a = np.array([1, 2, 2, 3], np.uint64)
    assert multiset_difference(a, np.array([3, 2, 1, 2], np.uint64)) == (0, 0)
    assert multiset_difference(a, np.array([1, 2, 3, 3], np.uint64)) == (1, 1)
    assert multiset_difference(a, np.array([], np.uint64)) == (4, 0)

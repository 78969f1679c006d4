"""Scatter on write + `shuffle --from-scatter` (pass 2 only): exact, deterministic, uniform; clear errors.

The statistical tests run the real writer and the real pass 2 over many seeds on memory:// datasets, with
the chi-square helpers of tests/test_shuffle_stats.py (critical values at the 0.999 level); seeds are fixed,
so each outcome is fixed too, yet each would fail for a biased path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from click.testing import CliRunner

from shuffler import Dataset
from shuffler.cli import main
from shuffler.errors import SchemaError
from shuffler.format.seal import seal
from shuffler.io.chunks import iter_decoded
from shuffler.keys import bucket_ids, producer_key
from shuffler.shuffling.from_scatter import shuffle_from_scatter
from shuffler.shuffling.on_write import NotScatteredError, ScatteredDataset
from shuffler.shuffling.plan import fixed_overhead
from shuffler.shuffling.verify import verify
from tests.test_shuffle_stats import assert_adjacent_distances_uniform, assert_positions_uniform
from writers import ScatterSpec, ShardWriter

ROW = 16  # bytes per row: a float32 activation (d_model 1), row_id int64, pad int32
COLS = (("row_id", "int64"), ("pad", "int32"))


def write_scattered(url: str, rows: range, *, seed: int, buckets: int, producer: str | None = None,
                    run_rows: int = 7, batch: int = 5, chunk_rows: int = 3) -> None:
    """Rows `rows` (row_id = activation value) written scattered, `batch` rows per write() call."""
    spec = ScatterSpec(seed=seed, buckets=buckets, run_bytes=run_rows * ROW)
    with ShardWriter(url, d_model=1, dtype="float32", columns=COLS, chunk_bytes=chunk_rows * ROW, producer=producer,
                     scatter=spec) as w:
        ids = np.arange(rows.start, rows.stop, dtype=np.int64)
        for s in range(0, len(ids), batch):
            part = ids[s : s + batch]
            w.write(part.astype(np.float32)[:, None], row_id=part, pad=np.zeros(len(part), np.int32))


def scattered_source(n: int, *, seed: int, buckets: int, producers: int = 1, **kw) -> str:
    url = f"memory://fused-{uuid.uuid4().hex[:10]}"
    if producers == 1:
        write_scattered(url, range(n), seed=seed, buckets=buckets, **kw)
    else:
        cuts = np.linspace(0, n, producers + 1).astype(int)
        for p in range(producers):
            write_scattered(url, range(cuts[p], cuts[p + 1]), seed=seed, buckets=buckets, producer=f"gpu{p}", **kw)
        seal(url)
    return url


def row_ids(url: str) -> np.ndarray:
    ds = Dataset.open(url)
    return np.concatenate([ds.read_shard(i).columns["row_id"] for i in range(len(ds.shards))] or [np.zeros(0, int)])


def shard_bytes(url: str) -> list[bytes]:
    ds = Dataset.open(url)
    return [ds.store.read(s.name) for s in ds.shards]


# ---------------------------------------------------------------------------------------------------
# Exactness and determinism


def test_from_scatter_is_a_permutation_byte_identical_across_runs_and_workers(tmp_path):
    src = str(tmp_path / "scattered")
    for p, rows in enumerate([range(0, 180), range(180, 300), range(300, 301)]):
        write_scattered(src, rows, seed=5, buckets=4, producer=f"p{p}")
    seal(src)
    outs = []
    for k, workers in enumerate([1, 2, 1]):
        dst = str(tmp_path / f"out{k}")
        m = shuffle_from_scatter(src, dst, workers=workers, chunk_bytes=4 * ROW, shard_bytes=8 * ROW)
        assert m.num_rows == 301 and m.metadata["shuffle"]["buckets"] == 4
        ids = row_ids(dst)
        assert np.array_equal(np.sort(ids), np.arange(301))
        assert not np.array_equal(ids, np.arange(301))
        assert verify([src], dst, full=True).ok
        assert sorted(os.listdir(dst)) == sorted(["manifest.json"] + [s.name for s in m.shards])  # no state left
        outs.append(shard_bytes(dst))
    assert outs[0] == outs[1] == outs[2]
    # the pass-2 seed keys the in-bucket permutations; by default it is the scatter seed
    other = str(tmp_path / "seeded")
    shuffle_from_scatter(src, other, seed=6, workers=1, chunk_bytes=4 * ROW, shard_bytes=8 * ROW)
    assert shard_bytes(other) != outs[0]
    assert np.array_equal(np.sort(row_ids(other)), np.arange(301))


def test_bucket_draws_are_pass_1s_keyed_by_producer_and_row_index_only():
    """Each row's bucket is scatter.bucket_ids(producer_key(seed, producer), index within producer, B): the
    same however the producer batched its writes or cut its runs."""
    n, B = 200, 6
    a = scattered_source(n, seed=9, buckets=B, run_rows=7, batch=5)
    b = scattered_source(n, seed=9, buckets=B, run_rows=64, batch=33)
    want = bucket_ids(producer_key(9, ""), 0, n, B)  # [n]
    for url in (a, b):
        sd = ScatteredDataset.open(url)
        assert sd.bucket_rows.tolist() == np.bincount(want, minlength=B).tolist()
        # bucket j's rows, in its fixed order: ascending row index (producer order kept by the stable sort)
        for j in range(B):
            t = sd.table(j)
            ids = np.concatenate([c[0] for _, _, c in iter_decoded(t, 0, t.rows)] or [np.zeros(0, int)])
            assert np.array_equal(ids, np.flatnonzero(want == j))
    # so the pass-2 output does not depend on batching or run size either
    oa, ob = f"memory://fo-{uuid.uuid4().hex[:8]}", f"memory://fo-{uuid.uuid4().hex[:8]}"
    shuffle_from_scatter(a, oa, workers=1)
    shuffle_from_scatter(b, ob, workers=1)
    assert np.array_equal(row_ids(oa), row_ids(ob))
    # different producers draw from different streams: same row index, unrelated buckets
    k0, k1 = producer_key(9, "gpu0"), producer_key(9, "gpu1")
    assert k0 != k1 and not np.array_equal(bucket_ids(k0, 0, 1000, 64), bucket_ids(k1, 0, 1000, 64))


def test_too_few_buckets_for_the_memory_still_exact_by_recursion(tmp_path):
    src = str(tmp_path / "one-bucket")
    write_scattered(src, range(400), seed=3, buckets=1, run_rows=50, chunk_rows=4)
    chunk = 4 * ROW
    memory = fixed_overhead(chunk) + 64 * (ROW + 12)  # room for 64 rows: the one bucket of 400 is 6x too big
    outs = []
    for k, workers in enumerate([1, 2]):
        dst = str(tmp_path / f"out{k}")
        m = shuffle_from_scatter(src, dst, memory=memory, workers=workers, chunk_bytes=chunk, shard_bytes=8 * chunk)
        assert any("." in s.name.split("-")[1] for s in m.shards), "expected recursed shard names"
        assert np.array_equal(np.sort(row_ids(dst)), np.arange(400))
        outs.append(shard_bytes(dst))
    assert outs[0] == outs[1]


def test_rerun_returns_the_finished_output(tmp_path):
    src = scattered_source(50, seed=1, buckets=2)
    dst = str(tmp_path / "out")
    m1 = shuffle_from_scatter(src, dst, workers=1)
    before = {n: os.path.getmtime(tmp_path / "out" / n) for n in os.listdir(dst)}
    m2 = shuffle_from_scatter(src, dst, workers=1)
    assert m1.to_json() == m2.to_json()
    assert before == {n: os.path.getmtime(tmp_path / "out" / n) for n in os.listdir(dst)}


# ---------------------------------------------------------------------------------------------------
# Uniformity of the fused path (the shuffle issue's tests, on scatter-on-write + pass 2)


def _fused_orders(n: int, seeds, buckets: int, producers: int) -> np.ndarray:
    out = []
    for s in seeds:
        src = scattered_source(n, seed=s, buckets=buckets, producers=producers, run_rows=n, chunk_rows=4)
        dst = f"memory://fused-out-{uuid.uuid4().hex[:10]}"
        shuffle_from_scatter(src, dst, workers=1, chunk_bytes=2 * ROW, shard_bytes=4 * ROW)
        out.append(row_ids(dst))
    return np.stack(out)


def test_fused_each_rows_position_is_uniform():
    # Two producers hold rows 0-3 and 4-7: their draws come from different keyed streams, and still every row
    # lands in every position equally often.
    n, seeds = 8, 200
    assert_positions_uniform(_fused_orders(n, range(3000, 3000 + seeds), buckets=3, producers=2))


def test_fused_adjacent_output_rows_independent_of_input_neighbours():
    n, seeds = 64, 60
    d = assert_adjacent_distances_uniform(_fused_orders(n, range(4000, 4000 + seeds), buckets=4, producers=1))
    assert 70 < int(np.sum(d == 1)) < 170  # 2/n of 3,780 pairs: about 118


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_scatter_spec_validation():
    for kw, needle in [({"seed": -1, "buckets": 4}, "seed=-1"), ({"seed": 0, "buckets": 0}, "buckets=0"),
                       ({"seed": 0, "buckets": "4"}, "buckets='4'"), ({"seed": 0, "buckets": 2**25}, "buckets="),
                       ({"seed": 0, "buckets": 4, "run_bytes": 0}, "run_bytes=0"), ({"seed": 1.5, "buckets": 4}, "seed=1.5")]:
        with pytest.raises(ValueError, match=needle):
            ScatterSpec(**kw)
    with pytest.raises(TypeError, match="positional"):
        ScatterSpec(0, 4)  # keyword-only
    with pytest.raises(TypeError, match="ScatterSpec"):
        ShardWriter("memory://x-bad", d_model=1, dtype="float32", scatter={"seed": 0, "buckets": 4})
    assert ScatterSpec(seed=np.uint64(3), buckets=np.int64(5)).to_json() == {"format": 1, "seed": 3, "buckets": 5}


def test_sized_uses_the_shuffles_bucket_rule():
    from shuffler.format.schema import Schema, standard_columns
    from shuffler.shuffling.plan import PlanRequest, make_plan

    schema = Schema(dtype="bfloat16", d_model=4096, columns=standard_columns())
    spec = ScatterSpec.sized(seed=1, rows=10**9, schema=schema, memory=8 << 30)
    assert spec.buckets == make_plan(PlanRequest(rows=10**9, schema=schema, memory=8 << 30)).buckets > 100


def test_from_scatter_on_a_normal_dataset_is_refused(tmp_path):
    url = str(tmp_path / "plain")
    with ShardWriter(url, d_model=1, dtype="float32", columns=COLS) as w:
        w.write(np.zeros((5, 1), np.float32), row_id=np.arange(5), pad=np.zeros(5, np.int32))
    with pytest.raises(NotScatteredError, match="not a scattered dataset.*scatter=ScatterSpec"):
        shuffle_from_scatter(url, str(tmp_path / "out"))
    r = CliRunner().invoke(main, ["shuffle", "--from-scatter", url, str(tmp_path / "out")])
    assert r.exit_code == 1 and "not a scattered dataset" in r.output
    assert not (tmp_path / "out" / "manifest.json").exists()
    r = CliRunner().invoke(main, ["shuffle", url, str(tmp_path / "out")])
    assert r.exit_code == 2 and "--seed" in r.output


def test_from_scatter_options_are_the_shuffles_but_those_the_producers_fixed(tmp_path):
    src = scattered_source(600, seed=4, buckets=3, run_rows=50, chunk_rows=4)
    for fixed in ("buckets", "map_rows", "keep_intermediate"):
        with pytest.raises(TypeError, match=f"unknown option\\(s\\) {fixed};.*memory, workers"):
            shuffle_from_scatter(src, str(tmp_path / "out"), **{fixed: 2})
    with pytest.raises(TypeError, match="wrokers"):
        shuffle_from_scatter(src, str(tmp_path / "out"), wrokers=1)
    assert not (tmp_path / "out").exists()
    stats: dict = {}
    m = shuffle_from_scatter(src, str(tmp_path / "out"), memory="512MiB", workers=1, stats=stats)
    assert m.metadata["shuffle"]["buckets"] == 3 and m.metadata["shuffle"]["seed"] == 4 and stats["from_scatter"]
    assert sorted(row_ids(str(tmp_path / "out"))) == list(range(600))


def test_seal_refuses_producers_with_different_specs(tmp_path):
    url = str(tmp_path / "mixed")
    write_scattered(url, range(10), seed=1, buckets=4, producer="a")
    write_scattered(url, range(10, 20), seed=1, buckets=5, producer="b")
    with pytest.raises(SchemaError, match="same ScatterSpec"):
        seal(url)
    assert not (tmp_path / "mixed" / "manifest.json").exists()


def test_a_failed_scattered_write_leaves_nothing(tmp_path):
    url = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(str(url), d_model=1, dtype="float32", columns=COLS, chunk_bytes=2 * ROW,
                         scatter=ScatterSpec(seed=0, buckets=3, run_bytes=5 * ROW)) as w:
            w.write(np.zeros((23, 1), np.float32), row_id=np.arange(23), pad=np.zeros(23, np.int32))
            raise RuntimeError("boom")
    assert [f for _, _, fs in os.walk(url) for f in fs] == []


def test_a_damaged_marker_is_named(tmp_path):
    src = str(tmp_path / "s")
    write_scattered(src, range(30), seed=0, buckets=3)
    (tmp_path / "s" / "map-000001.idx").write_bytes(b"junk")
    with pytest.raises(ValueError, match="map-000001.idx"):
        shuffle_from_scatter(src, str(tmp_path / "out"))
    os.remove(tmp_path / "s" / "map-000001.idx")
    with pytest.raises(ValueError, match="marker of run map-000001.shard is missing"):
        ScatteredDataset.open(src)


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_synth_scatter_then_from_scatter(tmp_path):
    src, dst = str(tmp_path / "sc"), str(tmp_path / "out")
    r = CliRunner().invoke(main, ["synth", src, "--rows", "3000", "--d-model", "8", "--scatter", "--seed", "4",
                                  "--buckets", "5", "--chunk-bytes", "4KiB"])
    assert r.exit_code == 0, r.output
    assert "5 scattered bucket(s)" in r.output
    assert Dataset.open(src).metadata["scatter"] == {"format": 1, "seed": 4, "buckets": 5}
    r = CliRunner().invoke(main, ["shuffle", "--from-scatter", src, dst, "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "pass 2 only" in r.output
    assert verify([src], dst, full=True).ok
    r = CliRunner().invoke(main, ["shuffle", "--from-scatter", src, dst, "--buckets", "3"])
    assert r.exit_code == 2 and "--buckets does not apply" in r.output
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "x"), "--rows", "10", "--d-model", "2", "--buckets", "3"])
    assert r.exit_code == 2 and "--buckets needs --scatter" in r.output


def test_cli_subprocess(tmp_path):
    src, dst = str(tmp_path / "sc"), str(tmp_path / "out")
    env = dict(os.environ, SHUFFLER_NO_PROGRESS="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "shuffler", *a], capture_output=True, text=True,  # noqa: E731
                                    env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = run("synth", src, "--rows", "2000", "--d-model", "4", "--scatter", "--seed", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "sc" / "manifest.json").read_text())["metadata"]["scatter"]["buckets"] == 1
    r = run("shuffle", "--from-scatter", src, dst, "--workers", "2")
    assert r.returncode == 0, r.stderr
    r = run("verify", src, dst, "--full")
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
    r = run("shuffle", "--from-scatter", dst, str(tmp_path / "again"))
    assert r.returncode == 1 and "is not a scattered dataset" in r.stderr


def test_every_backend_producers_scatter_seal_from_scatter_and_permuted_read(any_url, tmp_path):
    """Producer folders, markers and pass 2 on local disk, memory:// and S3 (moto on 127.0.0.1)."""
    from readers import ActivationStream

    for p, rows in enumerate([range(0, 70), range(70, 150)]):
        write_scattered(any_url, rows, seed=8, buckets=3, producer=f"gpu{p}", run_rows=40, chunk_rows=9)
    seal(any_url)
    dst = str(tmp_path / "out")
    shuffle_from_scatter(any_url, dst, workers=1)
    assert np.array_equal(np.sort(row_ids(dst)), np.arange(150))
    got = [b.columns["row_id"] for b in ActivationStream(any_url, batch_size=32, columns=("row_id",),
                                                          permute_buckets=True)]
    assert np.array_equal(np.sort(np.concatenate(got)), np.arange(150))


def test_cli_capture_scatter_sizes_buckets_from_the_layer_width(tmp_path):
    from shuffler.format.schema import Schema, standard_columns
    from shuffler.shuffling.plan import PlanRequest, make_plan

    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("Activations are captured in document order, so they must be shuffled. " * 40)
    out, dst = str(tmp_path / "cap"), str(tmp_path / "out")
    schema = Schema(dtype="float32", d_model=384, columns=standard_columns())  # MiniLM's width, known after loading
    memory = fixed_overhead(8 << 20) + 150 * (schema.row_bytes + 12)  # room for 150 of the 200 rows
    r = CliRunner().invoke(main, ["capture", out, "--layer", "1", "--max-tokens", "200", "--context", "48",
                                  "--text", str(text), "--device", "cpu", "--scatter", "--seed", "3",
                                  "--memory", str(memory)])
    assert r.exit_code == 0, r.output
    ds = Dataset.open(out)
    want = make_plan(PlanRequest(rows=200, schema=schema, memory=memory)).buckets
    assert ds.metadata["scatter"] == {"format": 1, "seed": 3, "buckets": want} and want > 1
    assert ds.num_rows == 200 and all(s.name.startswith("map-") for s in ds.shards)
    assert shuffle_from_scatter(out, dst, workers=1).num_rows == 200
    assert verify([out], dst, full=True).ok
    r = CliRunner().invoke(main, ["capture", out, "--layer", "1", "--max-tokens", "10", "--buckets", "4"])
    assert r.exit_code == 2 and "--buckets needs --scatter" in r.output


def test_a_damaged_run_is_named_and_kept(tmp_path):
    src = str(tmp_path / "s")
    write_scattered(src, range(60), seed=0, buckets=3, run_rows=20, chunk_rows=4)
    ds = Dataset.open(src)
    e = ds.index(1).entries[2]
    path = tmp_path / "s" / ds.shards[1].name
    data = bytearray(path.read_bytes())
    data[int(e["offset"]) + int(e["comp_len"]) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="map-000001.shard"):
        shuffle_from_scatter(src, str(tmp_path / "out"), workers=1)
    assert (tmp_path / "s" / "map-000001.idx").exists()  # the producer's data: reported, never deleted
    assert not (tmp_path / "out" / "manifest.json").exists()

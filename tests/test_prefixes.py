"""Scratch spread over hashed prefixes (shuffler/storage/storage.py: prefixed_key, `#prefixes=N` URLs) and the
plan's multipart part size: the same output bytes, the hashed layout on local disk and on S3 (moto), resume
after kill -9 and the bucket index through it, and the cost model's requests as the prefixes and parts say."""

from __future__ import annotations

import collections
import os

import pytest

from shuffler.format.schema import Schema, standard_columns
from shuffler.shuffling.array_job import TaskSlot, run_stage
from shuffler.shuffling.costmodel import Cluster, estimate
from shuffler.shuffling.plan import GiB, PlanRequest, fixed_overhead, make_plan
from shuffler.shuffling.run import shuffle
from shuffler.storage.storage import (
    MAX_PARTS,
    PART_BYTES,
    Storage,
    part_bytes_for,
    prefixed_key,
    split_prefixes,
    with_prefixes,
)

from .test_shuffle import SMALL, output_bytes
from .test_shuffle_resume import ARGS, raw, reference, run_cli  # noqa: F401  (fixtures)


def test_prefixed_key_is_stable_spread_and_keeps_temporaries_beside_their_object():
    names = [f"map-{i:06d}.shard" for i in range(4000)]
    heads = collections.Counter(prefixed_key(n, 16).split("/", 1)[0] for n in names)
    assert sorted(heads) == [f"{i:x}" for i in range(16)]  # every prefix used, one hex digit
    assert max(heads.values()) < 1.3 * 4000 / 16  # near uniform
    assert prefixed_key("map-000003.shard", 16) == "9/map-000003.shard"  # CRC-32: the same in every process
    assert prefixed_key("map-000003.shard", 1) == "map-000003.shard"
    assert prefixed_key("a", 256).split("/")[0] == f"{int(prefixed_key('a', 256).split('/')[0], 16):02x}"
    tmp = prefixed_key("map-000003.shard.tmp-0123456789ab", 16)
    assert tmp.split("/")[0] == "9"
    assert split_prefixes(with_prefixes("s3://b/run-x", 8) + "/sub-1") == ("s3://b/run-x/sub-1", 8)
    assert with_prefixes("s3://b/run-x#prefixes=8", 1) == "s3://b/run-x"
    with pytest.raises(ValueError, match="prefixes=0"):
        with_prefixes("s3://b/x", 0)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_spread_folder_reads_writes_lists_and_deletes_by_name(backend, tmp_path, s3_url):
    base = str(tmp_path / "scratch") if backend == "local" else s3_url + "/scratch"
    store = Storage(with_prefixes(base, 4))
    names = [f"map-{i:06d}.shard" for i in range(12)] + ["index/b-00000001.idx", "index/done.json"]
    for n in names:
        store.write(n, n.encode() * 3)
    assert store.list("") == sorted(names)
    assert store.list("index/") == ["index/b-00000001.idx", "index/done.json"]
    assert store.read("index/done.json") == b"index/done.json" * 3
    assert store.read_range("map-000003.shard", 4, 9) == b"000003.shard"[:5]
    assert store.read_ranges(["map-000001.shard"], [0], [3]) == [b"map"]
    # On the filesystem, every object sits under its hashed prefix, and the prefixes are the four of N=4.
    keys = Storage(base).list("")
    assert sorted(keys) == sorted(prefixed_key(n, 4) for n in names)
    assert {k.split("/", 1)[0] for k in keys} == {"0", "1", "2", "3"}
    # A child folder named by appending to the URL (as a recursive re-shuffle does) hashes under the same root.
    sub = Storage(store.url_of("sub-0.1"))
    sub.write("map-000000.shard", b"x")
    assert sub.list("") == ["map-000000.shard"]
    assert prefixed_key("sub-0.1/map-000000.shard", 4) in Storage(base).list("")
    assert "sub-0.1/map-000000.shard" in store.list("")
    sub.delete_prefix("")
    store.delete_prefix("")
    assert Storage(base).list("") == []


def test_spread_scratch_gives_the_same_bytes_on_local_disk_and_keeps_the_layout(raw, reference, tmp_path):  # noqa: F811
    dst, scratch = str(tmp_path / "out"), str(tmp_path / "scratch")
    stats: dict = {}
    shuffle(raw, dst, seed=1, buckets=4, workers=2, map_rows=1000, scratch=scratch, scratch_prefixes=4,
            keep_intermediate=True, stats=stats, **SMALL)
    assert output_bytes(dst) == reference
    assert stats["plan"]["scratch_prefixes"] == 4
    (run_dir,) = os.listdir(scratch)
    keys = Storage(os.path.join(scratch, run_dir)).list("")
    assert all(prefixed_key(k.split("/", 1)[1], 4) == k for k in keys)
    assert len({k.split("/", 1)[0] for k in keys}) > 1
    assert sorted(k.split("/", 1)[1] for k in keys) == sorted(
        [f"map-{m:06d}.{e}" for m in range(5) for e in ("shard", "idx")])


def test_resume_after_kill_9_with_spread_scratch(raw, reference, tmp_path):  # noqa: F811
    dst = str(tmp_path / "out")
    p = run_cli("shuffle", raw, dst, *ARGS, "--workers", "1", "--scratch-prefixes", "8", fault="kill-after-map=2")
    assert p.returncode == -9, p.stderr
    spread = [k for k in Storage(dst).list(".shuffle/scratch") if k.endswith(".idx")]
    assert len(spread) == 2 and all(k.split("/")[3] in {f"{i}" for i in range(8)} for k in spread), spread
    # Re-run without the option: the run keeps the prefixes it started with (run.json) and skips the committed
    # map tasks, so the intermediates written before the kill are the ones read.
    p = run_cli("shuffle", raw, dst, *ARGS, "--workers", "1")
    assert p.returncode == 0, p.stderr
    assert output_bytes(dst) == reference
    assert not os.path.exists(os.path.join(dst, ".shuffle", "scratch"))


def test_array_job_with_spread_scratch_on_s3_uses_the_bucket_index(raw, reference, s3_url):  # noqa: F811
    dst = s3_url + "/spread"
    config = dict(buckets=4, map_rows=1000, scratch_prefixes=4, **SMALL)
    run_stage("plan", [raw], dst, seed=1, config=config, workers=1)
    for i in range(2):
        run_stage("scatter", [raw], dst, seed=1, slot=TaskSlot(index=i, count=2), workers=1)
    keys = Storage(dst).list(".shuffle/scratch")
    (run_dir,) = {k.split("/")[2] for k in keys}
    inside = [k.split("/", 3)[3] for k in keys]
    assert len({k.split("/", 1)[0] for k in inside}) > 1
    assert sum(k.endswith("/index/done.json") for k in inside) == 1
    assert all(prefixed_key(k.split("/", 1)[1], 4) == k for k in inside)
    for i in range(2):
        out = run_stage("permute", [raw], dst, seed=1, slot=TaskSlot(index=i, count=2), workers=1)
        assert out["indexed"] is True, out  # read its buckets from the index, not the footers
    run_stage("finalize", [raw], dst, seed=1, workers=1)
    assert output_bytes(dst) == reference


def test_a_shuffle_on_s3_spreads_its_scratch(raw, reference, s3_url):  # noqa: F811
    dst = s3_url + "/spread-local-executor"
    shuffle(raw, dst, seed=1, buckets=4, workers=1, map_rows=1000, scratch_prefixes=2, keep_intermediate=True,
            **SMALL)
    assert output_bytes(dst) == reference
    inside = [k.split("/", 3)[3] for k in Storage(dst).list(".shuffle/scratch")]
    assert all(prefixed_key(k.split("/", 1)[1], 2) == k for k in inside) and len(inside) == 10
    assert {k.split("/", 1)[0] for k in inside} == {"0", "1"}


PB = PlanRequest(rows=61_035_156_250, schema=Schema(dtype="bfloat16", d_model=8192, columns=standard_columns()),
                 memory=128 * GiB, workers=7, threads=10, scratch_remote=True, dst_remote=True, machine_memory=0)
CLUSTER = Cluster(nodes=128, cores=64, memory=1024 * GiB, network=12.5e9, disk=8e9)


def test_the_plan_picks_prefixes_and_parts():
    plan = make_plan(PB)
    assert plan.part_bytes == PART_BYTES == 64 << 20
    assert plan.scratch_prefixes == 128  # 7,3xx tasks / 64 per prefix, rounded up to a power of two
    import dataclasses

    assert make_plan(dataclasses.replace(PB, scratch_remote=False)).scratch_prefixes == 1
    assert make_plan(dataclasses.replace(PB, scratch_prefixes=3)).scratch_prefixes == 3
    with pytest.raises(ValueError, match="scratch_prefixes=0"):
        dataclasses.replace(PB, scratch_prefixes=0)
    # Past 10,000 parts of 64 MiB (625 GiB), parts grow so that an object still fits.
    assert part_bytes_for(600 * GiB) == PART_BYTES
    big = part_bytes_for(2048 * GiB)
    assert big > PART_BYTES and big % (1 << 20) == 0 and 2048 * GiB / big < MAX_PARTS
    # The upload buffers are inside the budget, local or remote alike: the same buckets either way.
    local = make_plan(dataclasses.replace(PB, scratch_remote=False, dst_remote=False))
    assert local.buckets == plan.buckets and plan.peak_task_bytes <= PB.memory + 2 * 8 * 8 * (1 << 20)
    assert fixed_overhead(8 << 20) - fixed_overhead(8 << 20, part_bytes=0) == 2 * PART_BYTES


def test_cost_model_requests_follow_the_parts_and_the_prefixes():
    import dataclasses

    plan = make_plan(PB)
    est = estimate(plan, CLUSTER)
    p1, p2 = est.passes
    each = plan.pass1_write_bytes / plan.map_tasks  # one intermediate, about 87 GiB
    assert p1.puts == plan.map_tasks * (-(-each // PART_BYTES) + 2 + 1)  # create + parts + complete, + marker
    # Pass 1's PUTs are mostly parts: 16 MiB parts (the old size) would need about 4x as many.
    assert 3.5 < (each / (16 << 20)) / (each / PART_BYTES) <= 4.0
    assert p1.bound == p2.bound == "network"
    # One prefix: S3's 5,500 GET/s per prefix bound pass 2 (53 M ranged GETs), and 3,500 PUT/s pass 1.
    one = estimate(dataclasses.replace(plan, scratch_prefixes=1), CLUSTER)
    assert one.passes[1].bound == "requests" and one.passes[1].requests_s == pytest.approx(p2.gets / 5500)
    assert one.passes[0].requests_s == pytest.approx(p1.puts / 3500)
    assert one.passes[1].requests_s == pytest.approx(128 * p2.requests_s)
    assert (one.passes[0].gets, one.passes[0].puts) == (p1.gets, p1.puts)  # the count is the same, the rate not
    assert "128 hashed prefix(es); 64.0 MiB parts" in est.report()

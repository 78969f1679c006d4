"""Flipped bytes at random positions of shards, shuffle intermediates, commit markers and manifests.

Every read of a damaged chunk fails with the project's error (FormatError, or its subclass ChecksumError)
naming the object and the chunk; reads of undamaged chunks return exactly the original rows; `inspect
--check` and `verify` list every damaged chunk and nothing else; a reader skips and counts them when asked.
A damaged intermediate or marker is found, named, and healed by re-running the same command: the output is
byte-identical to an undamaged run. The counts (positions tried, and how each was caught) are printed with
`pytest -s` and recorded in docs/reliability.md.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from readers import ActivationStream
from shuffler import ChecksumError, Dataset, FormatError
from shuffler.cli import main
from shuffler.errors import DatasetNotFoundError, SchemaError
from shuffler.format.shard import decode_header
from shuffler.shuffling.run import shuffle
from shuffler.shuffling.verify import verify

from .test_reliability_shuffle import OPTS, ROOT, drive
from .test_shuffle import make_dataset, output_bytes

# Flips per test by default, and with --slow.
SHARD_FLIPS = (150, 3000)
INTERMEDIATE_FLIPS = (12, 150)
MARKER_FLIPS = (12, 150)
MANIFEST_FLIPS = (150, 3000)
SEED = 20261127


def count(request, which: tuple[int, int]) -> int:
    return which[1] if request.config.getoption("--slow") else which[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("corrupt")
    src, dst = str(base / "raw"), str(base / "out")
    make_dataset(src, 5000)
    shuffle(src, dst, **OPTS)
    ds = Dataset.open(dst)
    chunks = {(i, j): ds.read_chunk(i, j) for i in range(len(ds.shards)) for j in range(ds.index(i).n_chunks)}
    return src, dst, chunks


def flip(path: str, pos: int, x: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ x]))


def same(a, b) -> bool:
    """Same activations and column values (in schema order: a damaged manifest may rename a column)."""
    return (np.array_equal(a.acts, b.acts) and len(a.columns) == len(b.columns)
            and all(np.array_equal(x, y) for x, y in zip(a.columns.values(), b.columns.values(), strict=True)))


def region(ds: Dataset, i: int, pos: int) -> tuple[str, int | None]:
    """('header' | 'chunk' | 'index', chunk number) of byte `pos` of shard i (as the undamaged file lays it out)."""
    head = ds.store.read_range(ds.shards[i].name, 0, 1 << 16)
    _, _, header_len = decode_header(head, where="")
    if pos < header_len:
        return "header", None
    e = ds.index(i).entries
    for j in range(len(e)):
        if e["offset"][j] <= pos < e["offset"][j] + e["comp_len"][j]:
            return "chunk", j
    return "index", None


def test_flipped_byte_anywhere_in_a_shard_is_caught_or_harmless(data, request):
    """SHARD_FLIPS single-byte flips at uniform positions of uniformly chosen shards, one at a time."""
    _, dst, chunks = data
    n = count(request, SHARD_FLIPS)
    ref = Dataset.open(dst)
    rng = np.random.default_rng(SEED)
    tally: Counter = Counter()
    for _ in range(n):
        i = int(rng.integers(len(ref.shards)))
        name = ref.shards[i].name
        pos, x = int(rng.integers(ref.shards[i].bytes)), int(rng.integers(1, 256))
        kind, hit = region(ref, i, pos)
        flip(os.path.join(dst, name), pos, x)
        try:
            ds = Dataset.open(dst)
            failed = []
            for j in range(ref.index(i).n_chunks):
                try:
                    got = ds.read_chunk(i, j)
                except FormatError as e:  # ChecksumError is a FormatError
                    assert name in str(e), e
                    if kind == "chunk":
                        assert j == hit and f"{name} chunk {j}" in str(e), e
                    failed.append(j)
                else:
                    assert same(got, chunks[(i, j)]), f"wrong data returned: {name} chunk {j}, byte {pos} ^ {x}"
            damage, _ = Dataset.open(dst).check()
            if kind == "chunk":
                assert failed in ([hit], []) and [(d.shard, d.chunk) for d in damage] == [(name, j) for j in failed]
                tally["chunk: read fails naming shard and chunk" if failed else "chunk: byte unused, data intact"] += 1
            elif kind == "index":
                assert len(failed) == ref.index(i).n_chunks, "a damaged index fails every read of its shard"
                assert [(d.shard, d.chunk) for d in damage] == [(name, None)]
                tally["index/trailer: every read of the shard fails naming it"] += 1
            else:
                # Reads never use the header; `check` compares it with the manifest's schema.
                assert failed == [] and [d.shard for d in damage] in ([name], [])
                tally["header: check names the shard" if damage else "header: byte unused (flags, level)"] += 1
        finally:
            flip(os.path.join(dst, name), pos, x)
    print(f"\n{n} shard flips: {dict(tally)}")
    assert Dataset.open(dst).check()[0] == []
    assert tally["chunk: read fails naming shard and chunk"] >= n // 2


def damage_chunks(dst: str, picks: list[tuple[int, int]], rng) -> list[tuple[str, int]]:
    ds = Dataset.open(dst)
    out = []
    for i, j in picks:
        e = ds.index(i).entries[j]
        flip(os.path.join(dst, ds.shards[i].name), int(e["offset"] + rng.integers(8, e["comp_len"] - 4)), 0xFF)
        out.append((ds.shards[i].name, j))
    return out


@pytest.mark.parametrize("trial", range(3))
def test_inspect_verify_and_readers_name_every_damaged_chunk(data, tmp_path, trial):
    src, ref_dst, chunks = data
    dst = str(tmp_path / "out")
    shutil.copytree(ref_dst, dst)
    rng = np.random.default_rng(SEED + trial)
    keys = sorted(chunks)
    picks = [keys[k] for k in sorted(rng.choice(len(keys), size=2 + trial * 2, replace=False))]
    damaged = damage_chunks(dst, picks, rng)
    r = CliRunner().invoke(main, ["inspect", dst, "--check"])
    assert r.exit_code == 1
    assert sorted(line.split(":")[0] for line in r.output.splitlines() if line.startswith("DAMAGED")) == \
        sorted(f"DAMAGED {n} chunk {j}" for n, j in damaged)
    rep = verify(src, dst)
    assert not rep.ok
    assert sorted(": ".join(p.split(": ")[:2]) for p in rep.problems if p.startswith("DST damaged")) == \
        sorted(f"DST damaged: {n} chunk {j}" for n, j in damaged)
    r = CliRunner().invoke(main, ["verify", src, dst])
    assert r.exit_code == 1 and all(f"{n} chunk {j}:" in r.output for n, j in damaged)
    # The reader: raises naming a damaged chunk, or skips exactly the damaged chunks' rows and counts them.
    with pytest.raises(ChecksumError) as info:
        list(ActivationStream(dst, batch_size=256))
    assert (info.value.obj, info.value.chunk) in damaged
    s = ActivationStream(dst, batch_size=256, columns=("row_id",), on_damaged="skip", seed=trial)
    got = np.concatenate([np.asarray(b.columns["row_id"]) for b in s])
    lost = np.concatenate([chunks[k].columns["row_id"] for k in picks])
    want = np.setdiff1d(np.concatenate([c.columns["row_id"] for c in chunks.values()]), lost)
    assert np.array_equal(np.sort(got), want), "exactly the undamaged rows, each once"
    assert s.stats.skipped_chunks == len(picks) and s.stats.skipped_rows == len(lost)


def test_inspect_check_in_a_real_process(data, tmp_path):
    src, ref_dst, chunks = data
    dst = str(tmp_path / "out")
    shutil.copytree(ref_dst, dst)
    (name, j), = damage_chunks(dst, [sorted(chunks)[7]], np.random.default_rng(SEED))
    p = subprocess.run([sys.executable, "-m", "shuffler", "inspect", dst, "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, SHUFFLER_NO_PROGRESS="1"))
    assert p.returncode == 1 and f"DAMAGED {name} chunk {j}:" in p.stderr


# -- intermediates: the shuffle killed between its passes, then a byte of its scratch flipped --------------


@pytest.fixture(scope="module")
def between_passes(data, tmp_path_factory):
    """A DST whose shuffle was killed with every intermediate committed and no bucket written."""
    src, ref_dst, _ = data
    base = tmp_path_factory.mktemp("between")
    drive(src, str(base / "traced"), OPTS, 0, str(base / "events.json"))
    events = json.load(open(base / "events.json"))
    pristine = str(base / "pristine")
    assert drive(src, pristine, OPTS, events.index("open shard-000000-0000.shard") + 1, str(base / "l")) == -9
    return src, pristine, output_bytes(ref_dst)


def finish_after_damage(src: str, dst: str, reference: dict) -> str:
    """Run the shuffle until it finishes (at most twice); return how the damage was met."""
    try:
        shuffle(src, dst, **OPTS)
        how = "healed silently (marker redone) or byte unused"
    except FormatError as e:
        assert "/map-0" in str(e) and "re-run the same command" in str(e), e
        assert not os.path.exists(os.path.join(dst, "manifest.json")), "nothing committed"
        how = "shuffle stopped naming the intermediate (and chunk); the re-run redid it"
        shuffle(src, dst, **OPTS)
    assert output_bytes(dst) == reference
    assert verify(src, dst).ok
    return how


@pytest.mark.parametrize("what", ["shard", "idx"])
def test_flipped_byte_in_an_intermediate_is_caught_and_healed_by_rerun(between_passes, tmp_path, what, request):
    src, pristine, reference = between_passes
    rng = np.random.default_rng(SEED + (what == "idx"))
    files = sorted(glob.glob(f"{pristine}/.shuffle/scratch/run-*/map-*.{what}"))
    assert len(files) == 5
    tally: Counter = Counter()
    n = count(request, INTERMEDIATE_FLIPS if what == "shard" else MARKER_FLIPS)
    for t in range(n):
        dst = str(tmp_path / f"t{t}")
        shutil.copytree(pristine, dst)
        victim = os.path.join(dst, os.path.relpath(files[int(rng.integers(len(files)))], pristine))
        flip(victim, int(rng.integers(os.path.getsize(victim))), int(rng.integers(1, 256)))
        tally[finish_after_damage(src, dst, reference)] += 1
        shutil.rmtree(dst)
    print(f"\n{n} flips in intermediate .{what} objects: {dict(tally)}")


def test_every_byte_of_a_commit_marker(between_passes, tmp_path):
    """Each of the ~200 bytes of one map marker flipped in turn: never an error of another type, never other output."""
    src, pristine, reference = between_passes
    (marker,) = glob.glob(f"{pristine}/.shuffle/scratch/run-*/map-000002.idx")
    from shuffler.shuffling.map import MapOutput

    data = open(marker, "rb").read()
    good = MapOutput.from_bytes(data, where="m", buckets=OPTS["buckets"])
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(FormatError):
            MapOutput.from_bytes(bytes(bad), where="m", buckets=OPTS["buckets"])
    assert good.rows == 1000


def test_damaged_reduce_marker_and_run_state_are_redone_or_refused(between_passes, tmp_path):
    src, pristine, reference = between_passes
    from shuffler.shuffling.run import RUN, reduce_marker

    dst = str(tmp_path / "out")
    shutil.copytree(pristine, dst)
    # Two buckets committed (the coordinator killed after them), then one's marker damaged: that bucket is
    # redone, the other kept, and the output is the same.
    p = subprocess.run([sys.executable, "-m", "shuffler", "shuffle", src, dst, "--seed", "1", "--buckets", "4",
                        "--chunk-bytes", "4KiB", "--shard-bytes", "32KiB", "--map-rows", "1000", "--workers", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, SHUFFLER_TEST_FAULT="kill-after-reduce=2", SHUFFLER_NO_PROGRESS="1"))
    assert p.returncode == -9, p.stderr
    m0 = os.path.join(dst, reduce_marker(0))
    text = open(m0).read()
    open(m0, "w").write(text.replace('"rows": ', '"rows": 1', 1))  # a digit more: the CRC no longer matches
    shuffle(src, dst, **OPTS)
    assert output_bytes(dst) == reference and verify(src, dst).ok
    # A run.json that is not JSON: refused as unknown state (not a traceback), cleared by --overwrite.
    dst2 = str(tmp_path / "out2")
    shutil.copytree(pristine, dst2)
    open(os.path.join(dst2, RUN), "wb").write(b"\x00garbage{")
    with pytest.raises(FileExistsError, match="unfinished state of another shuffle"):
        shuffle(src, dst2, **OPTS)
    shuffle(src, dst2, overwrite=True, **OPTS)
    assert output_bytes(dst2) == reference


def test_run_state_cannot_make_overwrite_delete_elsewhere(between_passes, tmp_path):
    """run.json names the scratch of its run; --overwrite clears it. A forged one pointing at other files
    must not make the shuffle delete them."""
    src, pristine, reference = between_passes
    from shuffler.shuffling.run import RUN

    victim = tmp_path / "precious"
    (victim / "run-0123456789abcdef").mkdir(parents=True)
    keep = [victim / "notes.txt", victim / "run-0123456789abcdef" / "data.bin",
            victim / "run-0123456789abcdef" / "map-000000.shard.bak"]
    for k in keep:
        k.write_bytes(b"keep me")
    for target in (str(victim), str(victim / "run-0123456789abcdef")):
        dst = str(tmp_path / f"out-{len(target)}")
        shutil.copytree(pristine, dst)
        state = json.load(open(os.path.join(dst, RUN)))
        state["identity"]["seed"] = 99  # another run's state ...
        state["scratch"] = target  # ... naming someone else's folder as its scratch
        open(os.path.join(dst, RUN), "w").write(json.dumps(state))
        shuffle(src, dst, overwrite=True, **OPTS)
        assert output_bytes(dst) == reference
    assert all(k.read_bytes() == b"keep me" for k in keep)


# -- manifests ------------------------------------------------------------------------------------------


def test_flipped_byte_in_a_manifest_is_refused_or_harmless(data, tmp_path, request):
    """MANIFEST_FLIPS flips in manifest.json: opening fails with a format error naming it, or the manifest still
    parses, and then any change that matters (a size, a row count, a name) fails reads naming the shard,
    or check/verify report it (a changed fingerprint). Reads never return rows other than the shards'."""
    src, ref_dst, chunks = data
    dst = str(tmp_path / "out")
    shutil.copytree(ref_dst, dst)
    path = os.path.join(dst, "manifest.json")
    original = open(path, "rb").read()
    ref = Dataset.open(ref_dst)
    rng = np.random.default_rng(SEED)
    tally: Counter = Counter()
    n = count(request, MANIFEST_FLIPS)
    for _ in range(n):
        bad = bytearray(original)
        bad[int(rng.integers(len(bad)))] ^= int(rng.integers(1, 256))
        open(path, "wb").write(bytes(bad))
        try:
            ds = Dataset.open(dst)
        except (FormatError, SchemaError) as e:
            assert "manifest.json" in str(e), e
            tally["open refused, naming manifest.json"] += 1
            continue
        except DatasetNotFoundError:
            raise
        if ds.manifest == ref.manifest:
            tally["parsed to the same manifest (whitespace, metadata key order)"] += 1
            continue
        errors = 0
        for i, info in enumerate(ds.shards):
            for j in range(max(info.chunks, 0)):
                try:
                    got = ds.read_chunk(i, j)
                except (FormatError, FileNotFoundError, IndexError) as e:
                    assert info.name in str(e) or "manifest" in str(e), e
                    errors += 1
                    break
                ri = [k for k, s in enumerate(ref.shards) if s.name == info.name]
                assert ri and same(got, chunks[(ri[0], j)]), "a read returned rows the shard does not hold"
        if errors:
            tally["opens; reads of the changed shard entry fail naming it"] += 1
        elif ds.schema != ref.schema:
            assert len(ds.check()[0]) == len(ds.shards), "every shard header now differs from the manifest"
            tally["opens; a column renamed: values right, check/verify name every shard"] += 1
        elif (ds.manifest.fingerprint, ds.num_rows) != (ref.manifest.fingerprint, ref.num_rows):
            assert not verify(src, dst).ok, "a changed fingerprint or count must fail verify"
            tally["opens, data intact; verify reports the changed fingerprint"] += 1
        else:
            tally["opens; only metadata changed, data intact"] += 1
    open(path, "wb").write(original)
    print(f"\n{n} manifest flips: {dict(tally)}")

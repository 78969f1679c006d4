"""A shared or leftover --scratch never blocks or corrupts a shuffle (issue: stale intermediates).

Intermediates in scratch are reused only by the run that wrote them: scratch folders are keyed by everything
that fixes their bytes (the run's identity, the destination, the map split), and every commit marker records
the rows it covers and is checked against them. --overwrite clears the scratch its run owns.
"""

from __future__ import annotations

import os
import shutil

from shuffler.shuffling.run import shuffle

from .test_shuffle import SMALL, assert_permutation, output_bytes, read_all
from .test_shuffle_resume import raw, reference, run_cli  # noqa: F401  (fixtures)

BASE = ["--seed", "1", "--buckets", "4", "--chunk-bytes", "4KiB", "--shard-bytes", "32KiB", "--workers", "1"]


def test_a_new_split_after_a_killed_run_with_its_destination_deleted(raw, reference, tmp_path):  # noqa: F811
    scratch, dst = str(tmp_path / "scratch"), str(tmp_path / "out")
    # 10 map tasks of 500 rows; 8 commit. The new split has 5 tasks of 1000: old markers 5-7 lie past it.
    p = run_cli("shuffle", raw, dst, *BASE, "--scratch", scratch, "--map-rows", "500", fault="kill-after-map=8")
    assert p.returncode == -9, p.stderr
    shutil.rmtree(dst)  # the run's state at DST is gone; its intermediates stay in the shared scratch
    p = run_cli("shuffle", raw, dst, *BASE, "--scratch", scratch, "--map-rows", "1000")
    assert p.returncode == 0, p.stderr
    assert output_bytes(dst) == reference  # the split never changes the output
    p = run_cli("verify", raw, dst)
    assert p.returncode == 0, p.stdout + p.stderr


def test_two_destinations_sharing_one_scratch(raw, reference, tmp_path):  # noqa: F811
    scratch = str(tmp_path / "scratch")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    p = run_cli("shuffle", raw, a, *BASE, "--scratch", scratch, "--map-rows", "500", fault="kill-after-map=8")
    assert p.returncode == -9, p.stderr
    p = run_cli("shuffle", raw, b, *BASE, "--scratch", scratch, "--map-rows", "1000")
    assert p.returncode == 0, p.stderr
    assert output_bytes(b) == reference
    p = run_cli("shuffle", raw, a, *BASE, "--scratch", scratch, "--map-rows", "500")  # resume the first
    assert p.returncode == 0, p.stderr
    assert output_bytes(a) == reference


def test_overwrite_clears_the_scratch_it_owns(raw, tmp_path):  # noqa: F811
    scratch, dst = str(tmp_path / "scratch"), str(tmp_path / "out")
    p = run_cli("shuffle", raw, dst, *BASE, "--scratch", scratch, "--map-rows", "500", fault="kill-after-map=4")
    assert p.returncode == -9, p.stderr
    assert any(f.endswith(".idx") for _, _, fs in os.walk(scratch) for f in fs)
    # Another run into the same DST with other options: refused without --overwrite, done with it.
    p = run_cli("shuffle", raw, dst, "--seed", "2", *BASE[2:], "--scratch", scratch, "--map-rows", "500")
    assert p.returncode != 0 and "--overwrite" in p.stderr
    p = run_cli("shuffle", raw, dst, "--seed", "2", *BASE[2:], "--scratch", scratch, "--map-rows", "500",
                "--overwrite")
    assert p.returncode == 0, p.stderr
    assert_permutation(read_all(raw), read_all(dst))
    left = [f for _, _, fs in os.walk(scratch) for f in fs]
    assert left == [], f"the discarded run's intermediates are still in scratch: {left[:5]}"


def test_a_marker_covering_other_rows_is_not_reused(raw, reference, tmp_path):  # noqa: F811
    """A commit marker of another split at the same index (same row count, other rows) must not be taken."""
    scratch, dst = str(tmp_path / "scratch"), str(tmp_path / "out")
    # Split 3000: map 1 holds rows 3000-4999. Split 2000: map 1 holds rows 2000-3999, the same count.
    p = run_cli("shuffle", raw, dst, *BASE, "--scratch", scratch, "--map-rows", "3000", fault="kill-after-map=2")
    assert p.returncode == -9, p.stderr
    shutil.rmtree(dst)
    shuffle(raw, dst, seed=1, buckets=4, workers=1, map_rows=2000, scratch=scratch, progress=False, **SMALL)
    assert output_bytes(dst) == reference


def test_markers_record_their_rows_and_version_2_still_reads():
    import io
    import zlib

    import numpy as np
    import pytest

    from shuffler.errors import FormatError
    from shuffler.shuffling.map import MapOutput

    cs = np.array([0, 2, 2, 5], dtype=np.int64)
    out = MapOutput(4, 1000, 5, 300, cs, row_start=1200)
    back = MapOutput.from_bytes(out.to_bytes(), where="m", buckets=3)
    assert (back.index, back.size, back.n_chunks, back.rows, back.row_start) == (4, 1000, 5, 300, 1200)
    assert np.array_equal(back.chunk_start, cs)
    # A version-2 marker (scattered datasets written before row_start existed) reads with row_start -1.
    a = np.concatenate([[2, 4, 1000, 5, 300, 0], cs]).astype("<i8")
    a[5] = zlib.crc32(a[:5].tobytes() + a[6:].tobytes())
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    assert MapOutput.from_bytes(buf.getvalue(), where="m", buckets=3).row_start == -1
    # The row range is under the CRC: changing it is damage, not another range.
    damaged = bytearray(out.to_bytes())
    damaged[-8 * 5] ^= 1  # the low byte of row_start
    with pytest.raises(FormatError, match="checksum"):
        MapOutput.from_bytes(bytes(damaged), where="m", buckets=3)


def test_array_stages_find_the_planned_scratch_however_dst_is_spelled(raw, reference, tmp_path):  # noqa: F811
    """Array tasks may name DST through another mount point or as file://: every stage uses the plan's scratch."""
    from shuffler.shuffling.array_job import TaskSlot, run_stage

    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    config = dict(buckets=4, chunk_bytes=4096, shard_bytes=32768, map_rows=1000)
    run_stage("plan", [raw], str(real / "out"), seed=1, config=config, workers=1)
    run_stage("scatter", [raw], str(real / "out"), seed=1, slot=TaskSlot(index=0, count=1), workers=1)
    done = run_stage("permute", [raw], f"file://{tmp_path}/link/out", seed=1, slot=TaskSlot(index=0, count=1),
                     workers=1)
    assert done["did"] == 4
    run_stage("finalize", [raw], str(tmp_path / "link" / "out"), seed=1, workers=1)
    assert output_bytes(str(real / "out")) == reference


def test_a_marker_for_another_bucket_count_is_named_as_such():
    import numpy as np
    import pytest

    from shuffler.errors import FormatError
    from shuffler.shuffling.map import MapOutput

    # A version-3 marker for 2 buckets is as long as a version-2 marker for 3 would be: still "not an index for 3".
    data = MapOutput(3, 1000, 5, 77, np.array([0, 2, 5], dtype=np.int64), row_start=0).to_bytes()
    with pytest.raises(FormatError, match="not an intermediate index for 3 buckets"):
        MapOutput.from_bytes(data, where="x", buckets=3)

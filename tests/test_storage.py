"""The storage contract, one suite for every backend: local disk, memory:// and S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import threading

import pytest

from shuffler.storage.storage import Storage


def test_write_read_ranges_list_delete(any_url):
    st = Storage(any_url)
    st.write("a/one.bin", b"0123456789")
    st.write("a/two.bin", b"abcdef")
    st.write("top.json", b"{}")
    assert st.read("a/one.bin") == b"0123456789"
    assert st.read_range("a/one.bin", 2, 5) == b"234"
    assert st.read_range("a/one.bin", 7, 10) == b"789"  # the last bytes
    assert st.read_ranges(["a/one.bin", "a/two.bin", "a/one.bin"], [0, 1, 9], [2, 4, 10]) == [b"01", b"bcd", b"9"]
    assert st.size("a/two.bin") == 6
    assert st.list() == ["a/one.bin", "a/two.bin", "top.json"]
    assert st.list("a") == ["a/one.bin", "a/two.bin"]
    assert st.exists("top.json") and not st.exists("nope")
    st.delete("top.json")
    st.delete("top.json")  # deleting twice is not an error
    assert not st.exists("top.json")
    st.delete_prefix("a")
    assert st.list() == []


def test_missing_object_raises_file_not_found(any_url):
    st = Storage(any_url)
    with pytest.raises(FileNotFoundError):
        st.read("missing.bin")
    assert st.list("nothing-here") == []


def test_open_atomic_commits_only_on_success(any_url):
    st = Storage(any_url)
    with st.open_atomic("obj.bin") as f:
        f.write(b"x" * 1000)
        f.write(b"y" * 1000)
    assert st.read("obj.bin") == b"x" * 1000 + b"y" * 1000

    class Boom(Exception):
        pass

    with pytest.raises(Boom), st.open_atomic("failed.bin") as f:
        f.write(b"partial" * 1000)
        raise Boom
    assert not st.exists("failed.bin")
    assert st.list() == ["obj.bin"]  # no temporary leftovers either


def test_failed_overwrite_keeps_old_content(any_url):
    st = Storage(any_url)
    st.write("obj.bin", b"old")
    with pytest.raises(RuntimeError), st.open_atomic("obj.bin") as f:
        f.write(b"new but unfinished")
        raise RuntimeError("crash mid-write")
    assert st.read("obj.bin") == b"old"


def test_put_if_absent_first_writer_wins(any_url):
    st = Storage(any_url)
    results = []

    def claim(i):
        results.append((i, st.put_if_absent("lock", str(i).encode())))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results if won]
    assert len(winners) == 1
    assert st.read("lock") == str(winners[0]).encode()


def test_large_object_streams_atomically(any_url):
    # Larger than one S3 multipart part (PART_BYTES, 64 MiB): exercises the multipart path on S3.
    st = Storage(any_url)
    block = bytes(range(256)) * 4096  # 1 MiB
    with st.open_atomic("big.bin") as f:
        for _ in range(70):
            f.write(block)
    assert st.size("big.bin") == 70 << 20
    assert st.read_range("big.bin", (69 << 20) + 5, (69 << 20) + 9) == block[5:9]
    if any_url.startswith("s3://"):  # two parts: a multipart ETag ends in "-<parts>"
        assert st.fs.info(st.path("big.bin"))["ETag"].strip('"').endswith("-2")


def test_unknown_scheme_is_named():
    with pytest.raises(ValueError, match="unknown URL scheme 'nosuch'"):
        Storage("nosuch://bucket/x")


def test_storage_pickles_as_url(tmp_path):
    import pickle

    st = Storage(str(tmp_path))
    st2 = pickle.loads(pickle.dumps(st))
    assert st2.url == st.url and st2 is not st


def test_missing_credentials_are_named(monkeypatch, s3_endpoint):
    # No keys, no profile, no instance metadata: the error names the URL and the fix.
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    st = Storage("s3://test-bucket/creds-check")
    with pytest.raises(PermissionError, match="no S3 credentials"):
        st.write("x.bin", b"data")

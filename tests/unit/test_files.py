"""The one atomic-write recipe and the one digest recipe (hica_bench.files)."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from hica_bench.errors import UserError
from hica_bench.files import atomic_dir, atomic_write, digest, file_sha256, remove_orphans


def _write_many(args):
    path, text = args
    for _ in range(50):
        atomic_write(path, text * 1000)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "leaderboard.md"
    atomic_write(path, "good\n")

    def fails(handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match=f"cannot write {path}: No space left on device"):
        atomic_write(path, fails)
    assert path.read_text() == "good\n" and sorted(p.name for p in tmp_path.iterdir()) == ["leaderboard.md"]


def test_concurrent_writers_never_share_a_temporary_or_tear_the_file(tmp_path):
    path = tmp_path / "shared.json"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_write_many, [(path, "a"), (path, "b")])
    assert path.read_text() in ("a" * 1000, "b" * 1000)  # one writer's whole content, never a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.json"]


def test_orphans_of_dead_writers_are_removed_and_the_living_kept(tmp_path):
    dead = tmp_path / ".x.npy.999999999.abcd.tmp"  # no such pid
    alive = tmp_path / f".x.npy.{os.getpid()}.efgh.tmp"
    folder = tmp_path / ".x.npy.999999998.ijkl.tmp"
    dead.write_text(""), alive.write_text(""), folder.mkdir()
    remove_orphans(tmp_path, "x.npy")
    assert not dead.exists() and not folder.exists() and alive.exists()


def test_a_published_folder_is_kept_and_a_late_one_discarded(tmp_path):
    with atomic_dir(tmp_path / "model") as first:
        (first / "model.onnx").write_text("first")
    with atomic_dir(tmp_path / "model") as second:
        (second / "model.onnx").write_text("second")
    assert (tmp_path / "model" / "model.onnx").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_digest_is_canonical_and_file_digests_are_remembered(tmp_path):
    assert digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1}) != digest({"a": [2, 1], "b": 1})
    assert len(digest("x", 12)) == 12
    data = tmp_path / "data.npz"
    data.write_bytes(b"0123")
    first = file_sha256(data, tmp_path / "memo")
    memo = next((tmp_path / "memo" / "digests").glob("*.json"))
    assert json.loads(memo.read_text())["sha256"] == first
    data.write_bytes(b"01234")  # a new version of the file is a new question
    assert file_sha256(data, tmp_path / "memo") != first


def test_a_run_remembers_file_digests_in_its_cache_folder(tmp_path, monkeypatch):
    """Inside ``digests_remembered_in`` (a run: its cache folder) a file's digest is kept on disk, keyed by its path,
    size, modification time and inode, so the next process reads a weights file once, not every run; the feature
    cache's integrity check (``on_disk=False``) still reads the bytes."""
    from hica_bench import files

    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"a" * 1000)
    with files.digests_remembered_in(tmp_path / "cache"):
        first = files.file_sha256(weights)
    assert len(list((tmp_path / "cache" / "digests").glob("*.json"))) == 1
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # same size; the modification time put back: only the memo can tell the old digest
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    monkeypatch.setattr(files, "_DIGESTS", {})  # a new process
    with files.digests_remembered_in(tmp_path / "cache"):
        assert files.file_sha256(weights) == first  # from the memo: the file was not read
        assert files.file_sha256(weights, on_disk=False) != first  # read
    monkeypatch.setattr(files, "_DIGESTS", {})
    assert files.file_sha256(weights) != first  # outside a run nothing on disk is consulted


def test_atomically_written_files_get_a_plain_new_files_mode(tmp_path):
    """Results, leaderboards and reports are written for others to read: the mode open() would give (0644 under the
    usual umask 022), not mkstemp's 0600."""
    import stat

    written = atomic_write(tmp_path / "results.jsonl", "{}\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_replaced_file_keeps_the_mode_it_had(tmp_path):
    import stat

    path = tmp_path / "private.jsonl"
    path.write_text("old\n")
    path.chmod(0o600)
    atomic_write(path, "new\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "new\n"

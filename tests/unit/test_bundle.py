"""Results bundles (:mod:`hica_bench.bundle`): export and import round trip, the merge on import, and every bad bundle
refused with one line before anything is written (bad bundles are built with :mod:`tarfile` directly)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from hica_bench import bundle
from hica_bench.errors import UserError
from hica_bench.results import SCHEMA_VERSION, CellKey, CellResult, Identity, Metrics, ResultsStore, Status
from test_store_properties import ORIGIN as STORE_ORIGIN

ORIGIN = dataclasses.replace(STORE_ORIGIN, prompts="digest-of-the-prompt-file")
WHEN = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def result(seed: int, acc: float = 0.5, dataset: str = "breastmnist:prompts=p.yaml") -> CellResult:
    return CellResult(CellKey(dataset, 28, "prototype", "pixels", 1, seed), Identity(ORIGIN, 1, seed, f"support-{seed}"),
                      Status.OK, metrics=Metrics(acc=acc, auc=0.5, f1_macro=0.5, balanced_acc=0.5),
                      finished_at="2024-01-01T00:00:00+00:00")


def results_folder(folder: Path, seeds, acc: float = 0.5) -> Path:
    """A results folder as ``run --save-predictions`` leaves it: results.jsonl, predictions/CELL_ID.npz, and the prompt
    file its dataset label names (relative to the folder the run started in: here, ``folder``'s parent)."""
    store = ResultsStore(folder / "results.jsonl")
    for seed in seeds:
        one = result(seed, acc)
        (folder / "predictions").mkdir(parents=True, exist_ok=True)
        (folder / "predictions" / f"{one.cell_id}.npz").write_bytes(f"probabilities of seed {seed}".encode() * 50)
        one.predictions = f"predictions/{one.cell_id}.npz"
        store.append(one)
    (folder.parent / "p.yaml").write_text("classnames: [benign tumour, malignant tumour]\n")
    return folder


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The system temporary folder, pointed at a folder of this test (to see that import leaves nothing there)."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def good(tmp_path, scratch) -> Path:
    """A bundle of two cells with their predictions, a prompt file and a suite."""
    results_folder(tmp_path / "run", [0, 1])
    (tmp_path / "paper.toml").write_text("shots = [1]\n")
    return bundle.export([tmp_path / "run"], tmp_path / "good.tar.gz", suite=tmp_path / "paper.toml",
                         prompts_from=tmp_path, created=WHEN).path


def import_(path: Path, out: Path) -> bundle.Imported:
    """What ``hica-bench import`` does, without its lock and publishing: check, then make --out and merge into it."""
    with bundle.opened(path) as opened:
        out.mkdir(parents=True, exist_ok=True)
        return bundle.import_into(opened, out)


def members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path, "r:gz") as tar:
        return [(info, tar.extractfile(info).read() if info.isreg() else b"") for info in tar]


def pack(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]], *, fmt: int = tarfile.PAX_FORMAT) -> Path:
    """``entries`` written as a bundle would be (gzip-compressed tar), whatever they hold."""
    with gzip.open(path, "wb") as compressed, tarfile.open(fileobj=compressed, mode="w", format=fmt) as tar:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


def with_manifest(entries, edit=None) -> list[tuple[tarfile.TarInfo, bytes]]:
    """``entries`` (the members after the manifest) with their manifest rewritten to list them with their true sizes and
    digests, then changed by ``edit(manifest)``."""
    manifest = json.loads(entries[0][1])
    manifest["members"] = [{"path": info.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                           for info, data in entries[1:] if info.isreg()]
    if edit is not None:
        edit(manifest)
    return [(entries[0][0], json.dumps(manifest).encode()), *entries[1:]]


def refused(path: Path, out: Path, scratch: Path, *phrases: str) -> str:
    """Importing ``path`` into ``out`` is one line of UserError holding ``phrases``, and writes nothing: ``out`` is not
    made, and the check's temporary folder is gone."""
    with pytest.raises(UserError) as caught:
        import_(path, out)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"bundle {path}")
    for phrase in phrases:
        assert phrase in text
    assert not out.exists()
    assert list(scratch.iterdir()) == []
    return text


# --------------------------------------------------------------------------------------------------- round trip
def test_export_then_import_gives_back_records_predictions_prompts_and_suite(tmp_path, good, scratch):
    imported = import_(good, tmp_path / "out")
    source, out = tmp_path / "run", tmp_path / "out"
    assert (out / "results.jsonl").read_bytes() == (source / "results.jsonl").read_bytes()
    for path in (source / "predictions").iterdir():
        assert (out / "predictions" / path.name).read_bytes() == path.read_bytes()
    prompt = next((out / "prompts").glob("*/p.yaml"))
    assert prompt.read_bytes() == (tmp_path / "p.yaml").read_bytes()
    assert prompt.parent.name == hashlib.sha256(prompt.read_bytes()).hexdigest()[:12]
    assert (out / "suite" / "paper.toml").read_text() == "shots = [1]\n"
    assert imported.predictions == 2 and imported.prompt_files == [prompt] and imported.suite == out / "suite" / "paper.toml"
    loaded = ResultsStore(out / "results.jsonl").load()
    assert all((out / r.predictions).is_file() for r in loaded.values())
    assert list(scratch.iterdir()) == []


def test_the_manifest_lists_versions_and_every_member_with_its_digest(good):
    entries = members(good)
    assert [info.name for info, _ in entries][:2] == ["manifest.json", "results.jsonl"]
    assert all(info.isreg() and info.mode == 0o644 and info.uid == 0 and info.mtime == WHEN.timestamp()
               for info, _ in entries)
    manifest = json.loads(entries[0][1])
    assert manifest["format"] == "hica-bench-bundle" and manifest["bundle_version"] == bundle.BUNDLE_VERSION
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["hica_bench"] and manifest["cells"] == 2
    assert manifest["created"] == "2024-01-02T03:04:05+00:00" and manifest["suite"] == "suite/paper.toml"
    assert [p["given_as"] for p in manifest["prompt_files"]] == ["p.yaml"]
    assert {m["path"]: (m["size"], m["sha256"]) for m in manifest["members"]} == {
        info.name: (len(data), hashlib.sha256(data).hexdigest()) for info, data in entries[1:]}


def test_two_exports_of_the_same_results_are_byte_identical(tmp_path, good, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(int(WHEN.timestamp())))
    again = bundle.export([tmp_path / "run" / "results.jsonl"], tmp_path / "again.tar.gz",
                          suite=tmp_path / "paper.toml", prompts_from=tmp_path)
    assert again.path.read_bytes() == good.read_bytes()


def test_import_merges_with_the_results_already_there(tmp_path, good, scratch):
    other = results_folder(tmp_path / "other" / "out", [1, 2])  # seed 1 also in the bundle, with the same outcome
    before = (other / "results.jsonl").read_bytes()
    imported = import_(good, other)
    loaded = ResultsStore(other / "results.jsonl").load()
    assert sorted(r.key.seed for r in loaded.values()) == [0, 1, 2]
    assert (other / "results.jsonl").read_bytes().startswith(before)  # the folder's own lines stay as they were
    assert sum(imported.merged.dropped.values()) == 1 and imported.predictions == 1
    assert all((other / r.predictions).is_file() for r in loaded.values())


def test_import_refuses_a_cell_with_another_outcome_and_writes_nothing(tmp_path, good, scratch):
    other = results_folder(tmp_path / "other" / "out", [1], acc=0.9)
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="has different results in .* and bundle .*good.tar.gz"):
        import_(good, other)
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


def test_a_prompt_file_already_there_with_other_content_is_refused(tmp_path, good, scratch):
    out = tmp_path / "out"
    import_(good, out)
    prompt = next((out / "prompts").glob("*/p.yaml"))
    prompt.write_text("classnames: [edited, by hand]\n")
    results = (out / "results.jsonl").read_bytes()
    with pytest.raises(UserError, match="exists with other content"):
        import_(good, out)
    assert (out / "results.jsonl").read_bytes() == results


def test_import_never_writes_through_a_link_out_of_the_folder(tmp_path, good, scratch):
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out.mkdir()
    (out / "predictions").symlink_to(elsewhere)
    with pytest.raises(UserError, match="leads outside"):
        import_(good, out)
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ["predictions"]


def test_a_bundle_that_changes_after_its_check_writes_nothing(tmp_path, good, scratch):
    entries = members(good)
    info, data = entries[-1]
    entries[-1] = (info, data[:-1] + bytes([data[-1] ^ 1]))
    changed = pack(tmp_path / "changed.tar.gz", entries).read_bytes()
    out = tmp_path / "out"
    with bundle.opened(good) as opened:
        with open(good, "r+b") as handle:  # rewritten in place: the open bundle reads the new bytes
            handle.write(changed)
            handle.truncate()
        out.mkdir()
        with pytest.raises(UserError, match="changed while it was imported; nothing of it was written"):
            bundle.import_into(opened, out)
    assert [p for p in out.rglob("*") if not p.is_dir()] == []


# --------------------------------------------------------------------------------------------------- export's input
def test_export_refuses_a_missing_predictions_file(tmp_path):
    run = results_folder(tmp_path / "run", [0])
    next((run / "predictions").iterdir()).unlink()
    with pytest.raises(UserError, match=r"saved predictions .* no such file") as caught:
        bundle.export([run], tmp_path / "b.tar.gz", prompts_from=tmp_path)
    assert "\n" not in str(caught.value) and not (tmp_path / "b.tar.gz").exists()


def test_export_finds_a_relative_prompt_file_where_the_run_started(tmp_path, monkeypatch):
    run = results_folder(tmp_path / "run", [0])
    monkeypatch.chdir(run)  # not where the run started: p.yaml is one folder up
    with pytest.raises(UserError, match="not found at .*; export from the folder the run was started in"):
        bundle.export([run], tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()
    assert bundle.export([run], tmp_path / "b.tar.gz", prompts_from=tmp_path).prompt_files


def test_export_refuses_results_that_disagree(tmp_path):
    one, two = results_folder(tmp_path / "a" / "run", [0]), results_folder(tmp_path / "b" / "run", [0], acc=0.9)
    with pytest.raises(UserError, match="has different results"):
        bundle.export([one, two], tmp_path / "b.tar.gz", prompts_from=tmp_path / "a")


# --------------------------------------------------------------------------------------------------- bad bundles
def test_a_member_with_a_wrong_digest(tmp_path, good, scratch):
    entries = members(good)
    info, data = entries[-1]
    entries[-1] = (info, bytes([data[0] ^ 1]) + data[1:])  # same size, one bit flipped
    refused(pack(tmp_path / "bad.tar.gz", entries), tmp_path / "out", scratch, "does not match its sha256", "tampered")


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "unlisted"])
def test_a_member_named_dot_dot(tmp_path, good, scratch, listed):
    entries = members(good) + [(member("../x"), b"escape")]
    entries = with_manifest(entries) if listed else entries
    refused(pack(tmp_path / "bad.tar.gz", entries), tmp_path / "out", scratch, "'../x'", "'..'")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "unlisted"])
def test_an_absolute_member_name(tmp_path, good, scratch, listed):
    entries = members(good) + [(member(str(tmp_path / "abs")), b"escape")]
    entries = with_manifest(entries) if listed else entries
    refused(pack(tmp_path / "bad.tar.gz", entries), tmp_path / "out", scratch, "absolute path")
    assert not (tmp_path / "abs").exists()


@pytest.mark.parametrize("kind, what", [(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"),
                                        (tarfile.DIRTYPE, "folder"), (tarfile.FIFOTYPE, "FIFO"),
                                        (tarfile.CHRTYPE, "device")])
def test_a_member_that_is_not_a_regular_file(tmp_path, good, scratch, kind, what):
    entries = members(good)
    entries.insert(2, (member("predictions/link.npz", kind, "/etc/passwd"), b""))
    refused(pack(tmp_path / "bad.tar.gz", entries), tmp_path / "out", scratch, what, "regular files only")


def test_a_bundle_from_a_newer_schema(tmp_path, good, scratch):
    entries = with_manifest(members(good), lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    refused(pack(tmp_path / "new.tar.gz", entries), tmp_path / "out", scratch, "made by a newer hica-bench",
            f"results schema {SCHEMA_VERSION + 1}; this hica-bench", f"reads up to {SCHEMA_VERSION}", "upgrade hica-bench")


def test_a_bundle_of_a_newer_format(tmp_path, good, scratch):
    entries = with_manifest(members(good), lambda m: m.update(bundle_version=bundle.BUNDLE_VERSION + 1))
    refused(pack(tmp_path / "new.tar.gz", entries), tmp_path / "out", scratch, "made by a newer hica-bench",
            "bundle format")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_a_truncated_bundle(tmp_path, good, scratch, keep):
    data = good.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[:int(len(data) * keep)])
    refused(tmp_path / "cut.tar.gz", tmp_path / "out", scratch, "truncated or damaged")


def test_a_bundle_missing_its_gzip_trailer(tmp_path, good, scratch):
    (tmp_path / "cut.tar.gz").write_bytes(good.read_bytes()[:-4])  # every member whole, the length check gone
    refused(tmp_path / "cut.tar.gz", tmp_path / "out", scratch, "truncated or damaged")


def test_a_member_the_manifest_does_not_list(tmp_path, good, scratch):
    entries = members(good) + [(member("predictions/extra.npz"), b"more")]
    refused(pack(tmp_path / "bad.tar.gz", entries), tmp_path / "out", scratch, "'predictions/extra.npz'",
            "does not list")


def test_a_member_the_manifest_lists_is_missing(tmp_path, good, scratch):
    entries = members(good)
    refused(pack(tmp_path / "bad.tar.gz", entries[:-1]), tmp_path / "out", scratch, entries[-1][0].name, "lacks")


def test_a_member_of_another_size_than_listed(tmp_path, good, scratch):
    entries = members(good)
    entries[-1] = (entries[-1][0], entries[-1][1] + b"x")
    refused(pack(tmp_path / "bad.tar.gz", entries), tmp_path / "out", scratch, "manifest says")


def test_a_member_given_twice(tmp_path, good, scratch):
    entries = members(good)
    refused(pack(tmp_path / "bad.tar.gz", entries + [entries[-1]]), tmp_path / "out", scratch, "twice")


def test_a_member_outside_the_layout(tmp_path, good, scratch):
    entries = members(good) + [(member("run-me.sh"), b"#!/bin/sh\n")]
    refused(pack(tmp_path / "bad.tar.gz", with_manifest(entries)), tmp_path / "out", scratch, "outside a bundle's layout")


def test_the_manifest_must_come_first(tmp_path, good, scratch):
    entries = members(good)
    refused(pack(tmp_path / "bad.tar.gz", entries[1:] + entries[:1]), tmp_path / "out", scratch, "first member")


def test_a_record_naming_predictions_the_bundle_lacks(tmp_path, good, scratch):
    entries = members(good)
    entries = [e for e in entries if not e[0].name.startswith("predictions/")]
    refused(pack(tmp_path / "bad.tar.gz", with_manifest(entries)), tmp_path / "out", scratch,
            "which the bundle does not hold")


def test_a_record_naming_another_cells_predictions(tmp_path, good, scratch):
    """Each record names its own cell's file: one naming another's would overwrite that cell's predictions in --out."""
    entries = members(good)
    records = [json.loads(line) for line in entries[1][1].decode().splitlines()]
    records[0]["predictions"] = records[1]["predictions"]
    entries[1] = (entries[1][0], "".join(json.dumps(r) + "\n" for r in records).encode())
    entries = [e for e in entries if e[0].name != f"predictions/{records[0]['cell_id']}.npz"]
    refused(pack(tmp_path / "bad.tar.gz", with_manifest(entries)), tmp_path / "out", scratch,
            f"not its own cell's (predictions/{records[0]['cell_id']}.npz)")


def test_export_never_writes_over_what_it_reads(tmp_path):
    folder = results_folder(tmp_path / "run", [0])
    before = (folder / "results.jsonl").read_bytes()
    for target in (folder / "results.jsonl", tmp_path / "p.yaml"):
        with pytest.raises(UserError, match="the bundle is made of; write the bundle elsewhere"):
            bundle.export([folder], target, prompts_from=tmp_path)
    assert (folder / "results.jsonl").read_bytes() == before


def test_results_the_manifest_miscounts(tmp_path, good, scratch):
    entries = with_manifest(members(good), lambda m: m.update(cells=5))
    refused(pack(tmp_path / "bad.tar.gz", entries), tmp_path / "out", scratch, "holds 2 cells but its manifest says 5")


def test_data_after_the_archive(tmp_path, good, scratch):
    raw = gzip.decompress(good.read_bytes())
    (tmp_path / "bad.tar.gz").write_bytes(gzip.compress(raw + b"junk" * 200))
    refused(tmp_path / "bad.tar.gz", tmp_path / "out", scratch, "does not end where its tar archive ends")


# mtime=0: a fixed gzip header, so the parameter (and the test's id) is the same in every pytest-xdist worker (with
# the time in it, two workers collecting in different seconds saw different tests and the run stopped)
@pytest.mark.parametrize("content", [b"", b"not a bundle at all", gzip.compress(b"not a tar" * 100, mtime=0)],
                         ids=["empty", "text", "gzip-not-tar"])
def test_not_a_bundle(tmp_path, scratch, content):
    (tmp_path / "no.tar.gz").write_bytes(content)
    refused(tmp_path / "no.tar.gz", tmp_path / "out", scratch)


def test_a_plain_tar_without_gzip(tmp_path, good, scratch):
    (tmp_path / "plain.tar").write_bytes(gzip.decompress(good.read_bytes()))
    refused(tmp_path / "plain.tar", tmp_path / "out", scratch, "not a whole gzip-compressed tar")


def test_a_fifo_is_refused_without_waiting_on_it(tmp_path, scratch):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UserError, match="not a regular file"):
        import_(tmp_path / "fifo", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_header_too_large_to_read(tmp_path, good, scratch):
    entries = members(good) + [(member("predictions/" + "n" * (2 << 20)), b"x")]  # a 2 MiB pax header
    refused(pack(tmp_path / "bad.tar.gz", entries), tmp_path / "out", scratch, "tar header of more than")


def test_the_limits_on_members_and_bytes(tmp_path, good, scratch, monkeypatch):
    monkeypatch.setattr(bundle, "MAX_MEMBERS", 3)
    refused(good, tmp_path / "out", scratch, "at most 2 entries")
    monkeypatch.setattr(bundle, "MAX_MEMBERS", 100)
    monkeypatch.setattr(bundle, "MAX_TOTAL_BYTES", 4000)
    refused(good, tmp_path / "out", scratch, "more than the 4,000 bytes a bundle may hold")
    monkeypatch.setattr(bundle, "MAX_TOTAL_BYTES", 1 << 30)
    monkeypatch.setattr(bundle, "MAX_MEMBER_BYTES", 500)
    refused(good, tmp_path / "out", scratch, "more than the 500 such a member may have")


@pytest.mark.parametrize("name, problem", [("../x", "'..'"), ("/x", "absolute"), ("a\\b", "backslash"),
                                           ("predictions/a/b", "layout"), ("predictions/", "empty"),
                                           ("prompts/xyz/p.yaml", "layout"), ("predictions/\x1b[2J", "control"),
                                           ("predictions/./x", "'.'"), ("C:/x", "absolute")])
def test_names_a_bundle_may_not_hold(name, problem):
    assert problem in bundle.name_problem(name)


def test_names_a_bundle_holds():
    for name in ("manifest.json", "results.jsonl", "suite/paper.toml", "prompts/0123456789ab/busi.yaml",
                 "predictions/0de852b812e7707f53f1.npz"):
        assert bundle.name_problem(name) is None

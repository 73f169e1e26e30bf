"""Hostile input, round three (issue 31): hangs (class 5), unbounded input (class 2) and wrong data accepted silently
(class 4) in suite files, prompt files, results files and folders of images. Each case is one line on stderr with
exit 2 (or the documented warning), never a hang (pytest-timeout), a traceback or a message that echoes the whole
unbounded value; every case runs in this process through the CLI's entry point. Each ``run`` case writes to an
``--out`` folder that already holds a finished run (the ``out`` fixture): afterwards its results file is unchanged or
only appended to, and when the case appended nothing every file the run had published is byte for byte the same."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TEST_PLUGINS, invoke, prototype_run

pytestmark = pytest.mark.timeout(120)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert len(lines[0]) < 700, lines[0][:300]  # never the whole unbounded value
    return lines[0]


@pytest.fixture(autouse=True)
def _plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, medmnist_root) -> Path:
    """A finished run (prototype, 1 shot, 2 seeds, real BreastMNIST) with its leaderboards and report."""
    base = tmp_path_factory.mktemp("finished")
    prototype_run(medmnist_root, base / "cache", base / "out", "0,1")
    return base / "out"


@pytest.fixture
def out(tmp_path, finished):
    """A copy of the finished run for a hostile case to write into; checks after the case that nothing it held was
    lost: results only appended to, and every published file intact when nothing was appended."""
    target = tmp_path / "o"
    shutil.copytree(finished, target)
    before = {path.relative_to(target): path.read_bytes() for path in target.rglob("*") if path.is_file()}
    yield target
    results = (target / "results.jsonl").read_bytes()
    assert results.startswith(before[Path("results.jsonl")]), "finished results were rewritten"
    if results == before[Path("results.jsonl")]:
        changed = [str(rel) for rel, data in before.items() if (target / rel).read_bytes() != data]
        assert not changed, f"published files changed by a case that added no result: {changed}"


def _fifo(path):
    os.mkfifo(path)
    return path


def _socket(path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    return path


def _images(root, classes=("benign", "malignant"), per_class=6, size=28):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _run(tmp_path, medmnist_root, *args):
    return invoke("-p", "pixel_encoder", "run", "--no-report", "--encoder", "pixels", "--methods", "prototype", "--shots", "1",
                  "--seeds", "0", "--data-root", medmnist_root, "--cache-dir", tmp_path / "cache", *args)


# --------------------------------------------------------------------------- class 5: read only regular files


SPECIAL = {"fifo": _fifo, "socket": _socket}


@pytest.mark.parametrize("what, suffix", [("fifo", ".toml"), ("fifo", ".yaml"), ("socket", ".toml"),
                                          ("urandom", ".toml"), ("zero", ".yaml"), ("null", ".toml")])
def test_a_suite_that_is_no_regular_file_is_one_line(what, suffix, tmp_path, out):
    suite = tmp_path / f"suite{suffix}"
    if what in SPECIAL:
        SPECIAL[what](suite)
    else:
        suite.symlink_to(f"/dev/{what}")
    code, _, err = invoke("run", "--suite", suite, "--out", out)
    assert code == 2 and "is not a regular file" in _one_line(err)


@pytest.mark.parametrize("what", ["fifo", "urandom"])
def test_a_prompt_file_that_is_no_regular_file_is_one_line(what, tmp_path, medmnist_root, out):
    prompts = tmp_path / "prompts.yaml"
    _fifo(prompts) if what == "fifo" else prompts.symlink_to("/dev/urandom")
    code, _, err = _run(tmp_path, medmnist_root, "--datasets", f"breastmnist:prompts={prompts}", "--out", out)
    assert code == 2 and "is not a regular file" in _one_line(err)


@pytest.mark.parametrize("what", ["fifo", "socket"])
def test_a_results_file_that_is_no_regular_file_is_one_line(what, tmp_path, medmnist_root):
    (tmp_path / "out").mkdir()
    SPECIAL[what](tmp_path / "out" / "results.jsonl")
    code, _, err = _run(tmp_path, medmnist_root, "--datasets", "breastmnist", "--out", tmp_path / "out")
    assert code == 2 and "is not a regular file" in _one_line(err)


@pytest.mark.parametrize("name", ["stuck.png", "stuck", "stuck.dcm", "sock.png"])
def test_a_fifo_or_socket_among_the_images_is_left_out_with_a_warning(name, tmp_path, medmnist_root, out):
    root = _images(tmp_path / "data")
    (_socket if name.startswith("sock") else _fifo)(root / "benign" / name)
    code, _, err = _run(tmp_path, medmnist_root, "--datasets", f"folder:root={root}", "--out", out)
    assert code == 0, err
    assert f"benign/{name} (not a regular file)" in " ".join(err.split())  # the warning names it; the run went on


# --------------------------------------------------------------------------- class 2: unbounded input


def _deep(suffix: str, depth: int = 100_000) -> str:
    if suffix == ".toml":
        return "shots = " + "[" * depth + "]" * depth + "\n"
    if suffix == ".json":
        return '{"templates": ' + "[" * depth + "]" * depth + "}"
    return "shots: " + "[" * depth + "]" * depth + "\n"


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_a_suite_nested_100000_deep_is_one_line(suffix, tmp_path, out):
    suite = tmp_path / f"deep{suffix}"
    suite.write_text(_deep(suffix))
    code, _, err = invoke("run", "--suite", suite, "--out", out)
    assert code == 2 and ("nests values deeper than" in _one_line(err) or "not valid" in err)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_prompt_file_nested_100000_deep_is_one_line(suffix, tmp_path, medmnist_root, out):
    prompts = tmp_path / f"deep{suffix}"
    prompts.write_text(_deep(suffix))
    code, _, err = _run(tmp_path, medmnist_root, "--datasets", f"breastmnist:prompts={prompts}", "--out", out)
    assert code == 2 and ("nests values deeper than" in _one_line(err) or "not valid" in err)


BOMB = ("shots: [&a [1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
        "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], "
        "&g [*f,*f,*f,*f,*f,*f,*f,*f,*f], &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]]\n")


def test_a_yaml_alias_bomb_is_one_short_line(tmp_path, out):
    suite = tmp_path / "bomb.yaml"
    suite.write_text(BOMB)
    code, _, err = invoke("run", "--suite", suite, "--out", out)
    assert code == 2 and "shots must be a non-empty list of whole numbers" in _one_line(err)


@pytest.mark.parametrize("template", ["{:>99999999999}", "a photo of {!r}", "{0} and {}", "{x}", "{} {}", "{:d}",
                                      "x" * 200_000 + "{}"])
def test_a_template_that_asks_for_too_much_is_one_line(template, tmp_path, medmnist_root, out):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"templates": [%s]}' % __import__("json").dumps(template))
    code, _, err = _run(tmp_path, medmnist_root, "--datasets", f"breastmnist:prompts={prompts}", "--out", out)
    assert code == 2 and "template" in _one_line(err)


@pytest.mark.parametrize("option", ["--shots", "--seeds", "--datasets", "--methods"])
def test_a_200000_character_flag_is_one_short_line(option, tmp_path, out):
    code, _, err = invoke("run", "--out", out, option, "1," * 100_000 if option in ("--shots", "--seeds") else "x" * 200_000 + ",,")
    assert code == 2
    _one_line(err)


def test_a_suite_file_larger_than_a_megabyte_is_one_line(tmp_path, out):
    suite = tmp_path / "large.toml"
    suite.write_text("# " + "x" * (2 << 20) + "\nshots = [1]\n")
    code, _, err = invoke("run", "--suite", suite, "--out", out)
    assert code == 2 and "more than the" in _one_line(err)


# --------------------------------------------------------------------------- class 4: wrong data accepted silently


def test_a_yaml_suite_with_a_key_given_twice_is_refused(tmp_path, out):
    suite = tmp_path / "twice.yaml"
    suite.write_text("shots: [1]\nseeds: [0]\nshots: [5]\n")
    code, _, err = invoke("run", "--suite", suite, "--out", out)
    assert code == 2 and "the key 'shots' is given twice" in _one_line(err)


@pytest.mark.parametrize("link", ["class-to-root", "class-to-class", "hard-link"])
def test_an_image_reached_under_two_names_is_refused(link, tmp_path, medmnist_root, out):
    root = _images(tmp_path / "data")
    if link == "class-to-root":
        (root / "loop").symlink_to(root, target_is_directory=True)
    elif link == "class-to-class":
        (root / "also-benign").symlink_to(root / "benign", target_is_directory=True)
    else:
        os.link(root / "benign" / "0.png", root / "malignant" / "copy.png")
    code, _, err = _run(tmp_path, medmnist_root, "--datasets", f"folder:root={root}", "--out", out)
    assert code == 2 and "are the same file (a link)" in _one_line(err)


def test_a_subfolder_that_cannot_be_read_is_refused_not_skipped(tmp_path, medmnist_root, out, monkeypatch):
    root = _images(tmp_path / "data")
    hidden = root / "benign" / "more"
    _images(hidden, classes=("x",))
    hidden.chmod(0)
    if os.geteuid() == 0:  # root reads every folder whatever its mode: the kernel's answer to anyone else, for it
        scandir = os.scandir

        def denied(path="."):
            if Path(path) == hidden / "x" or Path(path) == hidden:
                raise PermissionError(13, "Permission denied", str(path))
            return scandir(path)

        monkeypatch.setattr(os, "scandir", denied)
    try:
        code, _, err = _run(tmp_path, medmnist_root, "--datasets", f"folder:root={root}", "--out", out)
    finally:
        hidden.chmod(stat.S_IRWXU)
    assert code == 2 and "cannot read folder" in _one_line(err)


@pytest.mark.parametrize("row, message", [
    ("0.png," + "x" * 200_000, "is not a CSV this reads"),
    ("0.png," + "x" * 1000, "a label of 1,000 characters; at most 200"),
    ("0\0.png,a", "NUL"),
    ("x" * 5000 + ".png,a", "a path of 5,004 characters"),
])
def test_a_manifest_with_an_unbounded_or_nul_field_is_one_line(row, message, tmp_path, medmnist_root, out):
    _images(tmp_path / "data")
    manifest = tmp_path / "data" / "list.csv"
    manifest.write_text(f"path,label\n{row}\nbenign/1.png,benign\nmalignant/0.png,malignant\n")
    code, _, err = _run(tmp_path, medmnist_root, "--datasets", f"folder:root={manifest}", "--out", out)
    assert code == 2 and message in _one_line(err)


@pytest.mark.parametrize("value", [" , ", ",", " ", "a,,b"])
def test_an_allow_list_that_names_nothing_is_refused(value, monkeypatch):
    monkeypatch.setenv("HICA_BENCH_PLUGINS", value)
    code, _, err = invoke("list", "method")
    assert code == 2 and "$HICA_BENCH_PLUGINS takes a comma-separated list of distribution names" in _one_line(err)


def _leaderboard_csv(tmp_path, medmnist_root) -> tuple:
    code, _, err = _run(tmp_path, medmnist_root, "--datasets", "breastmnist", "--out", tmp_path / "out", "--no-report")
    assert code == 0, err
    return tmp_path / "out" / "leaderboard.csv", (tmp_path / "out" / "leaderboard.csv").read_text().splitlines()


@pytest.mark.parametrize("column, value", [("k", "inf"), ("k", "-1"), ("n", "0"), ("acc_mean", "7.5"),
                                           ("acc_mean", "inf"), ("auc_std", "-3"),
                                           ("encoder_images_per_s_mean", "fast"), ("reference_images_per_s_mean", "-2")])
def test_a_baseline_csv_with_impossible_numbers_is_one_line(column, value, tmp_path, medmnist_root):
    path, lines = _leaderboard_csv(tmp_path, medmnist_root)
    header = lines[0].split(",")
    if column not in header:
        pytest.skip(f"{column} is not a column of this leaderboard")
    import csv
    import io

    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    rows[1][header.index(column)] = value
    baseline = tmp_path / "baseline.csv"
    with baseline.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    code, _, err = invoke("check", "--baseline", baseline, "--results", tmp_path / "out")
    assert code == 2 and "malformed row" in _one_line(err)


@pytest.mark.parametrize("metric, value", [("acc", "Infinity"), ("acc", "7.5"), ("auc", "-3"), ("ece", "NaN"),
                                           ("balanced_acc", "-0.1")])
def test_a_record_with_impossible_metrics_is_not_published(metric, value, tmp_path, medmnist_root):
    _leaderboard_csv(tmp_path, medmnist_root)
    results = tmp_path / "out" / "results.jsonl"
    import json as _json

    record = _json.loads(results.read_text().splitlines()[0])
    text = _json.dumps(record).replace(f'"{metric}": {_json.dumps(record["metrics"][metric])}', f'"{metric}": {value}', 1)
    results.write_text(text + "\n")
    published = {path: path.read_bytes() for path in (tmp_path / "out").glob("leaderboard*")}
    for command in (["leaderboard", tmp_path / "out"], ["report", tmp_path / "out", "--out", tmp_path / "r"]):
        code, _, err = invoke(*command)
        assert code == 2 and f"metrics.{metric} must be a fraction in [0, 1]" in _one_line(err)
    assert published and all(path.read_bytes() == data for path, data in published.items())  # the old ones stand


def test_report_bootstrap_without_saved_predictions_says_so(tmp_path, medmnist_root):
    _leaderboard_csv(tmp_path, medmnist_root)  # a run without --save-predictions
    code, _, err = invoke("report", tmp_path / "out", "--out", tmp_path / "r", "--bootstrap", "100")
    assert code == 2 and "--bootstrap needs the test predictions each cell saved" in _one_line(err)


@pytest.mark.parametrize("content", [b"not an npz", b"PK\x03\x04broken", "pickle", "other-layout", "nan"])
def test_report_bootstrap_on_predictions_that_are_not_ours_is_one_line(content, tmp_path, medmnist_root):
    code, _, err = _run(tmp_path, medmnist_root, "--datasets", "breastmnist", "--out", tmp_path / "out", "--no-report",
                        "--save-predictions")
    assert code == 0, err
    (saved,) = (tmp_path / "out" / "predictions").glob("*.npz")
    if content == "pickle":
        np.save(saved.with_suffix(".tmp.npy"), np.array([object()], dtype=object), allow_pickle=True)
        saved.write_bytes(saved.with_suffix(".tmp.npy").read_bytes())
    elif content == "other-layout":
        np.savez(saved.with_suffix(""), labels=np.zeros(3), proba=np.zeros(3))
    elif content == "nan":
        np.savez(saved.with_suffix(""), labels=np.zeros(3, int), proba=np.full((3, 2), np.nan))
    else:
        saved.write_bytes(content)
    code, _, err = invoke("report", tmp_path / "out", "--out", tmp_path / "r", "--bootstrap", "100")
    assert code == 2 and "saved predictions" in _one_line(err) and "cannot be read" in err


@pytest.mark.parametrize("case", ["nan-float-tiff", "inf-float-tiff", "long-pad", "tall-pad"])
def test_an_image_that_cannot_be_scaled_or_squared_is_a_bad_image(case, tmp_path, medmnist_root, out):
    root = _images(tmp_path / "data")
    bad = root / "benign" / ("odd.tif" if "tiff" in case else "odd.png")
    if "tiff" in case:
        values = np.random.default_rng(0).random((28, 28)).astype(np.float32)
        values[3, 3] = np.nan if case.startswith("nan") else np.inf
        Image.fromarray(values).save(bad)
    else:
        Image.fromarray(np.zeros((4, 300_000) if case == "long-pad" else (300_000, 4), np.uint8)).save(bad)
    args = ("--datasets", f"folder:root={root}:resize=pad", "--out", out)
    code, _, err = _run(tmp_path, medmnist_root, *args)
    assert code == 2 and "odd." in _one_line(err)
    assert ("NaN or infinite" if "tiff" in case else "pad square would be 300,000² pixels") in err
    code, _, err = _run(tmp_path, medmnist_root, *args, "--skip-bad-images")  # the flag leaves it out
    assert code == 0, err


def test_skipping_bad_images_must_not_leave_a_class_without_test_images(tmp_path, medmnist_root, out):
    root = _images(tmp_path / "data")
    for path in (root / "malignant").iterdir():
        path.write_bytes(b"not an image")
    code, _, err = _run(tmp_path, medmnist_root, "--datasets", f"folder:root={root}", "--skip-bad-images",
                        "--out", out)
    assert code == 2 and "class malignant has no" in _one_line(err) and "--skip-bad-images" in err

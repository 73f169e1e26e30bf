"""The bad-input catalogue: every user mistake is one line on stderr, exit code 2, no traceback, and the
finished results already in ``--out`` are byte for byte what they were.

Cases run the console script's entry point (``hica_bench.cli:main``) in this process, which is the same code
as the installed ``hica-bench`` minus interpreter start-up (an unexpected exception would escape ``main`` and
fail the test with its traceback); tests/test_cli.py runs a few through the real executable.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import TEST_PLUGINS, invoke, prototype_run, write_medmnist_npz
from hica_bench.registry import ALLOW_ENV, DISABLE_AUTOLOAD_ENV
from hica_bench.results import SCHEMA_VERSION


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    monkeypatch.setenv(ALLOW_ENV, "")  # --plugins-only writes it; restored after each test
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)


@pytest.fixture(scope="module")
def finished(medmnist_root, tmp_path_factory) -> Path:
    """A results folder holding one finished cell."""
    out = tmp_path_factory.mktemp("finished")
    prototype_run(medmnist_root, out / "cache", out, "0")
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    return out / "results.jsonl"


# --------------------------------------------------------------------------- the catalogue


def _npz(change: Callable[[dict], None] | None = None, truncate: bool = False):
    """Setup: a bloodmnist.npz (8 classes, RGB) in MedMNIST format under {data}, altered by ``change``."""
    def setup(paths: dict[str, Path]) -> None:
        path = write_medmnist_npz(paths["data"] / "bloodmnist.npz", n_classes=8, rgb=True, counts=(40, 8, 16))
        if change:
            with np.load(path) as npz:
                arrays = dict(npz)
            change(arrays)
            np.savez_compressed(path, **arrays)
        if truncate:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return setup


def _newer_schema(paths):
    record = json.loads(paths["results"].read_text().splitlines()[0])
    record["schema_version"] += 1
    with paths["results"].open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _not_results(paths):
    with paths["results"].open("a") as handle:
        handle.write('{"hello": "world"}\n')


def _plain_file(name):
    def setup(paths):
        (paths["tmp"] / name).write_text("a file, not a folder\n")
    return setup


def _list_needs_plugin(paths):
    (paths["tmp"] / "list_needs.py").write_text(
        "from hica_bench import hookimpl\nfrom hica_bench.interfaces import PluginSpec\n\n"
        "class ListNeeds:\n    needs = ['image_features']\n\n"
        "@hookimpl\ndef hica_bench_methods():\n    return [PluginSpec('method', 'list-needs', 'needs as a list', ListNeeds)]\n")


def _duplicate_plugin(paths):
    (paths["tmp"] / "dup_prototype.py").write_text(
        "from hica_bench import hookimpl\nfrom hica_bench.interfaces import PluginSpec\n\n"
        "class Prototype:\n    needs = frozenset({'image_features'})\n\n"
        "@hookimpl\ndef hica_bench_methods():\n    return [PluginSpec('method', 'prototype', 'a second prototype', Prototype)]\n")


@dataclass
class Case:
    id: str
    args: list[str]  #: appended to a valid `run` command (the last value of an option wins), or a whole command
    message: str  #: part of the one line printed
    root: list[str] = field(default_factory=list)  #: options before the command
    setup: Callable[[dict[str, Path]], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    command: bool = False  #: ``args`` is the whole command, not additions to `run`


CASES = [
    # names, with suggestions
    Case("unknown-dataset", ["--datasets", "breastmnst"], "did you mean breastmnist"),
    Case("unknown-method", ["--methods", "linear-prob"], "did you mean linear-probe"),
    Case("unknown-encoder", ["--encoder", "effnet-lite0"], "unknown encoder 'effnet-lite0'; did you mean effnet-lite0-minilm"),
    Case("unknown-command", ["rnu"], "No such command 'rnu'. Did you mean 'run'?", command=True),
    Case("unknown-option", ["--shot", "1"], "No such option: --shot"),
    Case("unknown-kind", ["list", "widgets"], "unknown kind 'widgets'", command=True),
    # shots, seeds, grid
    Case("shots-zero", ["--shots", "0"], "--shots must be >= 1"),
    Case("shots-not-numbers", ["--shots", "1,x"], "--shots takes comma-separated whole numbers"),
    Case("shots-empty", ["--shots", ""], "--shots takes comma-separated whole numbers"),
    Case("shots-above-smallest-class", ["--shots", "1,500"], "500 shots is more than breastmnist's smallest train class"),
    Case("seeds-empty-item", ["--seeds", "0,,1"], "--seeds takes comma-separated whole numbers"),
    Case("seeds-negative", ["--seeds", "-1"], "--seeds must be between 0 and 4294967295, got -1"),
    Case("seeds-too-large", ["--seeds", "4294967296"], "--seeds must be between 0 and 4294967295, got 4294967296"),
    Case("empty-grid", ["--methods", ""], "--methods takes a comma-separated list of names; got ''"),
    Case("method-twice", ["--methods", "prototype,prototype"], "--methods names something twice"),
    # method options
    Case("option-wrong-type", ["--methods", "prototype:temperature=hot"], "option temperature='hot' of method 'prototype' must be a finite number"),
    Case("option-out-of-range", ["--methods", "hica:noise=2"], "option noise=2 of method 'hica' must be within [0, 1]"),
    Case("option-nan", ["--methods", "prototype:temperature=nan"], "must be a finite number"),
    Case("option-unknown", ["--methods", "prototype:tau=1"], "has no option 'tau' (options: temperature)"),
    Case("option-twice", ["--methods", "prototype:temperature=1:temperature=2"], "option 'temperature' given twice"),
    Case("option-without-value", ["--methods", "prototype:temperature"], "malformed name 'prototype:temperature'"),
    Case("encoder-option-unknown", ["--encoder", "pixels:size=32"], "encoder 'pixels' has no option 'size' (options: side)"),
    # other options
    Case("device", ["--device", "tpu"], "--device must be auto, cpu or cuda"),
    # encoder execution (issue 8)
    Case("backend-unknown", ["--backend", "tensorrt"], "--backend must be one of auto, eager, onnxruntime; got 'tensorrt'"),
    Case("batch-size-negative", ["--batch-size", "-1"], "--batch-size must be 0 (choose by measurement) to 4096, got -1"),
    Case("threads-negative", ["--threads", "-2"], "--threads must be 0 (choose by measurement) to 1024, got -2"),
    Case("threads-unbounded", ["--threads", "100000"], "--threads must be 0 (choose by measurement) to 1024, got 100000"),
    Case("batch-size-unbounded", ["--batch-size", "10000000"], "--batch-size must be 0 (choose by measurement) to 4096"),
    Case("size-unbounded", ["--size", "10000000"], "--size must be 1 to 2048 pixels, got 10000000"),
    Case("backend-onnxruntime-cannot-run", ["--backend", "onnxruntime"],
         "--backend onnxruntime cannot run encoder 'test-pixels-16px-v1': the encoder does not expose its image module"),
    Case("size-not-a-number", ["--size", "big"], "Invalid value for '--size'"),
    Case("size-not-offered", ["--size", "32"], "breastmnist comes in sizes 28, 64, 128, 224; got --size 32"),
    Case("max-test-zero", ["--max-test", "0"], "--max-test must be >= 1"),
    Case("cell-timeout-zero", ["--cell-timeout", "0"], "--cell-timeout must be a positive number of seconds"),
    Case("cell-timeout-infinite", ["--cell-timeout", "inf"], "--cell-timeout must be a positive number of seconds"),
    # data
    Case("data-root-missing", ["--data-root", "{tmp}/nowhere"], "does not exist or is not a directory"),
    Case("file-missing-offline", ["--data-root", "{tmp}", "--no-download"], "breastmnist.npz is missing from"),
    Case("npz-missing-key", ["--datasets", "bloodmnist", "--data-root", "{data}"], "lacks the arrays test_labels",
         setup=_npz(lambda a: a.pop("test_labels"))),
    Case("npz-wrong-dtype", ["--datasets", "bloodmnist", "--data-root", "{data}"], "train_images has dtype float32",
         setup=_npz(lambda a: a.update(train_images=a["train_images"].astype(np.float32)))),
    Case("npz-count-mismatch", ["--datasets", "bloodmnist", "--data-root", "{data}"], "40 images but 39 labels",
         setup=_npz(lambda a: a.update(train_labels=a["train_labels"][:-1]))),
    Case("npz-labels-out-of-range", ["--datasets", "breastmnist,bloodmnist", "--data-root", "{data}"],
         "test_labels has values outside 0..7", setup=_npz(lambda a: a["test_labels"].__setitem__(0, 9))),
    Case("npz-truncated", ["--datasets", "bloodmnist", "--data-root", "{data}"], "bloodmnist.npz is not a readable .npz file",
         setup=_npz(truncate=True)),
    # folders and files
    Case("cache-dir-not-writable", ["--cache-dir", "{tmp}/a-file/cache"], "cache directory", setup=_plain_file("a-file")),
    Case("out-not-writable", ["--out", "{tmp}/a-file"], "--out folder", setup=_plain_file("a-file")),
    Case("results-newer-schema", [], f"was written by a newer hica-bench (schema {SCHEMA_VERSION + 1} > {SCHEMA_VERSION})",
         setup=_newer_schema),
    Case("results-not-a-results-file", [], ":2 is not a hica-bench result record", setup=_not_results),
    Case("leaderboard-missing-file", ["leaderboard", "{tmp}/none.jsonl"], "is neither a results file nor a folder", command=True),
    Case("leaderboard-several-without-out", ["leaderboard", "{results}", "{results}"], "give --out", command=True),
    Case("leaderboard-same-file-twice", ["leaderboard", "{results}", "{results}", "--out", "{tmp}/board"], "is given twice",
         command=True),
    # plugins
    Case("plugin-module-missing", [], "-p no_such_plugin: cannot import it (ModuleNotFoundError", root=["-p", "no_such_plugin"]),
    Case("plugin-module-raises", [], "-p broken_at_import: cannot import it (RuntimeError: deliberately broken plugin module)",
         root=["-p", "broken_at_import"]),
    Case("plugin-name-twice", [], "method 'prototype' is registered twice: by hica-bench-baselines and by -p dup_prototype",
         root=["-p", "dup_prototype"], setup=_duplicate_plugin),
    Case("allow-list-unknown", [], "--plugins-only names hica-bench-baselinez, which installs no hica_bench plugin",
         root=["--plugins-only", "hica-bench-medmnist,hica-bench-baselinez"]),
    Case("allow-list-and-autoload-off", [], "HICA_BENCH_DISABLE_PLUGIN_AUTOLOAD turns entry-point plugins off",
         root=["--plugins-only", "hica-bench-medmnist"], env={DISABLE_AUTOLOAD_ENV: "1"}),
    Case("method-needs-not-a-set", ["--methods", "list-needs"], "method list-needs: needs must be a frozenset of strings",
         root=["-p", "list_needs"], setup=_list_needs_plugin),
    Case("no-default-methods", ["--plugins-only", "hica-bench-medmnist,hica-bench-encoders", "run", "--out", "{tmp}/out"],
         "no installed plugin declares a default method; name methods with --methods", command=True),
    Case("hica-option-names-unknown-component", ["--methods", "hica:loss_local=nope"],
         "method 'hica' option loss_local=nope: unknown loss 'nope'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, finished, medmnist_root, tmp_path, monkeypatch):
    paths = {"tmp": tmp_path, "data": tmp_path / "data", "results": tmp_path / "out" / "results.jsonl"}
    paths["data"].mkdir()
    shutil.copy(medmnist_root / "breastmnist.npz", paths["data"])
    paths["results"].parent.mkdir()
    shutil.copy(finished, paths["results"])
    monkeypatch.syspath_prepend(str(tmp_path))
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.setup:
        case.setup(paths)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    fill = {k: str(v) for k, v in paths.items()}
    args = [a.format(**fill) for a in case.args]
    if not case.command:
        args = ["-p", "pixel_encoder", *case.root, "run", "--encoder", "pixels", "--datasets", "breastmnist", "--methods",
                "prototype", "--shots", "1,2", "--seeds", "0", "--data-root", str(medmnist_root),  # the 2-shot cell is pending
                "--cache-dir", str(tmp_path / "cache"), "--out", str(paths["results"].parent), *args]
    code, _, err = invoke(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert lines[0].startswith("hica-bench: error: ") and case.message in lines[0], lines[0]
    for path, content in before.items():  # nothing that was there is lost or changed
        assert path.read_bytes() == content, path
    assert paths["results"].read_bytes() == before[paths["results"]]

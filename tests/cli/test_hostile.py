"""Hostile input, class by class (issue 13): whatever is thrown at it, hica-bench answers with the exit code the README
promises, at most one line on stderr and never a traceback, and ``results.jsonl`` is unchanged or only appended to.

Most cases run the console script's entry point (``hica_bench.cli:main``) in this process, on the real BreastMNIST
file (or a copy of it made hostile) with the tiny ``pixels`` test encoder; property-based cases (Hypothesis) generate
corrupted files, records and option values. Full disks (a real tmpfs), signals, broken pipes and concurrent runs need
real processes and are in ``test_hostile_processes.py``.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEST_PLUGINS, invoke, prototype_run
from hica_bench.registry import ALLOW_ENV, load_registry
from hica_bench.results import SCHEMA_VERSION

FAST = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    monkeypatch.setenv(ALLOW_ENV, "")


@pytest.fixture(scope="module")
def finished(medmnist_root, tmp_path_factory) -> Path:
    """A results folder with two finished cells (prototype, k=1, seeds 0 and 1), and its feature cache."""
    root = tmp_path_factory.mktemp("finished")
    prototype_run(medmnist_root, root / "cache", root / "out", "0,1", "--backend", "eager", "--batch-size", "64",
                  "--threads", "2", "--no-channels-last", "--quiet")
    return root


@pytest.fixture
def work(finished, tmp_path) -> dict[str, Path]:
    """A copy of the finished folder (results, leaderboard, cache) to be made hostile."""
    shutil.copytree(finished / "out", tmp_path / "out")
    shutil.copytree(finished / "cache", tmp_path / "cache")
    (tmp_path / "data").mkdir()
    return {"tmp": tmp_path, "out": tmp_path / "out", "results": tmp_path / "out" / "results.jsonl",
            "cache": tmp_path / "cache", "data": tmp_path / "data"}


def run_args(work: dict[str, Path], data: Path, *extra: str) -> list[str]:
    """A run whose 2-shot cells are pending (the 1-shot ones are finished in ``work``)."""
    return ["-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist", "--methods", "prototype",
            "--shots", "1,2", "--seeds", "0,1", "--data-root", str(data), "--cache-dir", str(work["cache"]),
            "--out", str(work["out"]), "--backend", "eager", "--batch-size", "64", "--threads", "2", "--no-channels-last", "--quiet", *extra]


def answered(code_and_streams, expected: int | tuple[int, ...], results: Path | None = None, before: bytes | None = None,
             message: str | None = None) -> str:
    """The promise: the expected exit code, at most one line on stderr (exactly one on exit 2), no traceback, and
    the results file unchanged or only appended to. Returns the stderr line ('' when none)."""
    code, _, err = code_and_streams
    lines = [line for line in err.splitlines() if line.strip()]
    expected = (expected,) if isinstance(expected, int) else expected
    assert code in expected, (code, err)
    assert "Traceback" not in err and len(lines) <= 1, err
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("hica-bench: error: "), err
    if message is not None:
        assert lines and message in lines[0], (message, err)
    if results is not None and before is not None:
        after = results.read_bytes() if results.is_file() else b""
        assert after.startswith(before), "results.jsonl lost or changed a finished record"
    return lines[0] if lines else ""


# =========================================================================== 1. malformed data files


def real_arrays(medmnist_root: Path) -> dict[str, np.ndarray]:
    with np.load(medmnist_root / "breastmnist.npz") as npz:
        return dict(npz)


def stored_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)  # uncompressed: members are memory-mapped in place
    return path


def lie_about_rows(path: Path, member: str, extra_rows: int) -> None:
    """Rewrite the shape in ``member``'s .npy header (same header length), so it promises ``extra_rows`` more rows
    than the member stores."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{member}.npy")
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    header_len = struct.unpack("<H", raw[start + 8: start + 10])[0]
    header = raw[start + 10: start + 10 + header_len].decode("latin1")
    rows = int(header.split("'shape': (")[1].split(",")[0])
    body = header.replace(f"'shape': ({rows},", f"'shape': ({rows + extra_rows},").rstrip()
    assert len(body) < header_len, "the new shape must fit the old header"
    new = body.ljust(header_len - 1) + "\n"  # the same length: the padding absorbs the longer number
    raw[start + 10: start + 10 + header_len] = new.encode("latin1")
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("member, rows", [("train_images", 1), ("test_images", 500), ("train_labels", 7)])
def test_an_uncompressed_member_that_promises_more_rows_than_it_stores(work, medmnist_root, member, rows):
    path = stored_npz(work["data"] / "breastmnist.npz", real_arrays(medmnist_root))
    lie_about_rows(path, member, rows)
    before = work["results"].read_bytes()
    line = answered(invoke(*run_args(work, work["data"])), 2, work["results"], before)
    assert f"array '{member}'" in line and ("promises shape" in line or "unreadable" in line)


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("member", ["train_images", "test_labels"])
def test_a_member_that_is_not_an_npy_array(work, medmnist_root, compressed, member):
    arrays = real_arrays(medmnist_root)
    path = work["data"] / "breastmnist.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            if name == member:
                archive.writestr(f"{name}.npy", b"this is not an array at all\n" * 40)
            else:
                with archive.open(f"{name}.npy", "w") as handle:
                    np.lib.format.write_array(handle, array, allow_pickle=False)
    before = work["results"].read_bytes()
    line = answered(invoke(*run_args(work, work["data"])), 2, work["results"], before)
    assert str(path) in line and member in line


@settings(FAST, max_examples=15)
@given(cut=st.floats(0.0, 0.999))
def test_a_truncated_dataset_file(finished, medmnist_root, cut):
    with tempfile.TemporaryDirectory() as tmp:
        work = {"out": Path(tmp) / "out", "cache": Path(tmp) / "cache"}
        shutil.copytree(finished / "out", work["out"])
        data = Path(tmp) / "data"
        data.mkdir()
        whole = (medmnist_root / "breastmnist.npz").read_bytes()
        (data / "breastmnist.npz").write_bytes(whole[: int(cut * len(whole))])
        before = (work["out"] / "results.jsonl").read_bytes()
        line = answered(invoke(*run_args(work, data)), 2, work["out"] / "results.jsonl", before)
        assert "breastmnist.npz" in line


@settings(FAST, max_examples=15)
@given(where=st.floats(0.0, 0.999), flip=st.integers(1, 255))
def test_a_dataset_file_with_a_damaged_byte(finished, medmnist_root, where, flip):
    """Any byte of the real compressed file flipped: refused with one line, or (when the damage leaves a valid file)
    a run on what is now another dataset identity. Never a traceback, never a finished result lost."""
    with tempfile.TemporaryDirectory() as tmp:
        work = {"out": Path(tmp) / "out", "cache": Path(tmp) / "cache"}
        shutil.copytree(finished / "out", work["out"])
        data = Path(tmp) / "data"
        data.mkdir()
        raw = bytearray((medmnist_root / "breastmnist.npz").read_bytes())
        raw[int(where * len(raw))] ^= flip
        (data / "breastmnist.npz").write_bytes(bytes(raw))
        before = (work["out"] / "results.jsonl").read_bytes()
        answered(invoke(*run_args(work, data)), (0, 2), work["out"] / "results.jsonl", before)


@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_a_damaged_scratch_copy_is_made_again_not_blamed_on_the_dataset(work, medmnist_root, damage):
    shutil.copy(medmnist_root / "breastmnist.npz", work["data"] / "breastmnist.npz")  # compressed: read via a scratch copy
    shutil.rmtree(work["cache"] / "arrays")  # only this file's scratch copies
    first = answered(invoke(*run_args(work, work["data"])), 0)
    assert first == ""
    scratch = next(work["cache"].glob("arrays/breastmnist-*/train_images.npy"))
    raw = bytearray(scratch.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[-5] ^= 0x40  # one pixel of the last image
    scratch.write_bytes(bytes(raw))
    shutil.rmtree(work["cache"] / "features")  # so the features are computed again, from the scratch copy
    records = [json.loads(line) for line in work["results"].read_text().splitlines()]
    work["results"].write_text("".join(json.dumps(r) + "\n" for r in records[:2]))  # the 2-shot cells are pending again
    before = work["results"].read_bytes()
    line = answered(invoke(*run_args(work, work["data"])), 0, work["results"], before)
    assert "does not match breastmnist.npz (damaged or edited); making it again" in line
    again = [json.loads(line) for line in work["results"].read_text().splitlines()[2:]]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in records[2:]]  # the same numbers as from the clean copy


# =========================================================================== 2. the results file


def _results_case(work: dict[str, Path], command: str) -> list[str]:
    """The command that reads ``work``'s results file: a run that would append to it, ``leaderboard``, or ``check``
    with it as either side (the other side an intact copy, see :func:`_prepare`)."""
    intact = str(work["tmp"] / "copy.jsonl")
    return {"run": run_args(work, work["data"]),
            "leaderboard": ["leaderboard", str(work["results"]), "--out", str(work["tmp"] / "board")],
            "check-baseline": ["check", "--baseline", str(work["results"]), "--results", intact],
            "check-results": ["check", "--baseline", intact, "--results", str(work["results"])]}[command]


COMMANDS = ["run", "leaderboard", "check-baseline", "check-results"]


def _prepare(work, medmnist_root):
    shutil.copy(medmnist_root / "breastmnist.npz", work["data"] / "breastmnist.npz")
    shutil.copy(work["results"], work["tmp"] / "copy.jsonl")  # the other side of a check: intact


def _insert_line(results: Path, at: int, line: bytes) -> None:
    lines = results.read_bytes().split(b"\n")
    lines.insert(at, line)
    results.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("bad, message", [
    (b"\xff\xfe not utf-8 \xc3\x28", "is not UTF-8 text"),
    (b'{"schema_version": 2, "key": ', "is not valid JSON"),
    (b"[1, 2, 3]", "is not a hica-bench result record"),
])
def test_a_damaged_line_in_the_results_file(work, medmnist_root, command, bad, message):
    _prepare(work, medmnist_root)
    _insert_line(work["results"], 1, bad)
    before = work["results"].read_bytes()
    line = answered(invoke(*_results_case(work, command)), 2, work["results"], before, message)
    assert "results.jsonl:2" in line


@pytest.mark.parametrize("command", ["run", "leaderboard", "check-baseline"])
def test_the_results_file_is_a_folder(work, medmnist_root, command):
    _prepare(work, medmnist_root)
    work["results"].unlink()
    work["results"].mkdir()
    answered(invoke(*_results_case(work, command)), 2, message="results")


RECORD_FIELDS = ["key", "identity", "status", "metrics", "n_support", "n_test", "timings", "fit_info", "components_used",
                 "environment", "finished_at", "schema_version"]
REQUIRED = ["key", "identity", "status"]


def _leaves(value, path=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))
    else:
        yield path, value


def _set(record, path, value):
    node = record
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


@settings(FAST, max_examples=12)
@given(field=st.sampled_from(REQUIRED + ["key.k", "key.seed", "identity.origin", "identity.support", "metrics.acc",
                                         "identity.origin.method", "identity.origin.features"]),
       command=st.sampled_from(COMMANDS))
def test_a_record_missing_a_field(finished, medmnist_root, field, command):
    with tempfile.TemporaryDirectory() as tmp:
        work = _copy_work(finished, Path(tmp))
        _prepare(work, medmnist_root)
        records = [json.loads(line) for line in work["results"].read_text().splitlines()]
        node = records[1]
        *parents, last = field.split(".")
        for step in parents:
            node = node[step]
        del node[last]
        work["results"].write_text("".join(json.dumps(r) + "\n" for r in records))
        before = work["results"].read_bytes()
        line = answered(invoke(*_results_case(work, command)), 2, work["results"], before)
        assert f"results.jsonl:2 does not match result schema {SCHEMA_VERSION}" in line and last in line


@settings(FAST, max_examples=20)
@given(data=st.data(), command=st.sampled_from(COMMANDS),
       wrong=st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.booleans()))
def test_a_record_with_a_value_of_the_wrong_type(finished, medmnist_root, data, command, wrong):
    """A number stored as a string (or a list, or a bool) anywhere the schema says number, whole number or text."""
    with tempfile.TemporaryDirectory() as tmp:
        work = _copy_work(finished, Path(tmp))
        _prepare(work, medmnist_root)
        records = [json.loads(line) for line in work["results"].read_text().splitlines()]
        typed = [(p, v) for p, v in _leaves(records[0]) if p[0] in ("key", "metrics", "timings", "n_support", "n_test")
                 and isinstance(v, (int, float)) and not isinstance(v, bool)]
        path, _ = data.draw(st.sampled_from(typed))
        _set(records[0], path, wrong)
        work["results"].write_text("".join(json.dumps(r) + "\n" for r in records))
        before = work["results"].read_bytes()
        line = answered(invoke(*_results_case(work, command)), 2, work["results"], before)
        assert f"results.jsonl:1 does not match result schema {SCHEMA_VERSION}" in line and str(path[-1]) in line


def _copy_work(finished: Path, root: Path) -> dict[str, Path]:
    shutil.copytree(finished / "out", root / "out")
    shutil.copytree(finished / "cache", root / "cache")
    (root / "data").mkdir()
    return {"tmp": root, "out": root / "out", "results": root / "out" / "results.jsonl", "cache": root / "cache",
            "data": root / "data"}


@settings(FAST, max_examples=25)
@given(line=st.binary(min_size=1, max_size=300).filter(lambda b: b"\n" not in b and b.strip()), command=st.sampled_from(COMMANDS))
def test_a_line_of_arbitrary_bytes_in_the_results_file(finished, medmnist_root, line, command):
    with tempfile.TemporaryDirectory() as tmp:
        work = _copy_work(finished, Path(tmp))
        _prepare(work, medmnist_root)
        _insert_line(work["results"], 1, line)
        before = work["results"].read_bytes()
        answered(invoke(*_results_case(work, command)), 2, work["results"], before, "results.jsonl:2")


V1 = {"schema_version": 1, "key": {"dataset": "breastmnist", "size": 28, "method": "prototype", "encoder": "pixels", "k": 1,
                                   "seed": 0, "max_test": None}, "status": "ok", "metrics": {"acc": 0.5, "auc": 0.5,
                                   "f1_macro": 0.5, "balanced_acc": 0.5}}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("line, message", [
    (b"[" * 100_000, "is not a result record JSON can read back"),
    (b'{"schema_version": 2, "n_test": ' + b"9" * 5000 + b"}", "is not a result record JSON can read back"),
    (json.dumps({**V1, "options": [1]}).encode(), "options must be an object"),
    (json.dumps({**V1, "environment": "x"}).encode(), "environment must be an object"),
    (json.dumps({**V1, "timings": "x"}).encode(), "timings must be an object"),
    (json.dumps({**V1, "status": "done"}).encode(), "status must be one of"),
    (b'{"schema_version": 1, "reason": "\\udc80"}'.replace(b"\\\\", b"\\"), "is not UTF-8 text"),
])
def test_pathological_lines_in_the_results_file(work, medmnist_root, command, line, message):
    _prepare(work, medmnist_root)
    _insert_line(work["results"], 0, line)
    before = work["results"].read_bytes()
    answered(invoke(*_results_case(work, command)), 2, work["results"], before, message)


@pytest.mark.parametrize("field", ["metrics", "per_class", "predictions", "timings", "environment", "finished_at", "n_test",
                                   "fit_info", "components_used", "reason"])
def test_every_field_of_a_schema_3_record_is_required(work, medmnist_root, field):
    """A finished record missing its metrics would count as done and never be computed again: refused."""
    _prepare(work, medmnist_root)
    records = [json.loads(line) for line in work["results"].read_text().splitlines()]
    del records[0][field]
    work["results"].write_text("".join(json.dumps(r) + "\n" for r in records))
    before = work["results"].read_bytes()
    answered(invoke(*run_args(work, work["data"])), 2, work["results"], before, f"missing field {field}")


def test_an_ok_record_without_metrics_is_refused(work, medmnist_root):
    _prepare(work, medmnist_root)
    records = [json.loads(line) for line in work["results"].read_text().splitlines()]
    records[1]["metrics"] = None
    work["results"].write_text("".join(json.dumps(r) + "\n" for r in records))
    answered(invoke(*run_args(work, work["data"])), 2, message="status 'ok' with metrics missing")


def test_a_whole_last_record_without_its_newline_is_kept(work, medmnist_root):
    """Before: the next append cut it off as if a kill had torn it, and a finished result was lost."""
    _prepare(work, medmnist_root)
    text = work["results"].read_text()
    work["results"].write_text(text.rstrip("\n"))  # e.g. an editor that strips the final newline
    before = work["results"].read_bytes()
    answered(invoke(*run_args(work, work["data"])), 0, work["results"], before)
    records = [json.loads(line) for line in work["results"].read_text().splitlines()]
    assert len(records) == 4 and records[:2] == [json.loads(line) for line in text.splitlines()]


def test_a_torn_last_record_is_cut_off_with_a_warning(work, medmnist_root):
    _prepare(work, medmnist_root)
    whole = work["results"].read_bytes()
    torn = whole.split(b"\n")[0][:300]
    work["results"].write_bytes(whole + torn)
    line = answered(invoke(*run_args(work, work["data"])), 0)
    assert "results.jsonl:3 is a record a killed write cut short; ignoring it" in line
    assert work["results"].read_bytes().startswith(whole) and len(work["results"].read_text().splitlines()) == 4


# =========================================================================== 4. options, seeds, tolerances

REGISTRY = load_registry()
RANGED = sorted((kind, name, option, registered.spec.constraints[option])
                for kind in ("method",) for name, registered in REGISTRY.specs(kind).items()
                for option in registered.spec.constraints if not name.startswith("hica-no"))


@settings(FAST, max_examples=30)
@given(data=st.data())
def test_an_option_outside_its_declared_range(finished, medmnist_root, data):
    kind, name, option, constraint = data.draw(st.sampled_from(RANGED))
    default = REGISTRY.get(kind, name).spec.options[option]
    if constraint.choices is not None:
        value = data.draw(st.text(min_size=1, max_size=6).filter(lambda v: v not in constraint.choices and ":" not in v
                                                                 and "," not in v and v.strip() == v))
    else:
        below = st.floats(max_value=constraint.low, allow_nan=False, allow_infinity=False) if constraint.low is not None else st.nothing()
        above = st.floats(min_value=constraint.high, allow_nan=False, allow_infinity=False) if constraint.high is not None else st.nothing()
        value = data.draw(st.one_of(below, above).filter(lambda v: constraint.problem(v) is not None))
        value = int(value) if isinstance(default, int) and not isinstance(default, bool) else value
        if constraint.problem(value) is None:  # rounding to a whole number brought it back into range
            value = (constraint.low - 1) if constraint.low is not None else constraint.high + 1
    with tempfile.TemporaryDirectory() as tmp:
        work = _copy_work(finished, Path(tmp))
        before = work["results"].read_bytes()
        args = run_args(work, medmnist_root)
        args[args.index("--methods") + 1] = f"{name}:{option}={value}"
        line = answered(invoke(*args), 2, work["results"], before)
        assert f"option {option}=" in line and f"of method '{name}'" in line and "must be" in line


@pytest.mark.parametrize("methods", ["prototype,prototype:temperature=0.05", "knn:neighbours=0,knn",
                                     "hica,hica:roi=saliency", "linear-probe:C=0,linear-probe:C=0.0"])
def test_the_same_method_twice_through_an_option_spelling(work, medmnist_root, methods):
    before = work["results"].read_bytes()
    args = run_args(work, medmnist_root)
    args[args.index("--methods") + 1] = methods
    answered(invoke(*args), 2, work["results"], before, "twice")


@settings(FAST, max_examples=10)
@given(seed=st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)))
def test_a_seed_no_generator_accepts(finished, medmnist_root, seed):
    with tempfile.TemporaryDirectory() as tmp:
        work = _copy_work(finished, Path(tmp))
        before = work["results"].read_bytes()
        args = run_args(work, medmnist_root)
        args[args.index("--seeds") + 1] = f"0,{seed}"
        answered(invoke(*args), 2, work["results"], before, "--seeds must be between 0 and 4294967295")


@pytest.mark.parametrize("option, value", [("--tolerance", "nan"), ("--tolerance", "inf"), ("--tolerance", "-1"),
                                           ("--noise-z", "nan"), ("--noise-z", "-2"), ("--throughput-tolerance", "nan"),
                                           ("--throughput-tolerance", "1")])
def test_a_gate_tolerance_that_would_disable_the_gate(work, option, value):
    answered(invoke("check", "--baseline", work["results"], "--results", work["results"], option, value), 2,
             message="--tolerance and --noise-z must be finite numbers >= 0")


# =========================================================================== 5. plugin faults stay in their cells


@pytest.mark.parametrize("method, reason", [
    ("ctor-runtime-error", "RuntimeError: boom"), ("ctor-value-error", "ValueError: bad"),
    ("ctor-key-error", "KeyError: 'missing'"), ("ctor-exits", "SystemExit: the method called sys.exit(4)"),
    ("exits-in-fit", "SystemExit: the method called sys.exit(3)"), ("exits-in-fit:code=0", "sys.exit(0)"),
])
def test_a_method_that_breaks_spoils_only_its_own_cells(work, medmnist_root, method, reason):
    before = work["results"].read_bytes()
    args = run_args(work, medmnist_root)
    args[args.index("--methods") + 1] = f"{method},prototype"
    answered(invoke("-p", "hostile_plugins", *args), 1, work["results"], before)
    records = [json.loads(line) for line in work["results"].read_text().splitlines()[2:]]
    broken = [r for r in records if r["key"]["method"] == method]
    assert broken and all(r["status"] == "failed" and reason in r["reason"] for r in broken), broken
    assert all(r["status"] == "ok" for r in records if r["key"]["method"] == "prototype")


def test_values_a_method_records_that_are_not_json_are_written_not_fatal(work, medmnist_root):
    before = work["results"].read_bytes()
    args = run_args(work, medmnist_root)
    args[args.index("--methods") + 1] = "odd-fit-info"
    answered(invoke("-p", "hostile_plugins", *args), 0, work["results"], before)
    info = json.loads(work["results"].read_text().splitlines()[-1])["fit_info"]
    assert info["n"] == 4 and info["prior"] == [0.5, 0.5] and info["model"].startswith("<object object")  # k=2, 2 classes


@pytest.mark.parametrize("damage", ["meta-not-an-object", "features-is-a-file", "digest-memo-not-an-object",
                                    "tuning-not-an-object"])
def test_a_damaged_cache_is_recomputed_or_one_line(work, medmnist_root, damage):
    """The cache is hica-bench's own: damage in it is repaired (recomputed) where it can be, else one line."""
    before = work["results"].read_bytes()
    expected = 0
    if damage == "meta-not-an-object":
        next((work["cache"] / "features").glob("*.json")).write_text("[]")  # one entry: one warning, recomputed
    elif damage == "features-is-a-file":
        shutil.rmtree(work["cache"] / "features")
        (work["cache"] / "features").write_text("in the way")
        expected = 2
    elif damage == "digest-memo-not-an-object":
        for memo in (work["cache"] / "digests").glob("*.json"):
            memo.write_text('"x"')
    else:
        (work["cache"] / "tuning").mkdir(exist_ok=True)
        for verdict in (work["cache"] / "tuning").glob("*.json"):
            verdict.write_text("[1, 2]")
    line = answered(invoke(*run_args(work, medmnist_root)), expected, work["results"], before)
    if expected == 2:
        assert line.startswith(f"hica-bench: error: cannot write {work['cache']}/features")


@settings(FAST, max_examples=10)
@given(info=st.recursive(st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5)),
                         lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
                             st.one_of(st.integers(), st.text(max_size=3), st.tuples(st.integers())), inner, max_size=3)),
                         max_leaves=8))
def test_whatever_a_method_records_in_fit_info_is_written(finished, medmnist_root, info):
    """fit_info_ with keys that are not text, tuples, NaN, nested containers: the cell is written, the run goes on."""
    import hostile_plugins

    with tempfile.TemporaryDirectory() as tmp:
        work = _copy_work(finished, Path(tmp))
        hostile_plugins.OddFitInfo.extra = {"drawn": info}
        before = work["results"].read_bytes()
        args = run_args(work, medmnist_root)
        args[args.index("--methods") + 1] = "odd-fit-info"
        answered(invoke("-p", "hostile_plugins", *args), 0, work["results"], before)
        assert len(work["results"].read_text().splitlines()) == 2 + 4  # its 4 cells (k 1, 2 × seeds 0, 1) appended


def test_specs_that_cannot_be_used_are_left_out_and_the_listing_goes_on():
    code, out, err = invoke("-p", "hostile_specs", "list", "method")
    assert code == 0 and "Traceback" not in err
    problems = [line for line in err.splitlines() if line.strip()]
    assert len(problems) == 12 and all(line.startswith("warning:") for line in problems), err
    for name, why in [("no-description", "it has no description"),
                      ("bad name", "its name 'bad name' cannot be spelled on the command line"),
                      ("list-default", "option sizes=[1, 2] has type list; defaults must be bool, int, float or str"),
                      ("out-of-its-range", "the default t=-1.0 must be >= 0"),
                      ("nan-default", "the default t=nan must be >= 0, not NaN"),
                      ("text-range", "the default mode='abc' does not fit its declared range (>= 0)"),
                      ("constraints-none", "its constraints must be a dict, got NoneType"),
                      ("default-in-spec", "constraints['t'] is 0.5, not an Option"),
                      ("unknown-constraint", "constraints names 'nope', which is not one of its options (t: read from "
                                             "the signature of its factory negative_t)"),
                      ("no-default", "parameter 'x' of its factory without_default has no default"),
                      ("missing-module", "its factory no_such_module_anywhere.methods:Thing cannot be imported")]:
        assert any(f"'{name}' left out: {why}" in line for line in problems), (name, err)
    assert any("returned 'not a spec at all' (a str), not a method spec; left out" in line for line in problems), err
    listed = " ".join(out.split())
    assert "usable" in listed and "linear-probe" in listed and "no-description" not in listed


# =========================================================================== 8. output paths are checked before the work


def test_output_paths_that_cannot_be_written_are_refused_before_the_work(work, medmnist_root):
    (work["tmp"] / "a-folder").mkdir()
    (work["tmp"] / "a-file").write_text("x")
    answered(invoke("check", "--baseline", work["results"], "--results", work["results"], "--report", work["tmp"] / "a-folder"),
             2, message="--report")
    answered(invoke("leaderboard", work["results"], "--out", work["tmp"] / "a-file"), 2, message="--out folder")
    answered(invoke("-p", "pixel_encoder", "bench", "--encoder", "pixels", "--data-root", medmnist_root, "--cache-dir",
                    work["cache"], "--out", work["tmp"] / "a-folder"), 2, message="--out")
    answered(invoke("-p", "pixel_encoder", "bench", "--encoder", "pixels", "--data-root", medmnist_root, "--cache-dir",
                    work["cache"], "--out", work["tmp"] / "a-file" / "report.json"), 2, message="--out")

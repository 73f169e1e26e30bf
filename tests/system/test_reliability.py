"""Reliability (issue 7): a killed run loses nothing, a broken plugin spoils only its own cells, and the same
arguments give the same results file. Runs use the fast ``pixels`` test encoder on the real BreastMNIST file.

Each run is a separate process executing the console script's entry point. Most are forked from one warm
process that has already imported torch, scikit-learn and the harness (:data:`WARM_SERVER`), which saves the
import start-up of every run; the determinism test's second run, the fault-isolation run and the plugin
listing start the installed ``hica-bench`` executable itself.

Kill points (see tests/plugins/crash_points.py; each run is SIGKILLed, then rerun with the same command):

1. inside an encoder batch of the train-split feature pass;
2. half-way through writing a feature-cache array (its temporary file is left half written);
3. after a cache array is in place but before its JSON entry is written;
4. half-way through writing a cache JSON entry;
5. half-way through a results.jsonl append (a torn record line);
6. from outside, with ``kill -9`` as soon as two more records have appended (appends slowed to 0.4 s each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_PLUGINS
from hica_bench.extraction.cache import FeatureCache

GRID = ["--encoder", "pixels", "--datasets", "breastmnist", "--methods", "linear-probe,prototype", "--shots", "1,3",
        "--seeds", "0,1", "--max-test", "60", "--quiet", "--no-report",  # no test here reads the report
        # extraction fixed: a probe would pick its batch size by timing, and two runs here with separate caches
        # could then record different (equally valid) ``environment.extraction`` settings
        "--backend", "eager", "--batch-size", "16", "--no-channels-last", "--threads", "2"]
CELLS = 2 * 2 * 2
TIMING_FIELDS = ("finished_at", "timings")  #: what may differ between two runs with the same arguments
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")])}

#: Reads one JSON request per line ({"args", "env", "stdout", "stderr"}), forks a child that runs
#: ``hica_bench.cli.main`` with them, prints the child's pid, then its exit code (negative: killed by a signal).
WARM_SERVER = r"""
import json, os, signal, sys
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import hica_bench.cli, hica_bench.runner, torch  # what every run imports, paid once
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(300)  # a stuck run ends rather than hanging the tests
            os.environ.update(request["env"])
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = ["hica-bench", *request["args"]]
            hica_bench.cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Run:
    """One ``hica-bench`` process: ``pid``, ``alive()``, ``finish() -> (exit code, stdout, stderr)``."""

    def __init__(self, args: list[str], env: dict[str, str], folder: Path, server: subprocess.Popen | None):
        self.server = server
        if server is None:  # the installed executable
            self.process = subprocess.Popen([str(Path(sys.executable).parent / "hica-bench"), *args], text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**ENV, **env})
            self.pid = self.process.pid
            return
        self.out, self.err = folder / f"{time.monotonic_ns()}.out", folder / f"{time.monotonic_ns()}.err"
        server.stdin.write(json.dumps({"args": args, "env": env, "stdout": str(self.out), "stderr": str(self.err)}) + "\n")
        server.stdin.flush()
        self.pid = int(server.stdout.readline())

    def alive(self) -> bool:
        if self.server is None:
            return self.process.poll() is None
        try:
            os.kill(self.pid, 0)  # the server reaps its children at once, so an ended one is gone
        except ProcessLookupError:
            return False
        return True

    def finish(self) -> tuple[int, str, str]:
        if self.server is None:
            out, err = self.process.communicate(timeout=300)
            return self.process.returncode, out, err
        code = int(self.server.stdout.readline())
        return code, self.out.read_text(), self.err.read_text()


@pytest.fixture(scope="module")
def warm():
    server = subprocess.Popen([sys.executable, "-c", WARM_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=ENV)
    yield server
    server.stdin.close()
    server.wait(timeout=60)


def grid_run(root: Path, data: Path, *plugins: str, env: dict[str, str] | None = None, server=None) -> Run:
    root.mkdir(parents=True, exist_ok=True)
    return Run(["-p", "pixel_encoder", *plugins, "run", *GRID, "--data-root", str(data), "--cache-dir", str(root / "cache"),
                "--out", str(root / "out")], env or {}, root, server)


def records(root: Path) -> list[dict]:
    """The results file's records, checking what must hold after any kill: every whole line parses and names
    a different cell; at most the last line is torn (no newline)."""
    path = root / "out" / "results.jsonl"
    lines = path.read_text().split("\n") if path.exists() else [""]
    parsed = [json.loads(line) for line in lines[:-1]]
    ids = [r["cell_id"] for r in parsed]
    assert len(ids) == len(set(ids)), f"a cell is recorded twice: {ids}"
    return parsed


def comparable(record: dict) -> str:
    """A record without its timing fields, serialised as the results file does."""
    return json.dumps({k: v for k, v in record.items() if k not in TIMING_FIELDS}, sort_keys=True, allow_nan=True)


def cache_files(root: Path) -> list[str]:
    folder = root / "cache" / "features"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def reference(medmnist_root, tmp_path_factory, warm) -> Path:
    """An uninterrupted run of the grid (forked from the warm process)."""
    root = tmp_path_factory.mktemp("reference")
    code, out, err = grid_run(root, medmnist_root, server=warm).finish()
    assert code == 0, err
    assert f"{CELLS} ran ok" in out
    return root


@pytest.mark.slow
def test_same_arguments_give_the_same_results_file(reference, medmnist_root, tmp_path):
    """Bit-identical apart from the timing fields: the installed executable, in a fresh interpreter (its own
    hash seed), with fresh cache and results folders, against the forked reference run."""
    code, _, err = grid_run(tmp_path, medmnist_root).finish()
    assert code == 0, err
    first = (reference / "out" / "results.jsonl").read_text().splitlines()
    second = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(first) == len(second) == CELLS
    for a, b in zip(first, second):
        a_record, b_record = json.loads(a), json.loads(b)
        assert a == json.dumps(a_record, sort_keys=True, allow_nan=True)  # the file is canonical JSON ...
        assert comparable(a_record) == comparable(b_record)  # ... equal byte for byte without the timing fields
        assert {k for k in a_record if a_record[k] != b_record[k]} <= set(TIMING_FIELDS)
    assert all(r["status"] == "ok" for r in map(json.loads, first))
    for name in cache_files(reference):  # and the same features
        assert (reference / "cache" / "features" / name).read_bytes() == (tmp_path / "cache" / "features" / name).read_bytes()


@pytest.mark.slow
def test_killed_runs_lose_nothing(reference, medmnist_root, tmp_path, warm):
    stderr = []

    def killed_at(point: str) -> None:
        code, _, err = grid_run(tmp_path, medmnist_root, "-p", "crash_points", env={"HICA_TEST_KILL_AT": point},
                                server=warm).finish()
        stderr.append(err)
        assert code == -signal.SIGKILL, f"the run was not killed at {point} (exit {code}): {err}"
        records(tmp_path)

    killed_at("encode:10")
    assert cache_files(tmp_path) == [] and records(tmp_path) == []

    killed_at("cache-npy:1")  # the train split's array, half written
    [orphan] = cache_files(tmp_path)
    assert orphan.endswith(".tmp") and ".npy." in orphan

    killed_at("cache-meta:1")  # the train array in place, no JSON entry yet
    assert cache_files(tmp_path) == [orphan[1:65] + ".npy"]  # and the orphan of the killed writer is gone

    killed_at("cache-json:2")  # train entry whole; the test split's JSON half written
    names = cache_files(tmp_path)
    assert len([n for n in names if n.endswith(".json")]) == 1 and len([n for n in names if n.endswith(".npy")]) == 2
    assert any(n.endswith(".tmp") and ".json." in n for n in names)

    killed_at("results:3")  # two records whole, the third torn
    text = (tmp_path / "out" / "results.jsonl").read_text()
    assert len(records(tmp_path)) == 2 and not text.endswith("\n") and text.count("\n") == 2

    run = grid_run(tmp_path, medmnist_root, "-p", "crash_points", env={"HICA_TEST_SLOW_RESULTS": "0.4"}, server=warm)
    deadline = time.monotonic() + 240
    while len(records(tmp_path)) < 4:
        assert run.alive(), f"the run ended before it could be killed: {run.finish()}"
        assert time.monotonic() < deadline, "no records appended"
        time.sleep(0.02)
    os.kill(run.pid, signal.SIGKILL)
    code, _, err = run.finish()
    stderr.append(err)
    assert code == -signal.SIGKILL
    assert 4 <= len(records(tmp_path)) < CELLS  # the torn line was cut off before the first new append

    code, out, err = grid_run(tmp_path, medmnist_root, server=warm).finish()
    stderr.append(err)
    assert code == 0, err
    assert "feature cache: 2 hits, 0 misses" in out
    final, expected = records(tmp_path), records(reference)
    assert (tmp_path / "out" / "results.jsonl").read_text().endswith("\n")
    assert [comparable(r) for r in final] == [comparable(r) for r in expected]  # every cell once, same numbers

    # the cache: whole entries only, no orphans left, features equal to the uninterrupted run's
    assert cache_files(tmp_path) == cache_files(reference)
    cache = FeatureCache(tmp_path / "cache")
    for name in cache_files(reference):
        if name.endswith(".npy"):
            reference_array = np.load(reference / "cache" / "features" / name)
            assert np.array_equal(cache.get(name[:-4]), reference_array)
    assert cache.rejected == 0 and not any("corrupt" in e for e in stderr)  # no half-written entry was ever read


def broken_distribution(folder: Path) -> Path:
    """An installed-looking distribution whose plugins are broken: one fails to import, one has a raising hook."""
    info = folder / "hica_bench_broken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hica-bench-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hica_bench]\nbroken = broken_at_import\nbadhook = broken_hook\n")
    return folder


@pytest.mark.slow
def test_broken_plugins_fail_only_their_own_cells(medmnist_root, tmp_path):
    site = broken_distribution(tmp_path / "site")
    env = {"PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), str(site), os.environ.get("PYTHONPATH", "")])}
    code, out, err = Run(["-p", "pixel_encoder", "-p", "misbehaving_methods", "run", "--encoder", "pixels",
                          "--datasets", "breastmnist", "--methods", "wrong-shape,infs,hangs,prototype", "--shots", "1",
                          "--seeds", "0", "--max-test", "40", "--cell-timeout", "1", "--data-root", str(medmnist_root),
                          "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")], env, tmp_path, None).finish()
    assert code == 1, err
    assert "plugin 'broken' from hica-bench-broken failed to import: RuntimeError: deliberately broken plugin module" in err
    assert "plugin from hica-bench-broken: hica_bench_methods failed: RuntimeError: deliberately broken hook" in err
    by_method = {r["key"]["method"]: r for r in records(tmp_path)}
    assert by_method["wrong-shape"]["reason"] == "ValueError: predict_proba returned shape (40, 3), expected (40, 2)"
    assert by_method["infs"]["reason"] == "ValueError: predict_proba returned NaN or inf"
    assert by_method["hangs"]["reason"] == "TimeoutError: timed out after 1 s (--cell-timeout)"
    assert {m: r["status"] for m, r in by_method.items()} == {"wrong-shape": "failed", "infs": "failed", "hangs": "failed",
                                                             "prototype": "ok"}
    summary = " ".join(out.split())  # rich wraps long lines on a pipe
    assert "1 ran ok, 0 not applicable, 3 failed" in summary
    for reason in ("shape (40, 3), expected (40, 2)", "NaN or inf", "timed out after 1 s"):
        assert reason in summary  # the summary names every failure


def test_allow_list_loads_only_the_named_distributions(tmp_path):
    site = broken_distribution(tmp_path / "site")
    env = {"PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), str(site), os.environ.get("PYTHONPATH", "")])}
    code, out, err = Run(["-p", "misbehaving_methods", "--plugins-only", "hica-bench-baselines", "list"], env, tmp_path,
                         None).finish()
    assert code == 0 and err == ""  # the broken distribution is not even imported
    assert "linear-probe" in out and "wrong-shape" in out  # -p modules load regardless of the allow-list
    assert "breastmnist" not in out and "effnet-lite0-minilm" not in out and "hica-no-local" not in out

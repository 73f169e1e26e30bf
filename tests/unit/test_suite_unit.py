"""The committed suite files agree with the installed plugins' default suite and with the committed tables (split
from tests/cli/test_suite.py)."""

from __future__ import annotations

from conftest import REPO as ROOT
from hica_bench.registry import load_registry
from hica_bench.suite import load
from test_suite import read_records


def test_the_committed_default_suite_is_what_run_runs_by_default():
    suite, registry = load(ROOT / "suites" / "default.toml"), load_registry()
    assert suite.datasets == registry.default_suite("dataset")
    assert suite.methods == registry.default_suite("method")
    assert suite.encoders == registry.default_suite("encoder")
    assert (suite.shots, suite.seeds, suite.size, suite.out) == ([1, 5, 20], list(range(10)), 28, "hica-bench-results")


def test_the_leaderboard_suite_is_the_grid_of_the_committed_tables():
    suite = load(ROOT / "suites" / "leaderboard.toml")
    committed = {(r["key"]["dataset"], r["key"]["method"], r["key"]["encoder"], r["key"]["k"], r["key"]["seed"],
                  r["key"]["size"], r["key"]["max_test"]) for r in read_records(ROOT / suite.out)}
    grid = {(d, m, e, k, s, suite.size, suite.max_test) for d in suite.datasets for m in suite.methods
            for e in suite.encoders for k in suite.shots for s in suite.seeds}
    assert grid == committed


def test_the_protocol_suites_are_the_grid_of_the_committed_protocol_tables():
    """suites/protocols.toml and suites/base-to-novel.toml (RetinaMNIST alone: base-to-novel needs 3 classes) write
    leaderboards/protocols/ together."""
    grid, out = set(), set()
    for name in ("protocols", "base-to-novel"):
        suite = load(ROOT / "suites" / f"{name}.toml")
        out.add(suite.out)
        grid |= {(d, m, e, p, k, s) for d in suite.datasets for m in suite.methods for e in suite.encoders
                 for p in suite.protocols for k in suite.shots for s in suite.seeds}
    (folder,) = out
    committed = {(r["key"]["dataset"], r["key"]["method"], r["key"]["encoder"], r["key"]["protocol"], r["key"]["k"],
                  r["key"]["seed"]) for r in read_records(ROOT / folder)}
    assert grid == committed

"""Plugin faults that escaped their plugin (issue 31, class 3): ``SystemExit`` and ``KeyboardInterrupt`` raised by a
plugin's own code, at import, in a hook, in a constructor, in ``needs``, ``fit`` or ``predict_proba``. Each fails only
its plugin (a load warning, a spec left out, or its own cells with the reason), never the run in silence; a real
Ctrl-C (tests/system/test_plugin_interrupts.py) still stops the run. A table of places x faults, each a module written
here and loaded with ``-p``."""

from __future__ import annotations

import itertools
import json
import textwrap

import pytest

from conftest import TEST_PLUGINS, invoke

FAULTS = {"exit0": "SystemExit(0)", "exit3": "SystemExit(3)", "exit_text": "SystemExit('bye')",
          "interrupt": "KeyboardInterrupt()", "interrupt_text": "KeyboardInterrupt('from the plugin')"}
PLACES = ("import", "hook", "constructor", "needs", "fit", "predict_proba")

TEMPLATE = '''
import numpy as np
from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec

if PLACE == "import":
    raise FAULT


class Faulty:
    def __init__(self):
        if PLACE == "constructor":
            raise FAULT

    @property
    def needs(self):
        if PLACE == "needs":
            raise FAULT
        return frozenset({"image_features"})

    def fit(self, task):
        if PLACE == "fit":
            raise FAULT
        self.prior_ = np.bincount(task.support_labels, minlength=task.n_classes) / len(task.support_labels)
        return self

    def predict_proba(self, features):
        if PLACE == "predict_proba":
            raise FAULT
        return np.tile(self.prior_, (len(features), 1))


@hookimpl
def hica_bench_methods():
    if PLACE == "hook":
        raise FAULT
    return [PluginSpec("method", "faulty", "raises FAULT in PLACE (tests)", Faulty)]
'''


def _module(tmp_path, monkeypatch, place: str, fault: str) -> str:
    name = f"fault_{place}_{fault}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TEMPLATE).replace("PLACE", repr(place))
                                         .replace("FAULT", FAULTS[fault]))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    return name


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("place, fault", list(itertools.product(PLACES, FAULTS)))
def test_a_plugins_exit_or_interrupt_fails_only_the_plugin(place, fault, medmnist_root, tmp_path, monkeypatch):
    module = _module(tmp_path, monkeypatch, place, fault)
    if place == "import":  # a -p module that cannot be imported is bad input: one line, exit 2
        code, _, err = invoke("-p", module, "list", "method")
        assert code == 2 and f"-p {module}: cannot import it (" in _one_line(err)
        assert ("SystemExit" if "exit" in fault else "KeyboardInterrupt") in err
        return
    if place == "hook":  # its specs are left out with a warning; everything else lists
        code, out, err = invoke("-p", module, "list", "method")
        assert code == 0 and "prototype" in out and "faulty" not in out
        assert "hica_bench_methods failed:" in _one_line(err)
        return
    code, out, err = invoke("-p", "pixel_encoder", "-p", module, "run", "--no-report", "--encoder", "pixels", "--datasets",
                            "breastmnist", "--methods", "faulty,prototype", "--shots", "1", "--seeds", "0,1",
                            "--data-root", medmnist_root, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    statuses = {(r["key"]["method"], r["key"]["seed"]): r["status"] for r in records}
    assert code == 1, err  # the faulty cells failed; the run went on
    assert statuses == {("faulty", 0): "failed", ("faulty", 1): "failed", ("prototype", 0): "ok", ("prototype", 1): "ok"}
    reasons = {r["reason"] for r in records if r["status"] == "failed"}
    assert all(("SystemExit" if "exit" in fault else "KeyboardInterrupt") in reason for reason in reasons), reasons
    assert "2 failed" in " ".join(out.split())


def test_an_entry_point_that_exits_at_import_is_left_out_with_a_warning(tmp_path, monkeypatch):
    """An installed distribution (a real dist-info on the path) whose entry point calls sys.exit while importing."""
    dist = tmp_path / "hica_bench_exits-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hica-bench-exits\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[hica_bench]\nexits = hica_bench_exits_plugin\n")
    (tmp_path / "hica_bench_exits_plugin.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = invoke("list", "method")
    assert code == 0 and "prototype" in out
    assert "plugin 'exits' from hica-bench-exits failed to import: SystemExit: called sys.exit(3)" in _one_line(err)

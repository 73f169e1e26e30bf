"""hica_bench.startup: the collector is paused inside the import blocks and left as it was after them."""

from __future__ import annotations

import gc

import pytest

from hica_bench.startup import collection_paused


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_paused_inside_and_back_after_even_on_error(collector_on):
    with collection_paused():
        assert not gc.isenabled()
        with collection_paused():  # nested: the outer block decides
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collection_paused():
        raise RuntimeError("a plugin's factory failed")
    assert gc.isenabled()


def test_a_process_without_collection_stays_without(collector_on):
    gc.disable()
    with collection_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_a_child_forked_inside_a_block_collects(collector_on):
    import os

    with collection_paused():
        pid = os.fork()
        if pid == 0:  # the child: report and leave at once
            os._exit(0 if gc.isenabled() else 1)
        assert not gc.isenabled()  # the parent's block goes on paused
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


PLUGIN = """
import gc
from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec

SEEN = []


def build(device="cpu"):
    SEEN.append(gc.isenabled())
    return "built"


@hookimpl
def hica_bench_encoders():
    return [PluginSpec("encoder", "gc-witness", "records whether the collector ran during its build", build)]
"""


def test_a_plugin_factory_builds_with_the_collector_paused(collector_on, tmp_path, monkeypatch):
    from hica_bench.registry import load_registry

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "gc_witness_plugin.py").write_text(PLUGIN)
    registry = load_registry(["gc_witness_plugin"])
    assert registry.choose("encoder", "gc-witness").build(device="cpu") == "built"
    import gc_witness_plugin

    assert gc_witness_plugin.SEEN == [False] and gc.isenabled()

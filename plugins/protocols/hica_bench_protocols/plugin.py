"""The evaluation protocols (:mod:`hica_bench_protocols.episodes`), registered under the ``hica_bench`` entry point."""

from __future__ import annotations

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec
from hica_bench_protocols import episodes


@hookimpl
def hica_bench_protocols() -> list[PluginSpec]:
    return list(episodes.SPECS)

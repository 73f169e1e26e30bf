"""The MedMNIST v2 datasets (:mod:`hica_bench_medmnist.dataset`: the 12 2D sets and the 6 3D ones, their files and
their specs), registered under the ``hica_bench`` entry point."""

from __future__ import annotations

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec
from hica_bench_medmnist import dataset


@hookimpl
def hica_bench_datasets() -> list[PluginSpec]:
    return list(dataset.SPECS)

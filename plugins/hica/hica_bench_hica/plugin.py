"""The hica plugin's hooks: the HiCA method and its ablation variants (:mod:`.method`), its losses (:mod:`.losses`),
ROI extractors (:mod:`.rois`) and descriptor generators (:mod:`.descriptors`), each declared in its own module; this
one only collects them. Those modules import torch only inside functions, so listing stays fast."""

from __future__ import annotations

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec
from hica_bench_hica import descriptors, losses, method, rois


@hookimpl
def hica_bench_methods() -> list[PluginSpec]:
    return list(method.SPECS)


@hookimpl
def hica_bench_losses() -> list[PluginSpec]:
    return list(losses.SPECS)


@hookimpl
def hica_bench_roi_extractors() -> list[PluginSpec]:
    return list(rois.SPECS)


@hookimpl
def hica_bench_descriptor_generators() -> list[PluginSpec]:
    return list(descriptors.SPECS)

"""The ``folder`` dataset: your own images, from a folder of class folders, of train/val/test folders, or a CSV.

``hica-bench run --datasets folder:root=PATH --size 224``. Layouts, class order and the seeded split:
:mod:`hica_bench_folder.layout`; formats and conversions (DICOM windowing, 16-bit scaling, resizing):
:mod:`hica_bench_folder.decode`; the decoded copy, the dataset's identity and its spec: :mod:`hica_bench_folder.dataset`.
The image size is the run's ``--size``. Class names, prompts and descriptors come from a prompt file, as for any
dataset: ``folder:root=PATH:prompts=FILE.yaml``.
"""

from __future__ import annotations

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec
from hica_bench_folder import dataset


@hookimpl
def hica_bench_datasets() -> list[PluginSpec]:
    return list(dataset.SPECS)

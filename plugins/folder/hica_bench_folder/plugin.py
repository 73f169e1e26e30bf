"""The ``folder`` dataset: your own images, from a folder of class folders, of train/val/test folders, or a CSV.

``hica-bench run --datasets folder:root=PATH --size 224``. Layouts, class order and the seeded split:
:mod:`hica_bench_folder.layout`; formats and conversions (DICOM windowing, 16-bit scaling, resizing):
:mod:`hica_bench_folder.decode`; the decoded copy and the dataset's identity: :mod:`hica_bench_folder.dataset`.
The image size is the run's ``--size``. Class names, prompts and descriptors come from a prompt file, as for any
dataset: ``folder:root=PATH:prompts=FILE.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from hica_bench import hookimpl
from hica_bench.interfaces import Option, PluginSpec

OPTIONS = {
    "root": "",  # a folder, or a .csv manifest; relative to the working folder
    "name": "",  # the dataset's name (the support sets are drawn by it); default: the root folder's (or CSV's) name
    "exclude": "",  # glob patterns (separated by |) of files to leave out, matched on the name or the path below root
    "val_fraction": Option(0.1, low=0, high=0.9),
    "test_fraction": Option(0.2, low=0, high=0.9, low_open=True),
    "split_seed": Option(0, low=0),
    "resize": Option("crop", choices=("crop", "pad", "stretch")),
    "skip_bad_images": False,
}


def build(root: str, size: int, download: bool, cache_dir: Path, **options):
    from hica_bench_folder.dataset import FolderDataset

    return FolderDataset(root, size, cache_dir, download=download, **options)


@hookimpl
def hica_bench_datasets() -> list[PluginSpec]:
    return [PluginSpec(
        "dataset", "folder",
        "Your own images: root=FOLDER (ROOT/<class>/<file>, split by split_seed; or ROOT/{train,val,test}/<class>/<file>) "
        "or root=FILE.csv (path,label[,split]); PNG, JPEG, TIFF, BMP, DICOM; decoded once at --size into the cache",
        build, dict(OPTIONS))]

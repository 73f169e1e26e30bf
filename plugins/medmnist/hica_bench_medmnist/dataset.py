"""The 12 MedMNIST v2 2D datasets and the 6 3D ones, described by ``medmnist.INFO`` (class names, task, split sizes,
URLs). The 3D datasets hold volumes, uint8 (N, D, H, W) at 28 or 64 voxels a side (``volumetric``; see
:mod:`hica_bench.volumes` for how encoders read them).

Files are ``{flag}.npz`` (28 px) or ``{flag}_{size}.npz`` in the data root (``--data-root`` >
``$HICA_BENCH_DATA`` > medmnist's ``~/.medmnist``). A missing file is downloaded from the official
record with its MD5 checked (torchvision's downloader, with a progress bar); offline, one line says
which file is missing and where to put it. Images are memory-mapped (see ``hica_bench.data.LazyNpz``).

ChestMNIST is multi-label (14 findings, labels (N, 14) in {0, 1}): task ``multi-label``, drawn by the per-label k-shot
rule and scored one-vs-rest (mean AUC, mean AP, per-label AUC; :mod:`hica_bench.protocol`, :func:`hica_bench.cell.one_vs_rest`).
RetinaMNIST (ordinal regression) is evaluated as 5-class classification, as medmnist's Evaluator does.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from hica_bench.data import LazyNpz
from hica_bench.errors import UserError
from hica_bench.files import file_sha256
from hica_bench.interfaces import PluginSpec, Split

SIZES = (28, 64, 128, 224)
#: flag -> modality. Everything else (classes, task, split sizes, URLs, MD5s) comes from ``medmnist.INFO``,
#: imported only when a dataset is built (importing medmnist imports torch: too slow for ``hica-bench list``).
FLAGS = {
    "pathmnist": "colon pathology, 9 classes",
    "chestmnist": "chest X-ray, 14 findings, multi-label (one-vs-rest)",
    "dermamnist": "dermatoscopy, 7 classes",
    "octmnist": "retinal OCT, 4 classes",
    "pneumoniamnist": "paediatric chest X-ray, 2 classes",
    "retinamnist": "fundus camera, 5 ordinal grades (as 5 classes)",
    "breastmnist": "breast ultrasound, 2 classes",
    "bloodmnist": "blood cell microscopy, 8 classes",
    "tissuemnist": "kidney cortex microscopy, 8 classes",
    "organamnist": "abdominal CT (axial), 11 classes",
    "organcmnist": "abdominal CT (coronal), 11 classes",
    "organsmnist": "abdominal CT (sagittal), 11 classes",
}
#: the 3D flags (volumes (N, S, S, S), sizes 28 and 64)
FLAGS_3D = {
    "organmnist3d": "abdominal CT volumes, 11 organs",
    "nodulemnist3d": "chest CT volumes, lung nodule malignancy, 2 classes",
    "adrenalmnist3d": "abdominal CT volumes (adrenal gland shape), 2 classes",
    "fracturemnist3d": "chest CT volumes, rib fracture type, 3 classes",
    "vesselmnist3d": "brain MRA volumes (vessel shape), aneurysm or not, 2 classes",
    "synapsemnist3d": "electron microscopy volumes, synapse type, 2 classes",
}
SIZES_3D = (28, 64)
SPLITS = ("train", "val", "test")


def _info(flag: str) -> dict:
    """medmnist's own ``INFO[flag]``. Its ``medmnist/info.py`` imports only the standard library, but importing the
    ``medmnist`` package imports torch (3 s and 0.5 GB with a CUDA wheel, which a run served from the feature cache
    never needs), so that one file is loaded on its own unless medmnist is imported already."""
    import sys

    if "medmnist" in sys.modules:
        return sys.modules["medmnist"].INFO[flag]
    import importlib.util

    package = importlib.util.find_spec("medmnist")
    if package is None or not package.submodule_search_locations:
        raise UserError("the medmnist package is not installed (pip install medmnist)")
    spec = importlib.util.spec_from_file_location(
        "hica_bench_medmnist._medmnist_info", Path(package.submodule_search_locations[0]) / "info.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.INFO[flag]


def file_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _download(flag: str, size: int, root: Path) -> None:
    from torchvision.datasets.utils import download_url

    suffix = "" if size == 28 else f"_{size}"
    info = _info(flag)
    try:
        download_url(info[f"url{suffix}"], str(root), filename=file_name(flag, size), md5=info[f"MD5{suffix}"])
    except Exception as exc:  # network down, host unreachable, MD5 mismatch
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"{file_name(flag, size)} is missing from {root} and could not be downloaded ({reason}); "
            f"download {info[f'url{suffix}']} and put it at {root / file_name(flag, size)}, or point --data-root "
            f"(or $HICA_BENCH_DATA) at the folder that holds it"
        ) from None
    if not (root / file_name(flag, size)).exists():
        raise UserError(f"download of {file_name(flag, size)} into {root} failed; put the file there by hand")


class MedMNIST:
    """One MedMNIST dataset at one size (implements ``hica_bench.interfaces.FewShotDataset``): 2D images, or volumes
    for the 3D flags (``volumetric``)."""

    def __init__(self, flag: str, root: str | None, size: int, download: bool, cache_dir: Path) -> None:
        info = _info(flag)
        self.volumetric = flag in FLAGS_3D
        sizes = SIZES_3D if self.volumetric else SIZES
        if size not in sizes:
            raise UserError(f"{flag} comes in sizes {', '.join(map(str, sizes))}; got --size {size}")
        if root is None:
            from medmnist.info import DEFAULT_ROOT

            root = DEFAULT_ROOT
        self.root = Path(root)
        self.name, self.size = flag, size
        self.task = {"ordinal-regression": "multi-class", "multi-label, binary-class": "multi-label"}.get(info["task"],
                                                                                                       info["task"])
        self.class_names = [info["label"][str(i)] for i in range(len(info["label"]))]
        self.channels = info["n_channels"]
        path = self.root / file_name(flag, size)
        if not path.exists():
            if not download:
                raise UserError(f"{path.name} is missing from {self.root}; put it there, point --data-root (or "
                                f"$HICA_BENCH_DATA) at the folder that holds it, or drop --no-download")
            self.root.mkdir(parents=True, exist_ok=True)
            _download(flag, size, self.root)
        self.path = path
        self._npz = LazyNpz(path, Path(cache_dir))
        self._npz.require([f"{s}_{part}" for s in SPLITS for part in ("images", "labels")])
        # the file's content digest: the same on every machine and for every copy, changed by any edit (it keys the
        # feature cache and is part of every result's identity); remembered per file version under the cache folder
        self.identity = f"medmnist/{flag}@{size}/sha256:{file_sha256(path, Path(cache_dir))}"
        self._splits: dict[str, Split] = {}

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        if name not in self._splits:
            self._splits[name] = self._load(name)
        return self._splits[name]

    def _load(self, name: str) -> Split:
        where = f"{self.path}: {name}"
        labels = self._npz.load(f"{name}_labels")
        images = self._npz.memmap(f"{name}_images")
        if images.dtype != np.uint8:
            raise UserError(f"{where}_images has dtype {images.dtype}; MedMNIST images are uint8")
        expected = ((self.size,) * 3 if self.volumetric else (self.size, self.size) if self.channels == 1
                    else (self.size, self.size, 3))
        if images.shape[1:] != expected:
            what = " (a 3D dataset holds volumes)" if self.volumetric else ""
            raise UserError(f"{where}_images has shape {images.shape}; expected (N, {', '.join(map(str, expected))})"
                            f"{what}")
        if self.task == "multi-label":
            return self._multilabel(where, images, labels)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{where}_labels has shape {labels.shape} and dtype {labels.dtype}; expected integers (N, 1)")
        if len(labels) != len(images):
            raise UserError(f"{where}: {len(images)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise UserError(f"{where}_labels has values outside 0..{len(self.class_names) - 1}")
        return Split(images=images, labels=labels.astype(np.int64))

    def _multilabel(self, where: str, images: np.ndarray, labels: np.ndarray) -> Split:
        n = len(self.class_names)
        if labels.ndim != 2 or labels.shape[1] != n or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{where}_labels has shape {labels.shape} and dtype {labels.dtype}; expected integers (N, {n}) "
                            "(one 0/1 column per finding)")
        if len(labels) != len(images):
            raise UserError(f"{where}: {len(images)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() > 1):
            raise UserError(f"{where}_labels has values other than 0 and 1")
        return Split(images=images, labels=labels.astype(np.int64))


#: what ``hica-bench run`` runs when no --datasets are named
DEFAULT_SUITE = ("breastmnist", "pneumoniamnist")

SPECS = [  # the default suite first, in its order (the order ``hica-bench run`` runs it in)
    *(PluginSpec("dataset", flag, f"MedMNIST v2 {flag}: {FLAGS[flag]}; sizes 28/64/128/224", partial(MedMNIST, flag),
                 in_default_suite=flag in DEFAULT_SUITE)
      for flag in [*DEFAULT_SUITE, *(flag for flag in FLAGS if flag not in DEFAULT_SUITE)]),
    *(PluginSpec("dataset", flag, f"MedMNIST v2 {flag}: {what}; volumes, sizes 28/64", partial(MedMNIST, flag))
      for flag, what in FLAGS_3D.items()),
]

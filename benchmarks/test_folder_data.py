"""Own data (issue 15), measured with pytest-benchmark and reported, never asserted:

- **decode throughput**: BreastMNIST's 780 real images written as 500 x 600 px PNGs (BUSI's order of size) and as
  512 x 512 px JPEGs (quality 90), decoded by the ``folder`` dataset at 224 px, in images/s, with 1 thread and with
  every usable core;
- **extraction from the decoded copy against the ``.npz`` path**: the same 224 px images as a ``folder`` dataset (its
  decoded memory map) and as a MedMNIST-format ``.npz`` (``breastmnist_224.npz``, memory-mapped by ``LazyNpz``),
  encoded by the default encoder with fixed settings, alternating A B A B (target: the folder at >= 0.95x the
  ``.npz`` path's images/s); and the data path alone (read + preprocess, no encoder), where any difference would show.

    python -m pytest benchmarks/test_folder_data.py -s
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hica_bench.data import preprocess
from hica_bench.extraction import FeatureExtractor

NAMES = ("malignant", "normal")
ROUNDS = 3


def _write(root: Path, images: np.ndarray, labels: np.ndarray, shape: tuple[int, int], suffix: str) -> Path:
    for i, (x, y) in enumerate(zip(images, labels)):
        path = root / NAMES[y] / f"{i:04d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).resize((shape[1], shape[0]), Image.Resampling.BICUBIC).save(
            path, **({"quality": 90} if suffix == ".jpeg" else {}))
    return root


@pytest.fixture(scope="module")
def breast(medmnist_root):
    with np.load(medmnist_root / "breastmnist.npz") as npz:
        images = np.concatenate([npz[f"{s}_images"] for s in ("train", "val", "test")])
        labels = np.concatenate([npz[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
    return images, labels


def _build(registry, root: Path, cache: Path, workers: int | None = None, monkeypatch=None):
    if workers is not None:
        monkeypatch.setattr("hica_bench_folder.dataset.workers", lambda: workers)
    start = time.perf_counter()
    dataset = registry.choose("dataset", f"folder:root={root}").build(root=None, size=224, download=False, cache_dir=cache)
    return dataset, time.perf_counter() - start


def test_decode_throughput(benchmark, registry, breast, tmp_path, monkeypatch):
    from hica_bench_folder.dataset import workers as decode_workers

    images, labels = breast
    folders = {"PNG 500x600": _write(tmp_path / "png", images, labels, (500, 600), ".png"),
               "JPEG 512x512": _write(tmp_path / "jpeg", images, labels, (512, 512), ".jpeg")}
    from hica_bench.files import file_sha256

    cores = decode_workers()
    rates = {}
    for name, root in folders.items():  # each file's sha256 once (a run reads each file version once): timed apart
        files = sorted(p for p in root.rglob("*") if p.is_file())
        start = time.perf_counter()
        for path in files:
            file_sha256(path, on_disk=False)
        rates[f"{name}, sha256 (1 thread, first run only)"] = [len(files) / (time.perf_counter() - start)]

    def decode_all():
        for name, root in folders.items():
            for workers in sorted({1, cores}):
                cache = tmp_path / f"cache-{name[:4]}-{workers}-{len(rates)}"
                dataset, seconds = _build(registry, root, cache, workers, monkeypatch)
                assert dataset.decoded == len(labels)
                rates.setdefault(f"{name}, {workers} thread{'s' if workers > 1 else ''}", []).append(len(labels) / seconds)
    benchmark.pedantic(decode_all, rounds=1, iterations=1)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    benchmark.extra_info.update(images_per_s=medians)
    print("\nfolder decode at 224 px: " + "; ".join(f"{k}: {v:.0f} img/s" for k, v in medians.items()))


def test_extraction_from_the_decoded_folder_against_the_npz_path(benchmark, registry, encoders, breast, tmp_path):
    images, labels = breast
    folder, _ = _build(registry, _write(tmp_path / "png", images, labels, (224, 224), ".png"), tmp_path / "cache")
    same = folder.split("train")
    npz_path = tmp_path / "npz" / "breastmnist_224.npz"
    npz_path.parent.mkdir()
    arrays = {}
    for split in ("train", "val", "test"):
        part = folder.split(split)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = np.asarray(part.images), part.labels.reshape(-1, 1).astype(np.uint8)
    np.savez_compressed(npz_path, **arrays)  # MedMNIST's own format: compressed members
    npz = registry.choose("dataset", "breastmnist").build(root=str(npz_path.parent), size=224, download=False,
                                                          cache_dir=tmp_path / "cache")
    assert np.array_equal(npz.split("train").images, same.images)
    sources = {"folder": folder, "npz": npz}
    encoded: dict[str, list[float]] = {name: [] for name in sources}
    data_path: dict[str, list[float]] = {name: [] for name in sources}

    def alternate():
        for _ in range(ROUNDS):
            for name, dataset in sources.items():
                split = dataset.split("train")
                start = time.perf_counter()
                for i in range(0, len(split.labels), 64):
                    preprocess(split.images[i:i + 64], encoders.image.input_spec, "cpu")
                data_path[name].append(len(split.labels) / (time.perf_counter() - start))
                extractor = FeatureExtractor.plain(encoders, 32)  # the service's batch loop, eager, fixed settings
                start = time.perf_counter()
                extractor.encode(split.images)
                encoded[name].append(len(split.labels) / (time.perf_counter() - start))
    benchmark.pedantic(alternate, rounds=1, iterations=1)
    ratio = statistics.median(f / n for f, n in zip(encoded["folder"], encoded["npz"]))
    data_ratio = statistics.median(f / n for f, n in zip(data_path["folder"], data_path["npz"]))
    benchmark.extra_info.update(encode_ratio=ratio, data_path_ratio=data_ratio,
                                encode_images_per_s={k: statistics.median(v) for k, v in encoded.items()},
                                data_path_images_per_s={k: statistics.median(v) for k, v in data_path.items()})
    print(f"\nextraction at 224 px, folder vs .npz (median of {ROUNDS} alternations): encoder pass "
          f"{statistics.median(encoded['folder']):.1f} vs {statistics.median(encoded['npz']):.1f} img/s, ratio {ratio:.3f} "
          f"[target >= 0.95]; read + preprocess alone {statistics.median(data_path['folder']):.0f} vs "
          f"{statistics.median(data_path['npz']):.0f} img/s, ratio {data_ratio:.3f}")

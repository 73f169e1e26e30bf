"""3D volumes (issue 22) at 64 voxels, measured and reported, never asserted:

- **volumes/s** of the whole ``hica-bench run`` encoder pass over a MedMNIST-3D-format file of 64³ volumes: the
  default 2D encoder reading each volume's 64 slices along axis 0 (mean pooled), and a native MONAI 3D ResNet-18
  (random init) on whole volumes;
- **peak RSS** of those runs (child processes) at two split sizes, 4x apart: memory stays flat when volumes are
  streamed a few at a time (:data:`hica_bench.volumes.CHUNK_SLICES`).

    python -m pytest benchmarks/test_volumes.py -s
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

CHILD = """
import resource, sys
sys.argv = ["hica-bench", *sys.argv[1:]]
from hica_bench.cli import main
try:
    main()
finally:
    print(f"peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
"""
SIZE = 64


def write_volumes(path: Path, n_train: int, n_test: int = 8) -> Path:
    """An uncompressed MedMNIST 3D file (``np.savez`` layout, memory-mapped in place) streamed a volume at a time."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for split, n in (("train", n_train), ("val", 4), ("test", n_test)):
            labels = (np.arange(n) % 2).astype(np.uint8).reshape(-1, 1)
            with archive.open(f"{split}_labels.npy", "w", force_zip64=True) as sink:
                np.lib.format.write_array(sink, labels)
            with archive.open(f"{split}_images.npy", "w", force_zip64=True) as sink:
                np.lib.format.write_array_header_1_0(sink, {"descr": "|u1", "fortran_order": False,
                                                            "shape": (n, SIZE, SIZE, SIZE)})
                for label in labels[:, 0]:
                    volume = rng.integers(40, 140, size=(SIZE,) * 3, dtype=np.uint8)
                    volume[: SIZE // 2 * (1 + label) // 2 or None] += 60
                    sink.write(volume.tobytes())
    return path


def run(tmp_path: Path, n_train: int, encoder: str, extra: list[str]) -> dict:
    root = tmp_path / f"{encoder.split(':')[0]}-{n_train}"
    write_volumes(root / "data" / "nodulemnist3d_64.npz", n_train)
    args = ["run", "--encoder", encoder, "--datasets", "nodulemnist3d", "--size", str(SIZE), "--methods", "prototype",
            "--shots", "1", "--seeds", "0", "--no-download", "--no-report", "--data-root", str(root / "data"),
            "--cache-dir", str(root / "cache"), "--out", str(root / "out"), *extra]
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(re.search(r"peak_rss_kib=(\d+)", done.stdout).group(1)) * 1024
    record = json.loads((root / "out" / "results.jsonl").read_text().splitlines()[0])
    volumes = n_train + 8
    seconds = volumes / record["timings"]["encoder_images_per_s"]
    return {"volumes_per_s": volumes / seconds, "peak_rss_mib": peak / 2**20, "volumes": volumes}


def test_volumes_per_second_and_peak_rss_at_64_voxels(tmp_path):
    lines = []
    for encoder, extra in (("effnet-lite0-minilm", ["--backend", "onnxruntime", "--batch-size", "64", "--threads", "2"]),
                           ("monai-3d:checkpoint=random:model=resnet18:size=64:text=", [])):
        small, large = run(tmp_path, 24, encoder, extra), run(tmp_path, 96, encoder, extra)
        lines.append(f"{encoder.split(':')[0]}: {large['volumes_per_s']:.2f} volumes/s ({large['volumes']} volumes of "
                     f"64³); peak RSS {small['peak_rss_mib']:.0f} MiB at {small['volumes']} volumes, "
                     f"{large['peak_rss_mib']:.0f} MiB at {large['volumes']} "
                     f"(ratio {large['peak_rss_mib'] / small['peak_rss_mib']:.2f})")
    print("\n" + "\n".join(lines))


def test_slices_per_second_against_2d_images_side_by_side(tmp_path, registry, cache_dir):
    """Volumes through a 2D encoder against the same encoder on 2D images of the same pixels (issue 35, target 3):
    the very slices of 64³ volumes, once cut from the volumes by the volume path (``encode_sliced``, axis 0, mean),
    once as a plain (N, 64, 64) image array through the 2D path, with the same extractor and settings (ONNX Runtime,
    batch 64, 2 threads), in turns, 5 rounds; the ratio of slices/s to images/s per round (target ≥ 0.97)."""
    import statistics
    import time

    from hica_bench import volumes
    from hica_bench.extraction import FeatureExtractor, Requested

    path = write_volumes(tmp_path / "data" / "nodulemnist3d_64.npz", 24, n_test=8)
    dataset = registry.choose("dataset", "nodulemnist3d").build(root=str(path.parent), size=64, download=False,
                                                                cache_dir=cache_dir)
    vols = dataset.split("train").images  # memory-mapped, as a run reads it
    flat = np.ascontiguousarray(volumes.slices(vols, 0))  # the same 24 · 64 slices as 2D images
    pair = registry.choose("encoder", "effnet-lite0-minilm").build(device="cpu")
    extractor = FeatureExtractor(pair, cache_dir, Requested(backend="onnxruntime", batch_size=64, channels_last=False,
                                                             threads=2), reference=False)
    options = volumes.VolumeOptions()
    extractor.encode(flat[:128])  # warm-up: the session and the first batches
    ratios, rates = [], []
    for _ in range(5):
        start = time.perf_counter()
        volumes.encode_sliced(vols, options, extractor.encode)
        sliced = len(flat) / (time.perf_counter() - start)
        start = time.perf_counter()
        extractor.encode(flat)
        images = len(flat) / (time.perf_counter() - start)
        ratios.append(sliced / images)
        rates.append((sliced, images))
    print(f"\nvolumes by slices: {statistics.median(r[0] for r in rates):.1f} slices/s against "
          f"{statistics.median(r[1] for r in rates):.1f} images/s on the same 2D pixels; ratio median "
          f"{statistics.median(ratios):.3f} (per round {', '.join(f'{r:.3f}' for r in ratios)})  [target ≥ 0.97]")

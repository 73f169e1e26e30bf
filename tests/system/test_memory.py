"""Memory stays flat: the peak RSS of a real ``hica-bench run`` over a 224 px dataset does not grow with the
number of images (issue 8).

The images are memory-mapped (``hica_bench.data.LazyNpz``); pages of a file map that were read count in the
process's RSS until they are unmapped, so without ``hica_bench.data.release_pages`` reading a 1 GB split
through its map grows RSS by 1 GB even though the data sits in the page cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_PLUGINS

SIZE = 224
SMALL, LARGE = 1_000, 11_000
# The 10,000 extra images are 10,000 × 224 × 224 B ≈ 480 MiB of pixels: RSS that grew with N would exceed this
# by almost an order of magnitude. What legitimately grows with N is tiny (labels, the (N, 16) float32 features:
# 0.7 MiB at 11k); the rest of the margin is allocator noise between two otherwise identical runs.
MARGIN_MIB = 64

CHILD = """
import resource, sys
sys.argv = ["hica-bench", *sys.argv[1:]]
from hica_bench.cli import main  # main() sets THP_MEM_ALLOC_ENABLE before torch is imported, as the console script
try:
    main()
finally:
    print(f"peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
"""


def write_breastmnist_224(path: Path, n_train: int, n_val: int = 16, n_test: int = 64) -> Path:
    """BreastMNIST at 224 px in the exact MedMNIST+ format (``breastmnist_224.npz``: uint8 images (N, 224, 224),
    uint8 labels (N, 1) per split), stored uncompressed like ``np.savez`` so it is memory-mapped in place.
    The images are streamed into the archive a chunk at a time: the test process never holds a whole split."""
    rng = np.random.default_rng(0)
    pool = rng.integers(40, 140, size=(256, SIZE, SIZE), dtype=np.uint8)  # noise, reused chunk after chunk
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            labels = (np.arange(n) % 2).astype(np.uint8).reshape(-1, 1)
            with archive.open(f"{split}_labels.npy", "w", force_zip64=True) as sink:
                np.lib.format.write_array(sink, labels)
            with archive.open(f"{split}_images.npy", "w", force_zip64=True) as sink:
                np.lib.format.write_array_header_1_0(sink, {"descr": "|u1", "fortran_order": False, "shape": (n, SIZE, SIZE)})
                for start in range(0, n, len(pool)):
                    chunk = pool[: min(len(pool), n - start)].copy()
                    chunk[labels[start : start + len(chunk), 0] == 1, : SIZE // 4, : SIZE // 4] = 230  # class 1: a bright corner
                    sink.write(chunk.tobytes())
    return path


def peak_rss_of_run(tmp_path: Path, n_train: int) -> int:
    """Peak RSS (bytes) of a child process running the real CLI's ``run`` over ``n_train`` 224 px train images."""
    root = tmp_path / f"n{n_train}"
    write_breastmnist_224(root / "data" / "breastmnist_224.npz", n_train)
    args = ["-p", "pooled_encoder", "run", "--encoder", "pooled224", "--datasets", "breastmnist", "--size", str(SIZE),
            "--methods", "prototype", "--shots", "1", "--seeds", "0", "--batch-size", "64", "--backend", "eager",
            "--threads", "1", "--no-channels-last", "--device", "cpu", "--no-download",
            "--data-root", str(root / "data"), "--cache-dir", str(root / "cache"), "--out", str(root / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")])}
    try:
        child = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, timeout=600)
    finally:
        (root / "data" / "breastmnist_224.npz").unlink()  # up to 1 GB: not left behind in pytest's kept temp folders
    assert child.returncode == 0, child.stderr
    records = [json.loads(line) for line in (root / "out" / "results.jsonl").open()]
    assert [(r["key"]["method"], r["key"]["k"], r["status"]) for r in records] == [("prototype", 1, "ok")], records
    peak = re.search(r"peak_rss_kib=(\d+)", child.stdout)
    assert peak, child.stdout
    return int(peak.group(1)) * (1 if sys.platform == "darwin" else 1024)  # ru_maxrss: bytes on macOS, KiB elsewhere


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="measures peak RSS with the resource module (POSIX)")
def test_peak_rss_of_a_224px_extraction_does_not_grow_with_the_number_of_images(tmp_path):
    small = peak_rss_of_run(tmp_path, SMALL)
    large = peak_rss_of_run(tmp_path, LARGE)
    mib = 1 << 20
    assert large - small <= MARGIN_MIB * mib, (
        f"peak RSS {large / mib:.0f} MiB with {LARGE} images vs {small / mib:.0f} MiB with {SMALL}: "
        f"grew by {(large - small) / mib:.0f} MiB (allowed {MARGIN_MIB})")

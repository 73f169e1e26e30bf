"""What a run costs as a whole process (issue 14's start-up targets), measured with pytest-benchmark and reported as
ratios taken in one run, never asserted:

- a fully cached one-cell run (BreastMNIST, linear probe, 1 shot, 1 seed; every feature and the tuning verdict in
  the cache, ``--force`` so the cell itself runs): wall seconds and peak RSS (target: < 3 s, < 400 MB);
- a first run on BreastMNIST with a fresh cache against the plain eager script (``benchmarks/plain_eager.py``)
  encoding the same 702 images, alternating (target: the run ≥ 2× faster end to end);
- a fresh-cache zero-shot run of an open_clip ViT-B-32 checkpoint against CLIP_benchmark's fp32 zero-shot evaluation
  of the same checkpoint on the same 156 test images, alternating (target: no slower). Needs ``clip_benchmark``
  (``pip install clip_benchmark``); the checkpoint is a random initialisation saved in open_clip's format: no
  aligned weights are reachable offline, and speed does not depend on the weights' values.

    python -m pytest benchmarks/test_start_up.py -s        # prints one report line per benchmark

Each process is timed by a wrapper that also reads the child's peak RSS (``getrusage(RUSAGE_CHILDREN)``).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3  #: alternations per comparison
CELL = ["--datasets", "breastmnist", "--methods", "linear-probe", "--shots", "1", "--seeds", "0", "-q"]
WRAPPER = ("import json, resource, subprocess, sys, time; start = time.perf_counter(); "
           "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
           "print(json.dumps({'rc': code, 'wall_s': time.perf_counter() - start, "
           "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")


def process(command: list[str], env: dict[str, str], cwd: Path) -> dict:
    """Wall seconds and peak RSS of ``command`` as one process (started from a fresh wrapper)."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, *command], env=env, cwd=cwd, capture_output=True, text=True,
                         check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["rc"] == 0, f"{command} exited {measured['rc']}: {out.stderr[-2000:]}"
    return measured


def hica_bench() -> list[str]:
    return [str(Path(sys.executable).with_name("hica-bench"))]


@pytest.fixture
def run_env(medmnist_root, tmp_path) -> dict[str, str]:
    return {**os.environ, "HICA_BENCH_DATA": str(medmnist_root), "HF_HUB_OFFLINE": "1",
            "HICA_BENCH_CACHE": str(tmp_path / "cache")}


def report(benchmark, text: str, **numbers) -> None:
    benchmark.extra_info.update(numbers)
    print(f"\n{text}")


def test_fully_cached_one_cell_run(benchmark, run_env, tmp_path):
    """One cell whose features and tuning verdict are cached: the encoder is not built and torch is not imported."""
    process(hica_bench() + ["run", *CELL, "--out", "out"], run_env, tmp_path)  # fills the cache
    runs = []

    def one_run():
        runs.append(process(hica_bench() + ["run", *CELL, "--out", "out", "--force"], run_env, tmp_path))

    benchmark.pedantic(one_run, rounds=5, iterations=1)
    walls, rss = [r["wall_s"] for r in runs], [r["peak_rss_mb"] for r in runs]
    report(benchmark, f"fully cached one-cell run: median {statistics.median(walls):.2f} s wall "
                      f"(min {min(walls):.2f}, max {max(walls):.2f}), peak RSS {max(rss):.0f} MB  [target < 3 s, < 400 MB]",
           wall_s_median=statistics.median(walls), wall_s=walls, peak_rss_mb=max(rss))


def test_first_run_against_a_plain_eager_script(benchmark, run_env, medmnist_root, tmp_path):
    """A first run (fresh cache: settings probe, encoding of train and test, one cell) against a plain eager script
    encoding the same 702 images, alternating."""
    ours, plain = [], []

    def pair():
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        ours.append(process(hica_bench() + ["run", *CELL, "--out", "out"], run_env, tmp_path)["wall_s"])
        plain.append(process([sys.executable, str(REPO / "benchmarks" / "plain_eager.py"), str(medmnist_root),
                              "breastmnist"], run_env, tmp_path)["wall_s"])

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1)
    ratios = [p / o for o, p in zip(ours, plain)]
    report(benchmark, f"first run vs plain eager (BreastMNIST, 702 images): hica-bench {statistics.median(ours):.1f} s, "
                      f"plain {statistics.median(plain):.1f} s; plain ÷ run median {statistics.median(ratios):.2f}× "
                      f"(per round {', '.join(f'{r:.2f}' for r in ratios)})  [target ≥ 2×]",
           run_s=ours, plain_s=plain, speedup=ratios)


#: CLIP_benchmark's zero-shot evaluation as its ``evaluate`` runs it (model and transform from its ``load_clip``, its
#: ``zero_shot_classifier`` and ``run_classification``, batch 64 like its CLI, fp32), with the accuracy computed here:
#: its own ``accuracy`` calls ``float()`` on a 1-element array, which NumPy 2 refuses (clip_benchmark 1.6.2).
CLIP_BENCHMARK = """
import sys
import torch
from torchvision.datasets import ImageFolder
from clip_benchmark.models import load_clip
from clip_benchmark.metrics import zeroshot_classification as zs

checkpoint, folder = sys.argv[1], sys.argv[2]
model, transform, tokenizer = load_clip(model_type="open_clip", model_name="ViT-B-32", pretrained=checkpoint,
                                        cache_dir=None, device="cpu")
loader = torch.utils.data.DataLoader(ImageFolder(folder, transform=transform), batch_size=64, shuffle=False,
                                     num_workers=0)
classnames = ["malignant", "normal, benign"]
templates = ["a photo of a {c}.", "an ultrasound image of {c} breast tissue."]
classifier = zs.zero_shot_classifier(model, tokenizer, classnames, templates, "cpu", amp=False)
logits, target = zs.run_classification(model, classifier, loader, "cpu", amp=False)
print("acc", (logits.argmax(1) == target).float().mean().item())
"""


def test_zero_shot_against_clip_benchmark(benchmark, run_env, medmnist_root, tmp_path):
    """``hica-bench run --methods zero-shot`` with a fresh cache against CLIP_benchmark's fp32 zero-shot evaluation of
    the same open_clip checkpoint on the same BreastMNIST test images, alternating."""
    pytest.importorskip("clip_benchmark", reason="pip install clip_benchmark to compare with it")
    import open_clip
    import torch
    from PIL import Image

    from hica_bench_encoders.weights import seeded

    checkpoint = tmp_path / "vit-b-32-random-init.pt"
    with seeded(0):
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), checkpoint)
    files = np.load(medmnist_root / "breastmnist.npz")
    for index, (image, label) in enumerate(zip(files["test_images"], files["test_labels"][:, 0])):
        folder = tmp_path / "images" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:04d}.png")
    script = tmp_path / "clip_benchmark_eval.py"
    script.write_text(CLIP_BENCHMARK)
    ours, theirs = [], []
    command = hica_bench() + ["run", "--datasets", "breastmnist", "--methods", "zero-shot", "--shots", "1",
                              "--seeds", "0", "-q", "--encoders", f"open-clip:model=ViT-B-32:pretrained={checkpoint}"]

    def pair():
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        ours.append(process(command + ["--out", "out"], run_env, tmp_path)["wall_s"])
        theirs.append(process([sys.executable, str(script), str(checkpoint), str(tmp_path / "images")], run_env,
                              tmp_path)["wall_s"])

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1)
    ratios = [o / t for o, t in zip(ours, theirs)]
    report(benchmark, f"fresh-cache zero-shot vs CLIP_benchmark fp32 (ViT-B-32, 156 images): hica-bench "
                      f"{statistics.median(ours):.1f} s, CLIP_benchmark {statistics.median(theirs):.1f} s; run ÷ "
                      f"CLIP_benchmark median {statistics.median(ratios):.2f} (per round "
                      f"{', '.join(f'{r:.2f}' for r in ratios)})  [target ≤ 1]",
           run_s=ours, clip_benchmark_s=theirs, ratio=ratios)

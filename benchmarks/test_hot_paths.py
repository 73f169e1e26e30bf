"""Hot paths of a run, timed with pytest-benchmark: preprocessing, feature extraction, the feature cache,
support sampling, metrics, and one small grid end to end.

Save a baseline, then compare a change against it (fails when a median is more than 10 % slower):

    python -m pytest benchmarks --benchmark-autosave
    python -m pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:10%
"""

from __future__ import annotations

import numpy as np
import pytest

from hica_bench import protocol
from hica_bench.data import preprocess
from hica_bench.extraction import FeatureExtractor
from hica_bench.extraction.cache import FeatureCache
from hica_bench.metrics import classification_metrics

BATCH = 16


def test_preprocess_batch(benchmark, breastmnist, encoders):
    """One CPU batch of 28 px grey images to the encoder's normalised 224 px input (bicubic, antialiased)."""
    images = breastmnist.split("train").images[:BATCH]
    batch = benchmark(preprocess, images, encoders.image.input_spec, "cpu")
    assert tuple(batch.shape) == (BATCH, 3, 224, 224)


def test_encoder_forward_batch(benchmark, breastmnist, encoders):
    """The raw forward of one preprocessed batch (what `hica-bench bench` calls raw)."""
    import torch

    batch = preprocess(breastmnist.split("train").images[:BATCH], encoders.image.input_spec, "cpu")
    with torch.inference_mode():
        features = benchmark.pedantic(encoders.image.encode, args=(batch,), rounds=5, iterations=1, warmup_rounds=1)
    assert tuple(features.shape) == (BATCH, encoders.image.embed_dim)


def test_feature_extraction(benchmark, breastmnist, encoders):
    """The extraction service's loop over 4 batches (eager): memory-mapped reads, preprocessing, forward, copy out."""
    images = breastmnist.split("train").images[: 4 * BATCH]
    extractor = FeatureExtractor.plain(encoders, BATCH)
    features = benchmark.pedantic(extractor.encode, args=(images,), rounds=3, iterations=1, warmup_rounds=1)
    assert features.shape == (4 * BATCH, encoders.image.embed_dim) and np.isfinite(features).all()


def test_feature_cache_roundtrip(benchmark, tmp_path):
    """Write and read back (both with sha256) features the size of PneumoniaMNIST's train split."""
    cache = FeatureCache(tmp_path)
    features = np.random.default_rng(0).standard_normal((4708, 1280), dtype=np.float32)

    def roundtrip():
        cache.put("bench", features, {"bench": True})
        return cache.get("bench")

    assert np.array_equal(benchmark.pedantic(roundtrip, rounds=5, iterations=1), features)


@pytest.mark.parametrize("k", [1, 20])
def test_support_sampling(benchmark, pneumonia_labels, k):
    """k-shot support sampling over PneumoniaMNIST's 4,708 train labels (one sha256 key per image)."""
    indices = benchmark(protocol.sample_support, pneumonia_labels, 2, k, 0, "pneumoniamnist")
    assert len(indices) == 2 * k


def test_metrics(benchmark):
    """ACC / AUC / macro-F1 / balanced accuracy on a PneumoniaMNIST-sized test split."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 624)
    proba = rng.dirichlet([1, 1], 624)
    scores = benchmark(classification_metrics, labels, proba)
    assert 0 <= scores.acc <= 1 and 0 <= scores.auc <= 1


def test_small_grid(benchmark, registry, medmnist_root, cache_dir, tmp_path):
    """`hica-bench run` on BreastMNIST (linear-probe + prototype, shots 1 and 5, seed 0), features from a warm cache:
    encoder construction, cache reads, support sampling, fit, predict, metrics, results and leaderboard writes."""
    from hica_bench import plan, publish, runner

    grid = plan.Grid(datasets=[registry.choose("dataset", "breastmnist")],
                     methods=[registry.choose("method", m) for m in ("linear-probe", "prototype")],
                     encoders=[registry.choose("encoder", "effnet-lite0-minilm")], shots=[1, 5], seeds=[0])
    rounds = iter(range(100))

    def run_grid():  # a fresh --out each round, so every cell runs
        out = tmp_path / f"out{next(rounds)}"
        summary = runner.run(grid, plan.Settings(device="cpu", data_root=str(medmnist_root), cache_dir=cache_dir,
                                                 out_dir=out, download=False), registry)
        publish.publish(out, report=False)
        return summary

    summary = benchmark.pedantic(run_grid, rounds=3, iterations=1, warmup_rounds=1)  # the warm-up fills the cache
    assert summary.ok == 4 and summary.failed == 0 and summary.cache_hits == 2


def test_encoder_loop_against_its_raw_forward(breastmnist, encoders, cache_dir):
    """The harness's encoder loop (``encode_images``: a prefetch thread preprocessing the next batch) against the raw
    forward of one preprocessed batch, and against the same batches preprocessed beforehand (the loop without
    preprocessing), on ONNX Runtime (dynamo export, batch 16, 2 threads), 384 BreastMNIST images, 8 rounds in turns in
    this process; ratios of images/s per round, reported (issue 35, target 1: the loop ≥ 0.95 of the raw forward)."""
    import statistics
    import time

    import torch

    from hica_bench.extraction.backends import onnx_forward
    from hica_bench.extraction.encode import encode_images

    pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    torch.set_num_threads(2)
    images = breastmnist.split("train").images[:384]
    spec = encoders.image.input_spec
    forward = onnx_forward(encoders, "cpu", cache_dir, 2, "dynamo")
    batches = [preprocess(images[s:s + BATCH], spec) for s in range(0, len(images), BATCH)]
    for _ in range(3):
        forward(batches[0])

    def rate(work) -> float:
        start = time.perf_counter()
        work()
        return len(images) / (time.perf_counter() - start)

    rounds = {"raw": [], "loop": [], "prepared": []}
    for _ in range(8):
        rounds["raw"].append(rate(lambda: [forward(batches[0]) for _ in batches]))
        rounds["loop"].append(rate(lambda: encode_images(images, encoders.image, "cpu", BATCH, forward=forward)))
        rounds["prepared"].append(rate(lambda: [forward(b).numpy() for b in batches]))
    lines = [f"raw forward {statistics.median(rounds['raw']):.1f} img/s"]
    for name in ("loop", "prepared"):
        ratios = [b / a for a, b in zip(rounds["raw"], rounds[name])]
        lines.append(f"{name} {statistics.median(rounds[name]):.1f} img/s = {statistics.median(ratios):.3f}x raw "
                     f"({min(ratios):.3f}-{max(ratios):.3f})")
    print("\nencoder loop vs raw forward (384 images, ONNX Runtime, batch 16, 2 threads): " + "; ".join(lines)
          + "  [target: loop >= 0.95x]")

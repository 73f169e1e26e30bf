"""`hica-bench bench` end to end on real BreastMNIST with tiny encoders: the report's fields and their consistency."""

import json
import statistics

import pytest

from test_check import cli


@pytest.fixture
def bench(capsys, medmnist_root, tmp_path):
    """``hica-bench bench`` in this process on real BreastMNIST: (CompletedProcess, JSON report or None)."""
    def run(*extra):
        out = tmp_path / "bench.json"
        out.unlink(missing_ok=True)
        result = cli(capsys, "-p", "pixel_encoder", "bench", "--data-root", medmnist_root, "--cache-dir", tmp_path / "cache",
                     "--out", out, *extra)
        return result, (json.loads(out.read_text()) if result.returncode == 0 else None)

    return run


def test_pixels_report(bench, tmp_path):
    result, report = bench("--encoder", "pixels", "--batch-size", "8",
                           "--batches", "3", "--repeats", "3", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    assert report["images"] == 24 and report["batch_size"] == 8 and report["device"] == "cpu"
    assert (report["size"], report["input_size"], report["precision"]) == (28, 16, "fp32")
    for path in ("raw", "harness"):
        ips = report[path]["images_per_s"]
        assert len(ips["per_repeat"]) == 3 and all(v > 0 for v in ips["per_repeat"])
        assert ips["min"] <= ips["median"] <= ips["max"] and ips["median"] == statistics.median(ips["per_repeat"])
    ratios = report["ratio_per_repeat"]
    assert ratios == [h / r for h, r in zip(report["harness"]["images_per_s"]["per_repeat"], report["raw"]["images_per_s"]["per_repeat"])]
    assert report["ratio"] == statistics.median(ratios) and report["ratio"] > 0
    stages = report["stage_seconds"]
    assert stages["preprocess"] > 0 and stages["cache_write"] > 0 and stages["harness_total"] > 0
    assert report["peak_memory_mb"] is None and report["peak_rss_mb"] > 0  # CPU: process peak only
    assert report["harness"]["recorded_images_per_s"] >= report["harness"]["images_per_s"]["min"]  # no cache write in it
    assert report["threads"] >= 1 and report["environment"]["cpu_model"]
    assert f"harness/raw ratio: {report['ratio']:.3f}" in result.stdout
    assert not list((tmp_path / "cache").glob("hica-bench-bench-*"))  # throw-away caches are removed


def test_conv_model_channels_last(bench):
    result, report = bench("--encoder", "timm:model=test_efficientnet:text=", "--batch-size", "4",
                           "--batches", "2", "--repeats", "1", "--warmup", "1", "--channels-last", "--split", "test")
    assert result.returncode == 0, result.stderr
    assert report["channels_last"] and report["input_size"] == 160 and report["split"] == "test"
    assert report["raw"]["step_ms_median"] > 0 and 0 < report["ratio"] < 10
    assert report["encoder_identity"].startswith("timm:test_efficientnet:")


def test_bad_input_exits_2(bench):
    too_many, _ = bench("--encoder", "pixels", "--split", "test", "--batches", "100")
    assert too_many.returncode == 2 and "fewer than --batches" in too_many.stderr
    no_module, _ = bench("--encoder", "pixels", "--channels-last")
    assert no_module.returncode == 2 and "--channels-last needs" in no_module.stderr
    bad_split, _ = bench("--encoder", "pixels", "--split", "dev")
    assert bad_split.returncode == 2 and "--split" in bad_split.stderr


class CountingEncoder:
    """A tiny real image encoder (mean colour) that records the batch size of every call."""

    identity = "counting-v1"
    embed_dim = 3

    def __init__(self):
        from hica_bench.interfaces import InputSpec

        self.input_spec = InputSpec(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
        self.calls = []

    def encode(self, images):
        self.calls.append(len(images))
        return images.mean(dim=(2, 3))


def test_reference_probe_spreads_its_passes_over_the_extraction():
    import numpy as np

    from hica_bench.features import ReferenceProbe, encode_images

    encoder = CountingEncoder()
    images = np.random.default_rng(0).integers(0, 255, (100, 28, 28), dtype=np.uint8)
    probe = ReferenceProbe.for_split(encoder, images, "cpu", batch_size=10, passes=3)
    assert probe.images_per_s is None  # nothing timed before the extraction
    features = encode_images(images, encoder, "cpu", 10, on_batch=probe)
    assert features.shape == (100, 3)
    # 10 extraction batches; a raw pass after batches 3, 6 and 9 (every 10 // 3), none after that
    assert encoder.calls == [10] * 13 and len(probe.times) == 3
    assert probe.paused_s >= sum(probe.times) > 0
    assert probe.images_per_s == 10 / statistics.median(probe.times)

"""Extraction settings chosen by measurement (hica_bench.extraction.tuning) and the ONNX Runtime backend (hica_bench.extraction.backends)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import write_medmnist_npz
from hica_bench.extraction import backends, tuning
from hica_bench.errors import UserError
from hica_bench.interfaces import EncoderPair, InputSpec

SPEC = InputSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")


class ConvEncoder:
    """A small real CNN (random init, seed 0) that exposes its module, so every backend and layout applies."""

    identity = "test-conv-32px-v1"
    input_spec = SPEC
    embed_dim = 8

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()

    def encode(self, images):
        return self.model(images)


class NumpyInsideEncoder(ConvEncoder):
    """Branches in Python on a pixel value, which a traced graph cannot express, so it cannot be exported."""

    identity = "test-branch-on-data-v1"

    def encode(self, images):
        features = self.model(images)
        return features * 2 if float(images.flatten()[0]) > 10 else features


def pair(encoder) -> EncoderPair:
    return EncoderPair(encoder, None, aligned=False, device="cpu", modules={"image": encoder.model})


def test_probe_keeps_fixed_knobs_and_is_remembered(tmp_path):
    lines: list[str] = []
    first = tuning.choose(pair(ConvEncoder()), tuning.Requested(batch_size=8, threads=1), tmp_path, lines.append)
    assert first.source == "measured" and first.path.is_file()
    assert first.settings.batch_size == 8 and first.settings.threads == 1
    assert {p["batch_size"] for p in first.probe} == {8}
    tried = {(p["backend"], p["channels_last"]) for p in first.probe}
    assert ("eager", False) in tried and ("eager", True) in tried
    assert ("onnxruntime", False) in tried  # installed with the test extra
    # no work given: the export --backend onnxruntime uses; the trace only where that one was not made
    assert {p.get("exporter") for p in first.probe if p["backend"] == "onnxruntime"} == {"dynamo"}
    assert "not needed" in first.unavailable["onnxruntime (torchscript export)"]
    assert len(lines) == len(first.probe)
    best = max(first.probe, key=lambda p: p["images_per_s"])
    chosen = next(p for p in first.probe if {k: v for k, v in p.items() if k != "images_per_s"} == tuning.knobs(first.settings))
    assert chosen["images_per_s"] * tuning.MARGIN >= best["images_per_s"]  # the winner, up to the probe's noise margin

    again = tuning.choose(pair(ConvEncoder()), tuning.Requested(batch_size=8, threads=1), tmp_path)
    assert again.source == "remembered" and again.settings == first.settings and again.probe == first.probe
    other = tuning.choose(pair(ConvEncoder()), tuning.Requested(batch_size=4, threads=1), tmp_path)
    assert other.source == "measured" and other.path != first.path  # a different fixed knob is a different question


def test_everything_fixed_needs_no_probe(tmp_path):
    choice = tuning.choose(pair(ConvEncoder()), tuning.Requested(backend="eager", batch_size=4, channels_last=True, threads=1), tmp_path)
    assert choice.source == "given" and choice.probe == [] and not (tmp_path / "tuning").exists()
    assert (choice.settings.backend, choice.settings.batch_size, choice.settings.channels_last) == ("eager", 4, True)


def test_batch_size_search_walks_from_the_middle(tmp_path):
    choice = tuning.choose(pair(ConvEncoder()), tuning.Requested(backend="eager", channels_last=False, threads=1), tmp_path)
    sizes = [p["batch_size"] for p in choice.probe]
    assert sizes[0] == 16 and set(sizes) <= set(tuning.CPU_BATCHES) and len(sizes) == len(set(sizes))
    assert choice.settings.batch_size in sizes


def test_unexportable_encoder_falls_back_to_eager_with_the_reason_remembered(tmp_path):
    choice = tuning.choose(pair(NumpyInsideEncoder()), tuning.Requested(batch_size=4, threads=1), tmp_path)
    assert choice.settings.backend == "eager"
    for exporter in backends.EXPORTERS:  # neither exporter can: the trace would freeze the branch, dynamo refuses it
        assert choice.unavailable[f"onnxruntime ({exporter} export)"].startswith("torch.onnx.export failed")
    record = json.loads(next((tmp_path / "onnx").glob("*/export.json")).read_text())
    assert record["ok"] is False  # not retried on the next run
    with pytest.raises(backends.BackendUnavailable, match="export failed"):
        backends.export_onnx(pair(NumpyInsideEncoder()), tmp_path)
    with pytest.raises(UserError, match="--backend onnxruntime"):
        tuning.choose(pair(NumpyInsideEncoder()), tuning.Requested(backend="onnxruntime", batch_size=4), tmp_path)
    with pytest.raises(UserError, match="--backend onnxruntime"):  # every knob fixed: nothing probed, still refused
        tuning.choose(pair(NumpyInsideEncoder()), tuning.Requested(backend="onnxruntime", batch_size=4, threads=1), tmp_path)


def test_encoder_without_module_is_eager_only(tmp_path):
    plain = EncoderPair(ConvEncoder(), None, aligned=False, device="cpu")  # modules not exposed
    choice = tuning.choose(plain, tuning.Requested(batch_size=4, threads=1), tmp_path)
    assert choice.source == "given" and choice.settings.backend == "eager" and not choice.settings.channels_last
    assert "image module" in choice.unavailable["onnxruntime"]


@pytest.mark.parametrize("bad", [dict(backend="tensorrt"), dict(batch_size=-1), dict(threads=-1)])
def test_requested_rejects_bad_values(bad):
    with pytest.raises(UserError):
        tuning.Requested(**bad)


def test_the_tracing_exporter_refuses_data_dependent_control_flow(tmp_path):
    """Tracing would freeze the encoder's pixel-dependent branch into the graph (and its check batch would not see it):
    the torchscript export is refused, with the reason remembered, instead of giving silently wrong features."""
    with pytest.raises(backends.BackendUnavailable, match="freeze data-dependent control flow"):
        backends.export_onnx(pair(NumpyInsideEncoder()), tmp_path, "torchscript")
    assert not backends.export_record(pair(NumpyInsideEncoder()), tmp_path, "torchscript")["ok"]  # remembered, refused
    path, record = backends.export_onnx(pair(ConvEncoder()), tmp_path, "torchscript")
    assert record["ok"] and record["exporter"] == "torchscript" and path.is_file()
    assert backends.export_record(pair(ConvEncoder()), tmp_path, "torchscript")["ok"]


class SamePaddingEncoder(ConvEncoder):
    """TensorFlow-"same" padding at stride 2 (timm's ``Conv2dSame``, as in EfficientNet-Lite0): the padding is worked
    out from the input's height and width when it runs, so a trace records it as shape arithmetic and a ``Pad``."""

    identity = "test-same-padding-32px-v1"

    def __init__(self) -> None:
        from timm.layers import create_conv2d

        torch.manual_seed(0)
        self.model = torch.nn.Sequential(create_conv2d(3, 8, 3, stride=2, padding="same"), torch.nn.BatchNorm2d(8),
                                         torch.nn.ReLU(), create_conv2d(8, 8, 3, stride=2, padding="same", depthwise=True),
                                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


def test_the_traced_graph_is_folded_into_the_convolutions(tmp_path):
    """The trace's run-time padding arithmetic is folded into the convolutions (no Pad, Shape or Gather left) and the
    folded graph kept: its features are the plain trace's to the bit (the export's own check)."""
    import onnx

    encoder = pair(SamePaddingEncoder())
    path, record = backends.export_onnx(encoder, tmp_path, "torchscript")
    fold = record["fold"]
    assert record["ok"] and fold["kept"] and fold["nodes_after"] < fold["nodes_before"] and fold["rounds"] >= 2, fold
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert "Conv" in ops and not ops & {"Pad", "Shape", "Gather"}, ops
    assert backends.export_record(encoder, tmp_path, "torchscript") == record


def test_the_probe_is_budgeted_by_the_work_ahead(tmp_path):
    """A small run does not pay for a long batch walk (the dynamo export it pays once, for a stable identity); the real
    images ahead are what is timed; the budget and what it left out are remembered with the verdict."""
    images = np.load(write_medmnist_npz(tmp_path / "tiny.npz", n_classes=2, counts=(40, 4, 8)))["train_images"]
    tiny = tuning.choose(pair(ConvEncoder()), tuning.Requested(threads=1), tmp_path / "a", work=tuning.Work(images, 40))
    assert tiny.source == "default" and tiny.probe == [] and not (tmp_path / "a" / "tuning").exists()  # not remembered
    assert (tiny.settings.backend, tiny.settings.batch_size, tiny.settings.channels_last) == ("eager", 16, False)
    assert "fewer than a probe needs to pay for itself" in tiny.unavailable["probe"]

    n = tuning.PROBE_MIN_IMAGES
    small = tuning.choose(pair(ConvEncoder()), tuning.Requested(threads=1), tmp_path / "a", work=tuning.Work(images, n))
    assert small.budget["work_images"] == n and small.budget["budget_s"] == tuning.MIN_PROBE_S
    assert {p.get("exporter") for p in small.probe if p["backend"] == "onnxruntime"} == {"dynamo"}  # whatever the size
    assert "not needed" in small.unavailable["onnxruntime (torchscript export)"]
    assert small.probe_s < tuning.MIN_PROBE_S + 30  # bounded by the budget plus the steps that are never skipped
    remembered = json.loads(small.path.read_text())
    assert remembered["budget"] == small.budget

    big = tuning.choose(pair(ConvEncoder()), tuning.Requested(threads=1), tmp_path / "b", work=tuning.Work(images, 10**9))
    assert {p.get("exporter") for p in big.probe if p["backend"] == "onnxruntime"} == {"dynamo"}  # a long run: the
    # identity --backend onnxruntime gives, whatever the trace would cost
    assert big.budget["skipped"] == []  # a long run affords the whole walk
    assert len({p["batch_size"] for p in big.probe}) > 1


def test_under_auto_the_dynamo_export_is_timed_whatever_the_run_and_the_cache(tmp_path):
    """The two exports' features differ in the last bits (the exporter is part of the feature identity), so under auto
    the dynamo export (the one --backend onnxruntime runs) is timed for a small run and a large one alike, even where
    only the trace is cached, and the two sizes share one verdict; the trace is tried only where the dynamo export
    cannot be made."""
    images = np.load(write_medmnist_npz(tmp_path / "tiny.npz", n_classes=2, counts=(40, 4, 8)))["train_images"]
    small, large = tuning.Work(images, tuning.PROBE_MIN_IMAGES), tuning.Work(images, 10**6)

    def exporters(choice) -> set:
        return {p.get("exporter") for p in choice.probe if p["backend"] == "onnxruntime"}

    backends.export_onnx(pair(ConvEncoder()), tmp_path / "trace-cached", "torchscript")
    first = tuning.choose(pair(ConvEncoder()), tuning.Requested(threads=1), tmp_path / "trace-cached", work=small)
    assert exporters(first) == {"dynamo"}
    assert "not needed" in first.unavailable["onnxruntime (torchscript export)"]
    again = tuning.choose(pair(ConvEncoder()), tuning.Requested(threads=1), tmp_path / "trace-cached", work=large)
    assert again.source == "remembered" and again.settings == first.settings  # one verdict, whatever the run's size

    # torch.export cannot follow this encoder's pixel-dependent branch and the trace refuses it: both are tried
    refused = tuning.choose(pair(NumpyInsideEncoder()), tuning.Requested(threads=1), tmp_path / "refused", work=small)
    assert "freeze data-dependent control flow" in refused.unavailable["onnxruntime (torchscript export)"]
    assert "onnxruntime (dynamo export)" in refused.unavailable or exporters(refused) == {"dynamo"}


def test_the_probes_winner_hands_over_the_first_batch_it_encoded(tmp_path):
    """The probe times real batches of the run's first split; the winner's features of the first batch are kept and
    the extraction does not encode that batch again. They must be the very bits the extraction would compute."""
    images = np.load(write_medmnist_npz(tmp_path / "tiny.npz", n_classes=2, counts=(40, 4, 8)))["train_images"]
    choice = tuning.choose(pair(ConvEncoder()), tuning.Requested(threads=1), tmp_path,
                           work=tuning.Work(images, tuning.PROBE_MIN_IMAGES, ("tiny", "train")))
    source, batch_size, kept = choice.first_batch
    assert source == ("tiny", "train") and batch_size == choice.settings.batch_size
    assert kept.shape == (min(batch_size, 40), ConvEncoder.embed_dim) and kept.dtype == np.float32
    from hica_bench.extraction import FeatureExtractor

    again = FeatureExtractor(pair(ConvEncoder()), tmp_path, settings=choice.settings, reference=False).encode(images)
    np.testing.assert_array_equal(again[: len(kept)], kept)
    handed = FeatureExtractor(pair(ConvEncoder()), tmp_path, settings=choice.settings, reference=False).encode(images, first=kept)
    np.testing.assert_array_equal(handed, again)

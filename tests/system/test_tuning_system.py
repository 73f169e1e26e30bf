"""Extraction settings and the ONNX Runtime backend with the real pretrained encoder, and as the installed
``hica-bench`` records them (split from tests/unit/test_tuning.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import TEST_PLUGINS, hica_bench, write_medmnist_npz
from hica_bench.data import LazyNpz, preprocess
from hica_bench.extraction import backends, tuning
from hica_bench.extraction.encode import encode_images


def test_onnx_export_of_the_default_encoder_matches_eager_on_real_images(medmnist_root, default_encoder_cache):
    from hica_bench_encoders.timm_encoders import effnet_lite0_minilm

    encoders = effnet_lite0_minilm("cpu")
    path, record = backends.export_onnx(encoders, default_encoder_cache)
    assert record["ok"] and record["max_abs_diff"] <= backends.ONNX_TOLERANCE * record["max_abs_eager"]
    images = LazyNpz(medmnist_root / "breastmnist.npz", default_encoder_cache).memmap("test_images")[:24]
    forward = backends.onnx_forward(encoders, "cpu", default_encoder_cache, threads=None)
    ort = encode_images(images, encoders.image, "cpu", batch_size=10, forward=forward)  # 10 + 10 + 4: dynamic batch
    eager = encode_images(images, encoders.image, "cpu", batch_size=10)
    assert np.abs(ort - eager).max() <= backends.ONNX_TOLERANCE * np.abs(eager).max()
    cosine = (ort * eager).sum(1) / np.linalg.norm(ort, axis=1) / np.linalg.norm(eager, axis=1)
    assert cosine.min() > 0.99999
    # the exported model is cached: a second call reuses the file and its record
    mtime = path.stat().st_mtime_ns
    assert backends.export_onnx(encoders, default_encoder_cache) == (path, record) and path.stat().st_mtime_ns == mtime
    with torch.inference_mode():  # channels-last eager (a probe candidate) agrees too
        backends.set_channels_last(encoders, True)
        try:
            cl = backends.eager_forward(encoders.image, "cpu", channels_last=True)(preprocess(images[:4], encoders.image.input_spec))
        finally:
            backends.set_channels_last(encoders, False)
    assert np.abs(cl.numpy() - eager[:4]).max() <= backends.ONNX_TOLERANCE * np.abs(eager).max()


def test_the_traced_export_of_the_default_encoder_is_folded_and_keeps_its_features_to_the_bit(
        medmnist_root, default_encoder_cache, tmp_path):
    """The torchscript export's shape arithmetic is folded and its pads fused into the convolutions (no Pad, Shape or
    Gather left: what kept ONNX Runtime from running it as fast as the dynamo graph), and on real images at a dynamic
    batch it gives the plain trace's features to the bit, so its feature identity stands."""
    import warnings

    import onnx
    import onnxruntime
    from hica_bench_encoders.timm_encoders import effnet_lite0_minilm

    encoders = effnet_lite0_minilm("cpu")
    path, record = backends.export_onnx(encoders, default_encoder_cache, "torchscript")
    assert record["ok"] and record["fold"]["kept"], record
    assert record["fold"]["nodes_after"] < record["fold"]["nodes_before"]
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert "Conv" in ops and not ops & {"Pad", "Shape", "Gather"}, ops

    class Encode(torch.nn.Module):  # the plain trace, as torch.onnx.export makes it
        def __init__(self) -> None:
            super().__init__()
            self.module = encoders.modules["image"]

        def forward(self, x):
            return encoders.image.encode(x)

    plain = tmp_path / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch calls this exporter "legacy"
        torch.onnx.export(Encode().eval(), (torch.rand(2, 3, 224, 224),), plain, dynamo=False, input_names=["images"],
                          output_names=["features"], dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    assert {node.op_type for node in onnx.load(plain).graph.node} >= {"Pad", "Shape", "Gather"}  # what was folded
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(str(plain), options, providers=["CPUExecutionProvider"])
    images = LazyNpz(medmnist_root / "breastmnist.npz", default_encoder_cache).memmap("test_images")[:24]
    folded = encode_images(images, encoders.image, "cpu", batch_size=10,
                           forward=backends.onnx_forward(encoders, "cpu", default_encoder_cache, 2, "torchscript"))
    traced = encode_images(images, encoders.image, "cpu", batch_size=10,
                           forward=lambda batch: torch.from_numpy(session.run(None, {"images": batch.numpy()})[0]))
    assert np.array_equal(folded, traced)


def test_onnx_runtime_prepares_the_images_itself_with_the_features_bits_on_real_grey_and_rgb_images(
        medmnist_root, default_encoder_cache, tmp_path):
    """The encoder loop hands ONNX Runtime the uint8 images as they are, and a graph made for their shape prepares them
    (cast, layout, the resize as two matrix products, clip and normalisation in front of the exported graph, in a file
    beside it): on real BreastMNIST (grey) and RetinaMNIST (RGB) images, 28 px, and on 224 px images (no resize), the
    features are the exported graph's on the preprocessed batch, to the bit, so the feature identity stands. A
    preparing graph that does not give them (here: made for ImageNet's constants) is not used, and the loop gives the same
    bits the slower way; neither is one for a shape it does not resize so (past the products' limit). A damaged one
    is written anew."""
    import onnx
    from hica_bench_encoders.timm_encoders import effnet_lite0_minilm

    from hica_bench.interfaces import InputSpec

    encoders = effnet_lite0_minilm("cpu")
    spec = encoders.image.input_spec
    forward = backends.onnx_forward(encoders, "cpu", default_encoder_cache, 2)
    path = backends.export_onnx(encoders, default_encoder_cache)[0]

    def bits(images, forward):
        with torch.inference_mode():
            expected = np.concatenate([forward(preprocess(images[s:s + 8], spec)).numpy() for s in range(0, len(images), 8)])
        got = encode_images(images, encoders.image, "cpu", batch_size=8, forward=forward)  # 8 + 8 + 5
        return np.array_equal(got.view(np.int32), expected.view(np.int32))

    real = {name: LazyNpz(medmnist_root / f"{name}.npz", default_encoder_cache).memmap("test_images")[:21]
            for name in ("breastmnist", "retinamnist")}
    real["224 px"] = np.random.default_rng(0).integers(0, 256, (21, 224, 224, 3), dtype=np.uint8)
    for name, images in real.items():
        assert forward.for_images(images) is not None, name
        assert bits(images, forward), name
    graph = onnx.load(path.with_name(f"preparing-{backends.PREPARING_VERSION}-28x28x1.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["uint8_images"]
    assert [n.op_type for n in graph.node[:7]] == ["Cast", "Unsqueeze", "MatMul", "MatMul", "Clip", "Sub", "Div"]
    assert forward.for_images(np.zeros((2, 65, 65), np.uint8)) is None  # past PRODUCTS_MAX_SIDE: preprocessed
    assert forward.for_images(np.zeros((2, 28, 28), np.float32)) is None  # not uint8

    # a preparing graph with other constants where the loop looks for it: it loads, the check refuses it, not used
    folder = tmp_path / "export"
    folder.mkdir()
    for part in path.parent.iterdir():  # copies: ONNX Runtime reads no weights file from outside the graph's folder
        if not part.name.startswith("preparing-"):
            shutil.copyfile(part, folder / part.name)
    images = real["breastmnist"]
    imagenet = InputSpec(spec.size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), spec.interpolation)
    assert imagenet.mean != spec.mean
    backends.preparing_graph(folder / path.name, imagenet, images.shape[1:])
    wrong = backends.ort_session(folder / f"preparing-{backends.PREPARING_VERSION}-28x28x1.onnx", 2)
    assert not backends.preparing_matches(forward, wrong, spec, images.shape[1:])
    other = backends.OnnxForward(backends.ort_session(folder / path.name, 2), folder / path.name, spec, 2)
    assert other.for_images(images) is None and other.for_images(images) is None  # refused, and not tried again
    assert bits(images, other)
    # a damaged one (it does not load) is written anew, checked and used
    damaged = folder / f"preparing-{backends.PREPARING_VERSION}-28x28x1.onnx"
    damaged.write_bytes(b"not a graph")
    mended = backends.OnnxForward(backends.ort_session(folder / path.name, 2), folder / path.name, spec, 2)
    assert mended.for_images(images) is not None and damaged.stat().st_size > 1000
    assert bits(images, mended)


@pytest.mark.slow
def test_run_records_the_chosen_settings_and_keys_the_cache_by_backend(tmp_path):
    data = tmp_path / "data"
    write_medmnist_npz(data / "breastmnist.npz", 2)
    common = ["-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist", "--methods", "prototype",
              "--shots", "1", "--seeds", "0", "--data-root", str(data), "--cache-dir", str(tmp_path / "cache")]
    first = hica_bench(*common, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    shown = " ".join(first.stdout.split())  # 50 images: too few for a probe to pay for itself
    assert "extraction: eager, batch 16" in shown and "defaults, not probed" in shown
    assert "this run encodes 50 images, fewer than a probe needs to pay for itself (480)" in shown
    record = json.loads((tmp_path / "a" / "results.jsonl").read_text().splitlines()[0])
    assert record["environment"]["extraction"]["backend"] == "eager"
    assert record["environment"]["extraction"]["batch_size"] in tuning.CPU_BATCHES

    chosen = record["environment"]["extraction"]
    second = hica_bench(*common, "--batch-size", "5", "--threads", "2", "--out", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    # eager features depend on the batch size (PyTorch picks other kernels): another feature identity, other entries
    assert "(defaults, not probed)" in " ".join(second.stdout.split()) and "0 hits, 2 misses" in second.stdout  # 50 images
    record = json.loads((tmp_path / "b" / "results.jsonl").read_text().splitlines()[0])
    assert record["environment"]["extraction"]["batch_size"] == 5 and record["identity"]["origin"]["features"]["batch_size"] == 5
    same = hica_bench(*common, "--batch-size", str(chosen["batch_size"]), "--threads", str(chosen["threads"]),
                      "--no-channels-last" if not chosen["channels_last"] else "--channels-last", "--out", str(tmp_path / "a"))
    # what the probe chose, given explicitly: the same identity, so the finished cell is kept and nothing is encoded
    assert "1 already finished" in same.stdout and "0 hits, 0 misses" in same.stdout

    refused = hica_bench(*common, "--backend", "onnxruntime", "--out", str(tmp_path / "c"))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--backend onnxruntime cannot run" in refused.stderr and not (tmp_path / "c" / "results.jsonl").exists()


def test_a_compiled_encoder_past_its_shapes_limit_is_one_line_never_an_eager_fallback(monkeypatch):
    """Dynamo runs a function eagerly, unsaid, once it has compiled it for as many shapes as its limit allows: other
    bits under a feature identity that says compiled. The compiled forward makes that an error, in one line."""
    import torch._dynamo.config as dynamo_config

    from hica_bench.errors import UserError

    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    from pixel_encoder import PixelEncoder

    monkeypatch.setattr(dynamo_config, "recompile_limit", dynamo_config.recompile_limit)  # restored afterwards
    monkeypatch.setattr(dynamo_config, "fail_on_recompile_limit_hit", dynamo_config.fail_on_recompile_limit_hit)
    forward = backends.eager_forward(PixelEncoder(), "cpu", compile=True)
    assert dynamo_config.recompile_limit >= backends.COMPILED_SHAPES_MAX and dynamo_config.fail_on_recompile_limit_hit
    dynamo_config.recompile_limit = 2  # as if the 64 shapes were spent
    with torch.inference_mode():
        for n in (1, 2):  # a graph each, within the limit
            assert forward(torch.ones(n, 3, 16, 16)).shape == (n, 768)
        with pytest.raises(UserError, match=r"met more than 64 batch shapes in this process"):
            forward(torch.ones(3, 3, 16, 16))

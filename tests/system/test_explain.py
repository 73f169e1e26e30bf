"""``hica-bench explain`` (occlusion and Grad-CAM maps, HiCA's regions, deletion/insertion faithfulness) and the
``concept-bottleneck`` method, on the real BreastMNIST with the real pretrained default encoder (EfficientNet-Lite0),
and on open_clip pairs saved in open_clip's own format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hica_bench import explain, plan
from hica_bench.registry import load_registry
from conftest import invoke, tiny_clip_folder

REGISTRY = load_registry()


def fitted(medmnist_root: Path, cache: Path, method: str, encoder: str = "effnet-lite0-minilm", k: int = 5,
           seed: int = 0) -> explain.FittedCell:
    """One BreastMNIST cell fitted as a run fits it."""
    grid = plan.Grid(datasets=[REGISTRY.choose("dataset", "breastmnist")], methods=[REGISTRY.choose("method", method)],
                     encoders=[REGISTRY.choose("encoder", encoder)], shots=[k], seeds=[seed])
    settings = plan.Settings(data_root=str(medmnist_root), cache_dir=cache, download=False)
    return explain.fit_cell(grid, settings, REGISTRY)


@pytest.fixture(scope="module")
def probe_cell(medmnist_root, default_encoder_cache) -> explain.FittedCell:
    return fitted(medmnist_root, default_encoder_cache, "linear-probe", k=20)


@pytest.fixture(scope="module")
def test_images(probe_cell) -> tuple[np.ndarray, np.ndarray]:
    test = probe_cell.dataset.split("test")
    return np.asarray(test.images[:24]), np.asarray(test.labels[:24])


def test_maps_have_the_image_shape_and_are_deterministic(probe_cell, test_images):
    images, labels = test_images[0][:2], test_images[1][:2]
    first = explain.explain_images(probe_cell.model, probe_cell.pair, probe_cell.extractor, images, labels, [0, 1])
    # the second image again, alone: its occlusion map and faithfulness curves are its own (encoded in the same batches
    # of its own perturbations), the same bits; Grad-CAM runs the images as one batch, so it is repeated on the same
    # batch for its bits (a batch of another size may take other kernels) and compared alone within float noise
    again = explain.explain_images(probe_cell.model, probe_cell.pair, probe_cell.extractor, images[1:], labels[1:], [1])
    assert set(first.maps) == {"occlusion", "grad-cam"} and not first.unavailable
    for name, found in first.maps.items():
        assert found.shape == images.shape and found.dtype == np.float32 and np.isfinite(found).all()
    np.testing.assert_array_equal(first.maps["occlusion"][1:], again.maps["occlusion"])
    for name in ("occlusion", "random"):  # Grad-CAM's curves follow its map's order, compared below
        assert first.faithfulness[1][name] == again.faithfulness[0][name]
    encoder = explain.Predictor(probe_cell.model, probe_cell.pair, probe_cell.extractor).encoder
    repeated, _ = explain.grad_cam(probe_cell.model, encoder, images, [int(t) for t in first.proba.argmax(1)],
                                   probe_cell.pair.device)
    np.testing.assert_array_equal(first.maps["grad-cam"], repeated)
    np.testing.assert_allclose(first.maps["grad-cam"][1:], again.maps["grad-cam"], atol=1e-5)
    assert first.layer.startswith("bn2")  # EfficientNet-Lite0's last spatial layer (1280 channels, 7x7)
    assert (first.maps["grad-cam"] >= 0).all() and first.maps["grad-cam"].max() <= 1 + 1e-6
    # the unperturbed probabilities are the method's own on the run's features
    run_features = probe_cell.extractor.features(probe_cell.dataset, "test")[0][:2]
    np.testing.assert_allclose(first.proba, probe_cell.model.predict_proba(run_features), atol=1e-5)
    for per_image in first.faithfulness:
        for name in ("occlusion", "grad-cam", "random"):
            curve = per_image[name]
            assert len(curve["deletion"]) == len(curve["insertion"]) == explain.GRID ** 2 + 1
            assert 0 <= curve["deletion_auc"] <= 1 and 0 <= curve["insertion_auc"] <= 1
        # both curves start or end at the unperturbed image's probability
        predicted = int(np.argmax(first.proba[first.faithfulness.index(per_image)]))
        p = first.proba[first.faithfulness.index(per_image), predicted]
        assert per_image["occlusion"]["deletion"][0] == pytest.approx(p, abs=1e-5)
        assert per_image["occlusion"]["insertion"][-1] == pytest.approx(p, abs=1e-5)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=st.integers(0, 23), other=st.integers(0, explain.GRID ** 2 - 1))
def test_occluding_the_top_region_lowers_the_prediction_more_than_another_region(probe_cell, test_images, image, other):
    """Property over real BreastMNIST test images: blurring the patch the occlusion map ranks first lowers the
    predicted class's probability at least as much as blurring any other patch, measured here by re-encoding the
    images independently of captum (so the map's coordinates, sign and patch grid are checked)."""
    predictor = explain.Predictor(probe_cell.model, probe_cell.pair, probe_cell.extractor)
    picture = test_images[0][image]
    target = int(predictor.proba(picture[None]).argmax())
    found = explain.occlusion(predictor, picture, target)
    ids = explain.patch_ids(*picture.shape[:2])
    top = int(np.argmax(explain.patch_scores(found, ids)))
    reference = explain.blurred(picture)

    def without(patch: int) -> np.ndarray:
        return np.where(ids == patch, reference, picture)

    base, p_top, p_other = predictor.proba(np.stack([picture, without(top), without(other)]))[:, target]
    assert base - p_top >= base - p_other - 1e-6
    assert base - p_top == pytest.approx(found[ids == top].mean(), abs=1e-5)  # the map is that very drop


@pytest.mark.slow
def test_the_top_region_beats_a_random_region_on_average(probe_cell, test_images):
    """Over 8 real test images, removing each image's top occlusion patch costs the predicted class more probability
    than removing a random patch, and the occlusion order's deletion AUC is below the random order's."""
    predictor = explain.Predictor(probe_cell.model, probe_cell.pair, probe_cell.extractor)
    rng = np.random.default_rng(0)
    top_drops, random_drops, deletion, random_deletion = [], [], [], []
    for picture in test_images[0][:8]:
        target = int(predictor.proba(picture[None]).argmax())
        found = explain.occlusion(predictor, picture, target)
        ids = explain.patch_ids(*picture.shape[:2])
        reference = explain.blurred(picture)
        top = int(np.argmax(explain.patch_scores(found, ids)))
        other = int(rng.integers(explain.GRID ** 2))
        p = predictor.proba(np.stack([picture, np.where(ids == top, reference, picture),
                                      np.where(ids == other, reference, picture)]))[:, target]
        top_drops.append(p[0] - p[1])
        random_drops.append(p[0] - p[2])
        deletion.append(explain.curves(predictor, picture, found, target)["deletion_auc"])
        random_deletion.append(explain.curves(predictor, picture, None, target, seed=1)["deletion_auc"])
    assert np.mean(top_drops) > np.mean(random_drops)
    assert np.mean(deletion) < np.mean(random_deletion)


@pytest.mark.slow
def test_hica_regions_are_the_boxes_and_descriptors_its_fit_used(medmnist_root, default_encoder_cache):
    # default options: stage 1 is the one tests/test_hica.py caches in this shared cache (one entry, as it checks)
    cell = fitted(medmnist_root, default_encoder_cache, "hica", k=5)
    model = cell.model
    support = np.asarray(cell.task.train_images[np.sort(cell.task.support_indices)])
    support = support[np.argsort(np.argsort(cell.task.support_indices))]
    regions = model.regions_(support)
    assert len(regions) == len(support) and all(len(r) == model.options["rois"] for r in regions)
    boxes = np.array([[r["box_encoder_pixels"] for r in per] for per in regions])
    np.testing.assert_array_equal(boxes, model.support_boxes_)  # the very boxes stage 2 pooled
    described = cell.task.components.build("descriptor-generator", "knowledge").describe("breastmnist",
                                                                                          cell.task.class_names)
    local = {c: set(d["local"]) for c, d in enumerate(described)}
    for per in regions:
        for region in per:
            assert region["descriptor"] in local[region["class"]]
            x0, y0, x1, y1 = region["box"]
            assert 0 <= x0 < x1 <= 28 and 0 <= y0 < y1 <= 28 and -1 <= region["similarity"] <= 1
    explained = explain.explain_images(model, cell.pair, cell.extractor, support[:2], cell.task.support_labels[:2], [0, 1])
    assert explained.regions == regions[:2] and "grad-cam" in explained.maps


@pytest.mark.slow
def test_a_method_that_adapts_the_encoder_is_explained_through_its_own_encoder(medmnist_root, default_encoder_cache):
    """finetune predicts through its adapted copy (encoder_): occlusion re-encodes through it (the service's view of it,
    as the run encodes its test images) and Grad-CAM runs through it."""
    cell = fitted(medmnist_root, default_encoder_cache, "finetune:steps=2", k=2)
    # one image: each is explained through the adapted encoder on its own (eager at 224 px, ~350 passes an image)
    images, labels = np.asarray(cell.dataset.split("test").images[:1]), np.asarray(cell.dataset.split("test").labels[:1])
    explained = explain.explain_images(cell.model, cell.pair, cell.extractor, images, labels, [0])
    run_features, _ = cell.extractor.adapted(cell.model.encoder_, cell.dataset, "test", rows=1)
    np.testing.assert_allclose(explained.proba, cell.model.predict_proba(run_features), atol=1e-5)
    assert set(explained.maps) == {"occlusion", "grad-cam"} and explained.maps["grad-cam"].shape == (1, 28, 28)


@pytest.mark.slow
def test_explain_command_writes_maps_overlays_and_the_report(medmnist_root, default_encoder_cache, tmp_path):
    out = tmp_path / "run"
    code, _, err = invoke("run", "--datasets", "breastmnist", "--methods", "linear-probe", "--shots", "5", "--seeds",
                          "0", "--data-root", medmnist_root, "--cache-dir", default_encoder_cache, "--out", out, "-q")
    assert code == 0, err
    code, stdout, err = invoke("explain", "--dataset", "breastmnist", "--method", "linear-probe", "--k", "5", "--seed",
                               "0", "--indices", "3,1", "--data-root", medmnist_root, "--cache-dir",
                               default_encoder_cache, "--out", out)
    assert code == 0, err
    folder = next((out / "explanations").iterdir())
    document = json.loads((folder / "explanation.json").read_text())
    assert [i["test_index"] for i in document["images"]] == [3, 1]
    assert document["cell"]["method"] == "linear-probe" and document["cell"]["k"] == 5
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert document["cell"]["cell_id"] == results[0]["cell_id"]  # the run's own cell: same support set, features, fit
    for name in ("occlusion", "grad-cam"):
        assert np.load(folder / f"{name}.npy", allow_pickle=False).shape == (2, 28, 28)
    assert (folder / "overlays.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "Explanations (hica-bench explain)" in page and f"{folder.name}/overlays.png" in page
    assert "occlusion" in stdout and "random" in stdout


def test_a_method_whose_fit_fails_is_one_line(medmnist_root, default_encoder_cache, tmp_path, monkeypatch):
    from conftest import TEST_PLUGINS

    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    code, _, err = invoke("-p", "faulty_methods", "explain", "--dataset", "breastmnist", "--method", "raises", "--k", "1",
                          "--seed", "0", "--data-root", medmnist_root, "--cache-dir", default_encoder_cache, "--out",
                          tmp_path)
    assert code == 2 and err.strip().splitlines() == [
        "hica-bench: error: cannot explain: raises's fit failed (RuntimeError: deliberate failure in fit)"]


# --------------------------------------------------------------------------- concept bottleneck


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> Path:
    """A tiny open_clip model saved as open_clip saves one (config + checkpoint file in a folder)."""
    import open_clip
    import torch

    folder = tiny_clip_folder(tmp_path_factory.mktemp("tiny-clip-weights"))
    torch.manual_seed(3)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.mark.slow
def test_concept_bottleneck_on_an_open_clip_checkpoint(medmnist_root, clip_checkpoint, default_encoder_cache, tmp_path):
    out = tmp_path / "out"
    encoder = f"open-clip:model=local-dir:{clip_checkpoint}"
    code, _, err = invoke("run", "--datasets", "breastmnist", "--methods", "concept-bottleneck,linear-probe",
                          "--encoders", f"{encoder},effnet-lite0-minilm", "--shots", "1,5", "--seeds", "0",
                          "--data-root", medmnist_root, "--cache-dir", default_encoder_cache, "--out", out, "-q",
                          "--max-test", "24")
    assert code == 0, err
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cbm = {(r["key"]["encoder"], r["key"]["k"]): r for r in results if r["key"]["method"] == "concept-bottleneck"}
    aligned = [r for (enc, _), r in cbm.items() if enc.startswith("open-clip")]
    assert len(aligned) == 2 and all(r["status"] == "ok" for r in aligned)
    knowledge = REGISTRY.choose("descriptor-generator", "knowledge").build().describe(
        "breastmnist", ["malignant", "normal, benign"])
    texts = {t for d in knowledge for t in d["global"] + d["local"]}
    for r in aligned:
        info = r["fit_info"]
        assert info["concepts"] == len(texts) and info["source"] == "descriptor generator knowledge"
        assert set(info["top_concepts"]) == {"malignant", "normal, benign"}
        assert all(concept in texts and weight > 0 for pairs in info["top_concepts"].values() for concept, weight in pairs)
        assert {"descriptor-generator"} <= {c["kind"] for c in r["components_used"]}
    unaligned = cbm["effnet-lite0-minilm", 5]
    assert unaligned["status"] == "not_applicable" and "aligned image-text encoder pair" in unaligned["reason"]
    page = (out / "report.html").read_text()
    assert "Concept bottleneck: top concepts per class" in page


def test_grad_cam_on_a_vision_transformer_folds_its_patch_tokens(clip_checkpoint, medmnist_root, tmp_path):
    """On a ViT the Grad-CAM layer is the input of the last block, its 4x4 patch tokens folded into a map."""
    cell = fitted(medmnist_root, tmp_path / "cache", "concept-bottleneck",
                  encoder=f"open-clip:model=local-dir:{clip_checkpoint}", k=5)
    images = np.asarray(cell.dataset.split("test").images[:2])
    maps, layer = explain.grad_cam(cell.model, cell.pair.image, images, [0, 1], "cpu")
    assert maps.shape == (2, 28, 28) and np.isfinite(maps).all()
    assert "last transformer block, 4x4 patch tokens" in layer and "resblocks.0" in layer

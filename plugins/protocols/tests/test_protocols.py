"""The evaluation protocols (issue 32): the sampling rules on real MedMNIST labels, the conformance kit, the test split
untouched before the final prediction, a grid over protocols end to end through the CLI (identities of the plain
few-shot cells unchanged), a third party's protocol, and bad input as one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_PLUGINS, invoke
from hica_bench import cell, plan, protocol, testing
from hica_bench.interfaces import Episode
from hica_bench.registry import RunComponents, load_registry
from hica_bench.results import CellKey
from hica_bench_protocols import episodes

SHOTS = (1, 2, 4, 8, 16)


def _labels(medmnist_root: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(medmnist_root / f"{name}.npz") as data:
        return {split: data[f"{split}_labels"].ravel().astype(np.int64) for split in ("train", "val")}


def _ranked(members: list[int], text: str) -> list[int]:
    """The documented key order, computed here from the rule's text (sha256 of "text|index")."""
    return sorted(members, key=lambda i: hashlib.sha256(f"{text}|{i}".encode()).digest())


@pytest.mark.parametrize("spec", episodes.SPECS, ids=lambda s: s.name)
def test_every_built_in_protocol_passes_the_conformance_kit(spec):
    testing.check_protocol(spec, options={"source": "kit-source"} if spec.name == "cross-dataset" else None)


@pytest.mark.parametrize("name", ["breastmnist", "pneumoniamnist", "retinamnist"])
def test_validation_sets_follow_the_written_rule_are_disjoint_and_nested(medmnist_root, name):
    """Real MedMNIST labels: each class's validation images are the min(k, 4) val indices with the smallest
    sha256("name|val|seed|i") (the rule recomputed here from its text, so it is the same on every platform), never in
    the support, and nested across k."""
    if not (medmnist_root / f"{name}.npz").exists():
        pytest.skip(f"{name}.npz is not in the data root")
    labels = _labels(medmnist_root, name)
    n = int(labels["train"].max()) + 1
    made = episodes.FewShotVal()
    for seed in (0, 7):
        previous = None
        for k in SHOTS:
            episode = made.episode(labels, n, k, seed, name)
            assert episode.validation_split == "val" and episode.selection == "validation"
            m = min(k, 4)
            expected = np.concatenate([np.sort(_ranked(np.flatnonzero(labels["val"] == c).tolist(),
                                                       f"{name}|val|{seed}")[:m]) for c in range(n)])
            assert np.array_equal(episode.validation, expected)
            support = np.concatenate([np.sort(_ranked(np.flatnonzero(labels["train"] == c).tolist(), f"{name}|{seed}")[:k])
                                      for c in range(n)])
            assert np.array_equal(episode.support, support)  # the few-shot protocol's support, unchanged
            assert np.array_equal(episode.support, episodes.FewShot().episode(labels, n, k, seed, name).support)
            if previous is not None:
                assert set(previous.validation) <= set(episode.validation) and set(previous.support) <= set(episode.support)
            previous = episode


def test_without_enough_val_images_the_validation_set_is_the_far_end_of_train(medmnist_root):
    """A val split with fewer than 4 images of a class: the validation set comes from train, the largest support keys
    of each class, so no support of that seed (any k with k + m <= the class size) can reach it."""
    labels = _labels(medmnist_root, "breastmnist")
    labels["val"] = labels["val"][:3]
    made = episodes.FewShotVal()
    for k in SHOTS:
        episode = made.episode(labels, 2, k, 0, "breastmnist")
        assert episode.validation_split == "train"
        assert not np.intersect1d(episode.validation, episode.support).size
        largest = episodes.FewShot().episode(labels, 2, 100, 0, "breastmnist").support  # any bigger support too
        assert not np.intersect1d(episode.validation, largest).size
        expected = np.concatenate([np.sort(_ranked(np.flatnonzero(labels["train"] == c).tolist(), "breastmnist|0")[-min(k, 4):])
                                   for c in range(2)])
        assert np.array_equal(episode.validation, expected)


# --------------------------------------------------------------------------- the test split is read last


@pytest.fixture(scope="module")
def spy_registry():
    import sys

    sys.path.insert(0, str(TEST_PLUGINS))
    try:
        registry = load_registry(modules=["spy_methods"])
    finally:
        sys.path.remove(str(TEST_PLUGINS))
    return registry


def _cell_on_breastmnist(medmnist_root, tmp_path, registry, made, k: int = 5, seed: int = 0):
    import spy_methods

    dataset = registry.choose("dataset", "breastmnist").build(root=str(medmnist_root), size=28, download=False,
                                                                cache_dir=tmp_path)
    labels = plan.split_labels(dataset)
    episode = made.episode(labels, 2, k, seed, "breastmnist")
    features = {split: np.asarray(dataset.split(split).images, dtype=np.float32).reshape(len(dataset.split(split).labels), -1)
                / 255 for split in ("train", "val", "test")}
    method = registry.choose("method", "spy")
    key = CellKey("breastmnist", 28, method.label, "pixels", k, seed, protocol=made.title)
    one = cell.Cell(method, key, None, np.asarray(episode.support), episode=episode, protocol_title=made.title)
    test = spy_methods.Tripwire(features["test"])
    result, proba = cell.fit_and_score(one, dataset, testing.toy_pair(text=False), (features["train"], labels["train"]),
                                       (test, np.asarray(dataset.split("test").labels)), RunComponents(registry),
                                       validation=(features["val"], labels["val"]))
    return result, test


@pytest.mark.parametrize("made", [episodes.FewShot(), episodes.FewShotVal(), episodes.SupportCV(), episodes.Oracle()],
                         ids=lambda m: m.title)
def test_the_test_split_is_read_only_for_the_final_prediction(made, medmnist_root, tmp_path, spy_registry):
    """The test features are a tripwire that fails on any read but a prediction: under every protocol the cell
    finishes, and only the oracle predicts the test split more than once (each of its 3 candidates, then the final)."""
    result, test = _cell_on_breastmnist(medmnist_root, tmp_path, spy_registry, made)
    assert result.status.value == "ok", result.reason
    assert test.opened == (3 + 1 if made.title.startswith("oracle") else 1)
    selection = (result.fit_info or {}).get("selection")
    if made.title == "few-shot":
        assert selection is None
    else:
        assert [c["options"]["sharpness"] for c in selection["candidates"]] == [1.0, 0.1, 10.0]
        assert selection["chosen"]["sharpness"] in (1.0, 0.1, 10.0) and selection["fits"] >= 4
        assert selection["scored_on"]["split"] == {"validation": "val", "support-cv": "train", "test": "test"}[selection["rule"]]


# --------------------------------------------------------------------------- end to end


def _run(tmp_path, medmnist_root, *args):
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TEST_PLUGINS))
        return invoke("-p", "pixel_encoder", "-p", "train_val_protocol", "run", "--encoder", "pixels", "--datasets", "breastmnist",
                      "--methods", "linear-probe,knn", "--shots", "1,5", "--seeds", "0,1", "--data-root", medmnist_root,
                      "--cache-dir", tmp_path / "cache", "--no-report", *args)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_grid_over_protocols_keeps_the_few_shot_identities_and_records_each_selection(tmp_path, medmnist_root):
    code, _, err = _run(tmp_path, medmnist_root, "--out", tmp_path / "plain")
    assert code == 0, err
    code, stdout, err = _run(tmp_path, medmnist_root, "--out", tmp_path / "grid",
                             "--protocols", "few-shot,few-shot-val,support-cv,oracle")
    assert code == 0, err
    plain = {r["cell_id"] for r in _records(tmp_path / "plain")}
    records = _records(tmp_path / "grid")
    by_protocol: dict[str, list[dict]] = {}
    for r in records:
        by_protocol.setdefault(r["key"]["protocol"], []).append(r)
    assert sorted(by_protocol) == ["few-shot", "few-shot-val", "oracle", "support-cv"]
    assert {r["cell_id"] for r in by_protocol["few-shot"]} == plain  # the built-in protocol keeps every cell id
    assert all(r["identity"]["origin"].get("protocol") is None for r in by_protocol["few-shot"])
    assert len({r["cell_id"] for r in records}) == len(records) == 4 * 2 * 2 * 2
    for r in by_protocol["few-shot-val"]:
        assert r["identity"]["validation"].startswith("val:") and r["identity"]["origin"]["protocol"]["name"] == "few-shot-val"
        selection = r["fit_info"]["selection"]
        assert selection["rule"] == "validation" and selection["scored_on"] == {"split": "val", "images": 2 * min(r["key"]["k"], 4)}
        assert len(selection["candidates"]) == {"linear-probe": 5, "knn": 5}[r["key"]["method"]]
    cv = {(r["key"]["method"], r["key"]["k"]): r for r in by_protocol["support-cv"]}
    assert cv["knn", 1]["status"] == "not_applicable" and "at least 2 shots per class" in cv["knn", 1]["reason"]
    assert cv["knn", 5]["fit_info"]["selection"]["scored_on"]["folds"] == 5
    board = (tmp_path / "grid" / "leaderboard.md").read_text()
    assert "protocol `oracle` — oracle (test-set tuning)" in board and "protocol `few-shot-val`" in board
    header = (tmp_path / "grid" / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert header[:10] == ["dataset", "size", "encoder", "method", "k", "max_test", "origin", "corruption", "severity", "protocol"]
    code, _, err = invoke("check", "--baseline", tmp_path / "grid" / "leaderboard.csv", "--results", tmp_path / "grid")
    assert code == 0, err  # the gate compares protocol by protocol
    # the oracle picks the candidate with the best test score, which the same seeded fit under another rule cannot beat:
    # inflation is never negative, seed by seed, so neither is its mean
    import pandas as pd

    inflation = pd.read_csv(tmp_path / "grid" / "inflation.csv")
    assert set(zip(inflation["protocol"], inflation["k"])) == {("few-shot-val", 1), ("few-shot-val", 5), ("support-cv", 5)}
    assert (inflation["inflation_mean"] >= -1e-9).all() and (inflation["n"] == 2).all()
    assert (inflation["oracle_mean"] - inflation["protocol_mean"] - inflation["inflation_mean"]).abs().max() < 1e-6
    assert "# Test-set tuning inflation" in board


def test_a_third_party_protocol_passes_the_kit_and_runs(tmp_path, medmnist_root, monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    import train_val_protocol

    testing.check_protocol(train_val_protocol.TrainValidation())
    code, _, err = _run(tmp_path, medmnist_root, "--out", tmp_path / "o", "--protocols", "train-val:per_class=3")
    assert code == 0, err
    records = _records(tmp_path / "o")
    assert {r["key"]["protocol"] for r in records} == {"train-val:per_class=3"}
    assert all(r["identity"]["validation"].startswith("train:") for r in records)
    assert all(r["identity"]["origin"]["protocol"]["distribution"] == "-p train_val_protocol" for r in records)


@pytest.mark.parametrize("args, message", [
    (["--protocols", "no-such-protocol"], "unknown protocol 'no-such-protocol'"),
    (["--protocols", "few-shot-val:source=val:per_class=30"], "k is beyond the validation pool"),
    (["--protocols", "few-shot-val:source=train", "--shots", "145"], "145 shots + 4 validation images per class"),
    (["--protocols", "few-shot-val:per_class=65"], "per_class"),
    (["--protocols", "few-shot,few-shot"], "--protocols names something twice"),
])
def test_bad_protocol_input_is_one_line(args, message, tmp_path, medmnist_root):
    code, _, err = _run(tmp_path, medmnist_root, "--out", tmp_path / "o", *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_an_episode_that_breaks_the_contract_is_refused_before_any_cell(medmnist_root):
    labels = _labels(medmnist_root, "breastmnist")
    support = protocol.sample_support(labels["train"], 2, 2, 0, "breastmnist")
    for episode, message in [
        (Episode(support, support[:2], "train", "validation"), "overlaps the support"),
        (Episode(support, None, "val", "validation"), "needs validation indices"),
        (Episode(support + 10**6), "not indices into the train split"),
        (Episode(support, selection="best-guess"), "selection must be one of"),
        (Episode(support.astype(float)), "not indices into the train split"),
    ]:
        with pytest.raises(Exception, match=message):
            plan.check_episode(episode, labels, "odd")


# --------------------------------------------------------------------------- base-to-novel


def test_base_to_novel_on_real_retinamnist(tmp_path, medmnist_root):
    """RetinaMNIST's 5 classes: base = 0, 1, 2 (CoCoOp's first half, ceil(5 / 2)), novel = 3, 4. Supports hold base
    classes only; base scores count the base classes' test images, novel scores the novel classes', among
    themselves; zero-shot and CoOp name the novel classes, the prototype cannot (with the reason); the leaderboard
    reports base / novel / HM."""
    from conftest import tiny_clip_folder

    if not (medmnist_root / "retinamnist.npz").exists():
        pytest.skip("retinamnist.npz is not in the data root")
    encoder = f"open-clip:model=local-dir:{tiny_clip_folder(tmp_path / 'tiny-clip')}:pretrained=random"
    code, _, err = invoke("run", "--encoder", encoder, "--datasets", "retinamnist", "--methods",
                          "zero-shot,coop:epochs=1:n_ctx=2,prototype", "--protocols", "base-to-novel", "--shots", "1,2",
                          "--seeds", "0", "--data-root", medmnist_root, "--cache-dir", tmp_path / "cache",
                          "--out", tmp_path / "o", "--no-report")
    assert code == 0, err
    with np.load(medmnist_root / "retinamnist.npz") as data:
        test = data["test_labels"].ravel()
        train = data["train_labels"].ravel()
    records = {(r["key"]["method"], r["key"]["k"]): r for r in _records(tmp_path / "o")}
    assert len(records) == 6 and {r["status"] for r in records.values()} == {"ok"}
    for (method, k), r in records.items():
        assert r["key"]["protocol"] == "base-to-novel" and r["n_support"] == 3 * k
        assert r["n_test"] == int(np.isin(test, [0, 1, 2]).sum()) and r["novel"]["n_test"] == int(np.isin(test, [3, 4]).sum())
        assert r["identity"]["origin"]["protocol"]["name"] == "base-to-novel"
        assert len(r["per_class"]["recall"]) == 3  # scored among the base classes
        if method == "prototype":
            assert r["novel"]["metrics"] is None and "cannot name classes it was not fitted on" in r["novel"]["reason"]
        else:
            assert 0 <= r["novel"]["metrics"]["acc"] <= 1 and r["novel"]["reason"] is None
    support = protocol.sample_support(train, 5, 2, 0, "retinamnist", classes=[0, 1, 2])
    assert records["zero-shot", 2]["identity"]["support"] == protocol.support_hash(support)
    board = (tmp_path / "o" / "leaderboard.md").read_text()
    assert "**ACC base / novel / HM**" in board and "protocol `base-to-novel`" in board
    line = next(row for row in board.splitlines() if row.startswith("| zero-shot") and "/" in row)
    base, novel, hm = (float(v) for v in line.split("|")[2].split("/"))
    assert hm == pytest.approx(2 * base * novel / (base + novel), abs=0.06)
    assert any(row.startswith("| prototype") and "/ n/a / n/a" in row for row in board.splitlines())
    code, _, err = invoke("report", tmp_path / "o", "--out", tmp_path / "r")
    page = (tmp_path / "r" / "report.html").read_text()
    assert code == 0 and "<h3>ACC base / novel / HM</h3>" in page and f"{base:.1f} / {novel:.1f} / {hm:.1f}" in page, err
    table = next((tmp_path / "r" / "latex" / "tables").glob("*-base-to-novel.tex")).read_text()
    assert f"{base:.1f} / {novel:.1f} / {hm:.1f}" in table and "ACC base / novel / HM" in table


def test_base_to_novel_needs_three_classes(tmp_path, medmnist_root):
    code, _, err = _run(tmp_path, medmnist_root, "--out", tmp_path / "o", "--protocols", "base-to-novel")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "base-to-novel needs at least 3 classes" in lines[0], err


def test_the_seeded_class_split_is_the_written_rule():
    base, novel = protocol.class_split(7, "seeded", 3)
    order = sorted(range(7), key=lambda c: hashlib.sha256(f"classes|3|{c}".encode()).digest())
    assert base.tolist() == sorted(order[:4]) and novel.tolist() == sorted(order[4:])
    assert [b.tolist() for b in protocol.class_split(5)] == [[0, 1, 2], [3, 4]]


# --------------------------------------------------------------------------- cross-dataset


def _another_site(root: Path, medmnist_root: Path, per_class: int = 24) -> Path:
    """A folder dataset of chest X-rays "from another site": real PneumoniaMNIST test images written as PNG files,
    darker and with less contrast (another scanner), under class folders named otherwise (``healthy``)."""
    from PIL import Image

    with np.load(medmnist_root / "pneumoniamnist.npz") as data:
        images, labels = data["test_images"], data["test_labels"].ravel()
    for label, name in ((0, "healthy"), (1, "pneumonia")):
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(labels == label)[:per_class]:
            shifted = (images[i].astype(np.float32) * 0.7 + 20).astype(np.uint8)
            Image.fromarray(shifted).save(root / name / f"{i}.png")
    return root


def test_a_cross_dataset_run_fits_on_the_source_and_scores_on_each_target(tmp_path, medmnist_root):
    """Supports from PneumoniaMNIST (the source), scored on its own test split (the in-domain diagonal) and on a folder
    dataset from "another site" whose class ``healthy`` a mapping file matches to ``normal``: the transfer cells use
    the source's own few-shot supports (same seed, same images), both datasets are in their identity, the diagonal
    equals the few-shot scores on the same supports, and the leaderboard and transfer.csv hold the transfer table."""
    import pandas as pd

    site = _another_site(tmp_path / "site", medmnist_root)
    (tmp_path / "map.yaml").write_text("healthy: normal\n")
    target = f"folder:root={site}"
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TEST_PLUGINS))
        code, _, err = invoke("-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", f"pneumoniamnist,{target}",
                              "--methods", "prototype,knn", "--protocols",
                              f"few-shot,cross-dataset:source=pneumoniamnist:mapping={tmp_path / 'map.yaml'}",
                              "--shots", "1,5", "--seeds", "0,1", "--data-root", medmnist_root,
                              "--cache-dir", tmp_path / "cache", "--out", tmp_path / "o", "--no-report")
    assert code == 0, err
    records = _records(tmp_path / "o")
    assert len(records) == 2 * 2 * 2 * 2 * 2 and {r["status"] for r in records} == {"ok"}
    few = {(r["key"]["dataset"], r["key"]["method"], r["key"]["k"], r["key"]["seed"]): r for r in records
           if r["key"]["protocol"] == "few-shot"}
    cross = [r for r in records if r["key"]["protocol"].startswith("cross-dataset")]
    with np.load(medmnist_root / "pneumoniamnist.npz") as data:
        train = data["train_labels"].ravel()
    for r in cross:
        origin = r["identity"]["origin"]
        k, seed = r["key"]["k"], r["key"]["seed"]
        assert origin["support_from"]["dataset"] == "pneumoniamnist" and origin["support_from"]["classes"] == [0, 1]
        assert origin["support_from"]["identity"] == few["pneumoniamnist", "prototype", 1, 0]["identity"]["origin"]["dataset_identity"]
        assert r["identity"]["support"] == protocol.support_hash(protocol.sample_support(train, 2, k, seed, "pneumoniamnist"))
        assert r["n_support"] == 2 * k
        own = few[r["key"]["dataset"], r["key"]["method"], k, seed]
        assert origin["dataset_identity"] == own["identity"]["origin"]["dataset_identity"]  # the target's, as its own cells
        assert r["cell_id"] != own["cell_id"] and r["n_test"] == own["n_test"]
        if r["key"]["dataset"] == "pneumoniamnist":  # the diagonal: the same supports, features and test split
            assert r["metrics"] == own["metrics"]
    transfer = pd.read_csv(tmp_path / "o" / "transfer.csv")
    assert set(transfer["source"]) == {"pneumoniamnist"} and set(transfer["target"]) == {"pneumoniamnist", target}
    assert len(transfer) == 2 * 2 * 2 and (transfer["n"] == 2).all()
    board = (tmp_path / "o" / "leaderboard.md").read_text()
    assert "# Cross-dataset transfer" in board and f"→ {target}" in board
    code, _, err = invoke("report", tmp_path / "o", "--out", tmp_path / "r")
    page = (tmp_path / "r" / "report.html").read_text()
    assert code == 0 and '<h2 id="transfer">Cross-dataset transfer</h2>' in page and "→ pneumoniamnist" in page, err
    assert any(p.name.startswith("transfer-") for p in (tmp_path / "r" / "latex" / "tables").iterdir())


@pytest.mark.parametrize("protocol_text, mapping, message", [
    ("cross-dataset:source=pneumoniamnist:mapping={map}", "malignant: pneumonia\nbenign: normal\n",
     "names class 'benign', which breastmnist does not have"),
    ("cross-dataset:source=pneumoniamnist:mapping={map}", "malignant: pneumonia\nnormal, benign: benign\n",
     "maps 'normal, benign' to 'benign', which pneumoniamnist does not have"),
    ("cross-dataset:source=pneumoniamnist", None, "class 'malignant' has no class of the same name in pneumoniamnist"),
    ("cross-dataset:source=chestmnist", None, "source=chestmnist is not one of the grid's datasets"),
    ("cross-dataset", None, "cross-dataset needs source=DATASET"),
    ("cross-dataset:source=pneumoniamnist:mapping={map}", "[1, 2]", "must be one table of target class name"),
])
def test_bad_cross_dataset_input_is_one_line(protocol_text, mapping, message, tmp_path, medmnist_root):
    if mapping is not None:
        (tmp_path / "map.yaml").write_text(mapping)
    code, _, err = _run(tmp_path, medmnist_root, "--out", tmp_path / "o", "--datasets", "breastmnist,pneumoniamnist",
                        "--protocols", protocol_text.format(map=tmp_path / "map.yaml"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "o" / "results.jsonl").exists()  # refused before any cell ran


def test_classes_are_matched_by_name_or_mapping_one_to_one():
    assert protocol.match_classes(["Normal", "pneumonia"], ["pneumonia", "normal"], "a", "b").tolist() == [1, 0]
    assert protocol.match_classes(["normal", "pneumonia", "covid_19"], ["COVID-19", "normal"], "a", "b").tolist() == [2, 0]
    assert protocol.match_classes(["normal", "pneumonia"], ["healthy", "pneumonia"], "a", "b",
                                  {"healthy": "normal"}).tolist() == [0, 1]
    with pytest.raises(Exception, match="two classes of b map to a's class 'normal'"):
        protocol.match_classes(["normal", "pneumonia"], ["healthy", "normal"], "a", "b", {"healthy": "normal"})


# --------------------------------------------------------------------------- multi-label (ChestMNIST's format)

FINDINGS = 14


def _chestmnist_file(root: Path, medmnist_root: Path, sizes=(300, 60, 120)) -> Path:
    """A ``chestmnist.npz`` in ChestMNIST's exact format (uint8 images (N, 28, 28); uint8 labels (N, 14) in {0, 1}):
    real PneumoniaMNIST X-rays, each finding present with probability 0.12 and drawn as a bright 4x4 mark at its own
    place (so a method that learns from pixels can find it)."""
    rng = np.random.default_rng(0)
    out = {}
    with np.load(medmnist_root / "pneumoniamnist.npz") as data:
        for split, n in zip(("train", "val", "test"), sizes):
            images = data[f"{split}_images"][:n].copy()
            labels = (rng.random((n, FINDINGS)) < 0.12).astype(np.uint8)
            for i, j in zip(*np.nonzero(labels)):
                row, col = divmod(int(j), 4)
                images[i, 1 + 7 * row:5 + 7 * row, 1 + 7 * col:5 + 7 * col] = 255
            out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    root.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / "chestmnist.npz", **out)
    return root


def test_the_multilabel_support_is_each_labels_k_positives_nested(tmp_path, medmnist_root):
    """The per-label rule recomputed from its text: the union over labels of each label's k positive and k negative
    train images with the smallest sha256("chestmnist|seed|i"); every label has at least k positives and k negatives in
    it; nested across k; the validation set is the same rule on the val split (m = min(k, 4) per label)."""
    root = _chestmnist_file(tmp_path / "data", medmnist_root)
    with np.load(root / "chestmnist.npz") as data:
        labels = {split: data[f"{split}_labels"].astype(np.int64) for split in ("train", "val")}
    previous = None
    for k in (1, 2, 4, 8):
        episode = episodes.FewShotVal().episode(labels, FINDINGS, k, 3, "chestmnist")
        expected = set()
        for j in range(FINDINGS):
            for side in (0, 1):
                expected |= set(_ranked(np.flatnonzero(labels["train"][:, j] == side).tolist(), "chestmnist|3")[:k])
        assert episode.support.tolist() == sorted(expected)
        positives = labels["train"][episode.support].sum(axis=0)
        assert (positives >= k).all() and (len(episode.support) - positives >= k).all()
        validation = set()
        for j in range(FINDINGS):
            for side in (0, 1):
                validation |= set(_ranked(np.flatnonzero(labels["val"][:, j] == side).tolist(),
                                          "chestmnist|val|3")[:min(k, 4)])
        assert episode.validation_split == "val" and episode.validation.tolist() == sorted(validation)
        if previous is not None:
            assert set(previous.support) <= set(episode.support) and set(previous.validation) <= set(episode.validation)
        previous = episode


def test_chestmnist_runs_one_vs_rest_with_mean_auc_mean_ap_and_per_label_auc(tmp_path, medmnist_root):
    """ChestMNIST (a file in its exact format) is no longer refused: every label is scored one-vs-rest on every test
    image; the recorded mean AUC, mean AP and per-label AUCs are scikit-learn's on the saved scores; few-shot-val
    selects each label's options; a method that adapts the encoder is marked not applicable with the reason."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    root = _chestmnist_file(tmp_path / "data", medmnist_root)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TEST_PLUGINS))
        code, out, err = invoke("-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "chestmnist",
                                "--methods", "prototype,knn,finetune", "--protocols", "few-shot,few-shot-val",
                                "--shots", "2", "--seeds", "0", "--data-root", root, "--cache-dir", tmp_path / "cache",
                                "--out", tmp_path / "o", "--no-report", "--save-predictions")
    assert code == 0, err
    assert "chestmnist: 14 labels (multi-label): 0=atelectasis" in " ".join(out.split())
    records = _records(tmp_path / "o")
    assert len(records) == 2 * 3
    with np.load(root / "chestmnist.npz") as data:
        test = data["test_labels"]
    for r in records:
        if r["key"]["method"] == "finetune":
            assert r["status"] == "not_applicable" and "one-vs-rest" in r["reason"], r["reason"]
            continue
        assert r["status"] == "ok", r["reason"]
        saved = np.load(tmp_path / "o" / r["predictions"])
        scores, labels = saved["proba"], saved["labels"]
        assert scores.shape == (len(test), FINDINGS) and np.array_equal(labels, test)
        per_label = [roc_auc_score(test[:, j], scores[:, j]) for j in range(FINDINGS)]
        score = r["multilabel"]
        assert score["auc"] == pytest.approx(per_label, abs=1e-6) and score["positives"] == test.sum(axis=0).tolist()
        assert r["metrics"]["auc"] == pytest.approx(np.mean(per_label), abs=1e-6)
        assert score["mean_ap"] == pytest.approx(np.mean([average_precision_score(test[:, j], scores[:, j])
                                                          for j in range(FINDINGS)]), abs=1e-4)
        if r["key"]["protocol"] == "few-shot-val":
            chosen = r["fit_info"]["one_vs_rest"]
            assert len(chosen) == FINDINGS and all(c["selection"]["rule"] == "validation" for c in chosen)
    learnt = [r["metrics"]["auc"] for r in records if r["key"]["method"] == "prototype"]
    assert min(learnt) > 0.65  # the findings' marks are learnt from 2 positives a label (chance: 0.5)
    board = (tmp_path / "o" / "leaderboard.md").read_text()
    assert "**AP**" in board and "**AUC per label (2-shot)**" in board and "hernia" in board
    code, _, err = invoke("report", tmp_path / "o", "--out", tmp_path / "r")
    page = (tmp_path / "r" / "report.html").read_text()
    assert code == 0 and "<h3>AP (multi-label)</h3>" in page and "<th>hernia</th>" in page, err
    tables = {p.name for p in (tmp_path / "r" / "latex" / "tables").iterdir()}
    assert any(t.endswith("-ap.tex") for t in tables) and any(t.endswith("-auc-per-label.tex") for t in tables)


def test_bad_multilabel_input_is_one_line(tmp_path, medmnist_root):
    root = _chestmnist_file(tmp_path / "data", medmnist_root)
    code, _, err = _run(tmp_path, medmnist_root, "--out", tmp_path / "o", "--data-root", root, "--datasets", "chestmnist",
                        "--protocols", "base-to-novel")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "chestmnist is multi-label" in err, err
    with np.load(root / "chestmnist.npz") as data:
        arrays = dict(data)
    arrays["test_labels"][0, 0] = 2
    np.savez_compressed(root / "chestmnist.npz", **arrays)
    code, _, err = _run(tmp_path, medmnist_root, "--out", tmp_path / "o", "--data-root", root, "--datasets", "chestmnist")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "values other than 0 and 1" in err, err

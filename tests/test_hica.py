"""The HiCA plugin end to end: listing, a real cell on BreastMNIST (determinism, stage-1 cache), and
learning on a constructed task."""

import json

import numpy as np
from conftest import hica_bench
from hica_bench.interfaces import FewShotTask
from hica_bench.registry import load_registry


def test_everything_is_listed_from_the_hica_distribution():
    listed = hica_bench("list")
    assert listed.returncode == 0
    rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if line.startswith("│")}
    for name in ("hica", "hica-no-local", "hica-no-cross", "hica-no-stage1", "global-infonce", "local-infonce",
                 "cross-margin", "grid", "saliency", "monai", "templates", "knowledge", "noisy"):
        assert name in rows and "hica-bench-hica" in rows[name], name


def _run(medmnist_root, cache, out, methods="hica", seeds="0"):
    result = hica_bench("run", "--datasets", "breastmnist", "--methods", methods, "--shots", "5", "--seeds", seeds,
                        "--max-test", "48", "--data-root", str(medmnist_root), "--cache-dir", str(cache), "--out", str(out))
    assert result.returncode == 0, result.stderr + result.stdout
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_full_hica_cell_is_deterministic_and_stage1_is_cached(medmnist_root, default_encoder_cache, tmp_path):
    shared_cache = default_encoder_cache
    first = _run(medmnist_root, shared_cache, tmp_path / "a")
    stage1 = list((shared_cache / "methods" / "hica-stage1").glob("*.safetensors"))
    assert len(stage1) == 1
    written = stage1[0].stat().st_mtime_ns
    second = _run(medmnist_root, shared_cache, tmp_path / "b")  # stage 1 now comes from the cache
    assert stage1[0].stat().st_mtime_ns == written
    assert first[0]["status"] == "ok", first[0]["reason"]
    assert first[0]["metrics"] == second[0]["metrics"]
    assert first[0]["support_hash"] == second[0]["support_hash"]


def test_hica_learns_a_constructed_task():
    """Two well separated clusters of features, the real MiniLM text encoder: HiCA must separate them."""
    pair = load_registry().choose("encoder", "effnet-lite0-minilm").build(device="cpu")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 64)) * 3
    train_labels = np.arange(200) % 2
    train = (centres[train_labels] + rng.normal(size=(200, 64))).astype(np.float32)
    support = np.concatenate([np.flatnonzero(train_labels == c)[:5] for c in (0, 1)])
    test_labels = np.arange(100) % 2
    test = (centres[test_labels] + rng.normal(size=(100, 64))).astype(np.float32)
    task = FewShotTask("breastmnist", "binary-class", ["malignant", "normal, benign"], train[support], train_labels[support],
                       support, 5, 0, pair, train_features=train)
    method = load_registry().choose("method", "hica-no-local:epochs=100").build()
    before = (task.support_features.copy(), task.train_features.copy())
    proba = method.fit(task).predict_proba(test)
    assert proba.shape == (100, 2) and np.allclose(proba.sum(1), 1)
    assert (proba.argmax(1) == test_labels).mean() > 0.95
    assert method.loss_history_[-1] < method.loss_history_[0]
    assert np.array_equal(before[0], task.support_features) and np.array_equal(before[1], task.train_features)

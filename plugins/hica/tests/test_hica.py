"""The HiCA plugin end to end: listing, a real cell on BreastMNIST (determinism, stage-1 cache), and
learning on a constructed task."""

import json

import numpy as np
import pytest
from conftest import hica_bench
from hica_bench import testing
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
    result = hica_bench("run", "--no-report", "--datasets", "breastmnist", "--methods", methods, "--shots", "5", "--seeds", seeds,
                        "--max-test", "48", "--data-root", str(medmnist_root), "--cache-dir", str(cache), "--out", str(out))
    assert result.returncode == 0, result.stderr + result.stdout
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_full_hica_cell_is_deterministic_and_stage1_is_cached(medmnist_root, default_encoder_cache, tmp_path):
    shared_cache = default_encoder_cache  # shared by the run's workers: other tests may cache stage-1 entries too
    entries = lambda: {p: p.stat().st_mtime_ns for p in (shared_cache / "methods" / "hica-stage1").glob("*.safetensors")}  # noqa: E731
    before = entries() if (shared_cache / "methods" / "hica-stage1").is_dir() else {}
    first = _run(medmnist_root, shared_cache, tmp_path / "a")
    cached = entries()
    assert len(set(cached) - set(before)) <= 1 and cached  # stage 1 trained once (or found: another test trained it)
    second = _run(medmnist_root, shared_cache, tmp_path / "b")  # stage 1 now comes from the cache
    now = entries()  # (another worker's test may add an entry of its own meanwhile)
    assert {path: now.get(path) for path in cached} == cached  # nothing trained again: no entry rewritten
    assert first[0]["status"] == "ok", first[0]["reason"]
    assert first[0]["metrics"] == second[0]["metrics"]
    assert first[0]["identity"] == second[0]["identity"]


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
                       support, 5, 0, pair, train_features=train, components=testing.installed_components())
    method = load_registry().choose("method", "hica-no-local:epochs=100").build()
    before = (task.support_features.copy(), task.train_features.copy())
    proba = method.fit(task).predict_proba(test)
    assert proba.shape == (100, 2) and np.allclose(proba.sum(1), 1)
    assert (proba.argmax(1) == test_labels).mean() > 0.95
    assert method.loss_history_[-1] < method.loss_history_[0]
    assert np.array_equal(before[0], task.support_features) and np.array_equal(before[1], task.train_features)


@pytest.mark.slow
def test_a_users_roi_extractor_and_loss_from_p_modules_are_used_by_hica(medmnist_root, default_encoder_cache, tmp_path):
    """HiCA builds its parts through ``task.components``, from the run's own registry: an ROI extractor and a loss
    from a ``-p`` module replace the built-in ones by name, are really called, and are recorded in the result."""
    calls = tmp_path / "calls.txt"
    result = hica_bench("-p", "hica_components", "run", "--no-report", "--datasets", "breastmnist", "--methods",
                        "hica:roi=corners:loss_global=cosine-ce", "--shots", "5", "--seeds", "0", "--max-test", "48",
                        "--data-root", str(medmnist_root), "--cache-dir", str(default_encoder_cache),
                        "--out", str(tmp_path / "out"), env={"HICA_TEST_COMPONENT_CALLS": str(calls)})
    assert result.returncode == 0, result.stderr + result.stdout
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "ok", record["reason"]
    assert record["key"]["method"] == "hica:loss_global=cosine-ce:roi=corners"
    used = {(c["kind"], c["name"]): c for c in record["components_used"]}
    assert used[("roi-extractor", "corners")]["distribution"] == "-p hica_components"
    assert used[("loss", "cosine-ce")]["distribution"] == "-p hica_components"
    assert used[("loss", "cosine-ce")]["options"] == {"temperature": 0.07}  # HiCA's tau, as the loss declares temperature
    assert {("loss", "local-infonce"), ("loss", "cross-margin"), ("descriptor-generator", "knowledge")} <= set(used)
    assert ("loss", "global-infonce") not in used and ("roi-extractor", "saliency") not in used
    named = {c["name"]: c["distribution"] for c in record["identity"]["origin"]["method_components"]}
    assert named == {"corners": "-p hica_components", "knowledge": "hica-bench-hica", "cosine-ce": "-p hica_components",
                     "local-infonce": "hica-bench-hica", "cross-margin": "hica-bench-hica"}
    called = calls.read_text().split()
    assert "corners" in called and called.count("cosine-ce") == 150  # one call per stage-2 epoch

    unknown = hica_bench("run", "--no-report", "--methods", "hica:roi=nope", "--data-root", str(medmnist_root), "--out", str(tmp_path / "x"))
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    assert "method 'hica' option roi=nope: unknown roi-extractor 'nope'" in unknown.stderr

"""A run builds the encoder only when it needs its models: an encoder spec with a ``describe`` hook gives the run the
identities it needs to find cached features and finished cells, so a run served from the cache builds nothing and,
with the default pair, never imports torch (issue 14: start-up cost only when needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_PLUGINS, hica_bench, invoke, write_medmnist_npz

EXTRACTION = ["--backend", "eager", "--batch-size", "64", "--threads", "2", "--no-channels-last", "--quiet"]


@pytest.fixture(autouse=True)
def _test_plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))


@pytest.fixture
def builds():
    import toy_aligned_encoder

    toy_aligned_encoder.BUILDS.clear()
    return toy_aligned_encoder.BUILDS


def _run(tmp_path: Path, medmnist_root: Path, methods: str, *extra: str, encoder: str = "toy-described"):
    return invoke("-p", "toy_aligned_encoder", "run", "--encoders", encoder, "--datasets", "breastmnist",
                  "--methods", methods, "--shots", "1", "--seeds", "0,1", "--max-test", "40", "--data-root", medmnist_root,
                  "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out", *EXTRACTION, *extra)


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]


def test_a_run_served_from_the_cache_builds_no_encoder(medmnist_root, tmp_path, builds):
    code, _, err = _run(tmp_path, medmnist_root, "prototype")
    assert code == 0, err
    assert builds == ["cpu"]  # features had to be computed: built once
    first = _records(tmp_path)

    code, _, err = _run(tmp_path, medmnist_root, "prototype", "--force")  # the cells again, every feature cached
    assert code == 0, err
    assert builds == ["cpu"]  # not built again
    again = _records(tmp_path)[len(first):]
    assert [r["identity"] for r in again] == [r["identity"] for r in first]  # the card gave the very same identities
    assert [r["metrics"] for r in again] == [r["metrics"] for r in first]


def test_a_method_that_uses_the_text_encoder_builds_the_pair_on_first_use(medmnist_root, tmp_path, builds):
    assert _run(tmp_path, medmnist_root, "prototype")[0] == 0  # fills the cache
    code, _, err = _run(tmp_path, medmnist_root, "zero-shot")  # test features cached; class texts need the text tower
    assert code == 0, err
    assert builds == ["cpu", "cpu"]  # once more, for the first zero-shot cell only (not per cell)
    zero_shot = [r for r in _records(tmp_path) if r["key"]["method"] == "zero-shot"]
    assert len(zero_shot) == 2 and all(r["status"] == "ok" for r in zero_shot)


def test_a_card_that_disagrees_with_the_built_pair_stops_the_run(medmnist_root, tmp_path, builds):
    code, _, err = _run(tmp_path, medmnist_root, "prototype", encoder="toy-described:lie=True")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "toy-described:lie=True: the plugin's describe() gave" in err and "must make them agree" in err


def test_a_cells_seed_reaches_torch_when_the_method_is_first_to_import_it():
    """A run served from the cache may not have imported torch when a cell starts; the cell's seed must still reach
    torch's global generator when the method imports torch, so the method draws the same numbers either way."""
    script = ("import sys; from hica_bench import runner; runner.seed_everything(7); "
              "assert 'torch' not in sys.modules; import torch; drawn = torch.rand(4); "
              "torch.manual_seed(7); assert torch.equal(drawn, torch.rand(4)), 'not seeded'; "
              "runner.seed_everything(8); drawn = torch.rand(4); torch.manual_seed(8); "
              "assert torch.equal(drawn, torch.rand(4)); print('seeded')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "seeded", result.stderr


def test_device_auto_without_a_gpu_driver_does_not_import_torch():
    script = ("import sys; from hica_bench import runner; print(runner.resolve_device('auto'), runner.resolve_device('cpu'), "
              "'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0 and result.stdout.split() == ["cpu", "cpu", "False"], result.stderr


CHECKED_RUN = """
import sys
from hica_bench.cli import main
sys.argv = ["hica-bench", *sys.argv[1:]]
try:
    main()
finally:
    print("heavy modules loaded:", sorted(m for m in ("torch", "timm", "sentence_transformers", "medmnist") if m in sys.modules),
          file=sys.stderr)
"""


@pytest.mark.slow
def test_the_default_pair_served_from_the_cache_loads_no_torch(medmnist_root, default_encoder_cache, tmp_path):
    """The real default encoder: once its features and settings are cached, a one-cell run imports neither torch nor
    timm, sentence-transformers or medmnist (the package imports torch), and scores exactly as the run that built it."""
    args = ["run", "--datasets", "breastmnist", "--methods", "linear-probe", "--shots", "1", "--seeds", "0",
            "--data-root", str(medmnist_root), "--cache-dir", str(default_encoder_cache), "--out", str(tmp_path / "out"),
            "--quiet"]
    first = hica_bench(*args)  # computes the features unless another test already did
    assert first.returncode == 0, first.stderr
    script = tmp_path / "checked_run.py"
    script.write_text(CHECKED_RUN)
    again = subprocess.run([sys.executable, str(script), *args, "--force"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "heavy modules loaded: []" in again.stderr, again.stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["identity"] == records[1]["identity"]
    assert records[0]["metrics"] == records[1]["metrics"]
    assert records[1]["environment"]["torch_threads"] is None  # recorded as not loaded, not guessed



def test_a_small_run_served_from_the_cache_builds_no_encoder(tmp_path, builds):
    """Too few images to probe: the defaults, not remembered. A second such run finds its features under the same
    default settings without building the encoder (nothing may ask for its modules first)."""
    write_medmnist_npz(tmp_path / "data" / "breastmnist.npz", n_classes=2)  # 30 train, 20 test images
    args = ["--backend", "auto", "--threads", "0", "--batch-size", "0"]  # overrides EXTRACTION: nothing fixed
    code, stdout, err = _run(tmp_path, tmp_path / "data", "prototype", *args)
    assert code == 0, err
    assert "defaults, not probed" in " ".join(stdout.split()) and builds == ["cpu"]
    code, _, err = _run(tmp_path, tmp_path / "data", "prototype", *args, "--force")
    assert code == 0, err
    assert builds == ["cpu"]  # served from the cache: not built

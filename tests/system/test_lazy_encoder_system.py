"""Start-up cost only when needed (issue 14), in fresh interpreters: a cell's seed reaches torch when the method is the
first to import it, ``--device auto`` imports no torch, and a run of the real default pair served from the cache loads
no torch at all (split from tests/cli/test_lazy_encoder.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import hica_bench, tiny_clip_folder


def test_a_cells_seed_reaches_torch_when_the_method_is_first_to_import_it():
    """A run served from the cache may not have imported torch when a cell starts; the cell's seed must still reach
    torch's global generator when the method imports torch, so the method draws the same numbers either way."""
    script = ("import sys; from hica_bench import cell; cell.seed_everything(7); "
              "assert 'torch' not in sys.modules; import torch; drawn = torch.rand(4); "
              "torch.manual_seed(7); assert torch.equal(drawn, torch.rand(4)), 'not seeded'; "
              "cell.seed_everything(8); drawn = torch.rand(4); torch.manual_seed(8); "
              "assert torch.equal(drawn, torch.rand(4)); print('seeded')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "seeded", result.stderr


def test_device_auto_without_a_gpu_driver_does_not_import_torch():
    script = ("import sys; from hica_bench import devices; print(devices.resolve_device('auto'), devices.resolve_device('cpu'), "
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
    print("heavy modules loaded:", sorted(m for m in ("torch", "timm", "sentence_transformers", "medmnist", "open_clip")
                                          if m in sys.modules),
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


def test_a_cached_zero_shot_run_never_builds_its_open_clip_pair(medmnist_root, tmp_path):
    """open-clip's card is remembered from the first build (per file version) and the class texts' embeddings are cached
    under the text encoder's identity: a zero-shot run whose features are cached imports no open_clip, scores
    exactly as the first run, and a changed config file (a new file version) finds no card (the pair is built again)."""
    folder = tiny_clip_folder(tmp_path / "tiny-clip")
    args = ["run", "--no-report", "--datasets", "breastmnist", "--methods", "zero-shot", "--shots", "1", "--seeds", "0",
            "--encoder", f"open-clip:model=local-dir:{folder}:pretrained=random", "--max-test", "32",
            "--data-root", str(medmnist_root), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            "--quiet"]
    first = hica_bench(*args)
    assert first.returncode == 0, first.stderr
    assert len(list((tmp_path / "cache" / "encoder-cards").glob("*.json"))) == 1
    script = tmp_path / "checked_run.py"
    script.write_text(CHECKED_RUN)
    again = subprocess.run([sys.executable, str(script), *args, "--force"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "open_clip" not in again.stderr.split("heavy modules loaded:")[-1], again.stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["identity"] == records[1]["identity"]
    assert records[0]["metrics"] == records[1]["metrics"] and records[1]["status"] == "ok"

    from hica_bench.files import digests_remembered_in
    from hica_bench_encoders.openclip_encoders import open_clip_card

    with digests_remembered_in(tmp_path / "cache"):  # as a run asks: the card remembered for these file versions
        card = open_clip_card("cpu", model=f"local-dir:{folder}", pretrained="random")
        assert card is not None and card.image == records[0]["identity"]["origin"]["features"]["encoder"]
        config = json.loads((folder / "open_clip_config.json").read_text())
        config["model_cfg"]["embed_dim"] += 16  # another model at the same path: a new file version, built again
        (folder / "open_clip_config.json").write_text(json.dumps(config))
        assert open_clip_card("cpu", model=f"local-dir:{folder}", pretrained="random") is None

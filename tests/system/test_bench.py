"""`hica-bench bench` end to end on real BreastMNIST: one worker process per variant, measured in turns.

The tiny ``pixels`` test encoder keeps most runs fast; one test runs the real default encoder at a small size to
show that the ratios, FLOP counts and the matmul ceiling are real numbers. No speed targets here: those live in
the bench report itself.
"""

import json
import math
import statistics

import pytest

from conftest import hica_bench

from hica_bench.extraction.backends import ONNX_TOLERANCE, onnxruntime_version
from hica_bench.bench import BENCH_VERSION, CHECK_IMAGES, VARIANTS


def run_bench(tmp_path, medmnist_root, *extra, plugins=("pixel_encoder",), env=None):
    """``hica-bench [-p ...] bench ...`` as a user runs it: (CompletedProcess, JSON report or None)."""
    out = tmp_path / "bench.json"
    out.unlink(missing_ok=True)
    plugin_args = [arg for name in plugins for arg in ("-p", name)]
    result = hica_bench(*plugin_args, "bench", "--data-root", str(medmnist_root), "--cache-dir", str(tmp_path / "cache"),
                        "--out", str(out), *extra, env=env)
    return result, (json.loads(out.read_text()) if result.returncode == 0 else None)


@pytest.mark.slow
def test_pixels_report_structure_and_worker_isolation(tmp_path, medmnist_root):
    # with --compile (torch.compile: Dynamo and Inductor; the pixels need no C++ kernel): the tuned and harness variants
    # run compiled, and none of them compiles inside its timed passes, the harness's extraction path having been warmed
    # up at set-up on the very batches it times (40 images: a short last batch too)
    result, report = run_bench(tmp_path, medmnist_root, "--encoder", "pixels", "--images", "40", "--repeats", "2",
                               "--warmup", "0", "--naive-batch-size", "16", "--compile",
                               env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert result.returncode == 0, result.stderr
    assert report["bench_version"] == BENCH_VERSION == 5
    assert (report["images"], report["repeats"], report["naive_batch_size"], report["device"]) == (40, 2, 16, "cpu")
    assert (report["size"], report["input_size"], report["encoder_identity"]) == (28, 16, "test-pixels-16px-v1")
    assert list(report["variants"]) == list(VARIANTS)
    variants = report["variants"]

    # isolation: each measured variant in its own process; only naive runs without the THP allocator
    naive, tuned, harness = variants["naive"], variants["eager-tuned"], variants["harness"]
    assert naive["worker"]["THP_MEM_ALLOC_ENABLE"] is None and naive["worker"]["allocator"] == "default"
    assert naive["settings"] == {"backend": "eager", "batch_size": 16, "channels_last": False,
                                 "threads": naive["worker"]["torch_threads"], "precision": "fp32", "compile": False,
                                 "allocator": "default", "pin_memory": False, "exporter": None}
    for entry in (tuned, harness):
        assert entry["settings"]["compile"] is True and "torch.compile" in entry["describe"]
        assert entry["compiles_while_timed"] == 0  # every shape compiled at set-up, none while timed
        assert entry["worker"]["THP_MEM_ALLOC_ENABLE"] == "1" and entry["settings"]["allocator"] == "thp"
        assert entry["tuning"]["source"] == "measured" and entry["tuning"]["path"]  # probed, and remembered
    assert len({naive["worker"]["pid"], tuned["worker"]["pid"], harness["worker"]["pid"]}) == 3
    assert tuned["settings"]["backend"] == harness["settings"]["backend"] == "eager"
    assert harness["prepares_images"] is False  # eager: preprocessed beside the engine

    # no image module: ONNX Runtime is reported as unavailable with its reason, the bench goes on
    assert variants["onnxruntime"]["available"] is False and "image module" in variants["onnxruntime"]["reason"]
    assert harness["tuning"]["unavailable"]["onnxruntime"]

    naive_ips = naive["images_per_s"]["per_repeat"]
    for name in ("naive", "eager-tuned", "harness"):
        entry = variants[name]
        ips, ratio = entry["images_per_s"], entry["ratio_to_naive"]
        assert len(ips["per_repeat"]) == 2 and all(v > 0 for v in ips["per_repeat"])
        assert ips["min"] <= ips["median"] <= ips["max"] and ips["median"] == statistics.median(ips["per_repeat"])
        assert ratio["per_repeat"] == [v / n for v, n in zip(ips["per_repeat"], naive_ips)]  # pairwise, per repeat
        assert ratio["median"] == statistics.median(ratio["per_repeat"])
        assert entry["gflops_per_s"] == 0 and entry["fraction_of_ceiling"] == 0  # mean pooling has no matmul FLOPs
        assert entry["peak_rss_mb"] > 0 and entry["features_within_tolerance"] and entry["features_max_abs_diff"] == 0
        assert entry["features_tolerance"] == ONNX_TOLERANCE and entry["peak_gpu_mb"] is None  # fp32, on the CPU
    assert naive["ratio_to_naive"]["per_repeat"] == [1.0, 1.0]
    # raw variants time ceil(N / batch) full batches; the harness encodes exactly the N images
    assert naive["images_timed"] == math.ceil(40 / 16) * 16 and harness["images_timed"] == 40
    assert tuned["images_timed"] == math.ceil(40 / tuned["settings"]["batch_size"]) * tuned["settings"]["batch_size"]

    overhead = harness["overhead_ratio"]["per_repeat"]
    assert overhead == [h / r for h, r in zip(harness["images_per_s"]["per_repeat"], harness["raw_images_per_s"]["per_repeat"])]
    stages = harness["stage_seconds"]
    inside = harness["forward_ratio"]["per_repeat"]  # the forward calls alone, inside the extraction, against raw
    assert len(inside) == len(overhead) and all(i >= o for i, o in zip(inside, overhead))
    assert stages["total"] > 0 and stages["preprocess"] > 0 and stages["cache_write"] > 0 and stages["forward"] > 0
    assert harness["recorded_images_per_s"] > 0

    ceiling = report["ceiling"]
    assert ceiling["gflops_per_s"]["median"] > 0 and len(ceiling["gflops_per_s"]["per_repeat"]) == 2
    assert ceiling["allocator"] == "thp" and ceiling["dtype"] == "float32" and ceiling["threads"] >= 1
    assert report["flops_per_image"]["gflop"] == 0
    check = report["feature_check"]
    assert check["images"] == CHECK_IMAGES and check["tolerance"] == ONNX_TOLERANCE and check["harness_within_tolerance"]
    assert check["precision"] == "fp32" and check["reference"] == "naive eager (fp32)"
    assert report["environment"]["cpu_model"] and report["wall_s"] > 0 and "naive eager" in report["naive_definition"]

    for text in ("naive", "eager-tuned", "not available", "matmul ceiling", "harness overhead", "within tolerance",
                 "wall time"):
        assert text in result.stdout, text
    assert not list((tmp_path / "cache").glob("hica-bench-bench-*"))  # the scratch folder is removed


@pytest.mark.slow
@pytest.mark.serial  # achieved FLOP/s against a matmul ceiling measured in the same run: alone, never beside another test
@pytest.mark.skipif(onnxruntime_version() is None, reason="needs hica-bench[onnx]")
def test_default_encoder_gives_real_ratios_flops_and_ceiling(medmnist_root, default_encoder_cache, tmp_path):
    """The real default encoder at a small size: every number is real, achieved FLOP/s stay under the ceiling, and
    the ONNX Runtime and harness features match eager within the stated tolerance."""
    out = tmp_path / "bench.json"
    result = hica_bench("bench", "--data-root", str(medmnist_root), "--cache-dir", str(default_encoder_cache),
                        "--out", str(out), "--images", "32", "--repeats", "1", "--warmup", "0",
                        "--naive-batch-size", "16", "--batch-size", "16", "--channels-last")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["encoder"] == "effnet-lite0-minilm" and report["input_size"] == 224
    assert 0.6 < report["flops_per_image"]["gflop"] < 0.9  # EfficientNet-Lite0 at 224 px: ~0.77 GFLOP
    ceiling = report["ceiling"]["gflops_per_s"]["median"]
    for name, entry in report["variants"].items():
        assert entry["available"], (name, entry.get("reason"))
        assert entry["images_per_s"]["median"] > 0 and entry["ratio_to_naive"]["median"] > 0
        assert 0 < entry["gflops_per_s"] < ceiling and 0 < entry["fraction_of_ceiling"] < 1, name
        assert entry["features_within_tolerance"], (name, entry["features_max_abs_diff"])
    assert report["variants"]["eager-tuned"]["settings"]["channels_last"]  # the user's fixed knobs are kept
    assert report["variants"]["onnxruntime"]["settings"]["backend"] == "onnxruntime"
    export = report["variants"]["onnxruntime"]["onnx_export"]
    assert export["ok"] and export["tolerance"] == ONNX_TOLERANCE
    assert export["max_abs_diff"] <= ONNX_TOLERANCE * export["max_abs_eager"]
    assert report["feature_check"]["harness_within_tolerance"]
    assert 0 < report["variants"]["harness"]["overhead_ratio"]["median"]
    harness = report["variants"]["harness"]  # on ONNX Runtime the engine prepares the 28 px images itself
    assert harness["prepares_images"] == (harness["settings"]["backend"] == "onnxruntime")
    assert ("ONNX Runtime prepared the images itself" in " ".join(result.stdout.split())) == harness["prepares_images"]


@pytest.mark.slow
def test_a_worker_that_dies_is_one_line_naming_it(tmp_path, medmnist_root):
    # crash_points SIGKILLs a process at its 3rd pixels encode: naive's first timed pass (after the FLOP count
    # and the check features); every knob is fixed, so the other workers do not probe
    result, _ = run_bench(tmp_path, medmnist_root, "--encoder", "pixels", "--images", "16", "--repeats", "1",
                          "--warmup", "0", "--batch-size", "8", "--threads", "1",
                          plugins=("pixel_encoder", "crash_points"), env={"HICA_TEST_KILL_AT": "encode:3"})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("hica-bench: error: bench worker 'naive' died (exit code -9)"), result.stderr
    assert "Traceback" not in result.stderr
    # the workers' stderr outlives the run's scratch folder, and the line says where it is
    kept = tmp_path / "cache" / "bench-logs"
    assert lines[-1].endswith(f"(the workers' stderr: {kept})")
    assert sorted(p.name for p in kept.iterdir()) == [f"{v}.stderr" for v in sorted(VARIANTS)]


@pytest.mark.slow
def test_compile_without_a_cxx_compiler_is_one_line(tmp_path, medmnist_root):
    # Inductor cannot build its CPU kernel without a C++ compiler: the run stops in one line saying so and how to go on
    result = hica_bench("-p", "pixel_encoder", "run", "--data-root", str(medmnist_root), "--datasets", "breastmnist",
                        "--methods", "prototype", "--shots", "1", "--seeds", "0", "--encoders", "pixels-doubled",
                        "--compile", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                        env={"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hica-bench: error: --compile: torch.compile of test-pixels-doubled-v1 "
                                                   "failed (InductorError: "), result.stderr
    assert "no-such-compiler" in lines[0] and lines[0].endswith("run without --compile")


@pytest.mark.slow
def test_bad_input_found_in_a_worker_exits_2(tmp_path, medmnist_root):
    # the workers build the encoder; an unknown timm model is the user's error, reported as such
    result, _ = run_bench(tmp_path, medmnist_root, "--encoder", "timm:model=no_such_model:text=", "--images", "16",
                          "--repeats", "1")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hica-bench: error:") and "no_such_model" in last and "Traceback" not in result.stderr

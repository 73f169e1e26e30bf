"""`hica-bench check` on a small real run (real BreastMNIST, the pixels test encoder): clean, doctored, broken."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import TEST_PLUGINS, hica_bench


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def run(medmnist_root, tmp_path_factory):
    """results.jsonl (+ leaderboard.csv) of a fresh 2-seed run: linear-probe, prototype, zero-shot (not applicable)."""
    root = tmp_path_factory.mktemp("check")
    result = hica_bench("-p", "pixel_encoder", "run", "--no-report", "--encoder", "pixels", "--datasets", "breastmnist",
                        "--methods", "linear-probe,prototype,zero-shot", "--shots", "1,5", "--seeds", "0,1",
                        "--data-root", str(medmnist_root), "--cache-dir", str(root / "cache"), "--out", str(root / "out"))
    assert result.returncode == 0, result.stderr
    return root / "out" / "results.jsonl"


def cli(capsys, *args):
    """``hica-bench ARGS`` in this process, through the real entry point (``main``): exit code, stdout, stderr."""
    from hica_bench.cli import main

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["hica-bench", *map(str, args)])
        patch.syspath_prepend(str(TEST_PLUGINS))
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture
def check(capsys):
    return lambda baseline, results, *extra: cli(capsys, "check", "--baseline", baseline, "--results", results, *extra)


def doctor(run, tmp_path, change, name="baseline.jsonl"):
    """A copy of the run's results with ``change(record)`` applied to every record."""
    records = _records(run)
    for record in records:
        change(record)
    return _write(tmp_path / name, records)


def test_run_records_throughput_reference_and_environment(run):
    ok = [r for r in _records(run) if r["status"] == "ok"]
    assert ok and all(r["timings"]["encoder_images_per_s"] > 0 and r["timings"]["reference_images_per_s"] > 0 for r in ok)
    assert len({r["timings"]["reference_images_per_s"] for r in ok}) == 1  # measured once per dataset
    env = ok[0]["environment"]
    assert env["cpu_model"] and env["device_name"] and env["torch_threads"] >= 1 and env["cpu_count"] >= 1
    csv_header = (run.parent / "leaderboard.csv").read_text().splitlines()[0]
    assert "encoder_images_per_s_mean" in csv_header and "reference_images_per_s_mean" in csv_header
    assert "Cost: encoder" in (run.parent / "leaderboard.md").read_text()


def test_unchanged_run_is_clean(run, check):
    result = hica_bench("check", "--baseline", str(run), "--results", str(run))  # as CI calls it
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 cells compared" in result.stdout and "0 regressed" in result.stdout
    # a folder and the leaderboard CSV work as baselines too
    assert check(run.parent, run).returncode == 0
    from_csv = check(run.parent / "leaderboard.csv", run)
    assert from_csv.returncode == 0, from_csv.stdout + from_csv.stderr
    assert "4 cells compared" in from_csv.stdout  # the CSV holds ok cells only


def test_baseline_with_better_accuracy_is_a_regression(run, tmp_path, check):
    def better(record):
        if record["key"]["method"] == "linear-probe" and record["key"]["k"] == 5:
            record["metrics"]["acc"] += 0.05

    result = check(doctor(run, tmp_path, better), run)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "regressed" in result.stdout and "linear-probe" in result.stdout and "ACC" in result.stdout
    assert "-5.0" in result.stdout and "1 regressed" in result.stdout

    # the same doctored baseline, read back as the run, is an improvement (exit 0)
    improved = check(run, tmp_path / "baseline.jsonl")
    assert improved.returncode == 0 and "1 improved" in improved.stdout


def test_seed_noise_bound_from_the_baseline_std(run, tmp_path, check):
    def noisy(record):  # +5 points on average, but the two seeds now disagree by 30 points
        if record["key"]["method"] == "prototype" and record["key"]["k"] == 5:
            record["metrics"]["acc"] += 0.20 if record["key"]["seed"] == 0 else -0.10

    baseline = doctor(run, tmp_path, noisy)
    assert check(baseline, run).returncode == 1
    within_noise = check(baseline, run, "--noise-z", "2")
    assert within_noise.returncode == 0, within_noise.stdout


def measured(spread=0.05, contention=0.0, factor=1.0):
    """A record change: this side's throughput measured with ``spread`` and ``contention``, ``factor`` times as fast."""
    def change(record):
        timings = record["timings"]
        if timings["encoder_images_per_s"]:
            timings["encoder_images_per_s"] *= factor
            timings["paired_efficiency"] *= factor
            timings["efficiency_spread"], timings["cpu_contention"] = spread, contention
    return change


def test_run_records_its_paired_efficiency_spread_and_contention(run):
    ok = [r["timings"] for r in _records(run) if r["status"] == "ok"]
    assert all(t["paired_efficiency"] > 0 and t["efficiency_spread"] >= 0 and 0 <= t["cpu_contention"] <= 1 for t in ok)


def test_baseline_with_better_throughput_is_a_regression(run, tmp_path, check):
    quiet_run = doctor(run, tmp_path, measured(), "run.jsonl")
    result = check(doctor(run, tmp_path, measured(factor=2)), quiet_run)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "harness / plain eager images/s (paired)" in result.stdout and "-50.0%" in result.stdout
    # within a generous tolerance it passes
    assert check(tmp_path / "baseline.jsonl", quiet_run, "--throughput-tolerance", "0.6").returncode == 0


@pytest.mark.parametrize("spread, contention, factor, verdict, why", [
    (0.05, 0.55, 1.8, "not comparable", "other processes used 55 % of the CPUs during the run's encoder pass"),
    (0.90, 0.0, 1.8, "not comparable", "the runs' own noise is ±63 %"),  # 2 SE of two medians of 7 (IQR 90 % and 5 %)
    (0.05, 0.55, 5.0, "regressed", "other processes used 55 % of the CPUs during the run's encoder pass"),
    (0.05, 0.05, 1.8, "regressed", ""),  # a little load is no excuse
])
def test_a_drop_within_the_runs_own_noise_is_not_comparable(run, tmp_path, check, spread, contention, factor, verdict, why):
    baseline = doctor(run, tmp_path, measured(factor=factor))
    result = check(baseline, doctor(run, tmp_path, measured(spread, contention), "run.jsonl"), "--report", tmp_path / "r.json")
    assert result.returncode == (1 if verdict == "regressed" else 0), result.stdout
    row = next(r for r in json.loads((tmp_path / "r.json").read_text()) if r["method"] == "(encoder pass)")
    assert row["verdict"] == verdict and why in row["note"], row
    if verdict == "not comparable":
        assert row["note"].endswith("rerun on an idle machine to judge it") and "1 not comparable" in result.stdout
    assert f"{1 if verdict == 'regressed' else 0} regressed" in result.stdout


def test_failed_cell_and_doctored_leaderboard_csv(run, tmp_path, check):
    def broken(record):
        if record["key"]["method"] == "prototype" and record["key"]["k"] == 1 and record["key"]["seed"] == 1:
            record["status"], record["metrics"], record["reason"] = "failed", None, "RuntimeError: boom"

    result = check(run, doctor(run, tmp_path, broken, "run.jsonl"))
    assert result.returncode == 1 and "boom" in result.stdout

    csv = (run.parent / "leaderboard.csv").read_text().splitlines()
    header = csv[0].split(",")
    row = csv[1].split(",")
    row[header.index("auc_mean")] = str(float(row[header.index("auc_mean")]) + 0.1)
    doctored = tmp_path / "leaderboard.csv"
    doctored.write_text("\n".join([csv[0], ",".join(row), *csv[2:]]) + "\n")
    result = check(doctored, run)
    assert result.returncode == 1 and "AUC" in result.stdout


def test_missing_cells_and_machine_notes(run, tmp_path, check):
    def elsewhere(record):
        record["environment"]["device_name"] = "Some Other CPU"
        record["environment"]["packages"]["torch"] = "0.0.1"
        record["environment"]["extraction"]["backend"] = "onnxruntime"  # the run is eager (pixels export nothing)

    records = _records(run)
    partial = _write(tmp_path / "partial.jsonl", [r for r in records if r["key"]["k"] == 1])
    result = check(doctor(run, tmp_path, elsewhere), partial)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "missing from the run: breastmnist linear-probe k=5" in result.stdout
    assert "different machines" in result.stdout and "Some Other CPU" in result.stdout
    assert "torch 0.0.1" in result.stdout
    assert "encoder backend differs (onnxruntime vs eager)" in " ".join(result.stdout.split())


def test_cached_run_has_no_throughput_to_compare(run, medmnist_root, tmp_path, capsys, check):
    cached = cli(capsys, "-p", "pixel_encoder", "run", "--no-report", "--encoder", "pixels", "--datasets", "breastmnist",
                 "--methods", "prototype", "--shots", "1", "--seeds", "0", "--data-root", medmnist_root,
                 "--cache-dir", run.parent.parent / "cache", "--out", tmp_path / "out")
    assert cached.returncode == 0 and "2 hits, 0 misses" in cached.stdout
    assert all(r["timings"]["reference_images_per_s"] is None and r["timings"]["encoder_images_per_s"] is None
               for r in _records(tmp_path / "out" / "results.jsonl"))
    result = check(run, tmp_path / "out" / "results.jsonl")
    assert result.returncode == 0 and "throughput of breastmnist not compared" in result.stdout


def test_broken_input_exits_2(run, tmp_path, check):
    def error(result, text):
        assert result.returncode == 2, result.stdout + result.stderr
        assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1

    error(check(tmp_path / "nope.jsonl", run), "does not exist")
    error(check(run, tmp_path), "holds neither")
    error(check(doctor(run, tmp_path, lambda r: r["key"].update(k=7)), run), "no cell of")
    error(check(doctor(run, tmp_path, lambda r: r.update(schema_version=99)), run), "newer hica-bench")
    error(check(doctor(run, tmp_path, lambda r: r.pop("schema_version")), run), "not a hica-bench result record")
    error(check(doctor(run, tmp_path, lambda r: r.update(extra_field=1)), run), "does not match result schema")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    error(check(tmp_path / "other.csv", run), "not a hica-bench leaderboard.csv")
    shutil.copy(run, tmp_path / "results.txt")
    error(check(tmp_path / "results.txt", run), "expected a results .jsonl")
    error(check(run, run, "--throughput-tolerance", "1.5"), "--throughput-tolerance")

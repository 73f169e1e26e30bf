"""``hica-bench report`` and the report ``run`` writes: files, content, bad input, and the page in a real browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import TEST_PLUGINS, invoke


@pytest.fixture(scope="module")
def finished(tmp_path_factory, medmnist_root):
    """Three methods on the real BreastMNIST (pixel encoder), shots 1 and 5, six seeds, predictions saved."""
    import sys

    base = tmp_path_factory.mktemp("report")
    sys.path.insert(0, str(TEST_PLUGINS))
    try:
        code, out, err = invoke("-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist",
                                "--methods", "linear-probe,prototype,knn", "--shots", "1,5", "--seeds", "0,1,2,3,4,5",
                                "--data-root", medmnist_root, "--cache-dir", base / "cache", "--out", base / "out",
                                "--save-predictions", "-q")
    finally:
        sys.path.remove(str(TEST_PLUGINS))
    assert code == 0, err
    assert f"report: {base / 'out' / 'report.html'}" in out
    return base


def test_run_writes_a_self_contained_report(finished):
    page = (finished / "out" / "report.html").read_text()
    assert "breastmnist (28 px) — encoder pixels, full test split" in page
    # curves and reliability; no CD diagram: the ranks' blocks are datasets (independent), and one is too few
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 2
    assert "needs at least 3 methods and 2 blocks (has 3 and 1), not computed" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from a network
    assert re.search(r"<td>\d+\.\d ± \d+\.\d \(6\)", page)  # mean ± 95 % interval half-width (n seeds)
    assert "linear-probe (reference)" in page and "Across datasets" in page and "Environment" in page
    figures = sorted(p.name for p in (finished / "out" / "figures").iterdir())
    assert len(figures) == 2 and {Path(f).suffix for f in figures} == {".png"}  # run's report: PNGs only
    tests = (finished / "out" / "paired_tests.csv").read_text().splitlines()
    assert tests[0].startswith("dataset,size,encoder,max_test,metric,method,k,n,")
    assert len(tests) == 1 + 2 * 2 * 2  # (prototype, knn) x (k = 1, 5) x (acc, auc)
    assert all(",6," in line for line in tests[1:])  # six seeds paired in every test


def test_report_command_with_a_bootstrap_and_another_reference(finished, tmp_path):
    code, out, err = invoke("report", finished / "out", "--out", tmp_path / "rep", "--reference", "prototype",
                            "--bootstrap", "200")
    assert code == 0, err
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "prototype (reference)" in page and "test-set bootstrap 95 % interval" in page
    figures = sorted(p.name for p in (tmp_path / "rep" / "figures").iterdir())
    assert len(figures) == 4 and {Path(f).suffix for f in figures} == {".png", ".svg"}  # the report command: and SVG
    assert re.search(r"<td>\d+\.\d–\d+\.\d</td><td>6</td>", page)  # an interval from each of the six seeds


def test_one_seed_and_no_common_seeds_are_labelled_not_computed(finished, tmp_path):
    records = [json.loads(line) for line in (finished / "out" / "results.jsonl").read_text().splitlines()]
    keep = [r for r in records if (r["key"]["method"] == "linear-probe" and r["key"]["seed"] == 0)
            or (r["key"]["method"] == "prototype" and r["key"]["seed"] == 1)
            or (r["key"]["method"] == "knn" and r["key"]["seed"] == 0)]
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    code, _, err = invoke("report", tmp_path / "few.jsonl", "--out", tmp_path / "rep")
    assert code == 0, err
    page = (tmp_path / "rep" / "report.html").read_text()
    text = re.sub(r'src="data:[^"]*"', "", page)  # the page without its embedded figures
    assert "n = 1, not computed" in text and "no seeds in common, not computed" in text and "nan" not in text.lower()
    assert re.search(r"<td>\d+\.\d \(1\)</td>", page)  # one seed: a mean without an interval


def test_a_single_shot_count_gets_no_curve(finished, tmp_path):
    records = [json.loads(line) for line in (finished / "out" / "results.jsonl").read_text().splitlines()]
    (tmp_path / "k5.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["key"]["k"] == 5))
    code, _, err = invoke("report", tmp_path / "k5.jsonl", "--out", tmp_path / "rep")
    assert code == 0, err
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "One\nshot count only: a curve needs at least two" in page
    assert not any(p.name.startswith("curves-") for p in (tmp_path / "rep" / "figures").iterdir())
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 1  # reliability (one block: no CD diagram)


def test_a_single_cell_gets_no_figure(finished, tmp_path):
    """One cell (a smoke run): no reliability diagram and no curve are drawn; the page says so."""
    records = [json.loads(line) for line in (finished / "out" / "results.jsonl").read_text().splitlines()]
    one = next(r for r in records if r["key"]["method"] == "linear-probe" and r["key"]["k"] == 5)
    (tmp_path / "one.jsonl").write_text(json.dumps(one) + "\n")
    code, _, err = invoke("report", tmp_path / "one.jsonl", "--out", tmp_path / "rep")
    assert code == 0, err
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "One cell only: no reliability diagram is drawn" in page and "<img" not in page
    assert not any((tmp_path / "rep" / "figures").glob("*.png"))


def test_results_from_other_data_are_never_paired(finished, tmp_path):
    """The reference's results on edited dataset files (another dataset identity) are not paired with the other
    methods' results on the old files."""
    records = [json.loads(line) for line in (finished / "out" / "results.jsonl").read_text().splitlines()]
    for r in records:
        if r["key"]["method"] == "linear-probe":
            r["identity"]["origin"]["dataset_identity"] += "-edited"
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, _, err = invoke("report", tmp_path / "mixed.jsonl", "--out", tmp_path / "rep")
    assert code == 0, err
    tests = (tmp_path / "rep" / "paired_tests.csv").read_text().splitlines()[1:]
    assert tests and all(",0,,,,," in line and "no seeds on the same data" in line for line in tests)


@pytest.mark.parametrize("case, message", [
    ("reference", "--reference 'coop' has no finished results here"),
    ("empty", "hold no results"),
    ("bootstrap", "--bootstrap must be 0"),
])
def test_bad_report_input_is_one_line_exit_2(case, message, finished, tmp_path):
    source = finished / "out"
    extra = []
    if case == "reference":
        extra = ["--reference", "coop"]
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        source = tmp_path / "empty.jsonl"
    else:
        extra = ["--bootstrap", "-3"]
    code, _, err = invoke("report", source, "--out", tmp_path / "rep", *extra)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err

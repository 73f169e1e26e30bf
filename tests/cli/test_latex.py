"""LaTeX for a paper (issue 33): the report's tables as booktabs tables with user text escaped, PDF figures, and a
document that inputs them, compiled by a real LaTeX engine from Debian's packages (``.ci/run`` installs TeX Live and
poppler's pdftoppm; the compile test skips, saying why, where they are absent)."""

from __future__ import annotations

import shutil

import pytest

from conftest import invoke
from hica_bench import latex


def test_user_text_is_escaped():
    assert latex.escape("hica:lambda1=0.5 & 100% #1 {x} a_b ~ ^ \\ ±") == (
        r"hica:lambda1=0.5 \& 100\% \#1 \{x\} a\_b \textasciitilde{} \textasciicircum{} \textbackslash{} $\pm$")
    assert latex.escape("naïve") == "na?ve"  # what pdflatex's default encoding cannot set


@pytest.fixture(scope="module")
def reported(tmp_path_factory, medmnist_root):
    """A grid's results (pixel encoder, real BreastMNIST and PneumoniaMNIST), reported with --latex."""
    import sys

    from conftest import TEST_PLUGINS

    base = tmp_path_factory.mktemp("latex")
    sys.path.insert(0, str(TEST_PLUGINS))
    try:
        code, _, err = invoke("-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets",
                              "breastmnist,pneumoniamnist", "--methods", "linear-probe,prototype,knn:neighbours=3",
                              "--shots", "1,5", "--seeds", "0,1,2", "--data-root", medmnist_root, "--cache-dir",
                              base / "cache", "--out", base / "run", "--no-report", "-q")
        assert code == 0, err
        code, out, err = invoke("report", base / "run", "--out", base / "report", "--latex")
    finally:
        sys.path.remove(str(TEST_PLUGINS))
    assert code == 0, err
    return base, out


def test_report_latex_writes_booktabs_tables_pdf_figures_and_a_document(reported):
    base, out = reported
    folder = base / "report" / "latex"
    tables = sorted(p.name for p in (folder / "tables").iterdir())
    assert len(tables) == 2 * 3 + 1  # two datasets x (ACC, AUC, ECE), and the ranks across them
    text = (folder / "tables" / next(t for t in tables if t.startswith("breastmnist") and t.endswith("-acc.tex"))).read_text()
    assert r"\toprule" in text and r"\midrule" in text and r"\bottomrule" in text
    assert r"linear-probe$^\dagger$" in text and r"knn:neighbours=3" in text and r"\textbf{" in text
    assert "Wilcoxon signed-rank" in text and "Holm-corrected" in text
    main = (folder / "main.tex").read_text()
    assert all(rf"\input{{tables/{t[:-4]}}}" in main for t in tables) and r"\footnote{" in main and "git" in main
    assert any(p.suffix == ".pdf" for p in (base / "report" / "figures").iterdir())
    assert r"\includegraphics[width=\linewidth]{figures/curves-" in (folder / "figures.tex").read_text()
    assert "latex:" in out


@pytest.mark.skipif(shutil.which("pdflatex") is None or shutil.which("pdftoppm") is None,
                    reason="no LaTeX engine (pdflatex, Debian's texlive-latex-recommended) or pdftoppm (poppler-utils) "
                           "on PATH; .ci/run installs them")
def test_the_document_compiles_with_a_real_latex_engine_and_page_1_renders(reported):
    base, out = reported
    folder = base / "report" / "latex"
    assert (folder / "main.pdf").read_bytes()[:5] == b"%PDF-"
    page = (folder / "main-page1.png").read_bytes()
    assert page[:8] == b"\x89PNG\r\n\x1a\n" and len(page) > 10_000  # a page with tables on it, not a blank one
    assert "compiled main.pdf and rendered its first page" in " ".join(out.split())


def test_a_table_that_pairs_cells_from_two_commits_says_so(reported, tmp_path):
    """The same results with half the records marked as run at another commit: the HTML section and the LaTeX table
    say that they pair cells from two commits, and the provenance lists both."""
    import json

    base, _ = reported
    lines = (base / "run" / "results.jsonl").read_text().splitlines()
    changed = []
    for i, line in enumerate(lines):
        record = json.loads(line)
        record["environment"]["git"] = ("a" if i % 2 else "b") * 40
        changed.append(json.dumps(record))
    (tmp_path / "results.jsonl").write_text("\n".join(changed) + "\n")
    code, _, err = invoke("report", tmp_path / "results.jsonl", "--out", tmp_path / "r")
    assert code == 0, err
    page = (tmp_path / "r" / "report.html").read_text()
    assert "this table pairs cells run at 2 commits (aaaaaaaaaa, bbbbbbbbbb)" in page
    assert "pair cells from 2 of them" in " ".join(page.split())
    table = next((tmp_path / "r" / "latex" / "tables").glob("breastmnist*-acc.tex")).read_text()
    assert "This table pairs cells run at 2 commits" in table


def test_ranks_are_over_the_datasets_with_the_shots_averaged(reported):
    """The ranking's blocks are the two datasets (independent), each method's value its mean ACC over seeds at each k
    averaged over k; recomputed here from the records, with the exact permutation p of two blocks."""
    import json

    import pandas as pd

    base, _ = reported
    records = [json.loads(line) for line in (base / "run" / "results.jsonl").read_text().splitlines()]
    frame = pd.DataFrame([{"dataset": r["key"]["dataset"], "method": r["key"]["method"], "k": r["key"]["k"],
                           "acc": r["metrics"]["acc"]} for r in records])
    value = frame.groupby(["dataset", "method", "k"])["acc"].mean().groupby(["dataset", "method"]).mean().unstack()
    expected = value.rank(axis=1, ascending=False).mean()
    ranks = pd.read_csv(base / "report" / "ranks.csv").set_index("method")
    assert (ranks["blocks"] == 2).all()
    for method, rank in expected.items():
        assert ranks.loc[method, "average_rank"] == pytest.approx(rank)
    page = (base / "report" / "report.html").read_text()
    assert "Blocks: 2 datasets (breastmnist, pneumoniamnist)" in page and "exact permutation" in page


def test_a_long_board_flushes_its_floats(tmp_path):
    """A board of many tables (the protocols board has 50) would overflow LaTeX's queue of unplaced floats: main.tex
    clears the page every few tables."""
    main = latex.write(tmp_path, [(f"t{i}", "") for i in range(10)], [], [])
    text = main.read_text()
    assert text.count(r"\clearpage") == (10 - 1) // latex.FLOATS_PER_PAGE_RUN and r"\input{tables/t9}" in text

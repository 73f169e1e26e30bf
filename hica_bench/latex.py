"""LaTeX for a paper: a report's tables as booktabs tables, its figures as PDF with their ``\\includegraphics`` lines,
and ``main.tex``, a document that ``\\input``s them all (``latex/`` beside every report; ``hica-bench report --latex``
also writes the PDF figures and compiles the document with ``pdflatex`` when one is installed, rendering its first
page to PNG with ``pdftoppm``).

Hand-written, and why: pandas' ``Styler.to_latex`` writes booktabs, but a cell here carries a mean, an interval, a
seed count, a significance mark and bold for the best of its column at once, each table a footnote naming the test
and its correction, and every user-given name (method options, dataset paths) escaped; the markup is a few lines.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from hica_bench import stats
from hica_bench.files import atomic_write

#: LaTeX's special characters in text, and what stands for each
_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}"}
#: non-ASCII characters the default pdflatex set-up cannot typeset, spelled in LaTeX
_UNICODE = {"±": r"$\pm$", "—": "---", "–": "--", "−": "$-$", "×": r"$\times$", "→": r"$\rightarrow$", "χ": r"$\chi$",
            "²": r"$^2$", "α": r"$\alpha$", "≤": r"$\le$", "≥": r"$\ge$", "⟨": r"$\langle$", "⟩": r"$\rangle$"}
ENGINE_TIMEOUT_S = 120  #: the most a LaTeX or pdftoppm call may take
FLOATS_PER_PAGE_RUN = 4  #: tables between two \clearpage in main.tex (a board of 50 tables overflows LaTeX's float queue)


def escape(text: Any) -> str:
    """``text`` as LaTeX text: its special characters escaped, the few non-ASCII ones tables use spelled in LaTeX,
    any other non-ASCII character replaced by ``?`` (pdflatex's default encoding cannot set it)."""
    out = []
    for char in str(text):
        if char in _SPECIAL:
            out.append(_SPECIAL[char])
        elif char in _UNICODE:
            out.append(_UNICODE[char])
        elif ord(char) < 128:
            out.append(char)
        else:
            out.append("?")
    return "".join(out)


def _name(slug: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", slug).strip("-")


MARKS = {"▲": r"\textsuperscript{$\blacktriangle$}", "▼": r"\textsuperscript{$\blacktriangledown$}"}


def section_table(section: Any, metric: str, alpha: float = stats.ALPHA) -> str:
    """One report section's table of ``metric`` (``acc``, ``auc`` or ``ece``): methods × shots, mean ± half-width of
    the 95 % t-interval over seeds (n), the best mean of each column in bold (lowest for ECE), the reference method
    marked, significance marks as the report's, and a footnote naming the test and its correction."""
    lower_better = metric == "ece"
    means: dict[tuple[str, int], float] = {}
    for row in section.rows:
        for k in section.shots:
            values = [v for v in row.values(metric, k).values() if v == v]
            if values:
                means[row.label, k] = float(np.mean(values))
    best = {}
    for k in section.shots:
        column = [means[r.label, k] for r in section.rows if (r.label, k) in means]
        if column:
            best[k] = min(column) if lower_better else max(column)
    lines = [r"\begin{table}[htbp]", r"\centering", r"\small",
             rf"\caption{{{escape(section.title)}: {metric.upper()}{' (lower is better)' if lower_better else ''}}}",
             rf"\label{{tab:{_name(section.slug)}-{metric}}}",
             r"\begin{tabular}{l" + "r" * len(section.shots) + "}", r"\toprule",
             "method & " + " & ".join(f"{k}-shot" for k in section.shots) + r" \\", r"\midrule"]
    for row in section.rows:
        label = escape(row.label) + (r"$^\dagger$" if row is section.reference else "")
        cells = []
        for k in section.shots:
            values = [v for v in row.values(metric, k).values() if v == v]
            if not values:
                cells.append("---")
                continue
            interval = stats.t_interval(values)
            mean = float(np.mean(values))
            text = f"{100 * mean:.1f}" + (rf" $\pm$ {100 * interval.half_width:.1f}" if interval is not None else "")
            if k in best and abs(mean - best[k]) < 1e-12:
                text = rf"\textbf{{{text}}}"
            test = section.tests.get((metric, row.label, k))
            mark = MARKS.get(test.mark, "") if test is not None and test.mark else ""
            cells.append(f"{text} ({len(values)}){mark}")
        lines.append(f"{label} & " + " & ".join(cells) + r" \\")
    reference = escape(section.reference.label) if section.reference is not None else None
    note = (r"Percent; mean $\pm$ half-width of the 95\,\% Student-$t$ interval over seeds ($n$ seeds). Best mean per "
            r"column in bold.")
    if reference is not None and metric in ("acc", "auc"):
        note += (rf" $^\dagger$ reference ({reference}). $\blacktriangle$/$\blacktriangledown$: better/worse than the "
                 rf"reference, two-sided Wilcoxon signed-rank test over the seeds both have (the same support sets), "
                 rf"Holm-corrected over every test of this table, $p < {alpha}$.")
    for extra in dict.fromkeys(section.notes):  # e.g. cells from several commits (each said once)
        note += " " + escape(extra[0].upper() + extra[1:]) + "."
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip\footnotesize " + note, r"\end{table}", ""]
    return "\n".join(lines)


def ranks_table(ranking: Any) -> str:
    """A ranking across datasets (the report's): methods by average rank, the Friedman test and Nemenyi's CD."""
    result = ranking.result
    title = f"Average ranks, encoder {ranking.encoder}, {ranking.size} px" + (
        "" if ranking.protocol == "few-shot" else f", protocol {ranking.protocol}")
    lines = [r"\begin{table}[htbp]", r"\centering", r"\small", rf"\caption{{{escape(title)}}}",
             r"\begin{tabular}{lr}", r"\toprule", r"method & average rank \\", r"\midrule"]
    for method, rank in sorted(result.average_ranks.items(), key=lambda item: item[1]):
        lines.append(f"{escape(method)} & {rank:.2f} " + r"\\")
    if result.p is not None:
        how = ("" if result.p_method == "chi-square" else
               f" ({escape(result.p_method)}; the chi-square approximation gives {result.p_chi_square:.3g})")
        note = (rf"Blocks: {len(result.blocks)} datasets (shots averaged); rank 1 = best. Friedman $\chi^2$ = "
                rf"{result.statistic:.3g}, $p$ = {result.p:.3g}{how}; Nemenyi critical difference {result.cd:.2f}.")
    else:
        note = escape(result.note) + "."
    if ranking.left_out:
        note += " Left out (no result in every block): " + escape(", ".join(ranking.left_out)) + "."
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip\footnotesize " + note, r"\end{table}", ""]
    return "\n".join(lines)


def rows_table(title: str, rows: list[dict[str, str]], note: str = "") -> str:
    """A table of already formatted cells (the robustness table's blocks): one column per key."""
    columns = list(rows[0])
    lines = [r"\begin{table}[htbp]", r"\centering", r"\scriptsize", rf"\caption{{{escape(title)}}}",
             r"\begin{tabular}{" + "l" * 2 + "r" * (len(columns) - 2) + "}", r"\toprule",
             " & ".join(escape(c) for c in columns) + r" \\", r"\midrule"]
    lines += [" & ".join(escape(row[c]) for c in columns) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"] + ([r"\par\smallskip\footnotesize " + escape(note)] if note else [])
    return "\n".join(lines + [r"\end{table}", ""])


def figure_snippet(name: str, caption: str) -> str:
    """The lines that put ``figures/name`` (PDF when written, else PNG) in a paper."""
    return "\n".join([r"\begin{figure}[htbp]", r"\centering",
                      rf"\includegraphics[width=\linewidth]{{figures/{name}}}", rf"\caption{{{escape(caption)}}}",
                      r"\end{figure}", ""])


PREAMBLE = r"""\documentclass[10pt]{article}
\usepackage[margin=2cm,landscape]{geometry}
\usepackage{booktabs}
\usepackage{graphicx}
\usepackage{amssymb}
\graphicspath{{../}}
\begin{document}
"""


def write(folder: Path, tables: list[tuple[str, str]], figures: list[tuple[str, str]], provenance: list[str]) -> Path:
    """``folder/tables/NAME.tex`` for each (name, table), ``folder/figures.tex`` with each (figure name, caption)'s
    snippet, and ``folder/main.tex`` that ``\\input``s them all, its first page's footnote listing every commit,
    package set and machine among the results (``provenance``). Returns main.tex."""
    (folder / "tables").mkdir(parents=True, exist_ok=True)
    inputs = []
    for i, (name, text) in enumerate(tables):
        atomic_write(folder / "tables" / f"{name}.tex", text)
        if i and i % FLOATS_PER_PAGE_RUN == 0:  # flush the floats: LaTeX holds only so many unplaced ones
            inputs.append(r"\clearpage")
        inputs.append(rf"\input{{tables/{name}}}")
    atomic_write(folder / "figures.tex", "\n".join(figure_snippet(name, caption) for name, caption in figures))
    source = (r"\noindent\textbf{hica-bench results}\footnote{" + "; ".join(escape(p) for p in provenance) + "}\n\n"
              if provenance else "")
    body = PREAMBLE + source + "\n".join(inputs) + ("\n\\clearpage\n\\input{figures}\n" if figures else "\n") + "\\end{document}\n"
    return atomic_write(folder / "main.tex", body)


def compile_document(main: Path) -> tuple[Path | None, str]:
    """``main.tex`` compiled by ``pdflatex`` (twice is not needed: no references) and its first page rendered to
    ``main-page1.png`` by ``pdftoppm``: (the PNG, what happened); (None, why) when an engine is missing or fails."""
    engine, render = shutil.which("pdflatex"), shutil.which("pdftoppm")
    if engine is None:
        return None, "no LaTeX engine (pdflatex) on PATH: the sources are written, not compiled"
    try:
        done = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", main.name], cwd=main.parent,
                              capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"pdflatex ran past {ENGINE_TIMEOUT_S} s"
    pdf = main.with_suffix(".pdf")
    if done.returncode != 0 or not pdf.is_file():
        error = next((line for line in done.stdout.splitlines() if line.startswith("!")), "see main.log")
        return None, f"pdflatex failed: {error}"
    if render is None:
        return None, f"compiled {pdf.name}; no pdftoppm on PATH to render its first page"
    try:
        subprocess.run([render, "-png", "-r", "80", "-f", "1", "-l", "1", "-singlefile", pdf.name, "main-page1"],
                       cwd=main.parent, capture_output=True, timeout=ENGINE_TIMEOUT_S, check=True)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as exc:
        return None, f"compiled {pdf.name}; pdftoppm failed ({type(exc).__name__})"
    return main.parent / "main-page1.png", f"compiled {pdf.name} and rendered its first page"

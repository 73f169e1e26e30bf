"""``hica-bench report``: results -> a folder to publish from (``run`` writes one beside its tables).

``report.html`` is one self-contained page (figures embedded as PNG, no network, no script): per dataset and
encoder, the ACC / AUC / ECE tables (mean ± 95 % t-interval half-width (n), paired-significance marks against the
reference method), few-shot curves, reliability diagrams at the largest k and the cost; across datasets and shots, the
average ranks, the Friedman test and the critical-difference diagram; the run's environment. Beside it:
``figures/*.png`` and ``*.svg`` (matplotlib), ``paired_tests.csv`` and ``ranks.csv``. The statistics are those of
:mod:`hica_bench.stats`; this module only lays them out.
"""

from __future__ import annotations

import base64
import io
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from hica_bench import explanations as explanations_module
from hica_bench import stats
from hica_bench.errors import UserError
from hica_bench.files import atomic_write, digest
from hica_bench.leaderboard import row_label
from hica_bench.results import CellResult, Status

REFERENCE = "linear-probe"  #: the default reference method of the paired tests
METRICS = ("acc", "auc", "ece")  #: the tables' metrics (ECE: lower is better)
PACKAGES = ("hica-bench", "torch", "numpy", "scikit-learn", "scipy", "onnxruntime", "timm", "open_clip_torch")


@dataclass
class Row:
    """One method (and origin) of one section: per k, per seed, the result."""

    label: str
    method: str
    origin: str
    cells: dict[int, dict[int, CellResult]] = field(default_factory=dict)  # k -> seed -> result

    def values(self, metric: str, k: int, same_as: "Row | None" = None) -> dict[int, float]:
        """seed -> the metric at ``k``; with ``same_as``, only the seeds whose result drew the same support set from
        the same dataset files as ``same_as``'s (so a pair compares methods, not data)."""
        out = {}
        for seed, r in self.cells.get(k, {}).items():
            value = getattr(r.metrics, metric, None)
            if value is None:
                continue
            if same_as is not None:
                other = same_as.cells.get(k, {}).get(seed)
                if other is None or _data(other) != _data(r):
                    continue
            out[seed] = value
        return out


def _data(result: CellResult) -> tuple | None:
    """What a cell's numbers were drawn from: its dataset files and support set (None: a legacy record)."""
    i = result.identity
    return None if i is None else (i.origin.dataset_identity, i.origin.max_test, i.support)


@dataclass
class Section:
    dataset: str
    size: int
    encoder: str
    max_test: int | None
    protocol: str  #: the evaluation protocol's label (``few-shot``: the plain k-shot one)
    rows: list[Row]
    shots: list[int]
    tests: dict[tuple[str, str, int], stats.Paired] = field(default_factory=dict)  # (metric, row label, k) -> test
    reference: Row | None = None
    bootstrap: dict[tuple[str, int], tuple[float, float, int]] = field(default_factory=dict)
    bootstrapped: int = 0  #: cells whose saved predictions the bootstrap read
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        test = "full test split" if self.max_test is None else f"first {self.max_test} test images"
        protocol = "" if self.protocol == "few-shot" else f", protocol {self.protocol}"
        return f"{self.dataset} ({self.size} px) — encoder {self.encoder}, {test}{protocol}"

    @property
    def slug(self) -> str:
        """A file and anchor name: readable, and unique through a digest of the whole section key."""
        readable = re.sub(r"[^A-Za-z0-9]+", "-", f"{self.dataset}-{self.size}-{self.encoder}").strip("-")[:48]
        key = [self.dataset, self.size, self.encoder, self.max_test] + ([] if self.protocol == "few-shot" else [self.protocol])
        return f"{readable}-{digest(key, 8)}"


def sections(results: list[CellResult]) -> list[Section]:
    """The ok results grouped as the leaderboard groups them: per (dataset, size, encoder, max_test, protocol), one row per
    method label and origin (a method with several origins gets ``⟨origin⟩`` in its label, never averaged)."""
    grouped: dict[tuple, dict[tuple[str, str], Row]] = {}
    origins: dict[tuple, dict[str, set[str]]] = {}
    results = [r for r in results if r.key.corruption is None]  # corrupted test splits: the robustness table
    for r in results:
        block = (r.key.dataset, r.key.size, r.key.encoder, r.key.max_test, r.key.protocol)
        origins.setdefault(block, {}).setdefault(r.key.method, set()).add(r.origin_id)
    for r in results:
        if r.status is not Status.OK or r.metrics is None:
            continue
        block = (r.key.dataset, r.key.size, r.key.encoder, r.key.max_test, r.key.protocol)
        label = row_label(r.key.method, r.origin_id, origins[block])
        row = grouped.setdefault(block, {}).setdefault((r.key.method, r.origin_id), Row(label, r.key.method, r.origin_id))
        row.cells.setdefault(r.key.k, {})[r.key.seed] = r  # the newest record of a cell is the one kept
    out = []
    for block in sorted(grouped, key=lambda b: (b[0], b[1], b[2], -1 if b[3] is None else b[3], b[4] != "few-shot", b[4])):
        rows = sorted(grouped[block].values(), key=lambda row: row.label)
        shots = sorted({k for row in rows for k in row.cells})
        out.append(Section(*block, rows, shots))
    return out


def _newest(rows: list[Row]) -> Row:
    return max(rows, key=lambda row: max((r.finished_at or "") for cells in row.cells.values() for r in cells.values()))


def paired_tests(section: Section, reference: str) -> None:
    """Every row against the reference method's row at each k, for ACC and AUC; Holm-corrected per metric."""
    candidates = [row for row in section.rows if row.method == reference]
    if not candidates:
        return
    section.reference = _newest(candidates)  # with several origins: the newest one
    for metric in ("acc", "auc"):
        family = []
        for row in section.rows:
            if row is section.reference:
                continue
            for k in section.shots:
                if k not in row.cells or k not in section.reference.cells:
                    continue
                test = stats.paired_test(row.values(metric, k, section.reference),
                                         section.reference.values(metric, k, row))
                if test.n == 0 and set(row.values(metric, k)) & set(section.reference.values(metric, k)):
                    test.note = "no seeds on the same data (dataset files or support sets differ), not computed"
                section.tests[(metric, row.label, k)] = test
                family.append(test)
        stats.holm(family)
        reachable = stats.holm_reachable(family)
        if reachable is not None:
            section.notes.append(reachable)


def bootstrap(section: Section, resamples: int, folders: dict[str, Path]) -> None:
    """Per row and k: the mean over seeds of each seed's test-set bootstrap interval of ACC (from saved predictions)."""
    from sklearn.metrics import accuracy_score

    for row in section.rows:
        for k, by_seed in row.cells.items():
            intervals = []
            for seed, r in by_seed.items():
                folder = folders.get(r.cell_id)
                if not r.predictions or folder is None or not (folder / r.predictions).is_file():
                    continue
                path = folder / r.predictions
                try:
                    with np.load(path, allow_pickle=False) as saved:
                        labels, proba = np.asarray(saved["labels"]), np.asarray(saved["proba"], dtype=np.float64)
                    if proba.ndim != 2 or labels.shape != proba.shape[:1] or not np.isfinite(proba).all():
                        raise ValueError(f"labels {labels.shape} and probabilities {proba.shape} do not fit")
                except Exception as exc:  # not an npz, another layout, a pickle, a truncated file
                    raise UserError(f"saved predictions {path} cannot be read ({type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())[:160]}); rerun that cell with --save-predictions "
                                    "--force or drop --bootstrap") from None
                section.bootstrapped += 1
                found = stats.bootstrap_interval(labels, proba, lambda y, p: accuracy_score(y, p.argmax(1)), resamples,
                                                 seed=seed)
                if found is not None:
                    intervals.append(found)
            if intervals:
                section.bootstrap[(row.label, k)] = (float(np.mean([i[0] for i in intervals])),
                                                     float(np.mean([i[1] for i in intervals])), len(intervals))


def _number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or value != value else f"{100 * value:.{digits}f}"


def cell_text(row: Row, metric: str, k: int, test: stats.Paired | None = None) -> str:
    values = [v for v in row.values(metric, k).values() if v == v]  # an undefined AUC of one seed is left out
    if not values:
        return "—"
    interval = stats.t_interval(values)
    text = (_number(float(np.mean(values))) + (f" ± {100 * interval.half_width:.1f}" if interval is not None else "")
            + f" ({len(values)})")
    return text + (f" {test.mark}" if test is not None and test.mark else "")


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **margins):
    """A figure (no pyplot state) with its subplots placed by ``margins`` (``subplots_adjust``): a layout engine would
    double the cost of every figure."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    if margins:
        figure.subplots_adjust(**margins)
    return figure, axes


#: what a figure is also written as besides PNG: ``svg`` (``hica-bench report``), ``pdf`` (``report --latex``)
VECTOR = ("svg", "pdf")


def _save(figure, folder: Path, name: str, svg: bool | tuple[str, ...]) -> str:
    """``figure`` as ``folder/name.png`` and, for a paper, in the vector formats ``svg`` names (True: SVG; a tuple of
    :data:`VECTOR`; ``hica-bench report`` asks for SVG, ``report --latex`` for PDF too, ``run``'s report embeds PNGs
    only, which halves its cost); returns the PNG as a data URI for the page."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(folder / f"{name}.png", buffer.getvalue())
    for kind in (("svg",) if svg is True else svg or ()):
        vector = io.BytesIO()
        figure.savefig(vector, format=kind)
        atomic_write(folder / f"{name}.{kind}", vector.getvalue())
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def curves(section: Section, folder: Path, svg: bool | tuple[str, ...] = True) -> str | None:
    """ACC and AUC against k (log axis), mean with its 95 % t-interval band, one line per method; None for a single k
    (no curve to draw: the table holds the same means and intervals)."""
    if len(section.shots) < 2:
        return None
    figure, axes = _figure(10, 3.8, ncols=2, left=0.06, right=0.79, bottom=0.14, top=0.88, wspace=0.22)
    for ax, metric in zip(axes[0], ("acc", "auc")):
        for row in section.rows:
            shots = [k for k in section.shots if row.values(metric, k)]
            if not shots:
                continue
            means, lows, highs = [], [], []
            for k in shots:
                values = list(row.values(metric, k).values())
                interval = stats.t_interval(values)
                mean = float(np.nanmean(values)) if any(v == v for v in values) else float("nan")
                means.append(100 * mean)
                lows.append(100 * (interval.low if interval else mean))
                highs.append(100 * (interval.high if interval else mean))
            line, = ax.plot(shots, means, marker="o", label=row.label)
            ax.fill_between(shots, lows, highs, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.set_xticks(section.shots, [str(k) for k in section.shots])
        ax.minorticks_off()
        ax.set_xlabel("shots per class (k)")
        ax.set_ylabel(f"{metric.upper()} (%)")
        ax.set_ylim(0, 100)  # an interval reaching past 0 or 100 % is drawn to the edge
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.8, 0.88), fontsize=8, frameon=False)
    figure.suptitle(f"{section.dataset} — {section.encoder}: mean and 95 % t-interval over seeds", fontsize=10)
    return _save(figure, folder, f"curves-{section.slug}", svg)


def one_cell(section: Section) -> bool:
    """Whether ``section`` holds a single cell (one method, one k, one seed)."""
    return sum(len(cells) for row in section.rows for cells in row.cells.values()) == 1


def diagram_left_out(section: Section) -> bool:
    """Whether the page says :func:`reliability` drew no diagram for this section: a single cell with an ECE."""
    return one_cell(section) and any(r.calibration for row in section.rows for cells in row.cells.values()
                                     for r in cells.values())


def reliability(section: Section, folder: Path, svg: bool | tuple[str, ...] = True) -> str | None:
    """Per method at the largest k: accuracy against confidence per bin, pooled over seeds (counts summed). None for a
    section of one cell (:func:`one_cell`): its ECE is in the table, and a figure of one cell is most of a smoke run's
    report time (~0.7 s of a one-cell zero-shot run on 2 cores; matplotlib is then not imported at all)."""
    k = max(section.shots)
    rows = [row for row in section.rows if any(r.calibration for r in row.cells.get(k, {}).values())]
    if not rows or one_cell(section):
        return None
    ncols = min(4, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    figure, axes = _figure(2.6 * ncols, 2.7 * nrows + 0.4, ncols=ncols, nrows=nrows, left=0.09, right=0.97, bottom=0.1,
                           top=1 - 0.95 / (2.7 * nrows + 0.4), wspace=0.4, hspace=0.75)
    for ax in axes.flat[len(rows):]:
        ax.set_axis_off()
    for ax, row in zip(axes.flat, rows):
        diagrams = [r.calibration for r in row.cells[k].values() if r.calibration]
        bins = len(diagrams[0].count)
        count = np.sum([d.count for d in diagrams], axis=0)
        confidence = np.array([sum(d.count[b] * (d.confidence[b] or 0) for d in diagrams) for b in range(bins)])
        accuracy = np.array([sum(d.count[b] * (d.accuracy[b] or 0) for d in diagrams) for b in range(bins)])
        filled = count > 0
        centres = (np.arange(bins) + 0.5) / bins
        ax.bar(centres[filled], accuracy[filled] / count[filled], width=1 / bins, edgecolor="black", linewidth=0.4,
               label="accuracy")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
        ece = float(np.sum(np.abs(accuracy[filled] - confidence[filled])) / count.sum())
        ax.set_title(f"{row.label}\nECE {100 * ece:.1f} (bins pooled over {len(diagrams)} seeds)", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
    figure.suptitle(f"{section.dataset} — {section.encoder}: reliability at k = {k} (15 bins)", fontsize=10)
    return _save(figure, folder, f"reliability-{section.slug}", svg)


def cd_diagram(result: stats.Friedman, name: str, folder: Path, svg: bool | tuple[str, ...] = True) -> str | None:
    if result.cd is None:
        return None
    import scikit_posthocs as sp

    figure, axes = _figure(10, 0.35 * len(result.methods) + 1.6, left=0.2, right=0.8, bottom=0.02, top=0.85)
    sp.critical_difference_diagram(result.average_ranks, result.nemenyi, ax=axes[0][0], cd=result.cd)
    axes[0][0].set_xlim(0.95, len(result.methods) + 0.05)  # the rank axis from 1 (best) to the number of methods
    axes[0][0].set_xticks(range(1, len(result.methods) + 1))
    figure.suptitle(f"average ranks over {len(result.blocks)} datasets (shots averaged); bars join methods Nemenyi does not "
                    f"tell apart (α = {stats.ALPHA}); CD = {result.cd:.2f}", fontsize=9)
    return _save(figure, folder, f"cd-{name}", svg)


# --------------------------------------------------------------------------- across datasets and shots


@dataclass
class Ranking:
    encoder: str
    size: int
    max_test: int | None
    protocol: str
    result: stats.Friedman
    left_out: list[str]
    image: str | None = None


def rankings(all_sections: list[Section]) -> list[Ranking]:
    """Per (encoder, size, max_test, protocol): methods × dataset blocks, each a method's mean ACC over seeds at each k
    averaged over the dataset's shots (independent blocks); methods without a mean at every k of every block are left
    out (named)."""
    import pandas as pd

    grouped: dict[tuple, dict[str, dict[str, float]]] = {}
    for section in all_sections:
        table = grouped.setdefault((section.encoder, section.size, section.max_test, section.protocol), {})
        for row in section.rows:
            means = []
            for k in section.shots:
                values = [v for v in row.values("acc", k).values() if v == v]
                means.append(float(np.mean(values)) if values else float("nan"))
            table.setdefault(row.label, {})[section.dataset] = float(np.mean(means))  # NaN unless every k has one
    out = []
    for (encoder, size, max_test, protocol), table in sorted(grouped.items(), key=lambda item: str(item[0])):
        frame = pd.DataFrame(table)  # blocks × methods
        complete = frame.dropna(axis=1)
        left_out = sorted(set(frame.columns) - set(complete.columns))
        out.append(Ranking(encoder, size, max_test, protocol, stats.friedman(complete), left_out))
    return out


# --------------------------------------------------------------------------- the page


def _environment(results: list[CellResult]) -> dict[str, Any]:
    newest = max(results, key=lambda r: r.finished_at or "")
    env = newest.environment
    packages = {name: env.packages[name] for name in PACKAGES if name in env.packages}
    return {"python": env.python, "platform": env.platform, "device": env.device, "device name": env.device_name,
            "CPU": f"{env.cpu_model} ({env.cpu_count} cores)" if env.cpu_count else env.cpu_model,
            "torch threads": env.torch_threads, "git": env.git, "packages": ", ".join(f"{k} {v}" for k, v in packages.items()),
            "newest result": newest.finished_at}


#: what ``write(..., latex=True)`` did with ``latex/main.tex``: [(its first page as PNG or None, a line saying what)]
LATEX_OUTCOME: list[tuple[Path | None, str]] = []


def provenance(results: list[CellResult]) -> list[str]:
    """Every (commit, package set, machine) among ``results``' finished cells, with how many cells each: what a table
    that pairs cells from different commits or machines must say."""
    found: dict[tuple, int] = {}
    for r in results:
        if r.status is not Status.OK:
            continue
        env = r.environment
        packages = ", ".join(f"{k} {env.packages[k]}" for k in PACKAGES if k in env.packages)
        machine = env.cpu_model or "unknown CPU"
        if env.device_name and env.device_name != env.cpu_model:  # a GPU's name (on CPU it is the CPU's)
            machine += f", {env.device_name}"
        key = (env.git or "unknown commit", packages, machine)
        found[key] = found.get(key, 0) + 1
    return [f"{n} cells: git {git}; {packages}; {machine}" for (git, packages, machine), n in
            sorted(found.items(), key=lambda item: -item[1])]


def _cost(section: Section) -> list[tuple[str, str, str]]:
    out = []
    for row in section.rows:
        results = [r for cells in row.cells.values() for r in cells.values()]
        fits = [r.timings.fit_s for r in results if r.timings.fit_s is not None]
        rates = [r.timings.encoder_images_per_s for r in results if r.timings.encoder_images_per_s]
        out.append((row.label, f"{np.mean(rates):.1f}" if rates else "cached", f"{np.mean(fits):.3g}" if fits else "—"))
    return out


def write(results: list[CellResult], out_dir: Path, reference: str | None = None, resamples: int = 0,
          folders: dict[str, Path] | None = None, sources: list[str] | None = None, svg: bool = True,
          latex: bool = False, gate: Any = None) -> Path:
    """The report of ``results`` in ``out_dir`` (``report.html`` and beside it figures and CSVs, and ``latex/``: its
    tables in LaTeX and a document that inputs them, :mod:`hica_bench.latex`); returns the page. ``reference``: the
    paired tests' reference method (None: :data:`REFERENCE`, not required to be there; a name given must be).
    ``resamples`` > 0 adds test-set bootstrap intervals from saved predictions (``folders``: cell id -> the folder its
    ``predictions`` path is relative to). ``svg``: also write the figures as SVG. ``latex``: also as PDF, and compile
    ``latex/main.tex`` when a LaTeX engine is installed (what happened: :data:`LATEX_OUTCOME`). Results of more than
    one commit also get a history section (:mod:`hica_bench.history`), each commit gated against the one before it
    (``gate``: a :class:`hica_bench.history.Gate`; default: ``hica-bench check``'s)."""
    import jinja2

    from hica_bench import latex as latex_module

    if latex:
        svg = ("svg", "pdf")
    if not results:
        raise UserError("no results to report")
    chosen = reference or REFERENCE
    if reference is not None and not any(r.key.method == reference and r.status is Status.OK for r in results):
        methods = sorted({r.key.method for r in results if r.status is Status.OK})
        raise UserError(f"--reference {reference!r} has no finished results here (methods: {', '.join(methods) or 'none'})")
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    found = sections(results)
    for section in found:
        paired_tests(section, chosen)
        commits = sorted({r.environment.git or "unknown" for row in section.rows for cells in row.cells.values()
                          for r in cells.values()})
        if len(commits) > 1:  # a table that pairs cells from different commits says so
            section.notes.append(f"this table pairs cells run at {len(commits)} commits ({', '.join(c[:10] for c in commits)})")
        if resamples:
            bootstrap(section, resamples, folders or {})
    bootstrapped = sum(section.bootstrapped for section in found)
    if resamples and not bootstrapped:
        raise UserError("--bootstrap needs the test predictions each cell saved (`hica-bench run --save-predictions`); "
                        "none of these results has them")
    ranked = rankings(found)
    for ranking in ranked:
        name = (re.sub(r"[^A-Za-z0-9]+", "-", f"{ranking.encoder}-{ranking.size}").strip("-")[:48] + "-"
                + digest([ranking.encoder, ranking.size, ranking.max_test]
                         + ([] if ranking.protocol == "few-shot" else [ranking.protocol]), 8))
        ranking.image = cd_diagram(ranking.result, name, figures, svg)
    pages = []
    lines = ["dataset,size,encoder,max_test,metric,method,k,n,mean_difference,p,p_holm,mark,note,protocol"]
    for section in found:
        tables = []
        for metric in METRICS:
            body = []
            for row in section.rows:
                cells = [cell_text(row, metric, k, section.tests.get((metric, row.label, k))) for k in section.shots]
                body.append((row.label + (" (reference)" if row is section.reference else ""), cells))
            tables.append((metric, body))
        for (metric, label, k), test in section.tests.items():
            lines.append(",".join(_csv(v) for v in (section.dataset, section.size, section.encoder, section.max_test, metric,
                                                      label, k, test.n, test.difference, test.p, test.p_holm, test.mark,
                                                      test.note, section.protocol)))
        named: dict[str, list[str]] = {}  # each note with the tests it is about ("identical on every seed": which)
        for (metric, label, k), test in section.tests.items():
            if test.note:
                named.setdefault(test.note, []).append(f"{label} {metric.upper()} k={k}")
        notes = [f"{note} ({', '.join(where)})" for note, where in sorted(named.items())]
        notes += list(dict.fromkeys(section.notes))  # Holm's note is the same for ACC and AUC: said once
        pages.append({"title": section.title, "slug": section.slug, "shots": section.shots, "tables": tables,
                      "novel": _base_to_novel(section), "multilabel": _multilabel(section),
                      "curves": curves(section, figures, svg), "reliability": reliability(section, figures, svg),
                      "one_cell": diagram_left_out(section),
                      "cost": _cost(section), "reference": section.reference.label if section.reference else None,
                      "notes": notes, "bootstrap": [(label, k, f"{100 * lo:.1f}–{100 * hi:.1f}", n)
                                                    for (label, k), (lo, hi, n) in sorted(section.bootstrap.items())]})
    atomic_write(out_dir / "paired_tests.csv", "\n".join(lines) + "\n")
    rank_lines = ["encoder,size,max_test,method,average_rank,blocks,protocol"]
    for ranking in ranked:
        for method, rank in sorted(ranking.result.average_ranks.items(), key=lambda item: item[1]):
            rank_lines.append(",".join(_csv(v) for v in (ranking.encoder, ranking.size, ranking.max_test, method, rank,
                                                           len(ranking.result.blocks), ranking.protocol)))
    atomic_write(out_dir / "ranks.csv", "\n".join(rank_lines) + "\n")
    origins = provenance(results)
    tex = [(f"{section.slug}-{metric}", latex_module.section_table(section, metric)) for section in found
           for metric in METRICS]
    tex += [(f"ranks-{i}", latex_module.ranks_table(ranking)) for i, ranking in enumerate(ranked)]
    from hica_bench.leaderboard import INFLATION_NOTE, ROBUSTNESS_NOTE, TRANSFER_NOTE, transfer_blocks, transfer_table

    robustness = _robustness(results)
    tex += [(f"robustness-{i}", latex_module.rows_table(f"Robustness: {title}", [dict(zip(header, row)) for row in body]))
            for i, (title, header, body) in enumerate(robustness)]
    inflation, transfer = _inflation(results), transfer_blocks(transfer_table(results))
    tex += [(f"inflation-{i}", latex_module.rows_table(f"Test-set tuning inflation: {title}",
                                                       [dict(zip(header, row)) for row in body], INFLATION_NOTE))
            for i, (title, header, body) in enumerate(inflation)]
    tex += [(f"transfer-{i}", latex_module.rows_table(f"Cross-dataset transfer: {title}",
                                                      [dict(zip(header, row)) for row in body], TRANSFER_NOTE))
            for i, (title, header, body) in enumerate(transfer)]
    figures_tex = [(f"curves-{s.slug}", f"Few-shot curves: {s.title}") for s in found if (figures / f"curves-{s.slug}.png").is_file()]
    drops = drop_heatmaps(results, figures, svg)
    figures_tex += [(name, f"ACC drop in points per corruption and severity: {title}") for title, _, name in drops]
    for page in pages:  # base-to-novel and multi-label sections' own tables
        columns = [f"{k}-shot" for k in page["shots"]]
        if page["novel"]:
            tex.append((f"{page['slug']}-base-to-novel", latex_module.rows_table(
                f"{page['title']}: ACC base / novel / HM", [{"method": label, **dict(zip(columns, cells))}
                                                            for label, cells in page["novel"]])))
        if page["multilabel"]:
            found_ml = page["multilabel"]
            tex.append((f"{page['slug']}-ap", latex_module.rows_table(
                f"{page['title']}: AP (multi-label, mean over labels)",
                [{"method": label, **dict(zip(columns, cells))} for label, cells in found_ml["ap"]])))
            tex.append((f"{page['slug']}-auc-per-label", latex_module.rows_table(
                f"{page['title']}: AUC per label ({found_ml['k']}-shot)",
                [{"method": label, **dict(zip(found_ml["labels"], cells))} for label, cells in found_ml["per_label"]])))
    main = latex_module.write(out_dir / "latex", tex, figures_tex, origins)
    LATEX_OUTCOME[:] = [latex_module.compile_document(main)] if latex else []
    explanations = [shown for shown in map(_explanation, explanations_module.read_all(out_dir)) if shown is not None]
    history = _history(results, out_dir, svg, gate)
    environment = jinja2.Environment(loader=jinja2.PackageLoader("hica_bench", "templates"),
                                     autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    page = environment.get_template("report.html.j2").render(
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), sources=sources or [],
        sections=pages, rankings=ranked, reference=chosen, test=stats.TEST, alpha=stats.ALPHA, resamples=resamples,
        bootstrapped=bootstrapped, n_cells=sum(r.status is Status.OK for r in results),
        environment=_environment(results), provenance=origins, n_results=len(results), robustness=robustness,
        explanations=explanations, concepts=_concepts(results), grid=explanations_module.GRID,
        robustness_note=ROBUSTNESS_NOTE.replace("`", ""), drops=[(title, image) for title, image, _ in drops], inflation=inflation, inflation_note=INFLATION_NOTE,
        transfer=transfer, transfer_note=TRANSFER_NOTE, history=history,
        n_ok=sum(r.status is Status.OK for r in results), fmt=lambda v: "—" if v is None else f"{v:.3g}")
    path = out_dir / "report.html"
    atomic_write(path, page)
    return path


def _history(results: list[CellResult], out_dir: Path, svg: bool | tuple[str, ...],
             gate: Any = None) -> dict[str, Any] | None:
    """The "History over commits" section (:mod:`hica_bench.history`) when ``results`` hold more than one commit: its
    files in ``out_dir/history/`` and what the page shows; None, and nothing computed, with one commit."""
    from hica_bench import history as history_module

    if not history_module.several_commits(results):
        return None
    found = history_module.build(results, gate or history_module.default_gate())
    written = history_module.write(found, out_dir / "history", ("svg",) if svg is True else tuple(svg or ()))
    return {"intro": history_module.gate_text(found), "commits": history_module.commit_rows(found),
            "gated": found.gate is not None,
            "notes": found.notes + [f"{v.commit.label}: {note}" for v in found.verdicts for note in v.notes],
            "tables": history_module.tables(found), "image": history_module.data_uri(written["history.png"]),
            "files": sorted(name for name in written)}


def write_beside(results: list[CellResult], out_dir: Path) -> Path | None:
    """The report of a results folder's own ``results.jsonl`` in that folder ``out_dir`` (:mod:`hica_bench.publish`,
    after ``run``, ``merge`` and ``explain``); None, and nothing written, when no cell finished ok."""
    if not any(r.status is Status.OK for r in results):
        return None
    return write(results, out_dir, folders={r.cell_id: out_dir for r in results},
                 sources=[str(out_dir / "results.jsonl")], svg=False)


def _explanation(e: dict[str, Any]) -> dict[str, Any] | None:
    """One ``explanation.json`` (:mod:`hica_bench.explain`) as the report shows it; None for one that is not in the
    shape explain writes (edited by hand, cut short): it is left out rather than stopping the report."""
    try:
        return {"title": " · ".join(str(e["cell"][k]) for k in ("dataset", "method", "encoder"))
                + f" · k={e['cell']['k']} · seed {e['cell']['seed']} ({len(e['images'])} test images)",
                "overlays": f"{e['folder']}/{e['overlays']}", "layer": e.get("grad_cam_layer"),
                "unavailable": dict(e.get("unavailable") or {}),
                "rows": [(r["attribution"], explanations_module.mean_se(r["deletion_auc"], r["deletion_auc_se"]),
                          explanations_module.mean_se(r["insertion_auc"], r["insertion_auc_se"]), explanations_module.versus_random(r))
                         for r in e["summary"]],
                "regions": [(image["test_index"], image["predicted_name"], region["box"], region["descriptor"],
                             region["class"], f"{region['similarity']:.3f}")
                            for image in e["images"] for region in (image.get("regions") or [])]}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _concepts(results: list[CellResult]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The top concepts per class of each concept-bottleneck cell group (dataset, size, encoder, method, k), from the
    lowest seed's ``fit_info`` (the concepts a seed's support set picked; other seeds may pick others)."""
    chosen: dict[tuple, CellResult] = {}
    for r in results:
        top = (r.fit_info or {}).get("top_concepts") if r.status is Status.OK else None
        if not isinstance(top, dict) or not all(  # a method of another shape under the same key is not shown
                isinstance(pairs, list) and all(isinstance(pair, (list, tuple)) and len(pair) == 2
                                                and isinstance(pair[1], (int, float)) for pair in pairs)
                for pairs in top.values()):
            continue
        group = (r.key.dataset, r.key.size, r.key.encoder, r.key.method, r.key.k)
        if group not in chosen or r.key.seed < chosen[group].key.seed:
            chosen[group] = r
    out = []
    for (dataset, size, encoder, method, k), r in sorted(chosen.items(), key=lambda item: tuple(map(str, item[0]))):
        rows = [(str(name), ", ".join(f"{concept} ({weight:+.2f})" for concept, weight in pairs) or "none")
                for name, pairs in r.fit_info["top_concepts"].items()]
        out.append((f"{dataset} ({size}px) · {method} · {encoder} · k={k} · seed {r.key.seed}", rows))
    return out


def _base_to_novel(section: Section) -> list[tuple[str, list[str]]]:
    """A base-to-novel section's ACC base / novel / HM per method and k (percent, means over seeds; HM of the means, as
    CoCoOp reports it); empty for any other section."""
    from hica_bench.leaderboard import harmonic_mean

    body = []
    for row in section.rows:
        results = [r for cells in row.cells.values() for r in cells.values()]
        if not any(r.novel is not None for r in results):
            return []
        cells = []
        for k in section.shots:
            seeds = list(row.cells.get(k, {}).values())
            if not seeds:
                cells.append("—")
                continue
            base = float(np.mean([r.metrics.acc for r in seeds]))
            novel = [r.novel.metrics.acc for r in seeds if r.novel is not None and r.novel.metrics is not None]
            if len(novel) < len(seeds):
                cells.append(f"{100 * base:.1f} / n/a / n/a")
            else:
                mean = float(np.mean(novel))
                cells.append(f"{100 * base:.1f} / {100 * mean:.1f} / {100 * harmonic_mean(base, mean):.1f}")
        body.append((row.label, cells))
    return body


def _multilabel(section: Section) -> dict[str, Any] | None:
    """A multi-label section's mean AP per method and k (percent, mean over seeds) and each label's AUC at the largest
    k; None for any other section."""
    results = [r for row in section.rows for cells in row.cells.values() for r in cells.values()]
    scored = [r.multilabel for r in results if r.multilabel is not None]
    if not scored:
        return None
    labels, top = scored[0].labels, max(section.shots)
    ap, per_label = [], []
    for row in section.rows:
        ap.append((row.label, [_number(100 * float(np.mean([r.multilabel.mean_ap for r in row.cells[k].values()])))
                               if row.cells.get(k) else "—" for k in section.shots]))
        seeds = list(row.cells.get(top, {}).values())
        per_label.append((row.label, [_number(100 * float(np.mean(values))) if values else "—" for values in (
            [r.multilabel.auc[j] for r in seeds if r.multilabel.auc[j] is not None] for j in range(len(labels)))]))
    return {"labels": labels, "k": top, "ap": ap, "per_label": per_label}


def _inflation(results: list[CellResult]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The leaderboard's test-set tuning inflation as (title, header, rows) per block (empty without an oracle)."""
    import pandas as pd

    from hica_bench.leaderboard import inflation_table

    table = inflation_table(results)
    blocks = []
    for (dataset, size, encoder, protocol), part in (table.groupby(["dataset", "size", "encoder", "protocol"], sort=True)
                                                     if not table.empty else []):
        shots = sorted(set(part["k"]))
        rows = []
        for method, per_method in part.groupby("method", sort=True):
            cells = {int(row["k"]): row for _, row in per_method.iterrows()}
            rows.append([method] + [
                "—" if k not in cells else f"{100 * cells[k]['inflation_mean']:+.1f} [{100 * cells[k]['inflation_ci_low']:+.1f}, "
                f"{100 * cells[k]['inflation_ci_high']:+.1f}] ({int(cells[k]['n'])})"
                if cells[k]["inflation_ci_low"] is not None and not pd.isna(cells[k]["inflation_ci_low"])
                else f"{100 * cells[k]['inflation_mean']:+.1f} ({int(cells[k]['n'])})" for k in shots])
        blocks.append((f"{dataset} ({int(size)} px) — encoder {encoder}: oracle − {protocol}", ["method"] +
                       [f"{k}-shot" for k in shots], rows))
    return blocks


def _robustness(results: list[CellResult]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The leaderboard's robustness section as (title, header, rows) per block (empty without corrupted cells)."""
    from hica_bench.leaderboard import robustness_blocks, robustness_table

    if not any(r.key.corruption is not None for r in results):
        return []
    return [(title.replace("`", ""), list(body[0]), [list(row.values()) for row in body])
            for title, body in robustness_blocks(robustness_table(results)) if body]


def drop_heatmaps(results: list[CellResult], folder: Path, svg: bool | tuple[str, ...] = True) -> list[tuple[str, str]]:
    """Per (dataset, size, encoder, max_test): a compact heatmap of the paired ACC drop (points) per corruption ×
    severity, one panel per method at the largest k run (blue: accuracy rose under the corruption); (title, PNG data
    URI, file name) each."""
    from hica_bench.leaderboard import robustness_table, variant_rows

    if not any(r.key.corruption is not None for r in results):
        return []
    table = variant_rows(robustness_table(results))
    out = []
    for (dataset, size, encoder, max_test), part in table.groupby(["dataset", "size", "encoder", "max_test"],
                                                                  dropna=False, sort=True):
        part = part[part["k"] == part["k"].max()]
        methods = sorted(set(part["method"]))
        names = sorted(set(part["corruption"]))
        levels = sorted({int(v) for v in part["severity"]})
        limit = max(1.0, float(np.nanmax(np.abs(part["acc_drop_pp"]))))
        figure, axes = _figure(1.6 + 1.9 * len(methods), 0.9 + 0.22 * len(names), ncols=len(methods), left=0.12,
                               right=0.97, bottom=0.08, top=0.8, wspace=0.08)
        for j, method in enumerate(methods):
            grid = np.full((len(names), len(levels)), np.nan)
            for _, row in part[part["method"] == method].iterrows():
                grid[names.index(row["corruption"]), levels.index(int(row["severity"]))] = row["acc_drop_pp"]
            ax = axes[0][j]
            ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_xticks(range(len(levels)), [str(v) for v in levels], fontsize=7)
            ax.set_yticks(range(len(names)), names if j == 0 else [""] * len(names), fontsize=7)
            ax.set_title(method, fontsize=8)
        k = int(part["k"].max())
        title = f"{dataset} ({int(size)} px), encoder {encoder}, {k}-shot"
        figure.suptitle(f"ACC drop in points per corruption (rows) and severity (columns), {title}; red: lower under "
                        f"the corruption, blue: higher (colour scale ±{limit:.1f})", fontsize=8)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{dataset}-{size}-{encoder}").strip("-")[:48]
        name = f"drops-{slug}-{digest([dataset, size, encoder, max_test], 8)}"
        out.append((title, _save(figure, folder, name, svg), name))
    return out


def _csv(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if value != value else f"{value:.6g}"
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


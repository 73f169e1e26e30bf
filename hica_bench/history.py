"""``hica-bench history``: results of several commits (typically the gate's run at each commit, one results folder
each) as tables and a figure of every metric and of the paired throughput efficiency over the commits, with the gate's
verdict at each commit.

- **Commits.** Records are grouped by the commit that ran them (``environment.git``); records that name none (run
  outside a git checkout, or schema 1) are grouped by their hica-bench version, and a note says so. Commits are ordered
  by their recorded commit time (``environment.git_time``, schema 11 on); when a commit has none (older records), all
  are ordered by their earliest result's ``finished_at`` instead, and a note says so. The same cell recorded at several
  commits is what this command is for (``report`` and ``leaderboard`` refuse it); within one results file the newest
  record of a cell counts, as everywhere.
- **Within a commit**, a cell (:data:`CELL`: its key without the seed, as the gate's cells) recorded under several
  origins counts with its newest origin only, as the gate compares it; its seeds are never averaged with another
  origin's.
- **Tables.** Per commit and cell, every metric (:meth:`hica_bench.results.Metrics.names`) as the mean over the ok seeds
  with its 95 % Student-t interval (:func:`hica_bench.metrics.aggregate`; one seed: no interval); per commit and
  encoder pass (dataset, size, encoder), the paired throughput efficiency as the gate reads it (the median of the
  records' ``timings.paired_efficiency``; None where the commit's run did not measure it).
- **Verdicts** (with a :class:`Gate`): each commit gated against the one before it by :func:`hica_bench.check.compare`
  (or against one fixed baseline): ``regression`` (what regressed is listed), else ``improvement``, else ``pass``;
  ``first`` for the first commit without a fixed baseline, ``not compared`` when two commits share no cell. The gate
  is handed to :func:`build` as a :class:`Gate` (:func:`default_gate`: ``hica-bench check``'s, with its defaults or
  the given tolerances); without one, the tables and the figure have no verdicts (``not gated``).

:func:`write` puts ``history.csv`` (long: one row per commit, cell and metric), ``history.md`` (a table per metric,
commits as columns in order, with the verdicts), ``verdicts.csv`` and the figure ``history.png`` (+ ``.svg``) in a
folder; :mod:`hica_bench.report` adds the same as a section when its results hold more than one commit.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from hica_bench.errors import UserError
from hica_bench.files import atomic_write
from hica_bench.metrics import aggregate
from hica_bench.results import SCHEMA_VERSION, CellKey, CellResult, Metrics, ResultsStore, Status, results_files

#: a cell: its key without the seed (the gate's cells, :data:`hica_bench.check.CELL`, hold the same parts)
CELL = tuple(f.name for f in dataclasses.fields(CellKey) if f.name != "seed")
METRICS = Metrics.names()  #: acc, auc, f1_macro, balanced_acc, ece: a table and a panel each
EFFICIENCY = "paired_efficiency"  #: the long table's name for the encoder pass's paired throughput efficiency
LOWER_IS_BETTER = ("ece",)
NAMES = {"acc": "ACC", "auc": "AUC", "f1_macro": "F1 macro", "balanced_acc": "balanced accuracy", "ece": "ECE"}
PASS = ["dataset", "size", "encoder"]  #: an encoder pass: what throughput is measured and gated per
#: the long table's columns (``history.csv``); metrics as fractions, the efficiency as a ratio
COLUMNS = ["commit", "commit_time", *CELL, "metric", "value", "ci_low", "ci_high", "n", "statistic"]
VERDICT_COLUMNS = ["order", "commit", "label", "commit_time", "time_source", "results", "against", "verdict", "regressed",
                   "improved", "compared", "notes"]
MAX_LINES = 8  #: more cells than this: the figure draws one line per method (its mean over the cells) instead
SHORT = 7  #: characters of a commit hash in labels
NOT_GATED = "not gated"


@dataclass(frozen=True)
class Gate:
    """The regression gate as :func:`build` applies it, handed over by the caller (see the module docstring):
    ``load(path, role)`` reads one side (:func:`hica_bench.check.load`), ``compare(reference, run)`` gates a run side
    against a reference side and returns the gate's report (:func:`hica_bench.check.compare` with its tolerances
    bound), ``settings`` are those tolerances (for the text), ``baseline`` the one side every commit is gated against
    (None: each commit against the one before it)."""

    load: Callable[[Path, str], Any]
    compare: Callable[[Any, Any], Any]
    settings: dict[str, float]
    baseline: Path | None = None


def default_gate(baseline: Path | None = None, tolerance: float | None = None, noise_z: float = 0.0,
                 throughput_tolerance: float | None = None) -> Gate:
    """The regression gate of ``hica-bench check`` (:func:`hica_bench.check.load` and :func:`~hica_bench.check.compare`
    with these tolerances; None: check's defaults), as :func:`build` applies it."""
    import functools

    from hica_bench import check

    settings = {"tolerance": check.DEFAULT_TOLERANCE if tolerance is None else tolerance, "noise_z": noise_z,
                "throughput_tolerance": (check.DEFAULT_THROUGHPUT_TOLERANCE if throughput_tolerance is None
                                         else throughput_tolerance)}
    return Gate(check.load, functools.partial(check.compare, **settings), settings, baseline)


@dataclass
class Commit:
    """The records of one commit (or of one hica-bench version, when they name no commit)."""

    id: str  #: the full commit hash, or ``hica-bench VERSION`` for records that name no commit
    label: str  #: the short hash, or ``vVERSION``
    git: bool  #: a commit hash (False: grouped by version)
    time: str | None  #: the recorded committer time (ISO 8601), if any
    first_finished: str  #: the earliest result's ``finished_at``
    results: list[CellResult]  #: the records that count: the newest per cell id, of each cell's newest origin

    @property
    def time_source(self) -> str:
        return "commit" if self.time else "first result"


@dataclass
class Verdict:
    """The gate's outcome for one commit."""

    commit: Commit
    verdict: str  #: first, pass, regression, improvement or not compared
    against: str | None = None  #: the commit (label) or baseline file it was gated against
    regressed: list[str] = field(default_factory=list)
    improved: list[str] = field(default_factory=list)
    compared: int = 0  #: cells compared
    notes: list[str] = field(default_factory=list)
    rows: pd.DataFrame | None = None  #: the gate's rows (:class:`hica_bench.check.Report`)


@dataclass
class History:
    commits: list[Commit]  #: in order
    table: pd.DataFrame  #: the long table (:data:`COLUMNS`)
    verdicts: list[Verdict]  #: one per commit, in order
    notes: list[str]
    gate: Gate | None = None  #: the gate the verdicts come from (None: not gated)


# --------------------------------------------------------------------------- reading and grouping


def read(paths: Iterable[Path]) -> list[CellResult]:
    """The results of several results files (or folders holding a ``results.jsonl``), all of them: a cell recorded in
    several files (at several commits) is kept in each. A missing, unreadable or empty one is a UserError."""
    found: list[CellResult] = []
    for path in results_files([Path(p) for p in paths]):
        loaded = list(ResultsStore(path).load().values())
        if not loaded:
            raise UserError(f"results file {path} holds no results")
        found += loaded
    return found


def _version(result: CellResult) -> str:
    return (result.environment.packages.get("hica-bench")
            or (result.identity.origin.harness if result.identity is not None else None) or "unknown")


def commit_of(result: CellResult) -> str:
    """The commit a record belongs to: its commit hash, or ``hica-bench VERSION`` when it names none."""
    return result.environment.git or f"hica-bench {_version(result)}"


def several_commits(results: Iterable[CellResult]) -> bool:
    """Whether ``results`` hold more than one commit (cheap: one pass, nothing computed)."""
    seen: set[str] = set()
    for r in results:
        seen.add(commit_of(r))
        if len(seen) > 1:
            return True
    return False


def _when(text: str | None) -> datetime | None:
    """An ISO 8601 time as an aware datetime (no zone: UTC); None for none or one that does not parse."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _cell(result: CellResult) -> tuple:
    return tuple(getattr(result.key, c) for c in CELL)


def _sortable(key: tuple) -> tuple:
    return tuple((v is None, v if v is not None else 0) for v in key)


def _counted(results: list[CellResult]) -> list[CellResult]:
    """The records of one commit that count, oldest first: the newest record per cell id, and of each cell only its
    newest origin's (what the gate compares)."""
    ordered = sorted(results, key=lambda r: _when(r.finished_at) or datetime.min.replace(tzinfo=timezone.utc))
    newest: dict[str, CellResult] = {}
    for r in ordered:  # a later record of the same cell id (the same cell given twice) replaces the earlier
        newest.pop(r.cell_id, None)
        newest[r.cell_id] = r
    origin = {_cell(r): r.origin_id for r in newest.values()}
    return [r for r in newest.values() if origin[_cell(r)] == r.origin_id]


def commits(results: list[CellResult]) -> tuple[list[Commit], list[str]]:
    """``results`` grouped by commit and ordered (see the module docstring), with the notes that ordering and grouping
    need."""
    grouped: dict[str, list[CellResult]] = {}
    for r in results:
        grouped.setdefault(commit_of(r), []).append(r)
    found = []
    for key, records in grouped.items():
        git = records[0].environment.git is not None
        times = sorted({r.environment.git_time for r in records if _when(r.environment.git_time)}, key=_when)
        finished = sorted((r.finished_at for r in records if _when(r.finished_at)), key=_when)
        label = key[:SHORT] if git else f"v{key.removeprefix('hica-bench ')}"
        found.append(Commit(key, label, git, times[0] if times else None, finished[0] if finished else "",
                            _counted(records)))
    labels = [c.label for c in found]
    for commit in found:  # two hashes that share their first characters: longer labels
        if labels.count(commit.label) > 1 and commit.git:
            commit.label = commit.id[:12]
    notes = []
    unnamed = [c for c in found if not c.git]
    if unnamed:
        notes.append(f"{sum(len(c.results) for c in unnamed)} results name no commit (run outside a git checkout, or "
                     f"schema 1): grouped by their hica-bench version ({', '.join(c.label for c in unnamed)})")
    untimed = [c for c in found if c.time is None]
    never = datetime.max.replace(tzinfo=timezone.utc)
    if untimed:
        found.sort(key=lambda c: _when(c.first_finished) or never)
        notes.append(f"commits ordered by their earliest result's finished_at, not by commit time: {len(untimed)} of "
                     f"{len(found)} have no recorded commit time (results of schema 10 or older, or run outside a git "
                     f"checkout: {', '.join(c.label for c in untimed)})")
    else:
        found.sort(key=lambda c: _when(c.time))
    return found, notes


# --------------------------------------------------------------------------- the gate, the tables


def side(results: list[CellResult], role: str, gate: Gate) -> Any:
    """``results`` as the gate reads one side (``gate.load``), through a scratch results file: the same reading, the
    same newest-origin choice, the same throughput medians. What the gate does not read (per-class scores,
    calibration, fit information) is left out of the scratch copy."""
    light = [dataclasses.replace(r, per_class=None, calibration=None, fit_info=None, predictions=None, novel=None,
                                 multilabel=None, components_used=[], schema_version=SCHEMA_VERSION) for r in results]
    with tempfile.TemporaryDirectory(prefix="hica-bench-history-") as folder:
        path = Path(folder) / "results.jsonl"
        path.write_text("".join(r.to_json() + "\n" for r in light), encoding="utf-8")
        found = gate.load(path, role)
    found.path = Path(role)
    return found


def _what(row: dict[str, Any]) -> str:
    """One gate row in words: ``breastmnist linear-probe k=5 ACC 80.1 → 75.1 (-5.0 points)``."""
    if row["method"] == "(encoder pass)":
        return f"{row['dataset']} ({row['encoder']}) throughput {row['baseline']} → {row['run']} ({row['change']})"
    cell = f"{row['dataset']} {row['method']} k={_none(row['k'])}"
    if _none(row["corruption"]) is not None:
        cell += f" {row['corruption']}/{_none(row['severity'])}"
    if row["what"] == "status":
        return f"{cell} status {row['baseline']} → {row['run']}"
    return f"{cell} {row['what']} {row['baseline']} → {row['run']} ({row['change']} points)"


def _gate(commit: Commit, run: Any, reference: Any, against: str | None, gate: Gate) -> Verdict:
    if reference is None:
        return Verdict(commit, "first")
    if not set(reference.cells) & set(run.cells):
        return Verdict(commit, "not compared", against, notes=[f"no cell in common with {against}"])
    report = gate.compare(reference, run)
    rows = report.rows.to_dict("records")
    regressed = [_what(r) for r in rows if r["verdict"] == "regressed"]
    improved = [_what(r) for r in rows if r["verdict"] == "improved"]
    notes = [f"{_what(r)}: not comparable ({r['note']})" for r in rows if r["verdict"] == "not comparable"]
    missing = sum(r["verdict"] == "missing" for r in rows)
    if missing:
        notes.append(f"{missing} cells of {against} are not in this commit's results")
    verdict = "regression" if regressed else "improvement" if improved else "pass"
    notes += [note for note in report.notes if not note.startswith("code differs:")]  # it does: they are two commits
    return Verdict(commit, verdict, against, regressed, improved, report.compared, notes, report.rows)


def _long(found: list[Commit]) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for commit in found:
        by_cell: dict[tuple, list[CellResult]] = {}
        for r in commit.results:
            by_cell.setdefault(_cell(r), []).append(r)
        for key in sorted(by_cell, key=_sortable):
            ok = [r for r in by_cell[key] if r.status is Status.OK and r.metrics is not None]
            for metric in METRICS:
                stats = aggregate(getattr(r.metrics, metric) for r in ok)
                if stats["n"]:
                    rows.append({"commit": commit.id, "commit_time": commit.time, **dict(zip(CELL, key)),
                                 "metric": metric, "value": stats["mean"], "ci_low": stats["ci_low"],
                                 "ci_high": stats["ci_high"], "n": stats["n"], "statistic": "mean"})
        passes: dict[tuple, list[float]] = {}  # the gate's reading: the median over the pass's records that have one
        for r in commit.results:
            found_ = passes.setdefault(tuple(getattr(r.key, c) for c in PASS), [])
            if r.timings.paired_efficiency:
                found_.append(r.timings.paired_efficiency)
        for key in sorted(passes, key=_sortable):
            rows.append({"commit": commit.id, "commit_time": commit.time, **dict.fromkeys(CELL), **dict(zip(PASS, key)),
                         "metric": EFFICIENCY, "value": float(np.median(passes[key])) if passes[key] else None,
                         "ci_low": None, "ci_high": None, "n": len(passes[key]), "statistic": "median"})
    return pd.DataFrame(rows, columns=COLUMNS).astype({c: "Int64" for c in ("size", "k", "max_test", "severity", "n")})


def build(results: list[CellResult], gate: Gate | None = None) -> History:
    """The history of ``results`` (see the module docstring), gated by ``gate`` (None: not gated). Fewer than two
    commits, or a baseline the gate cannot read, is a UserError."""
    found, notes = commits(results)
    if len(found) < 2:
        only = found[0] if found else None
        raise UserError("history needs results of at least 2 commits; these hold "
                        + (f"1 ({only.label}, {len(only.results)} results)" if only else "none"))
    if gate is None:
        verdicts = [Verdict(c, NOT_GATED) for c in found]
    else:
        fixed = gate.load(Path(gate.baseline), "baseline") if gate.baseline is not None else None
        sides = [side(c.results, f"commit {c.label}", gate) for c in found]
        verdicts = []
        for i, (commit, run) in enumerate(zip(found, sides)):
            if fixed is not None:
                verdicts.append(_gate(commit, run, fixed, str(gate.baseline), gate))
            else:
                verdicts.append(_gate(commit, run, sides[i - 1] if i else None, found[i - 1].label if i else None, gate))
    return History(found, _long(found), verdicts, notes, gate)


# --------------------------------------------------------------------------- tables for people


def _row_labels(keys: list[tuple]) -> dict[tuple, str]:
    """A readable label per cell: dataset, method and k, and whichever other parts of the cell vary among ``keys``."""
    varying = {c for i, c in enumerate(CELL) if len({key[i] for key in keys}) > 1}
    labels = {}
    for key in keys:
        part = dict(zip(CELL, key))
        text = f"{part['dataset']} · {part['method']} · k={part['k']}"
        if "encoder" in varying:
            text += f" · {part['encoder']}"
        if "size" in varying:
            text += f" · {part['size']} px"
        if "max_test" in varying:
            text += f" · test {'full' if part['max_test'] is None else part['max_test']}"
        if part["corruption"] is not None:
            text += f" · {part['corruption']}/{part['severity']}"
        if "protocol" in varying and part["protocol"] != "few-shot":
            text += f" · {part['protocol']}"
        labels[key] = text
    return labels


def _percent(row: dict[str, Any]) -> str:
    text = f"{100 * row['value']:.1f}"
    if row["ci_low"] is not None and not pd.isna(row["ci_low"]):
        text += f" ± {100 * (row['ci_high'] - row['ci_low']) / 2:.1f}"
    return text + f" ({int(row['n'])})"


def verdict_text(verdict: Verdict) -> str:
    return {"first": "—", "pass": "pass"}.get(verdict.verdict, verdict.verdict)


def tables(history: History) -> list[tuple[str, list[str], list[list[str]]]]:
    """The history as (title, header, rows) tables: one per metric and one of the paired efficiency; a row per cell
    (encoder pass), a column per commit in order, and a last row with the gate's verdicts."""
    header = ["cell"] + [c.label for c in history.commits]
    order = {c.id: i for i, c in enumerate(history.commits)}
    verdicts = [["gate verdict"] + [verdict_text(v) for v in history.verdicts]] if history.gate else []
    out = []
    frame = history.table
    for metric in (*METRICS, EFFICIENCY):
        part = frame[frame["metric"] == metric]
        if part.empty:
            continue
        records = part.to_dict("records")
        columns = CELL if metric != EFFICIENCY else PASS
        keys = sorted({tuple(_none(r[c]) for c in columns) for r in records}, key=_sortable)
        if metric == EFFICIENCY:
            labels = {key: f"{key[0]} · {key[2]}" + (f" · {key[1]} px" if len({k[1] for k in keys}) > 1 else "")
                      for key in keys}
        else:
            labels = _row_labels(keys)
        grid = {key: ["—"] * len(history.commits) for key in keys}
        for r in records:
            key = tuple(_none(r[c]) for c in columns)
            if metric == EFFICIENCY:
                value = "not measured" if r["value"] is None or pd.isna(r["value"]) else f"{r['value']:.3f}"
            else:
                value = _percent(r)
            grid[key][order[r["commit"]]] = value
        title = ("paired throughput efficiency (harness ÷ plain eager images/s, median of the run's interleaved pairs)"
                 if metric == EFFICIENCY else f"{NAMES.get(metric, metric)} (%, mean ± 95 % interval half-width (n seeds))"
                 + (", lower is better" if metric in LOWER_IS_BETTER else ""))
        out.append((title, header, [[labels[key], *grid[key]] for key in keys] + verdicts))
    return out


def _none(value: Any) -> Any:
    """A pandas cell as the value it was (NaN of an empty column: None; numpy numbers: Python numbers)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    value = value.item() if isinstance(value, np.generic) else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def commit_rows(history: History) -> list[dict[str, Any]]:
    """One row per commit, in order: what ``verdicts.csv`` holds."""
    return [{"order": i + 1, "commit": v.commit.id, "label": v.commit.label,
             "commit_time": v.commit.time or v.commit.first_finished, "time_source": v.commit.time_source,
             "results": len(v.commit.results), "against": v.against or "", "verdict": v.verdict,
             "regressed": "; ".join(v.regressed), "improved": "; ".join(v.improved), "compared": v.compared,
             "notes": "; ".join(v.notes)} for i, v in enumerate(history.verdicts)]


def gate_text(history: History) -> str:
    if history.gate is None:
        return ("Not gated here: `hica-bench history RESULTS... --out DIR` adds the gate's verdict at each commit (each "
                "commit against the one before it).")
    settings = history.gate.settings
    against = (f"every commit against the baseline {history.gate.baseline}" if history.gate.baseline is not None
               else "each commit against the one before it")
    return (f"The gate (hica-bench check): {against}; ACC/AUC tolerance {settings['tolerance']:g} percentage points"
            + (f" or {settings['noise_z']:g} × the seed noise" if settings["noise_z"] else "")
            + f", throughput tolerance {100 * settings['throughput_tolerance']:.0f} %.")


def markdown(history: History) -> str:
    """``history.md``: the commits (with the gate's verdicts), the notes, and the tables of :func:`tables`."""
    columns = ["order", "label", "commit_time", "results"]
    columns += ["verdict", "against", "regressed", "improved"] if history.gate is not None else []
    names = {"order": "#", "label": "commit", "commit_time": "time"}
    lines = ["# History over commits", "",
             f"{len(history.commits)} commits in order of "
             + ("their recorded commit time" if all(c.time for c in history.commits) else "their earliest result")
             + ". " + gate_text(history), "",
             "| " + " | ".join(names.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in commit_rows(history):
        lines.append("| " + " | ".join(_md(row[c]) for c in columns) + " |")
    notes = history.notes + [f"{v.commit.label}: {note}" for v in history.verdicts for note in v.notes]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {_md(note)}" for note in notes]
    for title, header, rows in tables(history):
        lines += ["", f"## {title}", "", "| " + " | ".join(map(_md, header)) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(_md, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- the figure


@dataclass
class Series:
    """One panel's lines: per line its values per commit (NaN: none), the cells it covers, and per commit the cells
    its value there came from (a line is drawn only between commits with the same cells: a mean over other cells is
    not a change)."""

    values: dict[str, np.ndarray]
    cells: dict[str, set]
    present: dict[str, list[frozenset]]
    subtitle: str


def _series(history: History, metric: str) -> Series:
    frame = history.table[history.table["metric"] == metric]
    order = {c.id: i for i, c in enumerate(history.commits)}
    columns = PASS if metric == EFFICIENCY else CELL
    records = frame.to_dict("records")
    keys = sorted({tuple(_none(r[c]) for c in columns) for r in records}, key=_sortable)
    scale = 1.0 if metric == EFFICIENCY else 100.0
    if len(keys) <= MAX_LINES:
        labels = ({key: f"{key[0]} ({key[2]})" for key in keys} if metric == EFFICIENCY else _row_labels(keys))
        groups = {key: labels[key] for key in keys}
        subtitle = ""
    elif metric == EFFICIENCY:  # many passes: one line per encoder, the median over its datasets
        groups = {key: key[2] for key in keys}
        subtitle = "median over datasets"
    else:  # many cells: one line per method, the mean over its cells
        groups = {key: key[CELL.index("method")] for key in keys}
        subtitle = "mean over each method's cells"
    values: dict[str, list[list[float]]] = {}
    cells: dict[str, set] = {}
    present: dict[str, list[set]] = {}
    for key, name in groups.items():
        values.setdefault(name, [[] for _ in history.commits])
        present.setdefault(name, [set() for _ in history.commits])
        cells.setdefault(name, set()).add(key)
    for r in records:
        key = tuple(_none(r[c]) for c in columns)
        if _none(r["value"]) is not None:
            values[groups[key]][order[r["commit"]]].append(scale * float(r["value"]))
            present[groups[key]][order[r["commit"]]].add(key)
    pick = np.median if metric == EFFICIENCY else np.mean
    return Series({name: np.array([pick(v) if v else np.nan for v in per_commit]) for name, per_commit in values.items()},
                  cells, {name: [frozenset(found) for found in per_commit] for name, per_commit in present.items()},
                  subtitle)


def _marks(history: History, metric: str, cells: dict[str, set]) -> list[tuple[int, str, str]]:
    """(commit index, line, verdict) for each line with a gated regression or improvement at a commit in this panel:
    ACC and AUC rows (and status changes, in every metric's panel) for the metrics, throughput rows for efficiency."""
    owner = {key: name for name, keys in cells.items() for key in keys}
    marks = []
    for i, verdict in enumerate(history.verdicts):
        if verdict.rows is None:
            continue
        for row in verdict.rows.to_dict("records"):
            if row["verdict"] not in ("regressed", "improved"):
                continue
            if metric == EFFICIENCY:
                if row["method"] != "(encoder pass)":
                    continue
                key = tuple(_none(row[c]) for c in PASS)
            else:
                if row["method"] == "(encoder pass)" or row["what"] not in (metric.upper(), "status"):
                    continue
                key = tuple(_none(row[c]) for c in CELL)
            if key in owner:
                marks.append((i, owner[key], row["verdict"]))
    return marks


def figure(history: History):
    """The figure: a panel per metric and one of the efficiency, x = the commits in order (short hashes; red: a
    regression, green: an improvement), red ▼ and green ▲ where the gate found a line's regression or improvement."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [m for m in (*METRICS, EFFICIENCY) if (history.table["metric"] == m).any()]
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    width = min(24.0, max(12.0, 0.3 * len(history.commits) * ncols))
    every = math.ceil(len(history.commits) / 45)  # at most about 45 commit labels fit under a panel
    figure_ = Figure(figsize=(width, 3.2 * nrows + 1.6), dpi=100)
    FigureCanvasAgg(figure_)
    axes = figure_.subplots(nrows, ncols, squeeze=False)
    figure_.subplots_adjust(left=0.06, right=0.98, top=1 - 0.85 / (3.2 * nrows + 1.6), bottom=1.25 / (3.2 * nrows + 1.6),
                            wspace=0.25, hspace=0.55)
    x = np.arange(len(history.commits))
    colours = {"regression": "#c0392b", "improvement": "#1e8449"}
    legend: dict[str, Any] = {}
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    cycle = [c for i, c in enumerate(colormaps["tab10"].colors) if i not in (2, 3)]  # green and red mark the gate
    palette: dict[str, Any] = {}  # a line's colour, the same in every panel
    for ax, metric in zip(axes.flat, panels):
        series = _series(history, metric)
        subtitle = series.subtitle
        style = "--" if metric == EFFICIENCY else "-"  # its lines are encoder passes, not cells: dashed
        lines = series.values
        for name, ys in lines.items():
            colour = palette.setdefault(name, cycle[len(palette) % len(cycle)])
            ax.plot(x, ys, marker="o", markersize=3.5, linestyle="none", color=colour)
            joined = np.full(len(x), np.nan)  # segments between neighbours that hold the same cells
            for i in range(len(x) - 1):
                if series.present[name][i] and series.present[name][i] == series.present[name][i + 1]:
                    ax.plot(x[i:i + 2], ys[i:i + 2], linestyle=style, linewidth=1.2, color=colour)
            legend.setdefault(name, ax.plot(joined, joined, marker="o", markersize=3.5, linestyle=style, linewidth=1.2,
                                            color=colour)[0])
        for i, name, verdict in _marks(history, metric, series.cells):
            y = lines[name][i]
            if not math.isnan(y):
                ax.plot([i], [y], marker="v" if verdict == "regressed" else "^", markersize=10, linestyle="none",
                        color="#d62728" if verdict == "regressed" else "#2ca02c", markeredgecolor="black",
                        markeredgewidth=0.6, zorder=5)
        for i, verdict in enumerate(history.verdicts):
            if verdict.verdict == "regression":
                ax.axvspan(i - 0.4, i + 0.4, color="#d62728", alpha=0.08, linewidth=0)
        ax.set_xticks(x, [c.label if i % every == 0 else "" for i, c in enumerate(history.commits)], rotation=45,
                      ha="right", fontsize=7, family="monospace")
        for tick, verdict in zip(ax.get_xticklabels(), history.verdicts):
            tick.set_color(colours.get(verdict.verdict, "black"))
        if metric == EFFICIENCY:
            ax.set_title("paired efficiency (harness ÷ plain eager)" + (f", {subtitle}" if subtitle else ""), fontsize=9)
        else:
            ax.set_title(f"{NAMES.get(metric, metric)} (%)" + (" — lower is better" if metric in LOWER_IS_BETTER else "")
                         + (f", {subtitle}" if subtitle else ""), fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_xlim(-0.5, len(history.commits) - 0.5)
    shown = list(legend.items())[:24]
    figure_.legend([line for _, line in shown], [name for name, _ in shown], loc="lower center", ncol=min(4, len(shown)),
                   fontsize=7, frameon=False)
    figure_.suptitle("hica-bench history over commits (oldest left): ▼ red: the gate found a regression, ▲ green: an "
                     "improvement;\ncommit labels coloured by the commit's verdict; a line joins two commits only where its "
                     "value comes from the same cells at both", fontsize=9)
    return figure_


# --------------------------------------------------------------------------- files


def _csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, float_format="%.6g", lineterminator="\n")


def write(history: History, out_dir: Path, vector: tuple[str, ...] = ("svg",)) -> dict[str, Path]:
    """``history.csv``, ``history.md``, ``verdicts.csv`` and ``history.png`` (and the ``vector`` formats: svg, pdf) in
    ``out_dir``; returns them by name."""
    drawn = figure(history)
    contents: dict[str, str | bytes] = {
        "history.csv": _csv(history.table),
        "verdicts.csv": _csv(pd.DataFrame(commit_rows(history), columns=VERDICT_COLUMNS)),
        "history.md": markdown(history)}
    for kind in ("png", *vector):  # everything rendered before the first file is written
        buffer = io.BytesIO()
        drawn.savefig(buffer, format=kind)
        contents[f"history.{kind}"] = buffer.getvalue()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: atomic_write(out_dir / name, content) for name, content in contents.items()}


def data_uri(path: Path) -> str:
    """A written PNG as a data URI (the report embeds its figures)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()

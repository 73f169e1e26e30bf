"""Results where researchers already look: MLflow and Weights & Biases (``run --track``, ``hica-bench track``).

One tracked run per cell, under one experiment (W&B: project) per suite or grid, grouped by a parent run per grid
(a results folder; W&B: a run group with a grid run). The mapping from a result to what a tracker holds is written
once, here (:func:`tracked`), and both backends (:mod:`.to_mlflow`, :mod:`.to_wandb`) log exactly that:

- **params** (W&B: config): the cell's identity flattened to dotted paths (``origin.method.options.lr``), with
  ``cell_id``, ``origin_id``, the label (``key.*``) and ``n_support`` / ``n_test``;
- **metrics** (W&B: summary): every score the record holds: ACC, AUC, macro-F1, balanced accuracy, ECE, per class
  recall and precision, a multi-label cell's per-label AUC and AP, a base-to-novel cell's novel-class scores, and the
  timings; a score that is undefined (AUC with one class evaluated) is left out, not logged as NaN;
- **tags**: status, origin, dataset, method, encoder, protocol, the reason of a not-applicable or failed cell, the
  commit and hica-bench version, and ``hica_bench.cell_id`` — the key that makes tracking idempotent: a cell already
  tracked with the same record (``finished_at``) is skipped, a re-run cell's run is updated, never duplicated;
- **artifacts**: the cell's saved predictions (``run --save-predictions``) on its run; the grid's report, leaderboards
  and figures on the grid's run.

Tracking reads results only (an import contract): it runs after the run loop has written and published them, so a
tracker that fails never loses a finished result. The trackers are optional extras (``hica-bench[mlflow]``,
``hica-bench[wandb]``); a missing one is one line naming the pip command.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hica_bench import __version__
from hica_bench.errors import UserError
from hica_bench.results import CellResult, flatten, jsonable

#: what a parameter value may hold (MLflow's limit is 6,000 characters); longer values are cut, with a mark
PARAM_VALUE_LIMIT = 6000
#: a tag's value (a failed cell's reason): cut beyond this
TAG_VALUE_LIMIT = 5000
#: a name (experiment, grid) a user gives: at most this long
NAME_LIMIT = 200
#: files of a grid's report that its run carries (those present), besides the figures and explanations folders
REPORT_FILES = ("report.html", "leaderboard.md", "leaderboard.csv", "paired_tests.csv", "ranks.csv", "robustness.csv",
                "transfer.csv")
REPORT_FOLDERS = ("figures", "explanations")
#: the tag that keys a tracked cell (idempotent tracking) and the one that keys a grid's parent run
CELL_TAG = "hica_bench.cell_id"
GRID_TAG = "hica_bench.grid"
FINISHED_TAG = "hica_bench.finished_at"
TRACKERS = ("mlflow", "wandb")


@dataclass
class Tracked:
    """One cell as a tracker holds it (:func:`tracked`)."""

    cell_id: str
    name: str  #: the run's name: the cell's label
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    status: str
    finished_at: str
    predictions: Path | None = None  #: the saved predictions file, when the record has one and it exists
    config: dict[str, Any] = field(default_factory=dict)  #: the same parameters, nested (W&B's config)


@dataclass
class Grid:
    """A results folder's cells, tracked under one parent run."""

    name: str  #: the grid's name (the folder's, unless given)
    folder: Path  #: where its results file and report are
    cells: list[Tracked]

    def report_files(self) -> list[Path]:
        """The report, leaderboards, figures and explanations of the grid, those present (regular files only)."""
        files = [self.folder / name for name in REPORT_FILES if (self.folder / name).is_file()]
        for sub in REPORT_FOLDERS:
            if (self.folder / sub).is_dir():
                files += sorted(p for p in (self.folder / sub).rglob("*") if p.is_file() and not p.is_symlink())
        return files


@dataclass
class Outcome:
    """What one tracker did with a grid."""

    tracker: str
    where: str  #: the URI or folder
    created: int = 0
    updated: int = 0
    skipped: int = 0  #: already tracked with the same record
    artifacts: int = 0
    lines: list[str] = field(default_factory=list)  #: e.g. how to open the UI or sync the runs

    def describe(self) -> str:
        return (f"{self.tracker} ({self.where}): {self.created} runs created, {self.updated} updated, {self.skipped} "
                f"already tracked, {self.artifacts} artifacts")


def _key(text: str) -> str:
    """A name MLflow and W&B both accept: letters, digits and ``_ - . /`` (others become ``_``; no empty path part, no
    leading or trailing ``/``), at most 250."""
    return re.sub(r"/{2,}", "/", re.sub(r"[^\w\-./]", "_", text)).strip("/")[:250] or "_"


def _text(value: Any, limit: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 20] + f"… ({len(text)} chars)"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def tracked(result: CellResult, results_file: Path) -> Tracked:
    """The one mapping of a result to what a tracker holds (see the module's docstring)."""
    record = jsonable(result)
    identity = record.get("identity") or {}
    nested = {"cell_id": result.cell_id, "origin_id": result.origin_id, "key": record["key"], "identity": identity,
              "n_support": result.n_support, "n_test": result.n_test}
    params = {_key(path): _text(value, PARAM_VALUE_LIMIT)
              for path, value in flatten(nested, index=".{}", empty=None).items() if value is not None and value != ""}
    metrics: dict[str, Any] = {}
    if result.metrics is not None:
        metrics.update(record["metrics"])
    if result.per_class is not None:
        for what in ("recall", "precision"):
            metrics.update({f"per_class.{what}.{i}": v for i, v in enumerate(getattr(result.per_class, what))})
    if result.multilabel is not None:
        ml = result.multilabel
        metrics.update({"multilabel.mean_auc": ml.mean_auc, "multilabel.mean_ap": ml.mean_ap})
        for i, label in enumerate(ml.labels):
            metrics.update({f"multilabel.auc.{label}": ml.auc[i], f"multilabel.ap.{label}": ml.ap[i]})
    if result.novel is not None and result.novel.metrics is not None:
        metrics.update({f"novel.{name}": v for name, v in record["novel"]["metrics"].items()})
    metrics.update({f"timings.{name}": v for name, v in record["timings"].items()})
    key = result.key
    tags = {CELL_TAG: result.cell_id, FINISHED_TAG: result.finished_at, "hica_bench.status": str(result.status),
            "hica_bench.origin_id": result.origin_id, "hica_bench.dataset": key.dataset, "hica_bench.method": key.method,
            "hica_bench.encoder": key.encoder, "hica_bench.protocol": key.protocol, "hica_bench.k": str(key.k),
            "hica_bench.seed": str(key.seed), "hica_bench.version": __version__}
    if result.reason:
        tags["hica_bench.reason"] = _text(result.reason, TAG_VALUE_LIMIT)
    if result.environment.git:
        tags["hica_bench.git"] = result.environment.git
    if key.corruption:
        tags["hica_bench.corruption"] = f"{key.corruption}@{key.severity}"
    predictions = None
    if result.predictions:
        candidate = results_file.parent / result.predictions
        predictions = candidate if candidate.is_file() and not candidate.is_symlink() else None
    name = " · ".join(str(part) for part in (key.dataset, key.protocol, key.method, key.encoder, f"k={key.k}",
                                             f"seed={key.seed}") if part)
    if key.corruption:
        name += f" · {key.corruption}@{key.severity}"
    return Tracked(cell_id=result.cell_id, name=name[:NAME_LIMIT], params=params,
                   metrics={_key(k): float(v) for k, v in metrics.items() if _finite(v)},
                   tags={k: _text(v, TAG_VALUE_LIMIT) for k, v in tags.items()}, status=str(result.status),
                   finished_at=result.finished_at, predictions=predictions, config=nested)


def grids(loaded: list[tuple[CellResult, Path]], name: str | None = None) -> list[Grid]:
    """The records read with their files (:func:`hica_bench.results.read_many_with_files`) as one grid per results
    folder, named after the folder (or ``name`` where there is one folder)."""
    by_folder: dict[Path, list[Tracked]] = {}
    for result, path in loaded:
        by_folder.setdefault(path.parent, []).append(tracked(result, path))
    if name is not None and len(by_folder) > 1:
        raise UserError(f"--grid names one grid, but the results come from {len(by_folder)} folders; track them "
                        "one at a time or leave --grid out (each folder is a grid named after it)")
    return [Grid(name=name or (folder.resolve().name or "results"), folder=folder, cells=cells)
            for folder, cells in by_folder.items()]


def timestamp_ms(iso: str) -> int | None:
    """A record's ``finished_at`` in milliseconds since the epoch (None when it has none)."""
    try:
        return int(datetime.fromisoformat(iso).timestamp() * 1000)
    except (TypeError, ValueError):
        return None


def check_name(value: str, what: str) -> str:
    text = value.strip()
    if not text or len(text) > NAME_LIMIT or any(ord(c) < 32 for c in text):
        raise UserError(f"{what} must be 1 to {NAME_LIMIT} printable characters, got {value[:60]!r}")
    return text


@dataclass
class Target:
    """Where ``--track`` sends results: ``mlflow`` (a local store under the results folder), ``mlflow:URI`` (a server
    or another store), or ``wandb`` (offline run files under the results folder, for ``wandb sync``)."""

    tracker: str
    uri: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Target":
        tracker, sep, uri = text.strip().partition(":")
        if tracker not in TRACKERS:
            raise UserError(f"a tracker is mlflow, mlflow:URI or wandb, got {text[:80]!r}")
        if tracker == "wandb" and sep:
            raise UserError("--track wandb takes no URI: it writes offline run files under the results folder (upload "
                            "them with `wandb sync`)")
        if sep and not uri:
            raise UserError("--track mlflow: needs a URI after the colon (or none: --track mlflow)")
        if uri and len(uri) > 2000:
            raise UserError("--track: the URI is longer than 2,000 characters")
        return cls(tracker, uri or None)

    def prepare(self, folder: Path) -> "Tracker":
        """The tracker for results in ``folder``, checked before any work: the extra is installed and the store or
        server answers (an unreachable server is one line within a few seconds)."""
        if self.tracker == "mlflow":
            from hica_bench.tracking.to_mlflow import MlflowTracker

            return MlflowTracker.open(self.uri, folder)
        from hica_bench.tracking.to_wandb import WandbTracker

        return WandbTracker.open(folder)


class Tracker:
    """A prepared tracker: :meth:`track` logs grids (``experiment``: the MLflow experiment / W&B project)."""

    name = ""

    def track(self, grids: list[Grid], experiment: str) -> Outcome:
        raise NotImplementedError


def needs_extra(tracker: str, exc: ImportError) -> UserError:
    return UserError(f"--track {tracker} needs {'MLflow' if tracker == 'mlflow' else 'Weights & Biases'}: pip install "
                     f"'hica-bench[{tracker}]' ({' '.join(str(exc).split())[:120]})")

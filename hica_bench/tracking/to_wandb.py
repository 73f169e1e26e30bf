"""Results to Weights & Biases, offline (``--track wandb``): the run files ``wandb sync`` uploads later, under the results
folder (``wandb/offline-run-*``). A project per suite or grid, a run group per grid with a grid run that carries the
report, and a run per cell whose W&B run id is its ``cell_id`` (so a synced re-run updates the cell's run instead of
adding one). What each run holds is :func:`hica_bench.tracking.tracked`'s mapping: the identity as the run's config,
the scores as its summary, the tags as config ``tags`` plus W&B tags (status, protocol), the saved predictions as an
artifact (referenced in place: keep the results folder until it is synced).

Which cells are tracked is kept in ``wandb/hica-bench-tracked.json`` (per project and cell id: the record's
``finished_at`` and the summary keys it wrote): a cell tracked with the same record is skipped; a re-run one is
tracked again under the same run id, with the summary keys the earlier record had and this one has not set to None
(a synced summary is merged into the run's, so no score of the earlier record lingers).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from hica_bench.errors import UserError
from hica_bench.files import atomic_write, digest, read_regular
from hica_bench.tracking import Grid, Outcome, Tracker, needs_extra

INDEX = "hica-bench-tracked.json"
INDEX_LIMIT = 64 << 20  #: bytes of the index file read back


def project_name(experiment: str) -> str:
    """A W&B project name: at most 128 characters, none of ``/ \\ # ? % :``."""
    return re.sub(r"[/\\#?%:]", "-", experiment)[:128]


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, wandb, folder: Path) -> None:
        self.wandb, self.folder = wandb, folder
        self.runs = folder / "wandb"

    @classmethod
    def open(cls, folder: Path) -> "WandbTracker":
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError as exc:
            raise needs_extra("wandb", exc) from None
        return cls(wandb, folder)

    def _index(self) -> dict[str, dict]:
        path = self.runs / INDEX
        if not path.exists():
            return {}
        try:
            index = json.loads(read_regular(path, "the W&B tracking index", INDEX_LIMIT))
        except (ValueError, UnicodeDecodeError):
            index = None
        if not isinstance(index, dict) or not all(isinstance(v, dict) and isinstance(v.get("finished_at"), str)
                                                  and isinstance(v.get("metrics"), list) for v in index.values()):
            raise UserError(f"{path} is not the index hica-bench writes (project/cell id → finished_at, metrics); "
                            "move it away to track every cell again")
        return index

    def _settings(self):
        return self.wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True, save_code=False,
                                   mode="offline")

    def track(self, grids: list[Grid], experiment: str) -> Outcome:
        try:
            return self._track(grids, experiment)
        except UserError:
            raise
        except Exception as exc:  # wandb's own errors (a usage error, a file it cannot read or write)
            raise UserError(f"W&B offline tracking into {self.runs} failed: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]} (the results are kept; track them again with "
                            "`hica-bench track`)") from None

    def _track(self, grids: list[Grid], experiment: str) -> Outcome:
        outcome = Outcome("wandb", str(self.runs))
        try:
            self.runs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create {self.runs}: {exc.strerror or exc}") from None
        index = self._index()
        project = project_name(experiment)
        try:
            for grid in grids:
                self._grid(grid, project, index, outcome)
        finally:  # once, also when stopped part-way: the cells finished so far are not tracked twice
            if outcome.created or outcome.updated:
                atomic_write(self.runs / INDEX, json.dumps(index, sort_keys=True, indent=0))
        outcome.lines.append(f"upload them: wandb sync {self.runs}/offline-run-*")
        return outcome

    def _grid(self, grid: Grid, project: str, index: dict[str, dict], outcome: Outcome) -> None:
        """A grid's cells, each a run (skipped when tracked with the same record), then its grid run if any changed."""
        changed = False
        for cell in grid.cells:
            key = f"{project}/{cell.cell_id}"
            before = index.get(key)
            if before is not None and before["finished_at"] == cell.finished_at:
                outcome.skipped += 1
                continue
            run = self.wandb.init(dir=str(self.folder), project=project, group=grid.name[:128], job_type="cell",
                                  id=cell.cell_id, name=cell.name, config={**cell.config, "tags": cell.tags},
                                  tags=[cell.status, cell.tags["hica_bench.protocol"]][:2], reinit="create_new",
                                  settings=self._settings())
            try:
                gone = {name: None for name in (before or {}).get("metrics", []) if name not in cell.metrics}
                run.summary.update({**gone, **cell.metrics})
                if cell.predictions is not None:
                    artifact = self.wandb.Artifact(f"predictions-{cell.cell_id}", type="predictions")
                    artifact.add_file(str(cell.predictions), policy="immutable")
                    run.log_artifact(artifact)
                    outcome.artifacts += 1
            finally:
                run.finish(exit_code=1 if cell.status == "failed" else 0)
            outcome.updated += before is not None
            outcome.created += before is None
            index[key] = {"finished_at": cell.finished_at, "metrics": sorted(cell.metrics)}
            changed = True
        if changed:
            self._grid_run(grid, project, outcome)

    def _grid_run(self, grid: Grid, project: str, outcome: Outcome) -> None:
        files = grid.report_files()
        run = self.wandb.init(dir=str(self.folder), project=project, group=grid.name[:128], job_type="grid",
                              id="grid-" + digest([project, grid.name], 20), name=grid.name, reinit="create_new",
                              config={"grid": grid.name, "cells": len(grid.cells)}, settings=self._settings())
        try:
            if files:
                artifact = self.wandb.Artifact(f"report-{re.sub(r'[^A-Za-z0-9_.-]', '-', grid.name)}", type="report")
                for path in files:
                    artifact.add_file(str(path), name=path.relative_to(grid.folder).as_posix(), policy="immutable")
                run.log_artifact(artifact)
                outcome.artifacts += len(files)
        finally:
            run.finish()

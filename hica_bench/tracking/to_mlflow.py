"""Results to MLflow (``--track mlflow[:URI]``): an experiment per suite or grid, a parent run per grid, a nested run per
cell keyed by its ``cell_id`` (see :mod:`hica_bench.tracking` for what each run holds).

The default store is local and works offline: SQLite plus an artifact folder under the results folder
(``mlflow/mlflow.db``, ``mlflow/artifacts``; ``mlflow ui --backend-store-uri sqlite:///…/mlflow.db`` shows it). A URI
without a scheme is such a folder; ``http(s)://`` is a tracking server (``mlflow server``), checked with one request of
at most :data:`REACH_S` seconds before anything runs; any other MLflow store URI (``sqlite:``, ``postgresql:``,
``databricks``…) is passed to MLflow as it is.
"""

from __future__ import annotations

import logging
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from hica_bench.errors import UserError
from hica_bench.tracking import (CELL_TAG, FINISHED_TAG, GRID_TAG, Grid, Outcome, Tracked, Tracker, needs_extra,
                                 timestamp_ms)

REACH_S = 3.0  #: seconds a tracking server has to answer the first request
BATCH = 100  #: MLflow's log_batch takes at most 100 params and 100 tags (and 1,000 metrics) per call
STATUS = {"ok": "FINISHED", "not_applicable": "FINISHED", "failed": "FAILED"}


def _quiet() -> None:
    """MLflow's start-up lines (database migrations, deprecations) are not the user's business on every run."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")
    # a server that stops answering mid-way fails the tracking in seconds, not after MLflow's minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # not a "View run … at" line per cell: the command prints where the runs are once
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def store_uri(uri: str | None, folder: Path) -> tuple[str, str | None]:
    """The tracking URI and, for a local store, its artifact root: ``None`` → ``folder/mlflow``; a path → that
    folder's SQLite store; a URI with a scheme → itself (its server or store decides where artifacts go)."""
    if uri is None or "://" not in uri and not uri.startswith(("databricks", "file:", "sqlite:", "uc:")):
        root = (Path(uri).expanduser() if uri else folder / "mlflow").resolve()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the MLflow store folder {root}: {exc.strerror or exc}") from None
        return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()
    return uri, None


def reach(uri: str, seconds: float = REACH_S) -> None:
    """One request to a tracking server's ``/health``; a server that does not answer within ``seconds`` is one line.
    Any HTTP answer counts as reached (MLflow's own errors say the rest)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(uri.rstrip("/") + "/health"), timeout=seconds):
            pass
    except urllib.error.HTTPError:
        pass
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):  # it answered; MLflow's own TLS settings (a private CA) decide
            return
        raise UserError(f"cannot reach the MLflow tracking server at {uri} within {seconds:g} s "
                        f"({' '.join(str(exc.reason).split())[:120]}); start it (mlflow server --host 127.0.0.1) or "
                        "leave the URI out for a local store under the results folder") from None
    except ssl.SSLError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot reach the MLflow tracking server at {uri} within {seconds:g} s "
                        f"({' '.join(str(reason).split())[:120]}); start it (mlflow server --host 127.0.0.1) or "
                        "leave the URI out for a local store under the results folder") from None


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, client, uri: str, artifact_root: str | None) -> None:
        self.client, self.uri, self.artifact_root = client, uri, artifact_root

    @classmethod
    def open(cls, uri: str | None, folder: Path) -> "MlflowTracker":
        tracking_uri, artifact_root = store_uri(uri, folder)
        if tracking_uri.startswith(("http://", "https://")):
            reach(tracking_uri)  # before importing MLflow: an unreachable server costs seconds, not its retries
        _quiet()
        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            raise needs_extra("mlflow", exc) from None
        try:
            client = MlflowClient(tracking_uri=tracking_uri)
        except Exception as exc:  # an unknown scheme, a locked or corrupt store, a missing database driver
            raise UserError(f"MLflow cannot open the tracking store {tracking_uri}: {' '.join(str(exc).split())[:200]}"
                            ) from None
        return cls(client, tracking_uri, artifact_root)

    def track(self, grids: list[Grid], experiment: str) -> Outcome:
        from mlflow.exceptions import MlflowException

        outcome = Outcome("mlflow", self.uri)
        try:
            experiment_id = self._experiment(experiment)
            cells, parents = self._tracked(experiment_id)
            for grid in grids:
                self._grid(grid, experiment_id, cells, parents, outcome)
        except MlflowException as exc:
            raise UserError(f"MLflow ({self.uri}) refused the tracking: {' '.join(str(exc).split())[:300]} (the "
                            "results are kept; track them again with `hica-bench track`)") from None
        except OSError as exc:  # requests' ConnectionError is one: the server went away mid-way
            raise UserError(f"MLflow ({self.uri}) stopped answering: {' '.join(str(exc).split())[:200]} (the results "
                            "are kept; track them again with `hica-bench track`)") from None
        except UserError:
            raise
        except Exception as exc:  # an artifact store's own errors (S3 credentials, a missing boto3...)
            raise UserError(f"MLflow ({self.uri}) failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]} "
                            "(the results are kept; track them again with `hica-bench track`)") from None
        if self.artifact_root:
            outcome.lines.append(f"open it: mlflow ui --backend-store-uri {self.uri}")
        elif self.uri.startswith(("http://", "https://")):
            outcome.lines.append(f"open it: {self.uri.rstrip('/')}/#/experiments/{experiment_id}")
        return outcome

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise UserError(f"the MLflow experiment {name!r} is deleted in {self.uri}; restore it "
                                "(mlflow experiments restore) or name another with --experiment")
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=self.artifact_root and
                                             f"{self.artifact_root}/{urllib.parse.quote(name, safe='')}")

    def _tracked(self, experiment_id: str) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str]]:
        """The experiment's tracked cells (cell_id → its runs: run id, finished_at; a run without finished_at was cut
        short) and grids (name → parent run id)."""
        cells: dict[str, list[tuple[str, str]]] = {}
        parents: dict[str, str] = {}
        token = None
        while True:
            page = self.client.search_runs([experiment_id], max_results=1000, page_token=token)
            for run in page:
                tags = run.data.tags
                if CELL_TAG in tags:
                    cells.setdefault(tags[CELL_TAG], []).append((run.info.run_id, tags.get(FINISHED_TAG, "")))
                elif GRID_TAG in tags:
                    parents[tags[GRID_TAG]] = run.info.run_id
            token = page.token
            if not token:
                return cells, parents

    def _grid(self, grid: Grid, experiment_id: str, cells: dict, parents: dict, outcome: Outcome) -> None:
        parent = parents.get(grid.name)
        changed = parent is None
        if parent is None:
            parent = self.client.create_run(experiment_id, run_name=grid.name,
                                            tags={GRID_TAG: grid.name, "hica_bench.kind": "grid"}).info.run_id
            parents[grid.name] = parent
        for cell in grid.cells:
            before = cells.get(cell.cell_id, [])
            if any(finished == cell.finished_at for _, finished in before):
                outcome.skipped += 1
                continue
            # a re-run cell (or one whose tracking was cut short): its runs are replaced, so no score, tag or reason
            # of the earlier record lingers beside the new one (MLflow cannot delete a metric from a run)
            for run_id, _ in before:
                self.client.delete_run(run_id)
            self._cell(cell, experiment_id, parent, outcome)
            outcome.updated += bool(before)
            outcome.created += not before
            cells[cell.cell_id] = [("", cell.finished_at)]
            changed = True
        if changed:  # the report of a grid whose runs changed (or a new grid)
            for path in grid.report_files():
                where = path.parent.relative_to(grid.folder)
                self.client.log_artifact(parent, str(path), None if str(where) == "." else where.as_posix())
                outcome.artifacts += 1
            self.client.set_terminated(parent, "FINISHED")

    def _cell(self, cell: Tracked, experiment_id: str, parent: str, outcome: Outcome) -> None:
        from mlflow.entities import Metric, Param, RunTag

        end = timestamp_ms(cell.finished_at)
        took = cell.metrics.get("timings.fit_s", 0.0) + cell.metrics.get("timings.predict_s", 0.0)
        start = None if end is None else end - round(took * 1000)  # the run's duration: the cell's fit + predict
        # keyed by its cell from its creation on; marked finished (FINISHED_TAG) only once all of it is logged, so a
        # tracking cut short anywhere is found and replaced by the next one, never skipped
        run_id = self.client.create_run(experiment_id, start_time=start, run_name=cell.name,
                                        tags={"mlflow.parentRunId": parent, CELL_TAG: cell.cell_id}).info.run_id
        params = [Param(k, v) for k, v in sorted(cell.params.items())]
        metrics = [Metric(k, v, end or 0, 0) for k, v in sorted(cell.metrics.items())]
        tags = [RunTag(k, v) for k, v in sorted(cell.tags.items()) if k != FINISHED_TAG]
        for i in range(0, max(len(params), len(tags), len(metrics)), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + BATCH], params=params[i:i + BATCH],
                                  tags=tags[i:i + BATCH])
        if cell.predictions is not None:
            self.client.log_artifact(run_id, str(cell.predictions), "predictions")
            outcome.artifacts += 1
        self.client.set_terminated(run_id, STATUS.get(cell.status, "FINISHED"), end_time=end)  # None: now
        self.client.set_tag(run_id, FINISHED_TAG, cell.finished_at)

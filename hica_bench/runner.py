"""The run loop: every pending cell of a grid, run by an executor, each result appended as it arrives. This module is
the only writer of results (``results.jsonl`` and the saved predictions); what a run will do is :mod:`hica_bench.plan`,
one cell is :mod:`hica_bench.cell`, where cells run is :mod:`hica_bench.executors`, and the tables and report made
from the results are :mod:`hica_bench.publish` (the CLI calls it after the loop).

Order of work: validate everything that can be validated (names, options, data files, shots) before the first
cell runs; work out each cell's :class:`~hica_bench.results.Identity` and skip those already finished with that
identity; per dataset with pending cells, get train/test features from the extraction service; per cell, fit,
predict, score (in this process, or as Ray tasks), append (here only). A cell that raises, returns invalid
probabilities or runs past ``--cell-timeout`` is recorded as ``failed`` and the grid goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hica_bench import executors, plan
from hica_bench.cell import decided_result, method_needs
from hica_bench.events import Events
from hica_bench.extraction import ExtractionRecord, Tuning
from hica_bench.files import atomic_write, digests_remembered_in
from hica_bench.environment import environment
from hica_bench.plan import Grid, Settings
from hica_bench.registry import Registry
from hica_bench.results import Environment, ResultsStore, Status, out_lock

log = logging.getLogger(__name__)


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0  #: already finished with the same identity
    other_shards: int = 0  #: cells of the grid left to the other shards (``--shard``)
    executor: str = "in-process"  #: how the cells ran (with Ray: the runtime's address and CPUs/GPUs)
    ok: int = 0
    not_applicable: int = 0
    failed: int = 0
    extractions: list[ExtractionRecord] = field(default_factory=list)
    #: per encoder label, the extraction settings (chosen before its cells: they are part of the identity)
    tuning: dict[str, Tuning] = field(default_factory=dict)
    random_init: list[str] = field(default_factory=list)  #: labels of encoders whose weights are a random initialisation
    cache_hits: int = 0
    cache_misses: int = 0
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)  #: one line per dataset: its classes and split sizes


def run(grid: Grid, settings: Settings, registry: Registry, events: Events | None = None) -> Summary:
    """Run every pending cell of ``grid``, reporting to ``events``. Everything the cells' methods build while they run
    comes from ``registry`` (the run's own, with its ``-p`` modules). One run at a time per ``out_dir``
    (:func:`hica_bench.results.out_lock`)."""
    with out_lock(settings.out_dir), digests_remembered_in(settings.cache_dir):
        return _loop(grid, settings, registry, events or Events())


def _loop(grid: Grid, settings: Settings, registry: Registry, events: Events) -> Summary:
    started = time.perf_counter()
    summary = Summary(total=grid.cells)
    store = ResultsStore(settings.out_dir / "results.jsonl")
    store.check_writable()
    finished = {cell_id for cell_id, r in store.load().items() if r.status.finished and not settings.force}
    datasets, prompt_files = plan.open_datasets(grid, settings, events)
    summary.datasets = plan.describe_datasets(grid, datasets, prompt_files)
    needs = {method.label: method_needs(method) for method in grid.methods}
    with executors.start(settings, registry, events) as executor:
        summary.executor = executor.describe()
        for index, encoder in enumerate(grid.encoders):  # one encoder in memory at a time
            job, skipped, elsewhere = plan.encoder_job(grid, settings, registry, events, index, encoder, datasets,
                                                       prompt_files, needs, finished)
            summary.tuning[encoder.label] = job.extractor.tuning
            if job.pair.card.random_init:
                summary.random_init.append(encoder.label)
            summary.skipped += skipped
            summary.other_shards += elsewhere
            events.cells(encoder.label, summary.total // len(grid.encoders) - elsewhere, skipped)
            _record(job, executor, store, summary, events)
    summary.total -= summary.other_shards
    summary.wall_s = time.perf_counter() - started
    return summary


def _record(job: plan.EncoderJob, executor: executors.InProcess | executors.RayExecutor, store: ResultsStore,
            summary: Summary, events: Events) -> None:
    """The job's cells, run by ``executor``; this process alone writes their results (one record per cell, appended
    as each arrives)."""
    settings, extractor = job.settings, job.extractor
    env = None  # worked out after the first features are served: it records whether the run loaded torch
    identities = {label: dataset.identity for label, dataset, _ in job.work}
    if job.decided:  # known before encoding: recorded now, said once per reason
        here = environment(settings.device, extractor.describe())
        results = [decided_result(cell) for cell in job.decided]
        for result in results:
            result.environment = here
            store.append(result)
        summary.not_applicable += len(results)
        events.decided(job.encoder.label, results)
    for cell, result, proba in executor.run(job):
        env = env or environment(settings.device, extractor.describe())
        if result.environment == Environment():  # a worker records its own machine; this process's otherwise
            result.environment = env
        for name, value in extractor.throughput(identities[cell.dataset_label]).items():
            setattr(result.timings, name, value)
        if settings.save_predictions and proba is not None:
            result.predictions = save_predictions(settings.out_dir / "predictions", cell.identity.id, proba,
                                                  *job.test_labels(cell))
        store.append(result)
        setattr(summary, result.status.value, getattr(summary, result.status.value) + 1)
        if result.status is Status.FAILED:
            summary.failures.append(f"{cell.key.dataset} {cell.key.method} {cell.key.encoder} k={cell.key.k} "
                                    f"seed={cell.key.seed}: {result.reason}")
        events.cell_done(result)
    summary.extractions += extractor.records
    if extractor.cache is not None:
        summary.cache_hits += extractor.cache.hits
        summary.cache_misses += extractor.cache.misses


def save_predictions(folder: Path, cell_id: str, proba: np.ndarray, labels: np.ndarray,
                     test_index: np.ndarray | None = None) -> str:
    """The cell's test probabilities and labels as ``predictions/<cell_id>.npz`` (compressed, no pickle) beside the
    results file, so its metrics can be recomputed, with each row's index into the test split (``test_index``: all
    of them in order unless given); returns the path relative to the results file's folder."""
    path = folder / f"{cell_id}.npz"
    index = np.arange(len(labels)) if test_index is None else np.asarray(test_index)
    atomic_write(path, lambda handle: np.savez_compressed(handle, proba=proba.astype(np.float32), labels=labels,
                                                          test_index=index))
    return f"{folder.name}/{path.name}"

"""Where a run's cells and encoder passes run: in this process (the default), or on Ray (``--executor ray``).

The plan (:mod:`hica_bench.plan`) works out the grid, the identities and what is pending; the runner is the only
writer of ``results.jsonl``: an executor only computes, one cell at a time through :mod:`hica_bench.cell`, and never
imports the runner. It receives a :class:`~hica_bench.plan.EncoderJob` (the pending cells of one encoder)
and yields ``(cell, result, probabilities)`` as cells finish; the runner appends each record as it arrives, so
resume, fault isolation and the one-line errors are the same whichever executor ran the cells.

Ray (https://docs.ray.io): one task per (encoder, dataset, split) whose features the cache does not hold, with a GPU
when the run is on CUDA (the features go to the feature cache, ``--cache-dir``, which every node should see, and
through Ray's object store to the cells); then one task per cell (fit + predict + score) with the CPUs and GPUs its
method declares in ``resources`` (default one CPU, and a quarter of a GPU on a CUDA run). Workers load the same
plugins as this process (entry points and ``-p`` modules: :class:`~hica_bench.registry.Recipe`) and refuse to run
a plugin whose version differs from this process's. A task is never retried by Ray: a worker that dies mid-cell
leaves that cell ``failed`` (rerun to retry it), never lost or recorded twice.

Hand-written here, and why: the grid's bookkeeping (identities, resume, the results file) is the runner's; Ray gives
scheduling, resources, the object store and cluster membership, and nothing here re-implements those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hica_bench.cell import Cell, fit_and_score
from hica_bench.encoder_pairs import encoder_pair
from hica_bench.environment import environment
from hica_bench.events import Events
from hica_bench.errors import PLUGIN_FAULTS, Interrupted, UserError
from hica_bench.files import digest
from hica_bench.plan import EXECUTORS, EncoderJob, Settings
from hica_bench.registry import Choice, Recipe, Registry, RunComponents
from hica_bench.results import CellResult, Status
from hica_bench.transfer import TransferDataset

log = logging.getLogger(__name__)

#: On a CUDA run, the share of a GPU a cell gets when its method declares no ``resources`` (four cells per GPU).
DEFAULT_CELL_GPUS = 0.25
#: Environment variables handed to Ray workers (besides those Ray sets): torch's allocator setting and the model
#: hubs' offline switches and cache folders, so a worker resolves weights exactly as this process does.
PASSED_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_HOME", "THP_MEM_ALLOC_ENABLE", "XDG_CACHE_HOME")


@contextlib.contextmanager
def start(settings: Settings, registry: Registry, events: Events) -> Iterator["InProcess | RayExecutor"]:
    """The executor ``settings.executor`` names, for the length of a run (a local Ray runtime started here is shut
    down at the end; a cluster joined with ``--ray-address`` is left running)."""
    if settings.executor == "in-process":
        yield InProcess()
        return
    if settings.executor != "ray":
        raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, got {settings.executor!r}")
    executor = RayExecutor(settings, registry, events)
    try:
        yield executor
    finally:
        executor.close()


# --------------------------------------------------------------------------- in this process


class InProcess:
    """Each dataset's features from this process's extraction service, then its cells one after the other."""

    def describe(self) -> str:
        return "in-process"

    def run(self, job: EncoderJob) -> Iterator[tuple[Cell, CellResult, np.ndarray | None]]:
        settings = job.settings
        for label, dataset, cells in job.work:
            if not cells:
                continue
            splits = job.features(label, dataset, cells)
            for cell in cells:
                job.events.cell(cell.key)
                result, proba = fit_and_score(cell, dataset, job.pair, splits["train"], splits["test"],
                                              RunComponents(job.registry), settings.cache_dir / "methods",
                                              settings.cell_timeout, job.extractor, validation=splits.get("val"))
                yield cell, result, proba


# --------------------------------------------------------------------------- Ray


@dataclass(frozen=True)
class ChoiceRef:
    """A :class:`~hica_bench.registry.Choice` as a worker receives it: names and option values, plus the
    distribution and version it must find installed there."""

    kind: str
    name: str
    options: tuple[tuple[str, Any], ...]
    prompts: str | None
    distribution: str
    version: str
    corruption: tuple[str, int] | None = None
    #: a cross-dataset transfer: the source dataset and, per target class, its source class
    #: (:class:`~hica_bench.transfer.TransferDataset`)
    source: "ChoiceRef | None" = None
    class_map: tuple[int, ...] | None = None

    @classmethod
    def of(cls, choice: Choice) -> "ChoiceRef":
        spec = choice.registered.spec
        return cls(spec.kind, spec.name, tuple(sorted(choice.options.items())), choice.prompts,
                   choice.registered.distribution, choice.registered.version, choice.corruption)

    def resolve(self, registry: Registry) -> Choice:
        registered = registry.get(self.kind, self.name)
        if (registered.distribution, registered.version) != (self.distribution, self.version):
            raise UserError(f"Ray worker on {socket.gethostname()}: {self.kind} {self.name} comes from "
                            f"{registered.distribution} {registered.version} there but from {self.distribution} "
                            f"{self.version} on the driver; install the same versions on every node")
        return Choice(registered, dict(self.options), self.prompts, self.corruption)


@dataclass(frozen=True)
class WorkerContext:
    """What every task of a run shares (hashable: a worker keeps its registry, datasets and encoders per context)."""

    recipe: Recipe
    data_root: str | None
    cache_dir: str
    device: str
    size: int
    cell_timeout: float | None
    volume: Any = None  #: how a 2D encoder reads volumes (:class:`hica_bench.volumes.VolumeOptions`)


class _WorkerState:
    """A worker process's registry, opened datasets and encoder pairs for one :class:`WorkerContext`."""

    def __init__(self, context: WorkerContext) -> None:
        self.context = context
        self.registry = context.recipe.load()
        self.datasets: dict[ChoiceRef, Any] = {}
        self.pairs: dict[ChoiceRef, Any] = {}
        self.environments: dict[str, Any] = {}

    def dataset(self, ref: ChoiceRef, identity: str | None) -> Any:
        if ref not in self.datasets:
            if ref.source is not None:  # a transfer: both datasets, checked together by its identity below
                target = self.dataset(dataclasses.replace(ref, source=None, class_map=None), None)
                dataset = TransferDataset(self.dataset(ref.source, None), target, np.asarray(ref.class_map),
                                          ref.source.name, ref.name)
            else:
                dataset = ref.resolve(self.registry).build(root=self.context.data_root, size=self.context.size,
                                                           download=False, cache_dir=Path(self.context.cache_dir))
            if identity is not None and dataset.identity != identity:
                raise UserError(f"Ray worker on {socket.gethostname()}: dataset {ref.name} has other contents there "
                                f"(identity {dataset.identity[:12]}, driver {identity[:12]}); give every node the same "
                                "data (--data-root)")
            self.datasets[ref] = dataset
        return self.datasets[ref]

    def pair(self, ref: ChoiceRef) -> Any:
        if ref not in self.pairs:
            self.pairs[ref] = encoder_pair(ref.resolve(self.registry), self.context.device,
                                              Path(self.context.cache_dir))
        return self.pairs[ref]

    def environment(self, extraction: dict[str, Any]) -> Any:
        key = digest(extraction)
        if key not in self.environments:
            self.environments[key] = environment(self.context.device, extraction)
        torch = sys.modules.get("torch")  # a later cell of this worker may be the first to load torch
        threads = torch.get_num_threads() if hasattr(torch, "get_num_threads") else None
        return dataclasses.replace(self.environments[key], torch_threads=threads)


_STATES: dict[WorkerContext, _WorkerState] = {}


def worker_dataset(context: WorkerContext, ref: ChoiceRef, identity: str) -> Any:
    """The dataset a Ray worker builds for ``ref`` in ``context`` (a transfer's from both its datasets), checked against
    the driver's ``identity`` (other contents there are one line)."""
    return _state(context).dataset(ref, identity)


def _state(context: WorkerContext) -> _WorkerState:
    if context not in _STATES:
        _STATES.clear()  # one run's plugins and data at a time per worker process
        _STATES[context] = _WorkerState(context)
    return _STATES[context]


def extract_task(context: WorkerContext, encoder: ChoiceRef, dataset: ChoiceRef, identity: str, split: str, rows: int,
                 settings: Any) -> tuple[np.ndarray, Any]:
    """A Ray task: one split's features with the driver's extraction settings (so the same feature identity),
    stored in the feature cache and returned through the object store."""
    from hica_bench.extraction import FeatureExtractor

    state = _state(context)
    extractor = FeatureExtractor(state.pair(encoder), Path(context.cache_dir), settings=settings, volume=context.volume)
    return extractor.features(state.dataset(dataset, identity), split, rows=rows)


def cell_task(context: WorkerContext, encoder: ChoiceRef, dataset: ChoiceRef, identity: str, cell: tuple,
              extraction: dict[str, Any], train_features: np.ndarray | None, train_labels: np.ndarray,
              test_features: np.ndarray, test_labels: np.ndarray, val_features: np.ndarray | None = None,
              val_labels: np.ndarray | None = None) -> tuple[Any, np.ndarray | None]:
    """A Ray task: one cell's fit, predict and score (the same :func:`~hica_bench.cell.fit_and_score` as in
    process), recorded with the worker's own environment."""
    from hica_bench.extraction import ExtractionSettings, FeatureExtractor

    state = _state(context)
    method, key, cell_identity, support, prompts, episode, title = cell
    one = Cell(method.resolve(state.registry), key, cell_identity, support, prompts, episode=episode,
               protocol_title=title)
    pair = state.pair(encoder)  # an adapting method's test images go through the driver's extraction settings
    extractor = FeatureExtractor(pair, Path(context.cache_dir), settings=ExtractionSettings(**extraction), reference=False,
                                 volume=context.volume)
    result, proba = fit_and_score(one, state.dataset(dataset, identity), pair,
                                         (train_features, train_labels), (test_features, test_labels),
                                         RunComponents(state.registry), Path(context.cache_dir) / "methods",
                                         context.cell_timeout, extractor,
                                         validation=None if val_labels is None else (val_features, val_labels))
    result.environment = state.environment(extraction)
    return result, proba


def method_resources(choice: Choice, device: str) -> dict[str, float]:
    """A cell's Ray resources: the method's ``resources`` (``num_cpus``, ``num_gpus``, ``memory`` in bytes), else one
    CPU and, on a CUDA run, :data:`DEFAULT_CELL_GPUS` of a GPU."""
    resources: dict[str, float] = {"num_cpus": 1.0}
    if device.startswith("cuda"):
        resources["num_gpus"] = DEFAULT_CELL_GPUS
    try:
        declared = getattr(choice.build(), "resources", None)
    except PLUGIN_FAULTS:  # a broken constructor: the cell fails on the worker with the reason
        declared = None
    if declared is None:
        return resources
    if not isinstance(declared, dict) or not set(declared) <= {"num_cpus", "num_gpus", "memory"} or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in declared.values()):
        raise UserError(f"method {choice.label}: resources must be a dict of num_cpus, num_gpus and memory (bytes), "
                        f"each a number >= 0; got {declared!r}")
    return {**resources, **{k: float(v) for k, v in declared.items()}}


class RayExecutor:
    """Cells and missing encoder passes as Ray tasks; results come back to the driver (this process)."""

    def __init__(self, settings: Settings, registry: Registry, events: Events) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray would report usage to its servers otherwise
        if settings.ray_address is not None and "ray" not in sys.modules and (
                any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
                or (Path.home() / ".ray" / "auth_token").is_file()):
            # `ray start --head` (Ray >= 2.59) turns token authentication on and keeps the token there; a driver that
            # joins by address sends it only in token mode, read when Ray is imported (an explicit mode is kept)
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'hica-bench[ray]' (or pip install ray)") from None
        self.ray = ray
        self.settings = settings
        self.registry = registry
        self.started = False
        passed = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES)}
        options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                       runtime_env={"env_vars": passed} if passed else None)
        with _signal_handlers_kept(), _interrupts_unwrapped():
            if ray.is_initialized():  # a runtime this process already started or joined (e.g. a notebook, a test)
                pass
            elif settings.ray_address is None:
                events.stage("starting a local Ray runtime")
                ray.init(num_cpus=settings.workers or os.cpu_count() or 1, _node_ip_address="127.0.0.1", **options)
                self.started = True
            else:
                events.stage(f"joining the Ray cluster at {settings.ray_address}")
                loopback = _reachable(settings.ray_address)
                if loopback:  # a cluster on this machine's loopback: this driver stays there too
                    options["_node_ip_address"] = "127.0.0.1"
                try:
                    ray.init(address=settings.ray_address, **options)
                except (ConnectionError, ValueError, RuntimeError) as exc:
                    raise UserError(f"--ray-address {settings.ray_address}: cannot join a Ray cluster there "
                                    f"({' '.join(str(exc).split())[:300]}); start one with `ray start --head`") from None
        resources = ray.cluster_resources()
        self.cpus, self.gpus = int(resources.get("CPU", 0)), resources.get("GPU", 0)
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        #: the most CPUs and GPUs one task can get (a task asking for more would wait forever)
        self.node_cpus = max((n.get("CPU", 0) for n in nodes), default=0)
        self.node_gpus = max((n.get("GPU", 0) for n in nodes), default=0)
        if settings.device.startswith("cuda") and not self.gpus:
            self.close()
            raise UserError(f"--device {settings.device} with --executor ray: the Ray cluster has no GPUs")
        self.limit = settings.workers or max(1, self.cpus)  #: cells in flight at once
        self.extract = ray.remote(max_retries=0)(extract_task)
        self.cell = ray.remote(max_retries=0)(cell_task)

    def describe(self) -> str:
        where = "local runtime" if self.started else f"cluster {self.settings.ray_address or 'already joined'}"
        return (f"ray ({where}: {self.cpus} CPUs, {self.gpus:g} GPUs; at most {self.limit} cells at once)")

    def close(self) -> None:
        if self.started:
            self.started = False
            self.ray.shutdown()

    def _context(self, job: EncoderJob) -> WorkerContext:
        settings = job.settings
        return WorkerContext(self.registry.recipe, settings.data_root, str(settings.cache_dir),
                             "cuda" if settings.device.startswith("cuda") else "cpu", job.grid.size,
                             settings.cell_timeout, settings.volume)

    def _features(self, job: EncoderJob, context: WorkerContext, encoder: ChoiceRef, choices: dict[str, ChoiceRef]) -> dict:
        """(dataset label, split) -> (features ObjectRef or None, labels ObjectRef): from the cache through this
        process, else computed by one Ray task per split; waits for all of them (an encoder pass that fails stops the
        run with one line, as in process)."""
        ray, extractor = self.ray, job.extractor
        found, computing = {}, []
        settings = extractor.settings
        gpus = 1 if job.settings.device.startswith("cuda") else 0
        for label, dataset, cells in job.work:
            if not cells:
                continue
            for split, labels in job.splits(dataset, cells):
                features, record = extractor.features(dataset, split, rows=len(labels), compute=False)
                if features is not None:
                    job.events.split_done(record)
                    found[label, split] = (ray.put(features), ray.put(labels))
                    continue
                progress = job.events.split(label, split, len(labels))
                feature_ref, record_ref = self.extract.options(
                    num_returns=2, num_cpus=min(max(1, settings.threads or 1), self.node_cpus), num_gpus=gpus).remote(
                    context, encoder, choices[label], dataset.identity, split, len(labels), settings)
                found[label, split] = (feature_ref, ray.put(labels))
                computing.append((record_ref, progress, label, split))
            if (label, "train") not in found:
                found[label, "train"] = (None, ray.put(np.asarray(dataset.split("train").labels)))
        for record_ref, progress, label, split in computing:
            try:
                record = ray.get(record_ref)
            except self.ray.exceptions.RayError as exc:
                raise UserError(f"encoding {label} {split} on a Ray worker failed: {_reason(exc)}") from None
            progress(record.n_images)
            extractor.records.append(record)
            job.events.split_done(record)
        return found

    def run(self, job: EncoderJob) -> Iterator[tuple[Cell, CellResult, np.ndarray | None]]:
        ray = self.ray
        context = self._context(job)
        encoder = ChoiceRef.of(job.encoder)
        choices = {choice.label: ChoiceRef.of(choice) for choice in job.grid.datasets}
        for label, dataset, _ in job.work:
            if isinstance(dataset, TransferDataset):
                choices[label] = dataclasses.replace(choices[dataset.target_label], source=choices[dataset.source_label],
                                                     class_map=tuple(dataset.class_map.tolist()))
        resources = {method.label: method_resources(method, job.settings.device) for method in job.grid.methods}
        for label, asked in resources.items():
            if asked["num_cpus"] > self.node_cpus or asked.get("num_gpus", 0) > self.node_gpus:
                raise UserError(f"method {label} asks for {asked['num_cpus']:g} CPUs and {asked.get('num_gpus', 0):g} "
                                f"GPUs per cell; the largest node of the Ray cluster has {self.node_cpus:g} and "
                                f"{self.node_gpus:g}")
        with _interrupts_unwrapped():
            features = self._features(job, context, encoder, choices)
        identities = {label: dataset.identity for label, dataset, _ in job.work}
        extraction = job.extractor.describe()
        queue = [(label, cell) for label, _, cells in job.work for cell in cells]
        queue.reverse()
        flying: dict[Any, Any] = {}
        try:
            with _interrupts_unwrapped():
                while queue or flying:
                    while queue and len(flying) < self.limit:
                        label, cell = queue.pop()
                        (train, train_labels), (test, test_labels) = features[label, "train"], features[label, "test"]
                        val, val_labels = features.get((label, "val"), (None, None))
                        spec = (ChoiceRef.of(cell.method), cell.key, cell.identity, cell.support, cell.prompts,
                                cell.episode, cell.protocol_title)
                        ref = self.cell.options(**resources[cell.method.label]).remote(
                            context, encoder, choices[label], identities[label], spec, extraction, train, train_labels,
                            test, test_labels, val, val_labels)
                        flying[ref] = cell
                        job.events.cell(cell.key)
                    done, _ = ray.wait(list(flying), num_returns=1)
                    for ref in done:
                        cell = flying.pop(ref)
                        try:
                            result, proba = ray.get(ref)
                        except ray.exceptions.RayTaskError as exc:
                            if isinstance(exc.cause, UserError):  # a worker's own bad input (versions, data, weights)
                                raise UserError(str(exc.cause)) from None
                            result, proba = _failed(cell, _reason(exc)), None
                        except ray.exceptions.RayError as exc:  # the worker process or its node died
                            result = _failed(cell, f"the Ray worker running it died ({_reason(exc)}); rerun to retry it")
                            proba = None
                        yield cell, result, proba
        finally:
            for ref in flying:  # interrupted: what is still running is not wanted any more
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)


def _failed(cell: Any, reason: str) -> CellResult:
    return CellResult(cell.key, cell.identity, Status.FAILED, reason=reason, n_support=len(cell.support))


@contextlib.contextmanager
def _interrupts_unwrapped():
    """Lets the CLI's SIGINT/SIGTERM exception through Ray's calls: Ray runs Python's signal handlers while it waits or
    submits and hands their exception back wrapped in a SystemError."""
    try:
        yield
    except SystemError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, (Interrupted, KeyboardInterrupt)):
            raise cause from None
        raise


@contextlib.contextmanager
def _signal_handlers_kept():
    """Keeps this process's SIGINT and SIGTERM handlers across ``ray.init``, which installs a crash handler of its own
    for SIGTERM (it would print a stack dump and exit 1 instead of the CLI's one line, exit 143, results kept)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            if handler is not None:
                signal.signal(signum, handler)


def _reachable(address: str) -> bool:
    """Whether ``address`` (``auto``, or ``HOST:PORT`` of a Ray head) is on the loopback; a ``HOST:PORT`` nothing
    listens on is one line now (Ray itself would retry for minutes)."""
    if address == "auto":
        return False
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address takes auto or HOST:PORT (the address `ray start --head` prints), got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=10):
            pass
    except OSError as exc:
        raise UserError(f"--ray-address {address}: nothing answers there ({exc.strerror or exc}); start the head with "
                        "`ray start --head --port PORT` first") from None
    return host in ("localhost", "::1") or host.startswith("127.")


def _reason(exc: BaseException) -> str:
    """A Ray error as one line: the task's own exception when there is one."""
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {' '.join(str(cause).split())[:500]}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"

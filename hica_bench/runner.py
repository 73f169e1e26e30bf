"""Runs a grid (datasets × methods × shots × seeds): features once per split, then every pending cell.

Order of work: validate everything that can be validated (names, options, data files, shots) before the
first cell runs; skip cells already finished in the results file; per dataset, get train/test features
from the cache or the encoder; per cell, sample the support set, fit, predict, score, append. A cell
that raises, returns invalid probabilities or runs past ``--cell-timeout`` is recorded as ``failed`` and
the grid goes on.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hica_bench import leaderboard, protocol, tuning
from hica_bench.cache import FeatureCache
from hica_bench.errors import NotApplicable, UserError
from hica_bench.features import Extraction, ReferenceProbe, split_features
from hica_bench.interfaces import EncoderPair, FewShotDataset, FewShotTask
from hica_bench.metrics import classification_metrics
from hica_bench.registry import Choice
from hica_bench.results import CellKey, CellResult, ResultsStore, environment

log = logging.getLogger(__name__)

SUPPORTED_TASKS = ("binary-class", "multi-class")


@dataclass
class Grid:
    datasets: list[Choice]
    methods: list[Choice]
    encoder: Choice
    shots: list[int]
    seeds: list[int]
    size: int = 28
    max_test: int | None = None

    def keys(self, dataset: str) -> list[tuple[Choice, CellKey]]:
        return [
            (method, CellKey(dataset, self.size, method.label, self.encoder.label, k, seed, self.max_test))
            for method in self.methods
            for k in self.shots
            for seed in self.seeds
        ]


@dataclass
class Settings:
    device: str = "cpu"
    extraction: tuning.Requested = field(default_factory=tuning.Requested)  #: knobs the user fixed; others are probed
    data_root: str | None = None
    cache_dir: Path = Path(".")
    out_dir: Path = Path("hica-bench-results")
    download: bool = True
    cell_timeout: float | None = None  #: seconds for one cell's fit + predict; None = no limit


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0  #: already finished in the results file
    ok: int = 0
    not_applicable: int = 0
    failed: int = 0
    extractions: list[Extraction] = field(default_factory=list)
    tuning: tuning.Tuning | None = None  #: the extraction settings (None when nothing was pending)
    cache_hits: int = 0
    cache_misses: int = 0
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    leaderboard: tuple[Path, Path] | None = None


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA device is available (use --device cpu or auto)")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {requested!r}")
    return requested


def open_datasets(grid: Grid, settings: Settings) -> dict[str, FewShotDataset]:
    """Build every dataset and check it can run the grid's shots (before any cell runs)."""
    datasets = {}
    for choice in grid.datasets:
        dataset = choice.build(root=settings.data_root, size=grid.size, download=settings.download, cache_dir=settings.cache_dir)
        if dataset.task not in SUPPORTED_TASKS:
            raise UserError(f"{choice.name} is a {dataset.task} dataset; hica-bench supports {' and '.join(SUPPORTED_TASKS)} tasks")
        labels = dataset.split("train").labels
        protocol.check_shots(grid.shots, labels, len(dataset.class_names), choice.name)
        dataset.split("test")  # a malformed test split is reported now, not after other cells ran
        datasets[choice.label] = dataset
    return datasets


def _check_proba(proba: np.ndarray, n: int, c: int) -> None:
    proba = np.asarray(proba)
    if proba.shape != (n, c):
        raise ValueError(f"predict_proba returned shape {proba.shape}, expected {(n, c)}")
    if not np.isfinite(proba).all():
        raise ValueError("predict_proba returned NaN or inf")
    if not np.allclose(proba.sum(axis=1), 1.0, atol=1e-4) or (proba < -1e-6).any():
        raise ValueError("predict_proba rows are not probabilities (non-negative, summing to 1)")


def run_cell(
    method: Choice,
    key: CellKey,
    dataset: FewShotDataset,
    encoders: EncoderPair,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    device: str,
    cache_dir: Path | None = None,
    timeout: float | None = None,
) -> CellResult:
    import torch

    train_features, train_labels = train
    test_features, test_labels = test
    n_classes = len(dataset.class_names)
    indices = protocol.sample_support(train_labels, n_classes, key.k, key.seed, key.dataset)
    result = CellResult(
        key,
        status="ok",
        support_hash=protocol.support_hash(indices),
        n_support=len(indices),
        n_test=len(test_labels),
        options={"method": method.options},
    )
    try:
        model = method.build()
        needs = set(getattr(model, "needs", ()))
        if "aligned_encoders" in needs and not encoders.aligned:
            raise NotApplicable(
                f"needs an aligned image-text encoder pair; {key.encoder} is not aligned "
                "(its image and text embeddings are separately trained spaces)"
            )
        if needs & {"text_encoder", "class_texts", "aligned_encoders"} and encoders.text is None:
            raise NotApplicable(f"needs a text encoder; {key.encoder} has none")
        task = FewShotTask(
            dataset=key.dataset,
            task=dataset.task,
            class_names=list(dataset.class_names),
            support_features=train_features[indices],
            support_labels=train_labels[indices],
            support_indices=indices,
            k=key.k,
            seed=key.seed,
            encoders=encoders,
            device=device,
            train_images=dataset.split("train").images if "encoders" in needs else None,
            train_features=train_features if "train_features" in needs else None,
            cache_dir=cache_dir,
        )
        torch.manual_seed(key.seed)
        np.random.seed(key.seed % 2**32)

        def fit_predict():
            start = time.perf_counter()
            model.fit(task)
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            proba = model.predict_proba(test_features)
            return proba, fit_s, time.perf_counter() - start

        proba, fit_s, predict_s = _within(timeout, fit_predict)
        _check_proba(proba, len(test_labels), n_classes)
        result.metrics = classification_metrics(test_labels, np.asarray(proba, dtype=np.float64))
        result.timings = {"fit_s": fit_s, "predict_s": predict_s}
        if isinstance(getattr(model, "fit_info_", None), dict):
            result.options["fit"] = model.fit_info_
    except NotApplicable as exc:
        result.status, result.reason = "not_applicable", str(exc)
    except Exception as exc:  # fault isolation: one cell's failure never stops the grid
        result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
        log.debug("cell %s failed:\n%s", key, traceback.format_exc())
    return result


def _within(seconds: float | None, work):
    """``work()``, or ``TimeoutError`` once it has run ``seconds``. Python cannot stop a thread: a timed-out
    ``work`` goes on in a daemon thread (using CPU, never blocking exit) while the grid continues."""
    if seconds is None:
        return work()
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="hica-bench-cell", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"timed out after {seconds:g} s (--cell-timeout)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def run(grid: Grid, settings: Settings, progress=None) -> Summary:
    """Run every pending cell of ``grid``; ``progress`` is an optional :class:`rich.progress.Progress`."""
    started = time.perf_counter()
    summary = Summary()
    store = ResultsStore(settings.out_dir / "results.jsonl")
    done = store.load()
    finished = {rid for rid, r in done.items() if r.status in ("ok", "not_applicable")}
    pending = {d.label: [(m, k) for m, k in grid.keys(d.label) if k.id not in finished] for d in grid.datasets}
    summary.total = sum(len(grid.keys(d.label)) for d in grid.datasets)
    summary.skipped = summary.total - sum(len(p) for p in pending.values())

    if any(pending.values()):
        datasets = open_datasets(grid, settings)
        encoders: EncoderPair = grid.encoder.build(device=settings.device)
        cache = FeatureCache(settings.cache_dir)
        probing = progress.add_task("encoder settings (probed once, then remembered)", total=None) if progress else None
        summary.tuning = tuned = tuning.choose(encoders, settings.extraction, settings.cache_dir, log.info)
        if progress:
            progress.remove_task(probing)
        extraction_settings = tuned.settings
        forward = _lazy(lambda: tuning.build_forward(encoders, extraction_settings, settings.cache_dir))
        env = environment(settings.device) | {"extraction": asdict(extraction_settings)}
        cells_task = progress.add_task("cells", total=summary.total - summary.skipped) if progress else None
        for name, cells in pending.items():
            if not cells:
                continue
            dataset = datasets[name]
            splits = {}
            reference: float | None = None  # plain eager images/s, measured during this dataset's first encoder pass
            for split in ("train", "test"):
                n = len(dataset.split(split).labels)
                bar = progress.add_task(f"{name} {split} features", total=n) if progress else None
                advance = (lambda count, bar=bar: progress.advance(bar, count)) if progress else None
                probe = None
                if reference is None:  # raw passes run only if this split is encoded (not on a cache hit)
                    probe = ReferenceProbe.for_split(encoders.image, dataset.split(split).images, settings.device,
                                                     extraction_settings.batch_size, settings.extraction.amp)
                    advance = _both(advance, probe)
                features, extraction = split_features(
                    cache, dataset, split, encoders.image, settings.device, extraction_settings.batch_size,
                    settings.extraction.amp, advance, extraction_settings.backend, forward,
                )
                if probe is not None and probe.images_per_s:
                    extraction.seconds -= probe.paused_s
                    reference = probe.images_per_s
                if progress:
                    progress.update(bar, completed=n, visible=False)
                labels = np.asarray(dataset.split(split).labels)
                if split == "test" and grid.max_test is not None:
                    features, labels = features[: grid.max_test], labels[: grid.max_test]
                splits[split] = (features, labels)
                summary.extractions.append(extraction)
            for method, key in cells:
                result = run_cell(method, key, dataset, encoders, splits["train"], splits["test"], settings.device,
                                  settings.cache_dir / "methods", settings.cell_timeout)
                result.environment = env
                result.options["encoder"] = grid.encoder.options
                result.timings.update(_throughput(summary.extractions, dataset.name, reference))
                store.append(result)
                setattr(summary, result.status, getattr(summary, result.status) + 1)
                if result.status == "failed":
                    summary.failures.append(f"{key.dataset} {key.method} k={key.k} seed={key.seed}: {result.reason}")
                if progress:
                    progress.advance(cells_task)
        summary.cache_hits, summary.cache_misses = cache.hits, cache.misses

    summary.leaderboard = leaderboard.write(list(store.load().values()), settings.out_dir)
    summary.wall_s = time.perf_counter() - started
    return summary


def _lazy(build):
    """A forward that is built on its first call (only a cache miss needs one)."""
    built = []

    def forward(batch):
        if not built:
            built.append(build())
        return built[0](batch)

    return forward


def _both(first, second):
    """One per-batch hook calling ``first`` (may be None) and then ``second``."""
    def hook(count: int) -> None:
        if first:
            first(count)
        second(count)

    return hook


def _throughput(extractions: list[Extraction], dataset: str, reference: float | None = None) -> dict[str, float]:
    """Encoder images/s of this dataset's extractions in this run (absent when all came from the cache), with the
    run's plain eager ``reference_images_per_s`` beside it (``hica-bench check`` compares their ratio)."""
    computed = [e for e in extractions if e.dataset == dataset and not e.cached]
    seconds = sum(e.seconds for e in computed)
    if not seconds:
        return {}
    timings = {"encoder_images_per_s": sum(e.n_images for e in computed) / seconds}
    if reference:
        timings["reference_images_per_s"] = reference
    return timings

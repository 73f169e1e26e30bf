"""Runs a grid (datasets × methods × shots × seeds): the grid loop, cell execution and fault isolation.

Order of work: validate everything that can be validated (names, options, data files, shots) before the first
cell runs; work out each cell's :class:`~hica_bench.results.Identity` and skip those already finished with that
identity; per dataset with pending cells, get train/test features from the extraction service; per cell, fit,
predict, score (in this process, or as Ray tasks: :mod:`hica_bench.executors`), append (here only). A cell that raises, returns invalid probabilities or runs past ``--cell-timeout`` is
recorded as ``failed`` and the grid goes on.

The rules a method's inputs and outputs obey live here once (:func:`build_task`, :func:`check_needs`,
:func:`check_proba`); the conformance kit (:mod:`hica_bench.testing`) calls the same functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from hica_bench import __version__, data, leaderboard, prompts, protocol
from hica_bench.errors import NotApplicable, UserError
from hica_bench.extraction import ExtractionRecord, FeatureExtractor, Requested, Tuning, Work
from hica_bench.files import atomic_write, digest, digests_remembered_in, file_lock
from hica_bench.adapting import frozen_state, restore, weight_versions
from hica_bench.interfaces import (NEEDS, Components, EncoderCard, EncoderPair, FewShotDataset, FewShotTask,
                                  ImageEncoder, Prompts)
from hica_bench.metrics import calibration, classification_metrics, per_class
from hica_bench.registry import Choice, Registry, RunComponents
from hica_bench.results import (CellKey, CellResult, Environment, Identity, Origin, ResultsStore, Status,
                                environment, jsonable)

log = logging.getLogger(__name__)

SUPPORTED_TASKS = ("binary-class", "multi-class")


@dataclass
class Grid:
    datasets: list[Choice]
    methods: list[Choice]
    encoders: list[Choice]  #: the grid runs over each (features computed once per encoder, dataset and split)
    shots: list[int]
    seeds: list[int]
    size: int = 28
    max_test: int | None = None

    def __post_init__(self) -> None:
        protocol.check_shots_and_seeds(self.shots, self.seeds)
        data.check_size(self.size)
        if self.max_test is not None and self.max_test < 1:
            raise UserError(f"--max-test must be >= 1, got {self.max_test}")

    @property
    def cells(self) -> int:
        return len(self.datasets) * len(self.methods) * len(self.encoders) * len(self.shots) * len(self.seeds)

    def position(self, encoder: int, dataset: int, method: int, k: int, seed: int) -> int:
        """A cell's place in the grid's order (encoders, datasets, methods, shots, seeds; indices into each list):
        ``--shard I/N`` runs the cells whose place is I modulo N. It depends only on the command's lists, so every
        shard of one command agrees on the partition, whatever machine it runs on or what has finished."""
        return (((encoder * len(self.datasets) + dataset) * len(self.methods) + method) * len(self.shots) + k) \
            * len(self.seeds) + seed


@dataclass
class Settings:
    device: str = "cpu"
    extraction: Requested = field(default_factory=Requested)  #: knobs the user fixed; others are probed
    data_root: str | None = None
    cache_dir: Path = Path(".")
    out_dir: Path = Path("hica-bench-results")
    download: bool = True
    cell_timeout: float | None = None  #: seconds for one cell's fit + predict; None = no limit
    force: bool = False  #: run every selected cell again, even one finished with the same identity
    save_predictions: bool = False  #: keep each cell's test probabilities under ``out_dir/predictions/``
    report: bool = True  #: write ``report.html`` (:mod:`hica_bench.report`) beside the leaderboards
    executor: str = "in-process"  #: where cells run: ``in-process`` or ``ray`` (:mod:`hica_bench.executors`)
    ray_address: str | None = None  #: a Ray cluster to join (``auto``, ``HOST:PORT``); None starts a local runtime
    workers: int | None = None  #: Ray: cells in flight at once (a local runtime gets this many CPUs); None: all CPUs
    shard: tuple[int, int] | None = None  #: (I, N): run only the cells whose grid position is I modulo N
    volume: Any = None  #: how a 2D encoder reads volumes (:class:`hica_bench.volumes.VolumeOptions`; None: the default)


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
    leaderboard: tuple[Path, Path] | None = None
    report: Path | None = None
    datasets: list[str] = field(default_factory=list)  #: one line per dataset: its classes and split sizes


@dataclass
class Cell:
    """A pending cell: the method, its key and identity, its support set (indices into the train split)."""

    method: Choice
    key: CellKey
    identity: Identity
    support: np.ndarray
    prompts: Prompts | None = None
    dataset_label: str = ""  #: the dataset choice's label (with a corruption, unlike ``key.dataset``)


@contextlib.contextmanager
def out_lock(out_dir: Path):
    """Holds ``out_dir``'s lock (:func:`hica_bench.files.file_lock`) while a run writes there: a second run on the same
    ``--out`` would compute the same pending cells again and append them twice, so it is refused with one line naming
    the run that holds the lock."""
    path = Path(out_dir) / ".hica-bench.lock"
    try:
        with file_lock(path, wait=False) as fd:
            if fd is not None:
                with contextlib.suppress(OSError):  # the pid is only for the message below (a full disk must not stop here)
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
    except BlockingIOError:
        holder = path.read_text(errors="replace").strip() if path.is_file() else ""
        raise UserError(f"another hica-bench run (pid {holder or '?'}) is writing to {out_dir}; wait for it to finish "
                        "(then rerun: finished cells are kept) or use another --out") from None


class EncoderBuildError(UserError):
    """Building a described encoder pair failed when a run first needed its models: the run stops with this line."""


class LazyEncoderPair:
    """An encoder pair known by its :class:`~hica_bench.interfaces.EncoderCard` and built on first use of its models
    (``image``, ``text`` or ``modules``). A run whose features are all cached, with methods that use only image
    features, never builds it; ``aligned``, ``device`` and ``card`` never build it. The built pair must match the
    card its spec's ``describe`` gave, else the run stops naming the plugin."""

    def __init__(self, card: EncoderCard, build: Callable[[], EncoderPair], label: str, device: str) -> None:
        self.card, self.aligned, self.device = card, card.aligned, device
        self._build, self._label = build, label
        self._pair: EncoderPair | None = None

    def pair(self) -> EncoderPair:
        """The built pair (built now on first call)."""
        if self._pair is None:
            try:
                pair = self._build()
            except UserError as exc:
                raise EncoderBuildError(str(exc)) from None
            if pair.card != self.card:
                raise EncoderBuildError(f"encoder {self._label}: the plugin's describe() gave {self.card} but the built "
                                        f"pair is {pair.card}; the plugin must make them agree")
            self._pair = pair
        return self._pair

    @property
    def image(self) -> Any:
        return self.pair().image

    @property
    def text(self) -> Any:
        return None if self.card.text is None else self.pair().text

    @property
    def modules(self) -> dict[str, Any]:
        return self.pair().modules


def encoder_pair(encoder: Choice, device: str) -> EncoderPair | LazyEncoderPair:
    """``encoder`` on ``device``: a :class:`LazyEncoderPair` when its spec can describe it, else built now."""
    card = encoder.describe(device=device)
    if card is None:
        return encoder.build(device=device)
    if not isinstance(card, EncoderCard):
        raise EncoderBuildError(f"encoder {encoder.label}: the plugin's describe() returned {type(card).__name__}, "
                                "not an EncoderCard")
    return LazyEncoderPair(card, lambda: encoder.build(device=device), encoder.label, device)


def gpu_driver_present() -> bool:
    """Whether a GPU driver is there for torch to use (NVIDIA's ``libcuda`` loads, or ROCm's ``/dev/kfd`` exists, and
    ``CUDA_VISIBLE_DEVICES`` does not hide every device). Without one torch sees no GPU, so ``--device auto`` is the
    CPU without importing torch (0.5 GB and 3 s for a CUDA wheel: a run served from the cache needs no torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    if os.path.exists("/dev/kfd"):
        return True
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def resolve_device(requested: str) -> str:
    if requested == "cpu":
        return "cpu"
    if requested == "auto" and not gpu_driver_present():
        return "cpu"
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA device is available (use --device cpu or auto)")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {requested!r}")
    return requested


def open_datasets(grid: Grid, settings: Settings, events: "Events | None" = None
                  ) -> tuple[dict[str, FewShotDataset], dict[str, Prompts]]:
    """Build every dataset, read its prompt file (if any) and check it can run the grid's shots (before any cell
    runs): (datasets, prompt files) by dataset label. A dataset plugin's :func:`hica_bench.data.progress` (decoding a
    folder) is shown through ``events``."""
    datasets, prompt_files = {}, {}
    with data.progress_to(events.task if events is not None else None):
        for choice in grid.datasets:
            dataset = choice.build(root=settings.data_root, size=grid.size, download=settings.download,
                                   cache_dir=settings.cache_dir)
            if dataset.task not in SUPPORTED_TASKS:
                raise UserError(f"{choice.name} is a {dataset.task} dataset; hica-bench supports "
                                f"{' and '.join(SUPPORTED_TASKS)} tasks")
            labels = dataset.split("train").labels
            protocol.check_shots(grid.shots, labels, len(dataset.class_names), choice.label, list(dataset.class_names))
            dataset.split("test")  # a malformed test split is reported now, not after other cells ran
            if choice.prompts is not None:
                prompt_files[choice.label] = prompts.load(choice.prompts, dataset.class_names, choice.label)
            datasets[choice.label] = dataset
    return datasets, prompt_files


def describe_dataset(label: str, dataset: FewShotDataset, prompt_file: Prompts | None = None) -> str:
    """One line: the dataset's classes in label order (with the prompt file's names), and its split sizes."""
    names = [name if prompt_file is None or prompt_file.classnames[i] == name else f"{name} ({prompt_file.classnames[i]!r})"
             for i, name in enumerate(dataset.class_names)]
    sizes = ", ".join(f"{len(dataset.split(s).labels)} {s}" for s in ("train", "val", "test"))
    return f"{label}: {len(names)} classes: {', '.join(f'{i}={n}' for i, n in enumerate(names))}; {sizes}"


# --------------------------------------------------------------------------- the rules of a method's inputs and outputs


def validate_needs(needs: Any) -> frozenset[str]:
    """A method's ``needs`` as a frozenset of known needs, else a ValueError saying what is wrong."""
    if not isinstance(needs, (set, frozenset)) or not all(isinstance(n, str) for n in needs):
        raise ValueError(f"needs must be a frozenset of strings, got {needs!r}")
    unknown = sorted(set(needs) - NEEDS)
    if unknown:
        raise ValueError(f"unknown needs {unknown}; known: {sorted(NEEDS)}")
    return frozenset(needs)


def check_needs(needs: Any, pair: EncoderPair, encoder_label: str) -> frozenset[str]:
    """``needs`` validated (:func:`validate_needs`); NotApplicable when ``pair`` cannot serve them (told by its card:
    nothing is built here)."""
    needs = validate_needs(needs)
    if "aligned_encoders" in needs and not pair.card.aligned:
        raise NotApplicable(f"needs an aligned image-text encoder pair; {encoder_label} is not aligned "
                            "(its image and text embeddings are separately trained spaces)")
    if needs & {"text_encoder", "class_texts", "aligned_encoders"} and pair.card.text is None:
        raise NotApplicable(f"needs a text encoder; {encoder_label} has none")
    return frozenset(needs)


#: needs that take the support images' features (the train split is encoded only for a cell whose method has one)
FEATURE_NEEDS = frozenset({"image_features", "train_features", "encoders"})


def method_needs(method: Choice) -> frozenset[str]:
    """What ``method`` declares in ``needs``; every need when its constructor or its ``needs`` is broken (its cells
    then fail on their own, with the reason)."""
    try:
        return validate_needs(getattr(method.build(), "needs", None))
    except (Exception, SystemExit):
        return NEEDS


def build_task(*, dataset: str, task: str, class_names: list[str], train_features: np.ndarray | None, train_labels: np.ndarray,
               support: np.ndarray, k: int, seed: int, pair: EncoderPair, needs: frozenset[str],
               train_images: Callable[[], np.ndarray] | None = None, cache_dir: Path | None = None,
               components: Components | None = None, prompts: Prompts | None = None) -> FewShotTask:
    """The :class:`FewShotTask` of one cell: the support set's labels, and only what ``needs`` declares (the support
    features, the whole train split's features, its images: ``train_images`` is called only then). With a prompt
    file, the task's class names are its ``classnames``."""
    features = bool(needs & FEATURE_NEEDS)
    if features and train_features is None:
        raise ValueError("the method needs image features but the train split was not encoded")
    return FewShotTask(
        dataset=dataset, task=task, class_names=list(class_names if prompts is None else prompts.classnames),
        support_features=train_features[support] if features else None, support_labels=train_labels[support],
        support_indices=support,
        k=k, seed=seed, encoders=pair, device=pair.device,
        train_images=train_images() if "encoders" in needs and train_images is not None else None,
        train_features=train_features if "train_features" in needs else None,
        cache_dir=cache_dir, components=components, prompts=prompts,
    )


_TORCH_SEED: list[int] = []  #: the seed of the cell that runs now, for torch when a method imports it (wrapt's hook)


def seed_everything(seed: int) -> None:
    """What every cell does before ``fit``: torch's and numpy's global generators from the cell's seed. When torch is
    not imported yet (every feature came from the cache and the encoder was not built), it is seeded the moment the
    method imports it, through a post-import hook, so a method drawing from torch's global generator gets the same
    numbers whether or not the harness loaded torch first."""
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "manual_seed"):
        torch.manual_seed(seed)
        return
    import wrapt

    if not _TORCH_SEED:
        wrapt.register_post_import_hook(lambda module: module.manual_seed(_TORCH_SEED[-1]), "torch")
    _TORCH_SEED[:] = [seed]


def check_proba(proba: Any, n: int, c: int) -> np.ndarray:
    """``predict_proba``'s answer as an (n, c) float array of probabilities, else a ValueError saying what is wrong."""
    if not isinstance(proba, np.ndarray):
        raise ValueError(f"predict_proba returned {type(proba).__name__}, not a numpy array")
    if proba.shape != (n, c):
        raise ValueError(f"predict_proba returned shape {proba.shape}, expected {(n, c)}")
    if not np.issubdtype(proba.dtype, np.floating):
        raise ValueError(f"predict_proba returned dtype {proba.dtype}, not float")
    if not np.isfinite(proba).all():
        raise ValueError("predict_proba returned NaN or inf")
    if not np.allclose(proba.sum(axis=1), 1.0, atol=1e-4) or (proba < -1e-6).any():
        raise ValueError("predict_proba rows are not probabilities: they must be non-negative and sum to 1 "
                         f"(sums: {np.round(proba.sum(axis=1)[:4], 4).tolist()}...)")
    return proba


# --------------------------------------------------------------------------- one cell


def _save_predictions(folder: Path, cell_id: str, proba: np.ndarray, labels: np.ndarray) -> str:
    """The cell's test probabilities and labels as ``predictions/<cell_id>.npz`` (compressed, no pickle) beside the
    results file, so its metrics can be recomputed; returns the path relative to the results file's folder."""
    path = folder / f"{cell_id}.npz"
    atomic_write(path, lambda handle: np.savez_compressed(handle, proba=proba.astype(np.float32), labels=labels,
                                                          test_index=np.arange(len(labels))))
    return f"{folder.name}/{path.name}"


def prepare(cell: Cell, dataset: FewShotDataset, pair: EncoderPair, train: tuple[np.ndarray | None, np.ndarray],
            components: Components, cache_dir: Path | None = None) -> tuple[Any, frozenset[str], FewShotTask]:
    """A cell's method, built, with its checked needs and its task, every generator seeded from the cell's seed: what
    ``fit`` gets in a run (:func:`fit_and_score`) and in ``hica-bench explain`` (:mod:`hica_bench.explain`) alike.
    Raises NotApplicable when the encoder pair or the dataset cannot serve the method's needs."""
    train_features, train_labels = train
    key = cell.key
    model = cell.method.build()
    needs = check_needs(getattr(model, "needs", None), pair, key.encoder)
    if "encoders" in needs and getattr(dataset, "volumetric", False):
        raise NotApplicable("reads the 2D images themselves (to adapt the encoder or pool regions); this dataset holds "
                            "3D volumes, which are encoded slice by slice or by a 3D encoder")
    task = build_task(dataset=getattr(dataset, "name", key.dataset), task=dataset.task,
                      class_names=dataset.class_names, train_features=train_features, train_labels=train_labels,
                      support=cell.support, k=key.k, seed=key.seed, pair=pair, needs=needs,
                      train_images=lambda: dataset.split("train").images, cache_dir=cache_dir,
                      components=components, prompts=cell.prompts)
    seed_everything(key.seed)
    return model, needs, task


def fit_and_score(cell: Cell, dataset: FewShotDataset, pair: EncoderPair, train: tuple[np.ndarray | None, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], components: RunComponents, cache_dir: Path | None = None,
                  timeout: float | None = None, extractor: FeatureExtractor | None = None
                  ) -> tuple[CellResult, np.ndarray | None]:
    """One cell: build the method, fit it on the support set, predict the test features, score. Returns the result
    and the test probabilities (None unless it finished ok). Whatever the method does wrong is the cell's failure
    (fault isolation); only an encoder that cannot be built stops the run. Runs wherever the executor puts it (this
    process, or a Ray worker: :mod:`hica_bench.executors`).

    A method that adapted the encoder during ``fit`` and exposes it as ``encoder_`` predicts on the test images
    encoded through it by ``extractor`` (:meth:`FeatureExtractor.adapted`: the run's preprocessing and batching), not
    on the frozen ``test`` features; without ``encoder_`` it gets the frozen ones. A method that changed the frozen
    encoder's weights in place fails (they serve every other cell and the feature cache)."""
    test_features, test_labels = test
    key = cell.key
    result = CellResult(key, cell.identity, Status.OK, n_support=len(cell.support), n_test=len(test_labels))
    proba = None
    try:
        model, needs, task = prepare(cell, dataset, pair, train, components, cache_dir)
        frozen = weight_versions(pair.modules) if "encoders" in needs else None
        saved = frozen_state(pair.modules) if frozen is not None else None  # to put back what a faulty method changes

        def fit_predict():
            start = time.perf_counter()
            try:
                model.fit(task)
            finally:  # also when fit raised: the next cells and datasets are encoded with the frozen weights
                if frozen is not None and weight_versions(pair.modules) != frozen:
                    restore(pair.modules, saved)
                    raise RuntimeError("the method changed the frozen encoder's weights or modes in place (they "
                                       "were put back); adapt a copy (hica_bench.adapting.adaptable_copy) and "
                                       "expose it as encoder_")
            fit_s = time.perf_counter() - start
            features, adapted = _adapted_features(model, pair, dataset, len(test_labels), extractor)
            start = time.perf_counter()
            proba = model.predict_proba(test_features if features is None else features)
            return proba, fit_s, time.perf_counter() - start, adapted

        # (what a timed-out cell's thread does later never reaches this result: it is filled in here only)
        proba, fit_s, predict_s, adapted = _within(timeout, fit_predict)
        if adapted is not None:
            result.adapted_encoder, result.timings.adapted_encode_s, result.timings.adapted_images_per_s = adapted
        proba = check_proba(proba, len(test_labels), len(dataset.class_names))
        result.calibration = calibration(test_labels, proba.astype(np.float64))
        result.metrics = classification_metrics(test_labels, proba.astype(np.float64), result.calibration)
        result.per_class = per_class(test_labels, proba)
        result.timings.fit_s, result.timings.predict_s = fit_s, predict_s
        if isinstance(getattr(model, "fit_info_", None), dict):
            result.fit_info = jsonable(model.fit_info_)  # whatever it holds (numpy values, objects), it can be written
    except EncoderBuildError:
        raise  # the encoder cannot be built (bad weights, a broken plugin): bad input for the whole run, not this cell
    except NotApplicable as exc:
        result.status, result.reason, proba = Status.NOT_APPLICABLE, str(exc), None
    except SystemExit as exc:  # a plugin calling sys.exit() must not end the run in silence
        result.status, proba = Status.FAILED, None
        result.reason = f"SystemExit: the method called sys.exit({exc.code!r})"
    except Exception as exc:  # fault isolation: one cell's failure never stops the grid
        result.status, result.reason, proba = Status.FAILED, f"{type(exc).__name__}: {exc}", None
        log.debug("cell %s failed:\n%s", key, traceback.format_exc())
    result.components_used = list({digest(jsonable([c.kind, c.name, c.options, c.distribution])): c
                                   for c in components.used}.values())  # each once, in the order first built
    return result, proba


def check_adapted(encoder: Any, pair: EncoderPair) -> None:
    """A method's ``encoder_`` is an image encoder with an identity of its own and the frozen encoder's input spec
    (the test images are preprocessed as for the frozen features); else a ValueError saying what is wrong."""
    if not isinstance(encoder, ImageEncoder):
        raise ValueError(f"encoder_ is a {type(encoder).__name__}, not an image encoder (identity, input_spec, "
                         "embed_dim, encode)")
    if not isinstance(encoder.identity, str) or not encoder.identity or encoder.identity == pair.card.image:
        raise ValueError("encoder_ must have an identity of its own (the frozen encoder's plus a digest of the adapted "
                         "weights, e.g. hica_bench.adapting.AdaptedImageEncoder)")
    if encoder.input_spec != pair.card.input_spec:
        raise ValueError(f"encoder_ wants input {encoder.input_spec}, the frozen encoder {pair.card.input_spec}; "
                         "an adapted encoder keeps its preprocessing")


def _adapted_features(model: Any, pair: EncoderPair, dataset: FewShotDataset, rows: int,
                      extractor: FeatureExtractor | None) -> tuple[np.ndarray | None, tuple | None]:
    """The test features through the method's adapted encoder (``encoder_``) with (its identity, encoding seconds
    (0: from the cache), images/s) for the result; (None, None) when it exposes none."""
    encoder = getattr(model, "encoder_", None)
    if encoder is None:
        return None, None
    check_adapted(encoder, pair)
    if extractor is None:
        raise ValueError("this cell adapted the encoder but was given no extraction service to encode through it")
    features, record = extractor.adapted(encoder, dataset, "test", rows=rows)
    return features, (encoder.identity, record.seconds if not record.cached else 0.0, record.images_per_s)


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


# --------------------------------------------------------------------------- the grid


def _pending(grid: Grid, registry: Registry, dataset_choice: Choice, dataset: FewShotDataset, encoder: Choice,
             pair: EncoderPair, extractor: FeatureExtractor, device: str, finished: set[str],
             prompt_file: Prompts | None = None, in_shard: Callable[[int, int, int], bool] = lambda m, k, s: True
             ) -> tuple[list[Cell], int, int]:
    """This dataset's cells with ``encoder`` whose identity has no finished result yet, how many were skipped, and how
    many belong to other shards (``in_shard(method, k, seed)``: indices into the grid's lists)."""
    labels = dataset.split("train").labels
    n_classes = len(dataset.class_names)
    # supports are drawn by the dataset's name, not its label: options (a folder's path, a prompt file) change nothing
    name = getattr(dataset, "name", dataset_choice.label)
    supports = {(k, seed): protocol.sample_support(labels, n_classes, k, seed, name)
                for k in grid.shots for seed in grid.seeds}
    pending, skipped, elsewhere = [], 0, 0
    for m, method in enumerate(grid.methods):
        origin = Origin(
            harness=__version__, dataset=dataset_choice.ref, dataset_identity=dataset.identity, size=grid.size,
            max_test=grid.max_test, encoder=encoder.ref, features=extractor.identity_for(dataset).as_dict(),
            text_encoder=pair.card.text, method=method.ref,
            method_components=registry.components_of(method), device=device.split(":")[0],
            prompts=None if prompt_file is None else prompt_file.digest,
            corruption=dataset.describe() if dataset_choice.corruption is not None else None)
        for k_index, k in enumerate(grid.shots):
            for seed_index, seed in enumerate(grid.seeds):
                if not in_shard(m, k_index, seed_index):
                    elsewhere += 1
                    continue
                identity = Identity(origin, k, seed, protocol.support_hash(supports[k, seed]))
                if identity.id in finished:
                    skipped += 1
                    continue
                key = CellKey(dataset_choice.base_label, grid.size, method.label, encoder.label, k, seed, grid.max_test,
                              *(dataset_choice.corruption or (None, None)))
                pending.append(Cell(method, key, identity, supports[k, seed], prompt_file, dataset_choice.label))
    return pending, skipped, elsewhere


class Events:
    """What a run reports while it works (the CLI shows it: a live display on a terminal, log lines elsewhere, nothing
    with ``--quiet``). Every method is a no-op here."""

    def stage(self, text: str) -> None:
        """A step without a count (e.g. the encoder settings probe); the next call of any kind ends it."""

    def cells(self, encoder: str, total: int, skipped: int) -> None:
        """The grid's cells with ``encoder`` are known: ``total`` cells, ``skipped`` of them already finished."""

    def split(self, dataset: str, split: str, images: int) -> Callable[[int], None]:
        """An encoder pass starts; the returned function is called with each batch's image count."""
        return lambda count: None

    def task(self, text: str, total: int) -> Callable[[int], None]:
        """A counted step of a plugin (:func:`hica_bench.data.progress`, e.g. decoding a folder of images) starts; the
        returned function is called with each step's count; the next call of any kind ends it."""
        return lambda count: None

    def split_done(self, record: ExtractionRecord) -> None:
        """An encoder pass (or cache read) finished."""

    def cell(self, key: CellKey) -> None:
        """A cell starts."""

    def cell_done(self, result: CellResult) -> None:
        """A cell finished and its record is in the results file."""


def run(grid: Grid, settings: Settings, registry: Registry, events: Events | None = None) -> Summary:
    """Run every pending cell of ``grid``, reporting to ``events``. Everything the cells' methods build while they run
    comes from ``registry`` (the run's own, with its ``-p`` modules). One run at a time per ``out_dir``
    (:func:`out_lock`)."""
    with out_lock(settings.out_dir), digests_remembered_in(settings.cache_dir):
        return _run(grid, settings, registry, events or Events())


def _run(grid: Grid, settings: Settings, registry: Registry, events: Events) -> Summary:
    from hica_bench import executors

    started = time.perf_counter()
    summary = Summary(total=grid.cells)
    store = ResultsStore(settings.out_dir / "results.jsonl")
    store.check_writable()
    finished = {cell_id for cell_id, r in store.load().items() if r.status.finished and not settings.force}
    datasets, prompt_files = open_datasets(grid, settings, events)
    summary.datasets = [describe_dataset(label, dataset, prompt_files.get(label)) for label, dataset in datasets.items()
                        if getattr(dataset, "corruption", None) is None]
    corrupted: dict[str, list] = {}  # one line per dataset for its corrupted copies, not one per copy
    for choice in grid.datasets:
        if choice.corruption is not None:
            corrupted.setdefault(choice.base_label, []).append(datasets[choice.label])
    for label, copies in corrupted.items():
        names = sorted({c.corruption for c in copies})
        levels = sorted({c.severity for c in copies})
        summary.datasets.append(f"{label}: test split also corrupted ({copies[0].set} set): {len(names)} corruptions "
                                f"({', '.join(names)}) x severities {','.join(map(str, levels))}")
    needs = {method.label: method_needs(method) for method in grid.methods}
    with executors.start(settings, registry, events) as executor:
        summary.executor = executor.describe()
        for index, encoder in enumerate(grid.encoders):  # one encoder in memory at a time
            _run_encoder(grid, settings, registry, events, index, encoder, datasets, prompt_files, needs, store,
                         finished, summary, executor)
    summary.total -= summary.other_shards
    everything = list(store.load().values())
    summary.leaderboard = leaderboard.write(everything, settings.out_dir)
    if settings.report:
        from hica_bench import report

        summary.report = report.write_beside(everything, settings.out_dir)
    summary.wall_s = time.perf_counter() - started
    return summary


def _splits(needs: Iterable[frozenset[str]]) -> tuple[str, ...]:
    """The splits to encode for methods with these needs: the train split only when one reads support features."""
    return ("train", "test") if any(n & FEATURE_NEEDS for n in needs) else ("test",)


def _rows(grid: Grid, split: str, n: int) -> int:
    """How many of a split's ``n`` images the grid evaluates (``--max-test`` cuts the test split)."""
    return min(grid.max_test, n) if split == "test" and grid.max_test is not None else n


def _work(grid: Grid, datasets: dict[str, FewShotDataset], needs: dict[str, frozenset[str]],
          volume: Any = None) -> Work:
    """The most the grid can encode with one encoder (every needed split of every dataset; finished cells and cached
    features can only make it less): a settings probe is budgeted by it and times real batches of its first split
    (for volumes: 2D slices, counted as such)."""
    from hica_bench import volumes
    from hica_bench.corruptions import split_identity

    options = volume or volumes.VolumeOptions()
    parts = [(dataset, split) for dataset in datasets.values() for split in _splits(needs.values())]
    # corrupted copies of a dataset share its train split: count it once
    unique = {(split_identity(dataset, split), split): (dataset, split) for dataset, split in parts}

    def images(dataset: FewShotDataset, split: str) -> int:
        n = _rows(grid, split, len(dataset.split(split).labels))
        if volumes.volumetric(dataset):
            shape = dataset.split(split).images.shape
            n *= sum(shape[1 + axis] for axis in options.axes)
        return n

    count = sum(images(dataset, split) for dataset, split in unique.values())
    if not parts:
        return Work(np.zeros((0, 1, 1), np.uint8), 0)
    dataset, split = parts[0]
    if volumes.volumetric(dataset):  # the probe times slices, as the extraction will encode them
        sample = dataset.split(split).images[:8]
        return Work(volumes.slices(sample, options.axes[0]), count)
    return Work(dataset.split(split).images, count, (dataset.identity, split))


@dataclass
class EncoderJob:
    """The pending cells of a grid with one encoder, as an executor (:mod:`hica_bench.executors`) receives them:
    ``work`` holds (dataset label, dataset, its pending cells)."""

    grid: Grid
    settings: Settings
    registry: Registry
    events: Events
    encoder: Choice
    pair: EncoderPair
    extractor: FeatureExtractor
    needs: dict[str, frozenset[str]]
    work: list[tuple[str, FewShotDataset, list[Cell]]]

    def splits(self, dataset: FewShotDataset, cells: list[Cell]) -> list[tuple[str, np.ndarray]]:
        """The splits these cells need encoded, each with the labels of the rows they use (zero-shot alone: no train
        split; ``--max-test N``: the first N test images)."""
        out = []
        for split in _splits(self.needs[cell.method.label] for cell in cells):
            labels = np.asarray(dataset.split(split).labels)
            out.append((split, labels[:_rows(self.grid, split, len(labels))]))
        return out

    def features(self, label: str, dataset: FewShotDataset, cells: list[Cell]
                 ) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
        """split -> (features, labels) for these cells, from the extraction service in this process (the train split
        without features when no method reads them)."""
        splits = {}
        for split, labels in self.splits(dataset, cells):
            features, record = self.extractor.features(dataset, split, self.events.split(label, split, len(labels)),
                                                       rows=len(labels))
            self.events.split_done(record)
            splits[split] = (features, labels)
        splits.setdefault("train", (None, np.asarray(dataset.split("train").labels)))
        return splits

    def test_labels(self, cell: Cell) -> np.ndarray:
        """The labels of the test rows ``cell`` was scored on."""
        dataset = next(d for label, d, _ in self.work if label == cell.dataset_label)
        labels = np.asarray(dataset.split("test").labels)
        return labels[:_rows(self.grid, "test", len(labels))]


def _run_encoder(grid: Grid, settings: Settings, registry: Registry, events: Events, index: int, encoder: Choice,
                 datasets: dict[str, FewShotDataset], prompt_files: dict[str, Prompts],
                 needs: dict[str, frozenset[str]], store: ResultsStore, finished: set[str], summary: Summary,
                 executor: Any) -> None:
    """The grid's cells with ``encoder`` (``needs``: each method label's declared needs), run by ``executor``; this
    process alone writes their results (one record per cell, appended as each arrives)."""
    pair = encoder_pair(encoder, settings.device)
    if pair.card.random_init:
        summary.random_init.append(encoder.label)
    from hica_bench import volumes

    flat = [label for label, dataset in datasets.items() if not volumes.volumetric(dataset)]
    if pair.card.volumetric and flat:
        raise UserError(f"encoder {encoder.label} is a 3D encoder (it takes whole volumes); {flat[0]} holds 2D images: "
                        "use a 2D encoder for it")
    extractor = FeatureExtractor(pair, settings.cache_dir, settings.extraction, log=log.info,
                                 work=_work(grid, datasets, needs, settings.volume), volume=settings.volume)
    events.stage(f"{encoder.label}: encoder settings (probed once per encoder and machine, then remembered)")
    summary.tuning[encoder.label] = extractor.tuning
    work, skipped_here, elsewhere_here = [], 0, 0
    for d, choice in enumerate(grid.datasets):
        dataset = datasets[choice.label]
        in_shard = (lambda m, k, s, d=d: True) if settings.shard is None else (
            lambda m, k, s, d=d: grid.position(index, d, m, k, s) % settings.shard[1] == settings.shard[0])
        cells, skipped, elsewhere = _pending(grid, registry, choice, dataset, encoder, pair, extractor, settings.device,
                                             finished, prompt_files.get(choice.label), in_shard)
        skipped_here += skipped
        elsewhere_here += elsewhere
        work.append((choice.label, dataset, cells))
    summary.skipped += skipped_here
    summary.other_shards += elsewhere_here
    events.cells(encoder.label, summary.total // len(grid.encoders) - elsewhere_here, skipped_here)
    job = EncoderJob(grid, settings, registry, events, encoder, pair, extractor, needs, work)
    env = None  # worked out after the first features are served: it records whether the run loaded torch
    identities = {label: dataset.identity for label, dataset, _ in work}
    for cell, result, proba in executor.run(job):
        env = env or environment(settings.device, extractor.describe())
        if result.environment == Environment():  # a worker records its own machine; this process's otherwise
            result.environment = env
        for name, value in extractor.throughput(identities[cell.dataset_label]).items():
            setattr(result.timings, name, value)
        if settings.save_predictions and proba is not None:
            result.predictions = _save_predictions(settings.out_dir / "predictions", cell.identity.id, proba,
                                                   job.test_labels(cell))
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

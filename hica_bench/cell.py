"""One cell under the method contract: the rules a method's inputs and outputs obey, written once.

A cell is a method fitted on one support set and scored on the test split. Here: which needs a method may declare
and whether an encoder pair serves them (:func:`check_needs`), the task it is handed (:func:`build_task`), the seeds
(:func:`seed_everything`), the check of its probabilities (:func:`check_proba`) and of an adapted encoder
(:func:`check_adapted`), and :func:`fit_and_score`: fit, predict, score, with fault isolation (whatever the method
does wrong is the cell's failure, recorded with the reason; only an encoder that cannot be built stops the run).
The executors (:mod:`hica_bench.executors`), ``hica-bench explain`` and the conformance kit (:mod:`hica_bench.testing`)
all call these same functions.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hica_bench import selection
from hica_bench.adapting import frozen_state, restore, weight_versions
from hica_bench.encoder_pairs import EncoderBuildError
from hica_bench.errors import PLUGIN_FAULTS, NotApplicable, fault_text
from hica_bench.extraction import FeatureExtractor
from hica_bench.files import digest
from hica_bench.data import split_identity
from hica_bench.interfaces import (NEEDS, Components, EncoderPair, Episode, FewShotDataset, FewShotTask, ImageEncoder,
                                   Prompts, Split)
from hica_bench.metrics import calibration, classification_metrics, multilabel_metrics, per_class
from hica_bench.registry import Choice, RunComponents
from hica_bench.results import CellKey, CellResult, Identity, NovelScore, Status, jsonable

log = logging.getLogger(__name__)

SUPPORTED_TASKS = ("binary-class", "multi-class", "multi-label")


@dataclass
class Cell:
    """A pending cell: the method, its key and identity, its support set (indices into the train split)."""

    method: Choice
    key: CellKey
    identity: Identity
    support: np.ndarray
    prompts: Prompts | None = None
    dataset_label: str = ""  #: the dataset choice's label (with a corruption, unlike ``key.dataset``)
    episode: Episode | None = None  #: what its protocol drew (None: a plain k-shot support, ``support``)
    protocol_title: str = "few-shot"  #: how tables name its protocol
    #: the dataset it runs on when it is not its grid dataset itself (cross-dataset: a
    #: :class:`~hica_bench.transfer.TransferDataset`, named by ``dataset_label``); never sent to a Ray worker
    dataset: Any = None
    #: why it is not applicable, when its method's needs tell before anything is encoded (the encoder pair cannot
    #: serve them): recorded without running (:func:`known_not_applicable`)
    not_applicable: str | None = None
    n_test: int | None = None  #: the test images it would be scored on (for a record made without running)


def scored(episode: Episode | None, labels: np.ndarray, classes: str = "base") -> tuple[np.ndarray | None, np.ndarray]:
    """(rows, labels) of the test images a cell is scored on among its ``classes`` (base-to-novel: ``base``, the classes
    it is fitted on, or ``novel``), labels renumbered 0.. in that class order; (None, labels) for every class."""
    labels = np.asarray(labels)
    chosen = None if episode is None else (episode.classes if classes == "base" else episode.novel)
    if chosen is None:
        return None, labels
    chosen = np.asarray(chosen)
    position = np.full(int(max(labels.max(initial=0), chosen.max()) + 1), -1)
    position[chosen] = np.arange(len(chosen))
    rows = np.flatnonzero(np.isin(labels, chosen))
    return rows, position[labels[rows]]


def _class_view(cell: "Cell", dataset: FewShotDataset, train_labels: np.ndarray
                ) -> tuple[list[str], np.ndarray, Prompts | None]:
    """The class names, train labels and prompt file a cell's method sees: all of them, or under base-to-novel the base
    classes only, renumbered 0.. (its support holds base-class images only)."""
    episode = cell.episode
    if episode is None or episode.classes is None:
        return list(dataset.class_names), train_labels, cell.prompts
    classes = [int(c) for c in episode.classes]
    position = np.full(len(dataset.class_names), -1)
    position[classes] = np.arange(len(classes))
    prompts = cell.prompts
    if prompts is not None:
        prompts = dataclasses.replace(prompts, classnames=tuple(prompts.classnames[c] for c in classes),
                                      descriptors=None if prompts.descriptors is None else
                                      tuple(prompts.descriptors[c] for c in classes))
    return [dataset.class_names[c] for c in classes], position[np.asarray(train_labels)], prompts


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


def known_not_applicable(method: Choice, pair: EncoderPair, encoder_label: str) -> str | None:
    """Why ``method`` cannot run on ``pair`` at all, when its declared needs tell (an aligned pair, a text encoder:
    :func:`check_needs`, from the pair's card): its cells are recorded not applicable before anything is encoded,
    with the reason a run of the cell would give. None when only running a cell can tell."""
    try:
        needs = validate_needs(getattr(method.build(), "needs", None))
    except PLUGIN_FAULTS:  # a broken constructor or needs: its cells fail on their own, with the reason
        return None
    try:
        check_needs(needs, pair, encoder_label)
    except NotApplicable as exc:
        return str(exc)
    return None


def decided_result(cell: Cell) -> CellResult:
    """The record of a cell decided not applicable before encoding (:func:`known_not_applicable`): what running it
    would record (status, reason, support and test sizes), without running it."""
    return CellResult(cell.key, cell.identity, Status.NOT_APPLICABLE, reason=cell.not_applicable,
                      n_support=len(cell.support), n_test=cell.n_test)


#: needs that take the support images' features (the train split is encoded only for a cell whose method has one)
FEATURE_NEEDS = frozenset({"image_features", "train_features", "encoders"})


def method_needs(method: Choice) -> frozenset[str]:
    """What ``method`` declares in ``needs``; every need when its constructor or its ``needs`` is broken (its cells
    then fail on their own, with the reason)."""
    try:
        return validate_needs(getattr(method.build(), "needs", None))
    except PLUGIN_FAULTS:
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
    if cell.episode is not None and cell.episode.classes is not None and needs & {"train_features", "encoders"}:
        raise NotApplicable("reads the whole train split, which holds the novel classes' images; base-to-novel fits "
                            "on the base classes' support alone")
    class_names, train_labels, prompts = _class_view(cell, dataset, train_labels)
    task = build_task(dataset=getattr(dataset, "name", key.dataset), task=dataset.task,
                      class_names=class_names, train_features=train_features, train_labels=train_labels,
                      support=cell.support, k=key.k, seed=key.seed, pair=pair, needs=needs,
                      train_images=lambda: dataset.split("train").images, cache_dir=cache_dir,
                      components=components, prompts=prompts)
    seed_everything(key.seed)
    return model, needs, task


class Rows:
    """Some rows of one split of a dataset, as a dataset of their own (every split name gives them): the images a
    selecting protocol scores a candidate on when its method adapted the encoder, encoded through that candidate's
    ``encoder_`` (:meth:`FeatureExtractor.adapted`) and cached under its identity and these rows."""

    def __init__(self, dataset: FewShotDataset, split: str, rows: np.ndarray) -> None:
        from hica_bench.protocol import support_hash

        rows = np.asarray(rows, dtype=np.int64)
        whole = dataset.split(split)
        self.name, self.size, self.task = dataset.name, dataset.size, dataset.task
        self.class_names = list(dataset.class_names)
        self.volumetric = bool(getattr(dataset, "volumetric", False))
        self._split = Split(np.asarray(whole.images[rows]), np.asarray(whole.labels)[rows])
        self.identity = f"{split_identity(dataset, split)}|{split}-rows:{support_hash(rows)}"

    def split(self, name: str) -> Split:
        return self._split

    def split_identity(self, name: str) -> str:
        return self.identity


def choose(cell: Cell, dataset: FewShotDataset, pair: EncoderPair, train: tuple[np.ndarray | None, np.ndarray],
           components: Components, cache_dir: Path | None = None, validation: tuple[np.ndarray, np.ndarray] | None = None,
           test: tuple[np.ndarray, np.ndarray] | None = None, extractor: FeatureExtractor | None = None
           ) -> tuple[Choice, dict[str, Any] | None]:
    """The method (its options) the cell's protocol selects, with what ``fit_info["selection"]`` records; the cell's
    own method and None under a protocol that selects nothing. The rule (:mod:`hica_bench.selection`): each candidate
    of the method's search space is fitted on the support (or on each fold's part of it) and scored on the validation
    images (``validation``: the features and labels of the episode's validation split, indexed here by its indices),
    the held-out folds, or, for the oracle alone, ``test``. Nothing but the oracle is handed the test split. A
    candidate that adapted the encoder (``encoder_``) is scored on those images encoded through its adapted encoder
    (``extractor``), as its final fit predicts the test split."""
    episode = cell.episode
    if episode is None or episode.selection == "none":
        return cell.method, None
    about = {"protocol": cell.protocol_title, "rule": episode.selection, "metric": episode.metric}
    space = selection.searched(cell.method)
    if not space:
        return cell.method, {**about, "searched": "nothing: the method declares no search space (or every searched "
                                                  "option was set by hand); its own defaults were used"}
    train_features, train_labels = train
    if episode.selection == "validation":
        features, labels = validation if episode.validation_split == "val" else (train_features, train_labels)
        rows = np.asarray(episode.validation)
        sets = [(cell.support, None if features is None else features[rows], np.asarray(labels)[rows],
                 (episode.validation_split, rows))]
        about["scored_on"] = {"split": episode.validation_split, "images": len(rows)}
    elif episode.selection == "support-cv":
        if cell.key.k < 2:
            raise NotApplicable("support-cv cross-validates on the support set, which needs at least 2 shots per class")
        support_labels = np.asarray(train_labels)[cell.support]
        sets = [(cell.support[fit], None if train_features is None else train_features[cell.support[held]],
                 support_labels[held], ("train", cell.support[held]))
                for fit, held in selection.folds(support_labels, cell.key.k, cell.key.seed)]
        about["scored_on"] = {"split": "train", "folds": len(sets), "images": len(cell.support)}
    else:  # the oracle: test-set tuning, which exists only to measure its inflation
        features, labels = test
        sets = [(cell.support, features, np.asarray(labels), ("test", None))]
        about["scored_on"] = {"split": "test", "images": len(labels)}
    tried = selection.candidates(cell.method)
    scores = []
    for candidate in tried:
        per_set = []
        for support, features, labels, (split, rows) in sets:
            model, _, task = prepare(dataclasses.replace(cell, method=candidate, support=support), dataset, pair, train,
                                     components, cache_dir)
            model.fit(task)
            if getattr(model, "encoder_", None) is not None:  # scored through the encoder this candidate adapted
                check_adapted(model.encoder_, pair)
                if extractor is None:
                    raise ValueError("this cell's candidates adapt the encoder but it was given no extraction service")
                images = dataset if rows is None else Rows(dataset, split, rows)
                features = extractor.adapted(model.encoder_, images, split, rows=len(labels))[0]
            proba = check_proba(model.predict_proba(features), len(labels), len(dataset.class_names))
            per_set.append(selection.score(labels, proba, episode.metric))
        scores.append(float(np.mean(per_set)))
    best = int(np.argmax(scores))  # the first best, in the declared order
    return tried[best], selection.record(list(space), tried, scores, best, **about, fits=len(tried) * len(sets) + 1)


def fit_and_score(cell: Cell, dataset: FewShotDataset, pair: EncoderPair, train: tuple[np.ndarray | None, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], components: RunComponents, cache_dir: Path | None = None,
                  timeout: float | None = None, extractor: FeatureExtractor | None = None,
                  validation: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[CellResult, np.ndarray | None]:
    """One cell: build the method, fit it on the support set, predict the test features, score. Returns the result
    and the test probabilities (None unless it finished ok). Whatever the method does wrong is the cell's failure
    (fault isolation); only an encoder that cannot be built stops the run. Runs wherever the executor puts it (this
    process, or a Ray worker: :mod:`hica_bench.executors`).

    A method that adapted the encoder during ``fit`` and exposes it as ``encoder_`` predicts on the test images
    encoded through it by ``extractor`` (:meth:`FeatureExtractor.adapted`: the run's preprocessing and batching), not
    on the frozen ``test`` features; without ``encoder_`` it gets the frozen ones. A method that changed the frozen
    encoder's weights in place fails (they serve every other cell and the feature cache).

    Under a selecting protocol the method's options are chosen first (:func:`choose`, within the cell's time limit);
    the chosen method is then built, fitted and scored as above, and ``fit_info["selection"]`` records the search
    (``timings.fit_s`` includes its time: ``fit_info`` holds only what the cell computed, the same on every run).

    A multi-label dataset's cell is scored one-vs-rest (:func:`one_vs_rest`)."""
    if dataset.task == "multi-label":
        return one_vs_rest(cell, dataset, pair, train, test, components, cache_dir, timeout, extractor, validation)
    test_features, all_test_labels = test
    rows, test_labels = scored(cell.episode, all_test_labels)  # base-to-novel: the base classes' test images
    n_classes = len(dataset.class_names) if rows is None else len(cell.episode.classes)
    key = cell.key
    result = CellResult(key, cell.identity, Status.OK, n_support=len(cell.support), n_test=len(test_labels))
    proba = None
    try:
        model, needs, task = prepare(cell, dataset, pair, train, components, cache_dir)
        frozen = weight_versions(pair.modules) if "encoders" in needs else None
        saved = frozen_state(pair.modules) if frozen is not None else None  # to put back what a faulty method changes
        chosen: list[dict[str, Any] | None] = [None]

        def fit_predict():
            nonlocal model, task
            start = time.perf_counter()
            try:
                if cell.episode is not None and cell.episode.selection != "none":
                    method, chosen[0] = choose(cell, dataset, pair, train, components, cache_dir, validation,
                                               test if cell.episode.selection == "test" else None, extractor)
                    model, _, task = prepare(dataclasses.replace(cell, method=method), dataset, pair, train,
                                             components, cache_dir)  # fitted again, seeded as every fit of the cell
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
            if features is None:
                features = test_features if rows is None else test_features[rows]
            proba = model.predict_proba(features)
            return proba, fit_s, time.perf_counter() - start, adapted

        # (what a timed-out cell's thread does later never reaches this result: it is filled in here only)
        proba, fit_s, predict_s, adapted = _within(timeout, fit_predict)
        if adapted is not None:
            result.adapted_encoder, result.timings.adapted_encode_s, result.timings.adapted_images_per_s = adapted
        proba = check_proba(proba, len(test_labels), n_classes)
        result.calibration = calibration(test_labels, proba.astype(np.float64))
        result.metrics = classification_metrics(test_labels, proba.astype(np.float64), result.calibration)
        result.per_class = per_class(test_labels, proba)
        if cell.episode is not None and cell.episode.novel is not None:
            result.novel = _novel(cell, model, dataset, test_features, all_test_labels)
        result.timings.fit_s, result.timings.predict_s = fit_s, predict_s
        if isinstance(getattr(model, "fit_info_", None), dict):
            result.fit_info = jsonable(model.fit_info_)  # whatever it holds (numpy values, objects), it can be written
        if chosen[0] is not None:
            result.fit_info = {**(result.fit_info or {}), "selection": jsonable(chosen[0])}
    except EncoderBuildError:
        raise  # the encoder cannot be built (bad weights, a broken plugin): bad input for the whole run, not this cell
    except NotApplicable as exc:
        _no_outcome(result, Status.NOT_APPLICABLE, str(exc))
        proba = None
    except SystemExit as exc:  # a plugin calling sys.exit() must not end the run in silence
        _no_outcome(result, Status.FAILED, f"SystemExit: the method called sys.exit({exc.code!r})")
        proba = None
    except PLUGIN_FAULTS as exc:  # fault isolation: one cell's failure never stops the grid (a real Ctrl-C does)
        _no_outcome(result, Status.FAILED, f"{type(exc).__name__}: {exc}" if isinstance(exc, Exception) else fault_text(exc))
        proba = None
        log.debug("cell %s failed:\n%s", key, traceback.format_exc())
    result.components_used = list({digest(jsonable([c.kind, c.name, c.options, c.distribution])): c
                                   for c in components.used}.values())  # each once, in the order first built
    return result, proba


class OneLabel:
    """Label ``j`` of a multi-label dataset as a binary dataset: classes ``no <label>`` and ``<label>`` (CheXzero's
    positive and negative prompts, for methods that name classes), every image, that label's column as labels."""

    def __init__(self, dataset: FewShotDataset, j: int) -> None:
        self.dataset, self.j = dataset, j
        name = dataset.class_names[j]
        self.name, self.size, self.task = dataset.name, dataset.size, "binary-class"
        self.class_names = [f"no {name}", name]
        self.identity = f"{dataset.identity}|label:{j}"
        self.volumetric = bool(getattr(dataset, "volumetric", False))

    def split(self, name: str) -> Split:
        split = self.dataset.split(name)
        return Split(split.images, np.asarray(split.labels)[:, self.j].astype(np.int64))

    def split_identity(self, name: str) -> str:
        return split_identity(self.dataset, name)


def one_vs_rest(cell: Cell, dataset: FewShotDataset, pair: EncoderPair, train: tuple[np.ndarray | None, np.ndarray],
                test: tuple[np.ndarray, np.ndarray], components: RunComponents, cache_dir: Path | None = None,
                timeout: float | None = None, extractor: FeatureExtractor | None = None,
                validation: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[CellResult, np.ndarray | None]:
    """A multi-label cell: for each label, the method fitted and scored as a binary cell (:class:`OneLabel`; the same
    support, validation set and selection rule, its options chosen per label), its positive-class probability that
    label's score; then mean AUC, mean AP and per-label AUC (:func:`hica_bench.metrics.multilabel_metrics`). Returns
    the (N, L) scores. A method that adapts the encoder is not applicable (one adapted encoder per label); the cell
    fails or is not applicable as soon as one label's does, with that label named; ``timeout`` is for all labels."""
    test_features, test_labels = test
    key, names = cell.key, list(dataset.class_names)
    result = CellResult(key, cell.identity, Status.OK, n_support=len(cell.support), n_test=len(test_labels))
    try:
        needs = check_needs(getattr(cell.method.build(), "needs", None), pair, key.encoder)
    except NotApplicable as exc:
        _no_outcome(result, Status.NOT_APPLICABLE, str(exc))
        return result, None
    except PLUGIN_FAULTS as exc:
        _no_outcome(result, Status.FAILED, f"{type(exc).__name__}: {exc}")
        return result, None
    if "encoders" in needs:
        _no_outcome(result, Status.NOT_APPLICABLE, f"adapts the encoder, which one-vs-rest scoring of a multi-label "
                                                   f"dataset would do once per label ({len(names)} adapted encoders a "
                                                   "cell); multi-label cells run on frozen features")
        return result, None
    scores = np.zeros((len(test_labels), len(names)))
    infos, used, fit_s, predict_s = [], [], 0.0, 0.0
    started = time.perf_counter()
    train_features, train_labels = train
    for j, name in enumerate(names):
        left = None if timeout is None else max(1e-3, timeout - (time.perf_counter() - started))
        prompts = cell.prompts
        if prompts is not None:
            prompts = dataclasses.replace(prompts, classnames=(f"no {prompts.classnames[j]}", prompts.classnames[j]),
                                          descriptors=None)
        one, proba = fit_and_score(
            dataclasses.replace(cell, prompts=prompts, dataset=None), OneLabel(dataset, j), pair,
            (train_features, np.asarray(train_labels)[:, j].astype(np.int64)),
            (test_features, np.asarray(test_labels)[:, j].astype(np.int64)), components, cache_dir, left, extractor,
            validation=None if validation is None else (validation[0], np.asarray(validation[1])[:, j].astype(np.int64)))
        used += one.components_used
        if one.status is not Status.OK or proba is None:
            _no_outcome(result, one.status, f"label {j} ({name}): {one.reason}")
            result.components_used = used
            return result, None
        scores[:, j] = proba[:, 1]
        infos.append(one.fit_info)
        fit_s += one.timings.fit_s or 0.0
        predict_s += one.timings.predict_s or 0.0
    result.metrics, result.multilabel = multilabel_metrics(test_labels, scores, names)
    result.timings.fit_s, result.timings.predict_s = fit_s, predict_s
    if any(info is not None for info in infos):
        result.fit_info = {"one_vs_rest": [jsonable(info) for info in infos]}
    result.components_used = list({digest(jsonable([c.kind, c.name, c.options, c.distribution])): c
                                   for c in used}.values())
    return result, scores


def _no_outcome(result: CellResult, status: Status, reason: str) -> None:
    """``result`` as a cell that did not finish: its status and reason, and none of the scores a step before the
    failure may have filled in (a record is either finished with its metrics or unfinished without them)."""
    result.status, result.reason = status, reason
    result.metrics = result.per_class = result.calibration = result.fit_info = None
    result.adapted_encoder = result.novel = result.multilabel = None


def _novel(cell: Cell, model: Any, dataset: FewShotDataset, test_features: np.ndarray, test_labels: np.ndarray
           ) -> NovelScore:
    """Base-to-novel: the fitted method on the novel classes' test images, among the novel classes named by their names
    (a prompt file's when given), through ``predict_proba_novel``; without it, not applicable on them, with the reason."""
    rows, labels = scored(cell.episode, test_labels, "novel")
    names = list(cell.prompts.classnames if cell.prompts is not None else dataset.class_names)
    novel_names = [names[int(c)] for c in cell.episode.novel]
    predict = getattr(model, "predict_proba_novel", None)
    if predict is None:
        return NovelScore(len(labels), None, "not applicable on novel classes: the method cannot name classes it was "
                                             "not fitted on (it has no predict_proba_novel)")
    proba = check_proba(predict(test_features[rows], novel_names), len(labels), len(novel_names))
    return NovelScore(len(labels), classification_metrics(labels, proba.astype(np.float64)))


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

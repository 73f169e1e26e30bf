"""What a run will do: the grid, its settings, each cell's identity, and which cells are pending.

A :class:`Grid` (encoders × datasets × methods × shots × seeds, with ``--corruptions`` expanded into datasets) and its
:class:`Settings` are validated when they are built. :func:`open_datasets` opens every dataset and checks it can run
the grid before any cell runs; :func:`encoder_job` works out, for one encoder, every cell's
:class:`~hica_bench.results.Identity` and which of them have no finished result yet (:func:`pending`), and hands them
to an executor as an :class:`EncoderJob`. Nothing here runs a method or writes a file.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from hica_bench import __version__, corruptions, data, prompts, protocol, volumes
from hica_bench.transfer import TransferDataset, transfer_label
from hica_bench import suite as suite_file
from hica_bench import cell as cell_module
from hica_bench.cell import FEATURE_NEEDS, SUPPORTED_TASKS, Cell, validate_needs
from hica_bench.devices import resolve_device
from hica_bench.encoder_pairs import encoder_pair
from hica_bench.errors import PLUGIN_FAULTS, UserError
from hica_bench.events import Events
from hica_bench.extraction import FeatureExtractor, Requested, Work
from hica_bench.interfaces import (SELECTION_METRICS, SELECTIONS, EncoderPair, Episode, EvaluationProtocol, FewShotDataset,
                                   Prompts)
from hica_bench.registry import Choice, Registry, plural
from hica_bench.results import CellKey, Identity, Origin

log = logging.getLogger("hica_bench.runner")  # the run's log lines keep the name they always had


@dataclass
class Grid:
    datasets: list[Choice]
    methods: list[Choice]
    encoders: list[Choice]  #: the grid runs over each (features computed once per encoder, dataset and split)
    shots: list[int]
    seeds: list[int]
    size: int = 28
    max_test: int | None = None
    #: the evaluation protocols (``protocol`` plugins); empty: plain k-shot episodes (:func:`protocol.sample_support`),
    #: as a grid built in code before protocols existed
    protocols: list[Choice] = field(default_factory=list)

    def __post_init__(self) -> None:
        protocol.check_shots_and_seeds(self.shots, self.seeds)
        data.check_size(self.size)
        if self.max_test is not None and self.max_test < 1:
            raise UserError(f"--max-test must be >= 1, got {self.max_test}")

    @property
    def cells(self) -> int:
        return (len(self.datasets) * max(1, len(self.protocols)) * len(self.methods) * len(self.encoders)
                * len(self.shots) * len(self.seeds))

    def position(self, encoder: int, dataset: int, method: int, k: int, seed: int, protocol_index: int = 0) -> int:
        """A cell's place in the grid's order (encoders, datasets, protocols, methods, shots, seeds; indices into each
        list): ``--shard I/N`` runs the cells whose place is I modulo N. It depends only on the command's lists, so
        every shard of one command agrees on the partition, whatever machine it runs on or what has finished (with one
        protocol, the places are those of a grid without protocols)."""
        outer = (encoder * len(self.datasets) + dataset) * max(1, len(self.protocols)) + protocol_index
        return ((outer * len(self.methods) + method) * len(self.shots) + k) * len(self.seeds) + seed


class PlainFewShot:
    """The episodes of a grid without protocols: the k-shot support alone (what the ``few-shot`` protocol draws)."""

    title = "few-shot"

    def check(self, labels: dict[str, np.ndarray], n_classes: int, shots, dataset: str, class_names) -> None:
        protocol.check_shots(list(shots), labels["train"], n_classes, dataset, list(class_names))

    def episode(self, labels: dict[str, np.ndarray], n_classes: int, k: int, seed: int, dataset: str) -> Episode:
        return Episode(protocol.sample_support(labels["train"], n_classes, k, seed, dataset))


def protocols(grid: Grid) -> list[tuple[Choice | None, Any]]:
    """(choice, built protocol) for each of the grid's protocols; (None, :class:`PlainFewShot`) for a grid without."""
    if not grid.protocols:
        return [(None, PlainFewShot())]
    built = []
    for choice in grid.protocols:
        made = _protocol_call(choice, choice.build)
        if not isinstance(made, EvaluationProtocol) or not isinstance(getattr(made, "title", None), str):
            raise UserError(f"protocol {choice.label}: its factory returned {type(made).__name__}, not an evaluation "
                            "protocol (title, check, episode)")
        built.append((choice, made))
    return built


def split_labels(dataset: FewShotDataset) -> dict[str, np.ndarray]:
    """The train and val labels a protocol draws from (a dataset without val images: an empty array)."""
    return {split: np.asarray(dataset.split(split).labels, dtype=np.int64) for split in ("train", "val")}


def check_episode(episode: Any, labels: dict[str, np.ndarray], label: str, n_classes: int | None = None) -> Episode:
    """A protocol's episode, checked: an :class:`Episode` whose support and validation indices are in range and never
    overlap (else a UserError naming the protocol)."""
    if not isinstance(episode, Episode):
        raise UserError(f"protocol {label}: episode() returned {type(episode).__name__}, not an Episode")
    train = len(labels["train"])
    support = np.asarray(episode.support)
    if support.ndim != 1 or support.dtype.kind not in "iu" or not len(support) or support.min() < 0 or support.max() >= train:
        raise UserError(f"protocol {label}: its support indices are not indices into the train split")
    if (labels["train"][support] < 0).any():
        raise UserError(f"protocol {label}: its support holds images of no class of the dataset it is scored on")
    if episode.selection not in SELECTIONS or episode.metric not in SELECTION_METRICS:
        raise UserError(f"protocol {label}: selection must be one of {', '.join(SELECTIONS)} and metric one of "
                        f"{', '.join(SELECTION_METRICS)}")
    if episode.validation is not None:
        validation = np.asarray(episode.validation)
        if episode.validation_split not in ("train", "val"):
            raise UserError(f"protocol {label}: validation_split must be train or val")
        pool = len(labels[episode.validation_split])
        if (validation.ndim != 1 or validation.dtype.kind not in "iu" or not len(validation) or validation.min() < 0
                or validation.max() >= pool):
            raise UserError(f"protocol {label}: its validation indices are not indices into the "
                            f"{episode.validation_split} split")
        if episode.validation_split == "train" and np.intersect1d(support, validation).size:
            raise UserError(f"protocol {label}: its validation set overlaps the support")
    elif episode.selection == "validation":
        raise UserError(f"protocol {label}: selection by validation needs validation indices")
    if episode.classes is not None or episode.novel is not None:
        n = n_classes if n_classes is not None else int(labels["train"].max()) + 1
        base = np.asarray(episode.classes if episode.classes is not None else [])
        novel = np.asarray(episode.novel if episode.novel is not None else [], dtype=np.int64)
        if (episode.classes is None or base.dtype.kind not in "iu" or not len(base) or base.min() < 0 or base.max() >= n
                or (len(novel) and (novel.min() < 0 or novel.max() >= n)) or np.intersect1d(base, novel).size):
            raise UserError(f"protocol {label}: its base and novel classes must be distinct class indices")
        if not np.isin(labels["train"][support], base).all():
            raise UserError(f"protocol {label}: its support holds images of classes it does not fit on")
        if episode.selection != "none":
            raise UserError(f"protocol {label}: base-to-novel episodes select nothing")
    return episode


EXECUTORS = ("in-process", "ray")  #: where cells can run (:mod:`hica_bench.executors`)


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

    def __post_init__(self) -> None:
        if self.cell_timeout is not None and not 0 < self.cell_timeout < float("inf"):
            raise UserError(f"--cell-timeout must be a positive number of seconds, got {self.cell_timeout}")
        if self.executor not in EXECUTORS:
            raise UserError(f"--executor must be in-process or ray, got {self.executor!r}")
        if self.executor != "ray" and (self.ray_address is not None or self.workers is not None):
            raise UserError(f"{'--ray-address' if self.ray_address is not None else '--workers'} needs --executor ray")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")


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
            dataset.split("test")  # a malformed test split is reported now, not after other cells ran
            if choice.prompts is not None:
                prompt_files[choice.label] = prompts.load(choice.prompts, dataset.class_names, choice.label)
            datasets[choice.label] = dataset
        for choice in grid.datasets:  # every protocol on every dataset (a transfer's source is one of them)
            for protocol_choice, made in protocols(grid):
                on, _ = protocol_dataset(grid, choice, datasets[choice.label], protocol_choice, made, datasets)
                labels = split_labels(on)
                where = on.source_label if isinstance(on, TransferDataset) else choice.label
                _protocol_call(protocol_choice, made.check, labels, len(on.class_names), list(grid.shots), where,
                               list(on.class_names))
    return datasets, prompt_files


def protocol_dataset(grid: Grid, choice: Choice, dataset: FewShotDataset, protocol_choice: Choice | None, made: Any,
                     datasets: dict[str, FewShotDataset] | None) -> tuple[FewShotDataset, str]:
    """(the dataset a protocol's cells of ``choice`` run on, its label): the dataset itself, or for a protocol with a
    ``support_from`` (cross-dataset) a :class:`~hica_bench.transfer.TransferDataset` from that grid dataset's train split to
    this one's test split, its classes matched by the protocol's ``match``."""
    source = getattr(made, "support_from", None)
    if not source:
        return dataset, choice.label
    label = protocol_choice.label if protocol_choice is not None else "few-shot"
    if not isinstance(source, str) or datasets is None:
        raise UserError(f"protocol {label}: source must name one of the grid's datasets")
    named = [c for c in grid.datasets if c.corruption is None and source in (c.name, c.label)]
    if len(named) != 1:
        shown = ", ".join(sorted({c.base_label for c in grid.datasets}))
        problem = "is not one of" if not named else "names more than one of"
        raise UserError(f"protocol {label}: source={source} {problem} the grid's datasets ({shown}); "
                        + ("add it to --datasets" if not named else "name one by its label"))
    source_choice = named[0]
    source_dataset = datasets[source_choice.label]
    if volumes.volumetric(source_dataset) != volumes.volumetric(dataset):
        raise UserError(f"protocol {label}: {source_choice.label} and {choice.label} are not both 2D or both 3D")
    class_map = np.asarray(_protocol_call(protocol_choice, made.match, list(source_dataset.class_names),
                                          list(dataset.class_names), source_choice.label, choice.base_label))
    if (class_map.shape != (len(dataset.class_names),) or class_map.dtype.kind not in "iu" or class_map.min() < 0
            or class_map.max() >= len(source_dataset.class_names) or len(set(class_map.tolist())) != len(class_map)):
        raise UserError(f"protocol {label}: match() must give each target class its own source class index")
    return (TransferDataset(source_dataset, dataset, class_map, source_choice.label, choice.label),
            transfer_label(source_choice.label, choice.label))


def describe_dataset(label: str, dataset: FewShotDataset, prompt_file: Prompts | None = None) -> str:
    """One line: the dataset's classes in label order (with the prompt file's names), and its split sizes."""
    names = [name if prompt_file is None or prompt_file.classnames[i] == name else f"{name} ({prompt_file.classnames[i]!r})"
             for i, name in enumerate(dataset.class_names)]
    sizes = ", ".join(f"{len(dataset.split(s).labels)} {s}" for s in ("train", "val", "test"))
    kind = "labels (multi-label)" if dataset.task == "multi-label" else "classes"
    return f"{label}: {len(names)} {kind}: {', '.join(f'{i}={n}' for i, n in enumerate(names))}; {sizes}"


def describe_datasets(grid: Grid, datasets: dict[str, FewShotDataset], prompt_files: dict[str, Prompts]) -> list[str]:
    """One line per dataset (:func:`describe_dataset`), and one per dataset for all its corrupted copies (set,
    corruptions, severities), not one per copy."""
    lines = [describe_dataset(label, dataset, prompt_files.get(label)) for label, dataset in datasets.items()
             if getattr(dataset, "corruption", None) is None]
    corrupted: dict[str, list] = {}
    for choice in grid.datasets:
        if choice.corruption is not None:
            corrupted.setdefault(choice.base_label, []).append(datasets[choice.label])
    for label, copies in corrupted.items():
        names = sorted({c.corruption for c in copies})
        levels = sorted({c.severity for c in copies})
        lines.append(f"{label}: test split also corrupted ({copies[0].set} set): {len(names)} corruptions "
                     f"({', '.join(names)}) x severities {','.join(map(str, levels))}")
    return lines


def _protocol_call(choice: Choice | None, call: Callable[..., Any], *args: Any) -> Any:
    """A protocol plugin's ``check`` or ``episode``: its UserError as it is; any other fault as one UserError naming
    it (a protocol that cannot draw its episodes is bad input for the whole grid, found before any cell runs)."""
    try:
        return call(*args)
    except UserError:
        raise
    except PLUGIN_FAULTS as exc:
        label = choice.label if choice is not None else "few-shot"
        raise UserError(f"protocol {label}: {call.__name__} failed: {' '.join(str(exc).split())[:300] or type(exc).__name__}") from None


def episodes(grid: Grid, dataset_choice: Choice, dataset: FewShotDataset,
             datasets: dict[str, FewShotDataset] | None = None) -> list[tuple[Choice | None, Any, dict, Any, str]]:
    """For each of the grid's protocols: (choice, built protocol, {(k, seed): its checked :class:`Episode`}, the
    dataset its cells run on and that dataset's label: :func:`protocol_dataset`). Episodes are drawn by the dataset's
    name, not its label: options (a folder's path, a prompt file) change nothing; a transfer's by its source's name."""
    drawn = []
    for choice, made in protocols(grid):
        on, on_label = protocol_dataset(grid, dataset_choice, dataset, choice, made, datasets)
        labels = split_labels(on)
        n_classes = len(on.class_names)
        name = getattr(on, "draw_name", None) or getattr(on, "name", dataset_choice.label)
        label = choice.label if choice is not None else "few-shot"
        drawn.append((choice, made, {(k, seed): check_episode(_protocol_call(choice, made.episode, labels, n_classes, k,
                                                                             seed, name), labels, label, n_classes)
                                     for k in grid.shots for seed in grid.seeds}, on, on_label))
    return drawn


def pending(grid: Grid, registry: Registry, dataset_choice: Choice, dataset: FewShotDataset, encoder: Choice,
             pair: EncoderPair, extractor: FeatureExtractor, device: str, finished: set[str],
             prompt_file: Prompts | None = None,
             in_shard: Callable[[int, int, int, int], bool] = lambda p, m, k, s: True,
             datasets: dict[str, FewShotDataset] | None = None) -> tuple[list[Cell], int, int]:
    """This dataset's cells with ``encoder`` whose identity has no finished result yet, how many were skipped, and how
    many belong to other shards (``in_shard(protocol, method, k, seed)``: indices into the grid's lists). A cell's
    identity holds its protocol (and its validation set) only when its episode is more than a plain k-shot support.
    ``datasets``: the grid's datasets by label (a cross-dataset protocol's source is one of them)."""
    pending, skipped, elsewhere = [], 0, 0
    known = {method.label: cell_module.known_not_applicable(method, pair, encoder.label) for method in grid.methods}
    for p, (protocol_choice, made, drawn, on, on_label) in enumerate(episodes(grid, dataset_choice, dataset, datasets)):
        test_labels = np.asarray(on.split("test").labels)
        test_labels = test_labels[:rows(grid, "test", len(test_labels))]
        for m, method in enumerate(grid.methods):
            origin = Origin(
                harness=__version__, dataset=dataset_choice.ref, dataset_identity=dataset.identity, size=grid.size,
                max_test=grid.max_test, encoder=encoder.ref, features=extractor.identity_for(dataset).as_dict(),
                text_encoder=pair.card.text, method=method.ref,
                method_components=registry.components_of(method), device=device.split(":")[0],
                prompts=None if prompt_file is None else prompt_file.digest,
                corruption=dataset.describe() if dataset_choice.corruption is not None else None,
                support_from=None if on is dataset else {"dataset": on.source_label, "identity": on.source.identity,
                                                         "classes": on.class_map.tolist()})
            for k_index, k in enumerate(grid.shots):
                for seed_index, seed in enumerate(grid.seeds):
                    if not in_shard(p, m, k_index, seed_index):
                        elsewhere += 1
                        continue
                    episode = drawn[k, seed]
                    identity = Identity(origin, k, seed, protocol.support_hash(episode.support))
                    if not episode.plain or on is not dataset:  # a transfer's cells name their protocol (source)
                        identity = Identity(dataclasses.replace(origin, protocol=protocol_choice.ref), k, seed,
                                            identity.support, None if episode.validation is None else
                                            f"{episode.validation_split}:{protocol.support_hash(episode.validation)}")
                    if identity.id in finished:
                        skipped += 1
                        continue
                    key = CellKey(dataset_choice.base_label, grid.size, method.label, encoder.label, k, seed,
                                  grid.max_test, *(dataset_choice.corruption or (None, None)),
                                  protocol=protocol_choice.label if protocol_choice is not None else "few-shot")
                    pending.append(Cell(method, key, identity, np.asarray(episode.support), prompt_file, on_label,
                                        episode=episode, protocol_title=made.title,
                                        dataset=on if on is not dataset else None,
                                        not_applicable=known[method.label],
                                        n_test=len(cell_module.scored(episode, test_labels)[1])))
    return pending, skipped, elsewhere


def splits(needs: Iterable[frozenset[str]]) -> tuple[str, ...]:
    """The splits to encode for methods with these needs: the train split only when one reads support features."""
    return ("train", "test") if any(n & FEATURE_NEEDS for n in needs) else ("test",)


def rows(grid: Grid, split: str, n: int) -> int:
    """How many of a split's ``n`` images the grid evaluates (``--max-test`` cuts the test split)."""
    return min(grid.max_test, n) if split == "test" and grid.max_test is not None else n


def work(grid: Grid, datasets: dict[str, FewShotDataset], needs: dict[str, frozenset[str]],
          volume: Any = None) -> Work:
    """The most the grid can encode with one encoder (every needed split of every dataset; finished cells and cached
    features can only make it less): a settings probe is budgeted by it and times real batches of its first split
    (for volumes: 2D slices, counted as such)."""
    options = volume or volumes.VolumeOptions()
    parts = [(dataset, split) for dataset in datasets.values() for split in splits(needs.values())]
    # corrupted copies of a dataset share its train split: count it once
    unique = {(data.split_identity(dataset, split), split): (dataset, split) for dataset, split in parts}

    def images(dataset: FewShotDataset, split: str) -> int:
        n = rows(grid, split, len(dataset.split(split).labels))
        if volumes.volumetric(dataset):
            shape = dataset.split(split).images.shape
            n *= sum(len(range(shape[1 + axis])[options.kept(shape[1 + axis])]) for axis in options.axes)
        return n

    count = sum(images(dataset, split) for dataset, split in unique.values())
    if not parts:
        return Work(np.zeros((0, 1, 1), np.uint8), 0)
    dataset, split = parts[0]
    if volumes.volumetric(dataset):  # the probe times slices, as the extraction will encode them
        sample = dataset.split(split).images[:8]
        axis = options.axes[0]
        return Work(volumes.slices(sample, axis, options.kept(sample.shape[1 + axis])), count)
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
    #: pending cells decided not applicable before encoding (their methods' needs tell): recorded, never run
    decided: list[Cell] = field(default_factory=list)

    def splits(self, dataset: FewShotDataset, cells: list[Cell]) -> list[tuple[str, np.ndarray]]:
        """The splits these cells need encoded, each with the labels of the rows they use (zero-shot alone: no train
        split; ``--max-test N``: the first N test images); a selecting protocol's validation images too (the val
        split, or the train split for a validation set drawn from it and for cross-validation on the support)."""
        wanted = set(splits(self.needs[cell.method.label] for cell in cells))
        for cell in cells:
            episode = cell.episode
            if episode is not None and episode.selection == "validation":
                wanted.add(episode.validation_split)
            elif episode is not None and episode.selection == "support-cv":
                wanted.add("train")
        out = []
        for split in (s for s in ("train", "val", "test") if s in wanted):
            labels = np.asarray(dataset.split(split).labels)
            out.append((split, labels[:rows(self.grid, split, len(labels))]))
        return out

    def features(self, label: str, dataset: FewShotDataset, cells: list[Cell]
                 ) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
        """split -> (features, labels) for these cells, from the extraction service in this process (the train split
        without features when no method reads them)."""
        splits = {}
        for split, labels in self.splits(dataset, cells):
            # a transfer's train and val splits are its source's (read as the source, so named so)
            read, shown = ((dataset.source, dataset.source_label) if isinstance(dataset, TransferDataset)
                           and split != "test" else (dataset, label))
            features, record = self.extractor.features(read, split, self.events.split(shown, split, len(labels)),
                                                       rows=len(labels))
            self.events.split_done(record)
            splits[split] = (features, labels)
        splits.setdefault("train", (None, np.asarray(dataset.split("train").labels)))
        return splits

    def test_labels(self, cell: Cell) -> tuple[np.ndarray, np.ndarray]:
        """The labels of the test rows ``cell`` was scored on (base-to-novel: the base classes', renumbered as its
        probabilities' columns), and those rows' indices into the test split."""
        dataset = next(d for label, d, _ in self.work if label == cell.dataset_label)
        labels = np.asarray(dataset.split("test").labels)
        labels = labels[:rows(self.grid, "test", len(labels))]
        picked, scored_labels = cell_module.scored(cell.episode, labels)
        return scored_labels, np.arange(len(labels)) if picked is None else picked


def encoder_job(grid: Grid, settings: Settings, registry: Registry, events: Events, index: int, encoder: Choice,
                datasets: dict[str, FewShotDataset], prompt_files: dict[str, Prompts],
                needs: dict[str, frozenset[str]], finished: set[str]) -> tuple[EncoderJob, int, int]:
    """The grid's cells with ``encoder`` (the ``index``-th of the grid's encoders) that are pending (no finished result
    with their identity in ``finished``) and in this shard, as an :class:`EncoderJob`; with how many were skipped as
    finished and how many belong to other shards. The encoder's extraction settings are chosen here (they are part of
    every identity); its models are built only when something needs them."""
    pair = encoder_pair(encoder, settings.device, settings.cache_dir)
    flat = [label for label, dataset in datasets.items() if not volumes.volumetric(dataset)]
    if pair.card.volumetric and flat:
        raise UserError(f"encoder {encoder.label} is a 3D encoder (it takes whole volumes); {flat[0]} holds 2D images: "
                        "use a 2D encoder for it")
    extractor = FeatureExtractor(pair, settings.cache_dir, settings.extraction, log=log.info,
                                 work=work(grid, datasets, needs, settings.volume), volume=settings.volume)
    events.stage(f"{encoder.label}: encoder settings (probed once per encoder and machine, then remembered)")
    extractor.tuning  # chosen now, before any cell (the settings are part of every identity)
    cells_by_dataset, skipped, elsewhere, decided = [], 0, 0, []
    for d, choice in enumerate(grid.datasets):
        dataset = datasets[choice.label]
        in_shard = (lambda p, m, k, s, d=d: True) if settings.shard is None else (
            lambda p, m, k, s, d=d: grid.position(index, d, m, k, s, p) % settings.shard[1] == settings.shard[0])
        cells, skipped_here, elsewhere_here = pending(grid, registry, choice, dataset, encoder, pair, extractor,
                                                      settings.device, finished, prompt_files.get(choice.label), in_shard,
                                                      datasets)
        skipped += skipped_here
        elsewhere += elsewhere_here
        decided += [c for c in cells if c.not_applicable is not None]
        cells = [c for c in cells if c.not_applicable is None]
        cells_by_dataset.append((choice.label, dataset, [c for c in cells if c.dataset is None]))
        for label in dict.fromkeys(c.dataset_label for c in cells if c.dataset is not None):  # transfers, in grid order
            theirs = [c for c in cells if c.dataset_label == label]
            cells_by_dataset.append((label, theirs[0].dataset, theirs))
    job = EncoderJob(grid, settings, registry, events, encoder, pair, extractor, needs, cells_by_dataset, decided)
    return job, skipped, elsewhere



# --------------------------------------------------------------------------- a suite and flags -> grid and settings


@dataclass
class RunRequest:
    """What ``hica-bench run`` was asked for: a suite file and the flags given beside it, as given (None: not given).
    A flag overrides the suite's value; what neither gives comes from :data:`DEFAULTS` or the installed plugins' default
    suite. :func:`configure` turns it into the run's :class:`Grid` and :class:`Settings`."""

    suite: Path | None = None
    datasets: str | None = None
    methods: str | None = None
    encoders: str | None = None
    protocols: str | None = None
    shots: str | None = None
    seeds: str | None = None
    size: int | None = None
    max_test: int | None = None
    out: Path | None = None
    corruptions: str | None = None
    severities: str | None = None
    slice_axis: str = "0"
    slice_pool: str = "mean"
    slice_step: int = 1
    device: str = "auto"
    extraction: Requested = field(default_factory=Requested)
    data_root: str | None = None
    cache_dir: str | None = None
    download: bool = True
    cell_timeout: float | None = None
    force: bool = False
    save_predictions: bool = False
    report: bool = True
    skip_bad_images: bool = False
    executor: str = "in-process"
    ray_address: str | None = None
    workers: int | None = None
    shard: str | None = None


#: A run's values when neither a flag nor the suite gives them (datasets, methods and encoders: the plugins' defaults).
DEFAULTS = {"shots": [1, 5, 20], "seeds": list(range(10)), "size": 28, "max_test": None, "out": "hica-bench-results",
            "corruptions": None, "severities": None}


def configure(request: RunRequest, registry: Callable[[], Registry]) -> tuple[Grid, Settings]:
    """The grid and settings of ``request``, every value checked (by :class:`Grid`, :class:`Settings` and the registry)
    before anything runs: a bad value is one UserError. ``registry()`` loads the run's registry (after the values that
    need none are checked). Creates ``--out`` (checked writable, with room for the leaderboards)."""
    given = suite_file.load(request.suite) if request.suite is not None else suite_file.Suite()
    where = f"suite {request.suite}"

    def value(key: str, parse: Callable[[Any, str], Any] | None = None) -> Any:
        flag = getattr(request, key)
        if flag is not None:
            return parse(flag, f"--{key.replace('_', '-')}") if parse is not None else flag
        from_suite = getattr(given, key)
        return from_suite if from_suite is not None and from_suite != [] else DEFAULTS[key]

    shots, seeds = value("shots", suite_file.int_list), value("seeds", suite_file.int_list)
    # the settings that need no registry, checked now (the rest are filled in below)
    settings = Settings(extraction=request.extraction, cell_timeout=request.cell_timeout, executor=request.executor,
                        ray_address=request.ray_address, workers=request.workers,
                        shard=parse_shard(request.shard) if request.shard is not None else None)
    plugins = registry()

    def each(kind: str, option: str) -> list[Choice]:
        key = plural(kind)
        flag, from_suite = getattr(request, key), getattr(given, key)
        if flag is None and from_suite:
            return choose_each(plugins, kind, from_suite, f"{where} {key}")
        return choose_each(plugins, kind, suite_file.name_list(
            flag if flag is not None else default_names(plugins, kind, option), option), option)

    dataset_choices = each("dataset", "--datasets")
    volume = volumes.VolumeOptions(request.slice_axis, request.slice_pool, request.slice_step)  # checked before anything runs
    corruption_names = value("corruptions", suite_file.name_list)
    severity_list = value("severities", suite_file.int_list)
    if request.skip_bad_images:  # the option of every dataset that declares it
        dataset_choices = [dataclasses.replace(c, options={**c.options, "skip_bad_images": True})
                           if "skip_bad_images" in c.registered.spec.options else c for c in dataset_choices]
    grid = Grid(datasets=corruptions.variants(dataset_choices, corruption_names, severity_list),
                methods=each("method", "--methods"), encoders=each("encoder", "--encoders"),
                shots=shots, seeds=seeds, size=value("size"), max_test=value("max_test"),
                protocols=each("protocol", "--protocols"))
    for method in grid.methods:  # option values its constructor rejects, or needs it cannot declare, are bad input
        try:
            needs = getattr(method.build(), "needs", None)
        except UserError:
            raise
        except PLUGIN_FAULTS:  # a broken constructor or needs is the plugin's fault: its cells record it and fail
            continue
        try:
            validate_needs(needs)
        except ValueError as exc:
            raise UserError(f"method {method.label}: {exc}") from None
    device = resolve_device(request.device)
    out_dir = Path(request.out) if request.out is not None else Path(given.out or DEFAULTS["out"])
    if settings.shard is not None:  # each shard its own results file (and lock): `hica-bench merge` combines them
        out_dir = out_dir / f"shard-{settings.shard[0]}-of-{settings.shard[1]}"
    out_dir = data.writable_dir(out_dir, "--out folder")
    for name in ("leaderboard.md", "leaderboard.csv"):  # written after the grid: a folder in the way is found now
        data.writable_file(out_dir / name, "leaderboard file")
    return grid, dataclasses.replace(
        settings, device=device, data_root=data.data_root(request.data_root), cache_dir=data.cache_root(request.cache_dir),
        out_dir=out_dir, download=request.download, force=request.force, save_predictions=request.save_predictions,
        report=request.report, volume=volume)


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> (1, 4): shard 1 of 4, numbered from 0 (a Slurm array's ``$SLURM_ARRAY_TASK_ID`` with --array=0-3)."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise UserError(f"--shard takes I/N, e.g. 0/4 (shard I of N, from 0); got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: I must be 0 to N-1 and N >= 1")
    return i, n


def default_names(registry: Registry, kind: str, option: str) -> str:
    """The names of ``kind`` the installed plugins declare as the default suite (comma list), for an option left out."""
    names = registry.default_suite(kind)
    if not names:
        raise UserError(f"no installed plugin declares a default {kind}; name {plural(kind)} with {option}")
    if kind == "encoder" and len(names) > 1:
        raise UserError(f"installed plugins declare {len(names)} default encoders ({', '.join(names)}); choose one with --encoder")
    return ",".join(names)


def choose_each(registry: Registry, kind: str, names: list[str], option: str) -> list[Choice]:
    """``names`` (of ``option`` or a suite) as choices of ``kind``; two spellings of one thing (``prototype`` and
    ``prototype:temperature=0.05``, its default) would run every cell twice, and are refused."""
    chosen, spelled = [], {}
    for name in names:
        choice = registry.choose(kind, name)
        if choice.label in spelled:
            raise UserError(f"{option} names {choice.label} twice: {spelled[choice.label]!r} and {name!r} are the same "
                            "(options at their defaults are left out)")
        spelled[choice.label] = name
        chosen.append(choice)
    return chosen

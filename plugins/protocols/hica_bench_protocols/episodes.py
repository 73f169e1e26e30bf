"""The k-shot protocols: what each cell fits on, and how each method's options are chosen.

- ``few-shot``: the support set alone; each method keeps its own defaults and rules (the linear probe's
  cross-validation on the support, Tip-Adapter's leave-one-out, ...). The harness's behaviour before protocols
  existed: its cells keep their identities.
- ``few-shot-val``: one model-selection rule for every method. A k-shot validation set (min(k, 4) images per class,
  as Dassl's few-shot validation for CoOp/CoCoOp), disjoint from the support, nested across k, drawn by
  :func:`hica_bench.protocol.sample_validation`; each candidate of the method's search space (its spec's ``search``)
  is fitted on the support and scored on it; the best is fitted again and predicts the test split.
- ``support-cv``: the same search scored by stratified cross-validation on the support alone (the "realistic"
  setting of Silva-Rodríguez et al., CVPR 2024); needs 2 shots per class.
- ``oracle``: the same search scored on the test split. It exists only to measure how much test-set tuning inflates
  a method (the report's inflation table: oracle − few-shot-val); never in a default suite.
- ``base-to-novel``: CoCoOp's generalisation test: fitted on the base half of the classes, scored on base and on
  novel classes, with their harmonic mean.
- ``cross-dataset``: fitted on one of the grid's datasets (``source``), scored on each grid dataset's test split, the
  classes matched by name or by a mapping file (domain shift, as clinical transfer is judged).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hica_bench import protocol
from hica_bench.interfaces import SELECTION_METRICS, Episode, Option, PluginSpec


class FewShot:
    """The support set alone (:func:`hica_bench.protocol.sample_support`); no selection."""

    title = "few-shot"

    def check(self, labels: dict[str, np.ndarray], n_classes: int, shots: Sequence[int], dataset: str,
              class_names: Sequence[str]) -> None:
        protocol.check_shots(list(shots), labels["train"], n_classes, dataset, list(class_names))

    def episode(self, labels: dict[str, np.ndarray], n_classes: int, k: int, seed: int, dataset: str) -> Episode:
        return Episode(protocol.sample_support(labels["train"], n_classes, k, seed, dataset))


class FewShotVal(FewShot):
    """A k-shot validation set for every method (``per_class``: images per class, 0 = min(k, 4); ``source``: auto =
    the val split when it holds enough of every class, else the rest of train); ``metric``: what the search
    maximises."""

    title = "few-shot-val"

    def __init__(self, per_class: int = 0, source: str = "auto", metric: str = "balanced_acc") -> None:
        self.per_class, self.source, self.metric = per_class, source, metric

    def check(self, labels, n_classes, shots, dataset, class_names) -> None:
        super().check(labels, n_classes, shots, dataset, class_names)
        protocol.check_validation(list(shots), labels, n_classes, dataset, self.per_class, self.source, list(class_names))

    def episode(self, labels, n_classes, k, seed, dataset) -> Episode:
        where, validation = protocol.sample_validation(labels, n_classes, k, seed, dataset, self.per_class, self.source)
        return Episode(protocol.sample_support(labels["train"], n_classes, k, seed, dataset), validation, where,
                       "validation", self.metric)


class _SearchedOnTheSupport(FewShot):
    """The support set alone, with the search scored by ``rule`` (a selection without validation images)."""

    rule = "none"

    def __init__(self, metric: str = "balanced_acc") -> None:
        self.metric = metric

    def episode(self, labels, n_classes, k, seed, dataset) -> Episode:
        return Episode(protocol.sample_support(labels["train"], n_classes, k, seed, dataset), selection=self.rule,
                       metric=self.metric)


class SupportCV(_SearchedOnTheSupport):
    """The search scored by stratified cross-validation on the support alone (min(k, 5) folds)."""

    title, rule = "support-cv", "support-cv"


class Oracle(_SearchedOnTheSupport):
    """The search scored on the test split: test-set tuning, to measure its inflation; never a result to publish."""

    title, rule = "oracle (test-set tuning)", "test"


class BaseToNovel(FewShot):
    """CoCoOp's base-to-novel generalisation: the classes split into base and novel (``split``: ``first-half``, CoCoOp's
    rule, or ``seeded`` by ``split_seed``); the method is fitted on k-shot supports of the base classes only, scored on
    the base classes' test images among the base classes, and on the novel classes' test images among the novel
    classes (if it can name unseen classes); tables report base, novel and their harmonic mean (HM)."""

    title = "base-to-novel"

    def __init__(self, split: str = "first-half", split_seed: int = 0) -> None:
        self.split, self.split_seed = split, split_seed

    def check(self, labels, n_classes, shots, dataset, class_names) -> None:
        from hica_bench.errors import UserError

        if protocol.multilabel(labels["train"]):
            raise UserError(f"{dataset} is multi-label; base-to-novel splits single-label classes")
        try:
            protocol.class_split(n_classes, self.split, self.split_seed)
        except UserError as exc:
            raise UserError(f"{dataset}: {exc}") from None
        super().check(labels, n_classes, shots, dataset, class_names)

    def episode(self, labels, n_classes, k, seed, dataset) -> Episode:
        base, novel = protocol.class_split(n_classes, self.split, self.split_seed)
        return Episode(protocol.sample_support(labels["train"], n_classes, k, seed, dataset, classes=base),
                       classes=base, novel=novel)


class CrossDataset(FewShotVal):
    """Clinical transfer: supports (and validation sets) drawn from the grid dataset ``source`` (its own few-shot
    supports: the same seed names the same images), scored on each grid dataset's test split (the source's own:
    the in-domain diagonal of the transfer table). Classes are matched by name (case, spaces, ``_`` and ``-`` aside)
    or by ``mapping``, a JSON/YAML/TOML table of target class name = source class name; source classes no target
    class maps to are left out of the support. ``select``: ``none`` (each method's own defaults, as ``few-shot``) or
    ``validation`` (``few-shot-val``'s rule, its validation set from the source)."""

    title = "cross-dataset"

    def __init__(self, source: str = "", mapping: str = "", select: str = "none", per_class: int = 0,
                 metric: str = "balanced_acc") -> None:
        from hica_bench.errors import UserError

        if not source:
            raise UserError("protocol cross-dataset needs source=DATASET: the grid dataset its supports come from")
        super().__init__(per_class, "auto", metric)
        self.support_from, self.mapping, self.select = source, mapping, select

    def match(self, source_classes: Sequence[str], target_classes: Sequence[str], source: str, target: str) -> np.ndarray:
        mapping = protocol.read_mapping(self.mapping) if self.mapping else None
        return protocol.match_classes(source_classes, target_classes, source, target, mapping,
                                      f"class mapping {self.mapping}")

    def check(self, labels, n_classes, shots, dataset, class_names) -> None:
        if self.select == "validation":
            super().check(labels, n_classes, shots, dataset, class_names)
        else:
            FewShot.check(self, labels, n_classes, shots, dataset, class_names)

    def episode(self, labels, n_classes, k, seed, dataset) -> Episode:
        if self.select == "validation":
            return super().episode(labels, n_classes, k, seed, dataset)
        return FewShot.episode(self, labels, n_classes, k, seed, dataset)


_METRIC = Option(choices=SELECTION_METRICS)

SPECS = [
    PluginSpec("protocol", "few-shot", "k-shot support from the train split, the whole test split; each method's own "
               "defaults", FewShot, in_default_suite=True),
    PluginSpec("protocol", "few-shot-val", "one selection rule for every method: its search space scored on a k-shot "
               "validation set (min(k, 4) per class, disjoint from the support)", FewShotVal,
               {"per_class": Option(low=0, high=64), "source": Option(choices=("auto", "val", "train")),
                "metric": _METRIC}),
    PluginSpec("protocol", "support-cv", "the search scored by cross-validation on the support alone (k >= 2)",
               SupportCV, {"metric": _METRIC}),
    PluginSpec("protocol", "base-to-novel", "CoCoOp's base-to-novel: fitted on the base half of the classes, scored on "
               "base and on novel classes (HM); 3 classes or more", BaseToNovel,
               {"split": Option(choices=("first-half", "seeded")), "split_seed": Option(low=0)}),
    PluginSpec("protocol", "cross-dataset", "fitted on the grid dataset source=NAME, scored on every grid dataset's "
               "test split (classes matched by name or mapping=FILE); a transfer table", CrossDataset,
               {"select": Option(choices=("none", "validation")), "per_class": Option(low=0, high=64),
                "metric": _METRIC}),
    PluginSpec("protocol", "oracle", "the search scored on the test split: test-set tuning, only to measure its "
               "inflation", Oracle, {"metric": _METRIC}),
]

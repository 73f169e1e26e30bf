"""The typed, versioned result schema: what one cell's record holds.

The versioned, typed result schema and the JSONL results store (append-only, resumable).

A result (:class:`CellResult`) says which cell it is in two ways:

- :class:`CellKey`, the *label* the tables show: dataset, size, method and encoder (with their non-default
  options), k, seed, ``max_test``;
- :class:`Identity`, *everything that determines its numbers*: the :class:`Origin` (hica-bench's version; the
  dataset plugin, its options and its files' digest; the encoder plugin, its options, the image encoder's identity
  with its weights digest, preprocessing, precision, backend and device; the text encoder's identity; the method
  plugin with its distribution, version, full resolved options and the components those options name; the device
  the method ran on; size and ``max_test``) plus k, seed and the support set's digest.

``cell_id`` (a digest of the identity) is what resume compares: a rerun skips a cell only when a finished result
with the same identity exists, so a new checkpoint, backend, plugin version, option default or dataset file reruns
exactly the cells it affects. Old results stay in the file. Tables group by ``origin_id`` and never average
results of different origins (see :mod:`hica_bench.leaderboard`).

Schema history: 1 had the label and no identity; such records are read as *legacy* (``identity`` None): shown, never
averaged with identified results, never used to skip a cell. 2 adds the identity and typed records. 3 adds per-class
recall and precision with the confusion matrix (:class:`PerClass`) and the file of saved predictions; schema-2
records read with neither. 4 adds the paired timing. 5 adds the prompt file's digest to the origin (``prompts``),
the expected calibration error (``metrics.ece``) and the reliability diagram (:class:`Calibration`); older records
read with none of them, and an origin without a prompt file keeps the id it had before. 6 adds, for a method that
adapted the encoder, the adapted encoder's identity (``adapted_encoder``) and the cost of encoding the test images
through it (``timings.adapted_encode_s``, ``adapted_images_per_s``); older records read with none. 7 adds the
corruption of the test split (robustness track, :mod:`hica_bench.corruptions`): ``key.corruption`` and
``key.severity`` (None for clean cells) and its definition in the origin (``corruption``: name, severity, parameter,
set, definitions version); older records read as clean, and a clean origin keeps the id it had before. 8 adds the
evaluation protocol (``key.protocol``, ``origin.protocol``, ``identity.validation``); older records read as plain
few-shot cells. 9 adds the novel classes' score (``novel``, base-to-novel). 10 adds multi-label scores
(``multilabel``) and the source of a cross-dataset support set (``origin.support_from``). 11 adds the commit's time to
the environment (``environment.git_time``, what ``hica-bench history`` orders commits by); older records read with
None. The environment is not part of the identity, so no cell id changed with it.

Reading and writing records is :mod:`hica_bench.results.codec`; older schemas are upgraded by
:mod:`hica_bench.results.migrations`; the JSONL file is :mod:`hica_bench.results.store`.
"""

from __future__ import annotations

import enum
import functools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hica_bench.files import digest
from hica_bench.results import migrations
from hica_bench.results.codec import jsonable, known, reader, typed

SCHEMA_VERSION = 11
LEGACY = "legacy"  #: the ``origin_id`` of schema-1 records, whose origin was not recorded


class Status(str, enum.Enum):
    OK = "ok"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"

    @property
    def finished(self) -> bool:
        """A rerun keeps ok and not-applicable results; failed cells are retried."""
        return self is not Status.FAILED

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Metrics:
    """Scores of one cell on its test images, as fractions in [0, 1] (AUC may be NaN: one class evaluated)."""

    acc: float
    auc: float
    f1_macro: float
    balanced_acc: float
    #: expected calibration error of the predicted class's probability, 15 equal-width bins (Guo et al. 2017); None in
    #: records before schema 5
    ece: float | None = None

    def __post_init__(self) -> None:
        for name in ("acc", "auc", "f1_macro", "balanced_acc", "ece"):
            value = getattr(self, name)
            if value is None and name == "ece":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"metrics.{name} must be a number, got {type(value).__name__}")
            if math.isnan(value) and name == "auc":  # undefined with one class evaluated
                continue
            if not 0 <= value <= 1:  # NaN and infinity fail this too
                raise ValueError(f"metrics.{name} must be a fraction in [0, 1], got {value}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class NovelScore:
    """Base-to-novel: how a cell did on the classes its method never saw, scored among themselves on their test images
    (schema 9 on). ``metrics`` None, with ``reason``: the method cannot name unseen classes."""

    n_test: int
    metrics: Metrics | None = None
    reason: str | None = None


@dataclass(frozen=True)
class MultiLabelScore:
    """A multi-label cell's scores (schema 10 on): each label scored one-vs-rest on every test image. ``mean_auc`` and
    ``mean_ap``: the means over the labels whose test images hold both outcomes (the others' AUC and AP are None);
    per label (in the dataset's label order) its AUC, average precision and number of positive test images."""

    labels: list[str]
    auc: list[float | None]
    ap: list[float | None]
    positives: list[int]
    mean_auc: float
    mean_ap: float


@dataclass(frozen=True)
class PerClass:
    """Per-class scores on the test images, class index = position: recall (sensitivity) and precision of each class,
    and the confusion matrix ``confusion[true][predicted]`` (counts)."""

    recall: list[float]
    precision: list[float]
    confusion: list[list[int]]


@dataclass(frozen=True)
class Calibration:
    """The reliability diagram of one cell (Guo et al. 2017): the test images binned by the predicted class's
    probability into ``len(count)`` equal-width bins on [0, 1]; per bin the number of images, their mean confidence
    and their accuracy (None for an empty bin). ``Metrics.ece`` is the count-weighted mean |accuracy - confidence|."""

    count: list[int]
    confidence: list[float | None]
    accuracy: list[float | None]


@dataclass
class Timings:
    fit_s: float | None = None  #: the method's ``fit``
    predict_s: float | None = None  #: its ``predict_proba`` on the test features
    encoder_images_per_s: float | None = None  #: this run's extraction rate of the dataset (absent: features cached)
    reference_images_per_s: float | None = None  #: the plain eager forward, measured during that extraction
    #: median of the interleaved (harness ÷ plain eager) pairs of that extraction (schema 4 on; see ReferenceProbe)
    paired_efficiency: float | None = None
    efficiency_spread: float | None = None  #: their relative interquartile range: the run's own noise
    cpu_contention: float | None = None  #: share of the machine's CPU time other processes used during the extraction
    #: a method that adapted the encoder (schema 6 on): seconds encoding the test images through it (0: they came from
    #: the cache under the adapted encoder's identity), and its images/s
    adapted_encode_s: float | None = None
    adapted_images_per_s: float | None = None

    @property
    def efficiency(self) -> float | None:
        """Harness images/s ÷ plain eager images/s (what ``hica-bench check`` gates)."""
        if self.encoder_images_per_s and self.reference_images_per_s:
            return self.encoder_images_per_s / self.reference_images_per_s
        return None


@dataclass
class Environment:
    """Versions and machine facts that decide whether two runs' speeds are comparable (not part of the identity)."""

    packages: dict[str, str] = field(default_factory=dict)
    python: str = ""
    platform: str = ""
    device: str = ""
    device_name: str = ""
    cpu_count: int | None = None
    cpu_model: str = ""
    torch_threads: int | None = None
    git: str | None = None  #: the commit hash of the hica-bench checkout that ran it (None: not a git checkout)
    #: that commit's committer time, ISO 8601 (``git show -s --format=%cI``; schema 11 on): orders runs by commit
    git_time: str | None = None
    extraction: dict[str, Any] | None = None  #: the extraction settings (backend, batch size, threads, ...)


@dataclass(frozen=True)
class CellKey:
    """The label of a cell, as tables show it."""

    dataset: str
    size: int
    method: str  #: method label incl. non-default options, e.g. ``linear-probe`` or ``hica:lambda1=0.5``
    encoder: str  #: encoder label incl. non-default options
    k: int
    seed: int
    max_test: int | None = None
    corruption: str | None = None  #: the test split's corruption (robustness track); None: clean
    severity: int | None = None  #: its severity, 1-5
    protocol: str = "few-shot"  #: the evaluation protocol's label (schema 8 on; earlier cells were all few-shot)


@dataclass(frozen=True)
class Component:
    """A plugin as a run used it: kind, name, full resolved options, and the distribution (and version) it came from
    (``-p MODULE`` for modules loaded explicitly)."""

    kind: str
    name: str
    options: dict[str, Any]
    distribution: str
    version: str

    def describe(self) -> str:
        return f"{self.name} ({self.distribution} {self.version})"


@dataclass(frozen=True)
class Origin:
    """Everything that determines a cell's numbers except which cell it is (k, seed, support)."""

    harness: str  #: hica-bench's version
    dataset: Component
    dataset_identity: str  #: the dataset plugin's identity of its files (a content digest)
    size: int
    max_test: int | None
    encoder: Component
    features: dict[str, str]  #: :class:`hica_bench.extraction.FeatureIdentity`: image encoder, preprocessing, precision, backend, device
    text_encoder: str | None  #: the text encoder's identity (None: an image-only pair)
    method: Component
    method_components: tuple[Component, ...]  #: plugins the method's options name (e.g. HiCA's ROI extractor, losses)
    device: str  #: where the method ran: cpu or cuda
    prompts: str | None = None  #: the digest of the dataset's prompt file (:class:`hica_bench.interfaces.Prompts`), if any
    #: the test split's corruption (:meth:`hica_bench.corruptions.CorruptedDataset.describe`), if any
    corruption: dict[str, Any] | None = None
    #: the evaluation protocol (a ``protocol`` plugin, with its options) when its episodes are more than a plain k-shot
    #: support (a validation set, a selection rule); None for a plain one (schema 8 on)
    protocol: Component | None = None
    #: cross-dataset transfer: the dataset the support came from (``dataset``: its label in the grid, ``identity``: its
    #: content digest, ``classes``: per class of this dataset, the source class it was matched to); None otherwise
    support_from: dict[str, Any] | None = None

    @functools.cached_property
    def id(self) -> str:
        return digest(self.identifying(), 12)

    def identifying(self) -> dict[str, Any]:
        """The fields the ids are digests of: all of them, but ``prompts`` only when there is a prompt file,
        ``corruption`` only when the test split is corrupted, ``protocol`` only when the episodes are more than a
        plain k-shot support and ``support_from`` only for a cross-dataset transfer, so an origin without them (and every cell of it) keeps the id it had before they
        existed."""
        fields_ = jsonable(self)
        for optional in ("prompts", "corruption", "protocol", "support_from"):
            if fields_[optional] is None:
                del fields_[optional]
        return fields_


@dataclass(frozen=True)
class Identity:
    origin: Origin
    k: int
    seed: int
    support: str  #: sha256 of the sorted support indices (:func:`hica_bench.protocol.support_hash`)
    #: the validation set: ``"SPLIT:"`` + the sha256 of its sorted indices; None without one (schema 8 on)
    validation: str | None = None

    @functools.cached_property
    def id(self) -> str:
        fields_ = {"origin": self.origin.identifying(), "k": self.k, "seed": self.seed, "support": self.support}
        if self.validation is not None:  # a cell without a validation set keeps the id it had before they existed
            fields_["validation"] = self.validation
        return digest(fields_, 20)


@dataclass
class CellResult:
    key: CellKey
    identity: Identity | None  #: None for a legacy (schema 1) record
    status: Status
    metrics: Metrics | None = None
    per_class: PerClass | None = None  #: with ``metrics`` (schema 3 on)
    calibration: Calibration | None = None  #: with ``metrics`` (schema 5 on)
    predictions: str | None = None  #: the saved test probabilities (``--save-predictions``), relative to the results file
    reason: str | None = None  #: the error (failed) or why the method does not apply (not_applicable)
    n_support: int | None = None
    n_test: int | None = None
    timings: Timings = field(default_factory=Timings)
    fit_info: dict[str, Any] | None = None  #: what the method chose on the support set (its ``fit_info_``)
    #: the identity of the encoder the method adapted and predicted through (its ``encoder_``; schema 6 on), else None
    adapted_encoder: str | None = None
    components_used: list[Component] = field(default_factory=list)  #: what it built through ``task.components``
    #: base-to-novel: the novel classes' score (``metrics`` above are the base classes'); None otherwise (schema 9 on)
    novel: NovelScore | None = None
    #: a multi-label dataset's per-label scores (``metrics`` above hold their means); None otherwise (schema 10 on)
    multilabel: MultiLabelScore | None = None
    environment: Environment = field(default_factory=Environment)
    finished_at: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def cell_id(self) -> str:
        """The identity's digest (what resume compares); legacy records get one from their label."""
        return self.identity.id if self.identity else "v1-" + digest(asdict(self.key), 17)

    @property
    def origin_id(self) -> str:
        return self.identity.origin.id if self.identity else LEGACY

    @property
    def support_hash(self) -> str | None:
        return self.identity.support if self.identity else self._legacy_support

    _legacy_support: str | None = field(default=None, repr=False)

    def to_json(self) -> str:
        record = jsonable({f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")})
        record["cell_id"] = self.cell_id
        record["origin_id"] = self.origin_id
        return json.dumps(record, sort_keys=True, allow_nan=True)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "CellResult":
        """A result from one parsed JSON line of schema 1 or 2, every field present and checked against its type; a
        ValueError says what does not match."""
        if record.get("schema_version") == 1:
            return _from_v1(record)
        record = migrations.upgrade({k: v for k, v in record.items() if k not in ("cell_id", "origin_id")})
        result = typed(cls, record, "", strict=True)
        if (result.status is Status.OK) != (result.metrics is not None):
            raise ValueError(f"status {result.status.value!r} with metrics {'given' if result.metrics else 'missing'}")
        return result


def _from_v1(record: dict[str, Any]) -> CellResult:
    """A schema-1 record as a legacy result: its label, status, metrics and timings; no identity."""
    metrics = record.get("metrics")
    for part in ("options", "timings", "environment"):
        if not isinstance(record.get(part) or {}, dict):
            raise ValueError(f"{part} must be an object, got {type(record[part]).__name__}")
    return CellResult(
        key=typed(CellKey, record.get("key"), "key"),
        identity=None,
        status=reader(Status, False)(record.get("status"), "status"),
        metrics=None if metrics is None else typed(Metrics, metrics, "metrics"),
        reason=record.get("reason"),
        n_support=record.get("n_support"),
        n_test=record.get("n_test"),
        timings=typed(Timings, known(Timings, record.get("timings")), "timings"),
        fit_info=(record.get("options") or {}).get("fit"),
        environment=Environment(**known(Environment, record.get("environment"))),
        finished_at=record.get("finished_at", ""),
        schema_version=1,
        _legacy_support=record.get("support_hash"),
    )


def origin_differences(a: Origin, b: Origin) -> list[str]:
    """What differs between two origins, one ``path: a → b`` item per differing leaf (e.g.
    ``features.backend: onnxruntime → eager``)."""
    left, right = flatten(asdict(a)), flatten(asdict(b))
    return [f"{path}: {_short(left.get(path))} → {_short(right.get(path))}"
            for path in sorted(set(left) | set(right)) if left.get(path) != right.get(path)]


def flatten(value: Any, prefix: str = "", index: str = "[{}]", empty: str | None = "[]") -> dict[str, Any]:
    """A nested record as ``{"a.b[0].c": leaf}``: dict keys joined by dots, list items by ``index`` (``".{}"``:
    ``a.b.0.c``); an empty list is the leaf ``empty`` (None: left out)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key), index, empty))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for position, item in enumerate(value):
            out.update(flatten(item, prefix + index.format(position), index, empty))
        return out or ({} if empty is None else {prefix: empty})
    return {prefix: value}


def _short(value: Any) -> str:
    text = "—" if value is None else str(value)
    return text if len(text) <= 48 else text[:36] + "…" + text[-8:]


"""The versioned, typed result schema and the JSONL results store (append-only, resumable).

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
set, definitions version); older records read as clean, and a clean origin keeps the id it had before.

One JSON object per line, one line per finished cell. A line is written with a single ``write`` on a file opened
for appending and then fsync'ed, so a killed run leaves at most one truncated last line: :meth:`ResultsStore.load`
skips it and the next append cuts it off before writing (it was never a finished cell).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import functools
import json
import logging
import os
import platform
import re
import subprocess
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from hica_bench.errors import UserError
from hica_bench.files import digest

log = logging.getLogger(__name__)

SCHEMA_VERSION = 7
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

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


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
    git: str | None = None
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

    @functools.cached_property
    def id(self) -> str:
        return digest(self.identifying(), 12)

    def identifying(self) -> dict[str, Any]:
        """The fields the ids are digests of: all of them, but ``prompts`` only when there is a prompt file and
        ``corruption`` only when the test split is corrupted, so an origin without them (and every cell of it) keeps
        the id it had before they existed."""
        fields_ = jsonable(self)
        for optional in ("prompts", "corruption"):
            if fields_[optional] is None:
                del fields_[optional]
        return fields_


@dataclass(frozen=True)
class Identity:
    origin: Origin
    k: int
    seed: int
    support: str  #: sha256 of the sorted support indices (:func:`hica_bench.protocol.support_hash`)

    @functools.cached_property
    def id(self) -> str:
        return digest({"origin": self.origin.identifying(), "k": self.k, "seed": self.seed, "support": self.support}, 20)


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
        record = {k: v for k, v in record.items() if k not in ("cell_id", "origin_id")}  # derived, recomputed
        if record.get("schema_version") == 2:  # before per-class scores and saved predictions
            record = {"per_class": None, "predictions": None, **record}
        if record.get("schema_version") in (2, 3) and isinstance(record.get("timings"), dict):  # before paired timing
            record["timings"] = {"paired_efficiency": None, "efficiency_spread": None, "cpu_contention": None,
                                 **record["timings"]}
        if record.get("schema_version") in (2, 3, 4):  # before prompt files and calibration
            record = {"calibration": None, **record}
            if isinstance(record.get("identity"), dict) and isinstance(record["identity"].get("origin"), dict):
                record["identity"] = {**record["identity"], "origin": {"prompts": None, **record["identity"]["origin"]}}
            if isinstance(record.get("metrics"), dict):
                record["metrics"] = {"ece": None, **record["metrics"]}
        if record.get("schema_version") in (2, 3, 4, 5):  # before methods that adapt the encoder
            record = {"adapted_encoder": None, **record}
            if isinstance(record.get("timings"), dict):
                record["timings"] = {"adapted_encode_s": None, "adapted_images_per_s": None, **record["timings"]}
        if record.get("schema_version") in (2, 3, 4, 5, 6):  # before the corruption track: clean cells
            if isinstance(record.get("key"), dict):
                record["key"] = {**record["key"], "corruption": None, "severity": None}
            if isinstance(record.get("identity"), dict) and isinstance(record["identity"].get("origin"), dict):
                record["identity"] = {**record["identity"], "origin": {"corruption": None, **record["identity"]["origin"]}}
        result = _typed(cls, record, "", strict=True)
        if (result.status is Status.OK) != (result.metrics is not None):
            raise ValueError(f"status {result.status.value!r} with metrics {'given' if result.metrics else 'missing'}")
        return result


_NONE = type(None)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _typed(cls: type, values: Any, where: str, strict: bool = False) -> Any:
    """``cls`` (a dataclass) from a JSON object, each field checked against its annotation (``int``, ``float``, ``str``,
    ``bool``, ``X | None``, ``dict``/``list``/``tuple`` of them, enums, nested dataclasses); unknown fields, missing
    fields (``strict``: every field, as :meth:`CellResult.to_json` writes them all; else those without a default), or
    a value of another type raise a ValueError naming the field."""
    return _reader(cls, strict)(values, where)


Reader = Callable[[Any, str], Any]


def _fail(where: str, what: str, value: Any) -> ValueError:
    return ValueError(f"{where} must be {what}, got {value!r}"[:300])


@functools.cache
def _reader(hint: Any, strict: bool) -> Reader:
    """A reader for values of type ``hint``, built once per type (results files hold thousands of records)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        nullable = _NONE in args
        options = [_reader(a, strict) for a in args if a is not _NONE]

        def union(value, where):
            if value is None:
                if nullable:
                    return None
                raise ValueError(f"{where} must not be null")
            errors = []
            for option in options:
                try:
                    return option(value, where)
                except ValueError as exc:
                    errors.append(str(exc))
            raise ValueError(errors[0])
        return union
    if hint is Any:
        return lambda value, where: value
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        public = [f for f in fields(hint) if not f.name.startswith("_")]
        names = {f.name for f in public}
        readers = [(f.name, _reader(hints[f.name], strict),
                    strict or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING))
                   for f in public]

        def record(value, where):
            if not isinstance(value, dict):
                raise ValueError(f"{where or 'the record'} must be an object, got {type(value).__name__}")
            unknown = set(value) - names
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}" + (f" in {where}" if where else ""))
            arguments = {}
            for name, read, required in readers:
                path = f"{where}.{name}" if where else name
                if name not in value:
                    if required:
                        raise ValueError(f"missing field {path}")
                    continue
                arguments[name] = read(value[name], path)
            return hint(**arguments)
        return record
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = ", ".join(repr(m.value) for m in hint)

        def member(value, where):
            try:
                return hint(value)
            except ValueError:
                raise _fail(where, f"one of {allowed}", value) from None
        return member
    if origin in (list, tuple):
        item = _reader(args[0] if args else Any, strict)

        def sequence(value, where):
            if not isinstance(value, list):
                raise ValueError(f"{where} must be a list, got {type(value).__name__}")
            items = [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        return sequence
    if origin is dict or hint is dict:
        def mapping(value, where):
            if not isinstance(value, dict):
                raise ValueError(f"{where} must be an object, got {type(value).__name__}")
            return value
        return mapping
    if hint is float:
        def number(value, where):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _fail(where, "a number", value)
            return float(value)
        return number
    if hint is int:
        def whole(value, where):
            if isinstance(value, bool) or not isinstance(value, int):
                raise _fail(where, "a whole number", value)
            return value
        return whole
    if hint in (str, bool):
        def plain(value, where):
            if not isinstance(value, hint):
                raise _fail(where, f"a {hint.__name__}", value)
            return value
        return plain
    raise TypeError(f"no reader for {hint!r}")  # a schema field of a type this reader does not know


def jsonable(value: Any, _seen: frozenset = frozenset()) -> Any:
    """``value`` as plain JSON values: records as objects, enums as their value, and whatever a plugin hands over
    (``fit_info_``, options of the components it built): numpy numbers and arrays as numbers and lists, tuples and sets
    as lists, keys that are not text as their ``str``, text that is not valid Unicode with its bad characters replaced,
    a container that contains itself as ``"<circular>"``, anything else as its ``repr``. It never raises, so a finished
    result can always be written."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate cannot be written as UTF-8
    if isinstance(value, enum.Enum):
        return jsonable(value.value, _seen)
    if id(value) in _seen:
        return "<circular>"
    seen = _seen | {id(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name), seen) for f in fields(value) if not f.name.startswith("_")}
    if isinstance(value, dict):
        return {(k if isinstance(k, str) else str(k)): jsonable(v, seen) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, seen) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays, torch tensors
        try:
            return jsonable(value.tolist(), seen)
        except Exception:
            pass
    try:
        return jsonable(repr(value), seen)
    except Exception:
        return f"<{type(value).__name__}>"


def _known(cls: type, values: dict[str, Any] | None) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in (values or {}).items() if k in names}


def _from_v1(record: dict[str, Any]) -> CellResult:
    """A schema-1 record as a legacy result: its label, status, metrics and timings; no identity."""
    metrics = record.get("metrics")
    for part in ("options", "timings", "environment"):
        if not isinstance(record.get(part) or {}, dict):
            raise ValueError(f"{part} must be an object, got {type(record[part]).__name__}")
    return CellResult(
        key=_typed(CellKey, record.get("key"), "key"),
        identity=None,
        status=_reader(Status, False)(record.get("status"), "status"),
        metrics=None if metrics is None else _typed(Metrics, metrics, "metrics"),
        reason=record.get("reason"),
        n_support=record.get("n_support"),
        n_test=record.get("n_test"),
        timings=_typed(Timings, _known(Timings, record.get("timings")), "timings"),
        fit_info=(record.get("options") or {}).get("fit"),
        environment=Environment(**_known(Environment, record.get("environment"))),
        finished_at=record.get("finished_at", ""),
        schema_version=1,
        _legacy_support=record.get("support_hash"),
    )


def origin_differences(a: Origin, b: Origin) -> list[str]:
    """What differs between two origins, one ``path: a → b`` item per differing leaf (e.g.
    ``features.backend: onnxruntime → eager``)."""
    left, right = _flatten(asdict(a)), _flatten(asdict(b))
    return [f"{path}: {_short(left.get(path))} → {_short(right.get(path))}"
            for path in sorted(set(left) | set(right)) if left.get(path) != right.get(path)]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{index}]"))
        return out or {prefix: "[]"}
    return {prefix: value}


def _short(value: Any) -> str:
    text = "—" if value is None else str(value)
    return text if len(text) <= 48 else text[:36] + "…" + text[-8:]


class ResultsStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, CellResult]:
        """The newest result per ``cell_id``, in file order. A last line without its newline is a write a kill cut
        short and is ignored, unless it is a whole record (then it counts, and :meth:`append` keeps it). Any other line
        that is not a result of a schema this version reads is a UserError naming the line: nothing is ever dropped
        silently, and nothing is computed before the file has been read."""
        results: dict[str, CellResult] = {}
        for number, record in self._records():
            result = self._result(number, record)
            results.pop(result.cell_id, None)  # the newest record of a cell counts, at its place in the file
            results[result.cell_id] = result
        return results

    def _read(self) -> bytes:
        if self.path.is_dir():
            raise UserError(f"results file {self.path} is a folder")
        try:
            return self.path.read_bytes() if self.path.exists() else b""
        except OSError as exc:
            raise UserError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def _records(self) -> list[tuple[int, dict[str, Any]]]:
        lines = self._read().split(b"\n")
        last = lines.pop()  # the bytes after the last newline (b"" when the file ends with one)
        found = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                found.append((number, self._parse(number, line)))
        if last.strip():
            record = _whole_record(last)
            if record is None:
                log.warning("%s:%d is a record a killed write cut short; ignoring it", self.path, len(lines) + 1)
            else:
                found.append((len(lines) + 1, record))
        return found

    def _parse(self, number: int, line: bytes) -> dict[str, Any]:
        where = f"{self.path}:{number}"
        try:
            record = json.loads(line.decode("utf-8"))
            if _SURROGATE_ESCAPE.search(line):  # a \udXXX escape: text that may not be writable back as UTF-8
                json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeError:
            raise UserError(f"{where} is not UTF-8 text; repair or delete that line") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{where} is not valid JSON ({exc.msg}, column {exc.colno}); repair or delete that line") from None
        except (ValueError, RecursionError) as exc:  # a number of thousands of digits, nesting thousands deep
            raise UserError(f"{where} is not a result record JSON can read back ({type(exc).__name__}); repair or "
                            "delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("schema_version"), int) or record["schema_version"] < 1:
            raise UserError(f"{where} is not a hica-bench result record")
        return record

    def _result(self, number: int, record: dict[str, Any]) -> CellResult:
        version = record["schema_version"]
        if version > SCHEMA_VERSION:
            raise UserError(f"{self.path} was written by a newer hica-bench (schema {version} > {SCHEMA_VERSION}); "
                            "upgrade hica-bench or use another --out")
        try:
            return CellResult.from_record(record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise UserError(f"{self.path}:{number} does not match result schema {version} ({exc})") from None

    def check_writable(self) -> None:
        """Before any work: the file can be appended to (not a folder, not read-only)."""
        if self.path.is_dir():
            raise UserError(f"results file {self.path} is a folder")
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise UserError(f"cannot write {self.path}: it is read-only")

    def append(self, result: CellResult) -> None:
        result.finished_at = result.finished_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
        line = (result.to_json() + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                whole = _whole_lines_size(self.path, size)
                if whole != size:  # the last line has no newline: a whole record keeps it, a cut-short write goes
                    tail = os.pread(fd, size - whole, whole)
                    if _whole_record(tail) is None:
                        os.ftruncate(fd, whole)
                        size = whole
                    else:
                        line = b"\n" + line
                try:
                    written = 0
                    while written < len(line):  # a nearly full disk may take part of the line and refuse the rest
                        count = os.write(fd, line[written:])
                        if count <= 0:
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                        written += count
                    os.fsync(fd)
                except OSError:  # a full disk may have taken part of the line: leave the file as it was
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from None


def _whole_record(line: bytes) -> dict[str, Any] | None:
    """``line`` as a result record when it is one whole (parses as a JSON object with a schema version), else None."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None
    return record if isinstance(record, dict) and isinstance(record.get("schema_version"), int) else None


def read_many(paths: list[Path]) -> list[CellResult]:
    """The results of several results files (or folders holding a ``results.jsonl``), in order. A cell (same identity)
    found in two of them is refused with one line naming both: merging must never pick one of two results silently."""
    return [result for result, _ in read_many_with_files(paths)]


def results_files(paths: list[Path]) -> list[Path]:
    """The results files ``paths`` name (a folder stands for its ``results.jsonl``); a missing one or one given twice is
    a UserError."""
    files: list[Path] = []
    for given in paths:
        path = Path(given) / "results.jsonl" if Path(given).is_dir() else Path(given)
        if not path.is_file():
            raise UserError(f"results {str(given)!r} is neither a results file nor a folder holding results.jsonl")
        if path.resolve() in {f.resolve() for f in files}:
            raise UserError(f"{path} is given twice")
        files.append(path)
    return files


def read_many_with_files(paths: list[Path]) -> list[tuple[CellResult, Path]]:
    """:func:`read_many`, each result with the results file it came from (its saved predictions are relative to that
    file's folder)."""
    found: dict[str, tuple[CellResult, Path]] = {}
    for path in results_files(paths):
        for cell_id, result in ResultsStore(path).load().items():
            if cell_id in found:
                other = found[cell_id][1]
                k = result.key
                raise UserError(f"{k.dataset} {k.method} k={k.k} seed={k.seed} ({k.encoder}) is in both {other} and "
                                f"{path}; merge results files that hold different cells")
            found[cell_id] = (result, path)
    return list(found.values())


#: What a cell computed (besides how long it took, where and when): two records of one cell that agree on these are
#: the same result, recorded twice.
OUTCOME = ("status", "metrics", "per_class", "calibration", "fit_info", "n_support", "n_test", "components_used")


def _outcome(result: CellResult) -> str:
    return json.dumps(jsonable({name: getattr(result, name) for name in OUTCOME}), sort_keys=True, allow_nan=True)


def merge_shards(paths: list[Path], out_dir: Path) -> tuple[list[CellResult], int]:
    """The results of several results files (``run --shard`` writes one per shard; or folders holding one) as one
    list, and how many duplicate records were dropped. A cell recorded in more than one of them is kept once when the
    records agree on what it computed (:data:`OUTCOME`; timings, machine and time may differ), and a finished record
    beats a failed one; two finished records that disagree are refused with one line naming both files, so a merge
    never picks one of two different numbers. Saved predictions are re-pointed to be relative to ``out_dir``."""
    found: dict[str, tuple[CellResult, Path]] = {}
    dropped = 0
    for path in results_files(paths):
        for cell_id, result in ResultsStore(path).load().items():
            if result.predictions:
                result.predictions = os.path.relpath(path.parent / result.predictions, out_dir)
            if cell_id not in found:
                found[cell_id] = (result, path)
                continue
            dropped += 1
            kept, other = found[cell_id]
            if kept.status.finished and result.status.finished and _outcome(kept) != _outcome(result):
                k = result.key
                raise UserError(f"{k.dataset} {k.method} k={k.k} seed={k.seed} ({k.encoder}) has different results in "
                                f"{other} and {path} (same identity, different outcome); keep one of them")
            if result.status.finished and not kept.status.finished:  # a retry that finished beats the failure
                found[cell_id] = (result, path)
    return [result for result, _ in found.values()], dropped


def _whole_lines_size(path: Path, size: int) -> int:
    """Bytes of ``path``'s first ``size`` bytes up to and including their last newline (0 if none)."""
    with path.open("rb") as handle:
        end = size
        while end > 0:
            start = max(0, end - (1 << 16))
            handle.seek(start)
            cut = handle.read(end - start).rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            end = start
    return 0


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name: ``/proc/cpuinfo`` (Linux), else py-cpuinfo when installed, else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    try:
        import cpuinfo  # optional (py-cpuinfo); slow, so only where /proc/cpuinfo is missing

        return str(cpuinfo.get_cpu_info().get("brand_raw") or "")
    except Exception:
        return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU's model."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def environment(device: str, extraction: dict[str, Any] | None = None) -> Environment:
    """Versions and machine facts that decide whether two runs are comparable (``torch_threads`` is None when the run
    did not load torch: every feature came from the cache)."""
    torch = sys.modules.get("torch")
    packages = {}
    for name in ("hica-bench", "torch", "torchvision", "numpy", "scikit-learn", "timm", "open_clip_torch", "transformers", "medmnist"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    for dist in metadata.distributions():
        if dist.entry_points.select(group="hica_bench"):
            packages[dist.metadata["Name"]] = dist.version
    cpu = cpu_model()
    return Environment(
        packages=dict(sorted(packages.items())),
        python=platform.python_version(),
        platform=platform.platform(),
        device=device,
        device_name=device_name(device) if device.startswith("cuda") else cpu,
        cpu_count=os.cpu_count(),
        cpu_model=cpu,
        torch_threads=torch.get_num_threads() if hasattr(torch, "get_num_threads") else None,
        git=_git_hash(),
        extraction=extraction,
    )

"""Descriptor generators: class-name templates, curated MedMNIST knowledge, and corrupted ("noisy") variants.

Every generator implements :class:`hica_bench.interfaces.DescriptorGenerator`: ``describe(dataset, class_names)``
returns a new list with one ``{"global": [...], "local": [...]}`` dict per class, in class order, with at least
one global text per class. Nothing a caller does to the returned lists affects later calls.
"""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hica_bench.errors import UserError
from hica_bench.interfaces import Option, PluginSpec

log = logging.getLogger(__name__)

KNOWLEDGE_FILE = "medmnist_knowledge.json"

#: Class-level prompts; ``{}`` is the class name.
GLOBAL_TEMPLATES = (
    "a medical image of {}.",
    "an image showing {}.",
    "a scan with findings of {}.",
    "a clinical image with signs of {}.",
    "{}.",
)
#: Region-level prompts for methods that need local texts.
LOCAL_TEMPLATES = (
    "a region showing {}.",
    "a local detail typical of {}.",
    "a close-up of a structure typical of {}.",
)

Descriptors = list[dict[str, list[str]]]


class TemplateDescriptors:
    """Prompt templates around the class name: works for any dataset and any class names."""

    def describe(self, dataset: str, class_names: Sequence[str]) -> Descriptors:
        return [self.describe_class(name) for name in class_names]

    @staticmethod
    def describe_class(name: str) -> dict[str, list[str]]:
        return {"global": [t.format(name) for t in GLOBAL_TEMPLATES],
                "local": [t.format(name) for t in LOCAL_TEMPLATES]}


def _is_text_list(value: Any, allow_empty: bool) -> bool:
    return (isinstance(value, list) and (allow_empty or len(value) > 0)
            and all(isinstance(t, str) and t.strip() for t in value))


def validate_knowledge(data: Any, where: str) -> dict:
    """Check the knowledge-file structure; raise a one-line :class:`UserError` naming the first problem.

    Required: ``{"datasets": {flag: {"classes": {name: {"global": [str, ...], "local": [str, ...]}}}}}``
    with non-empty strings and at least one global text per class; optional ``version`` (must be 1),
    ``sources`` (id -> citation) and per-dataset ``sources`` (ids that must be in the top-level map).
    """
    def fail(msg: str) -> None:
        raise UserError(f"{where}: {msg}")

    if not isinstance(data, dict):
        fail("must be a JSON object with a 'datasets' object")
    if data.get("version", 1) != 1:
        fail(f"unsupported version {data.get('version')!r} (expected 1)")
    sources = data.get("sources", {})
    if not isinstance(sources, dict):
        fail("'sources' must be an object mapping ids to citations")
    datasets = data.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        fail("must have a non-empty 'datasets' object")
    for flag, entry in datasets.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("classes"), dict) or not entry["classes"]:
            fail(f"datasets.{flag} must have a non-empty 'classes' object")
        cited = entry.get("sources", [])
        if not isinstance(cited, list):
            fail(f"datasets.{flag}.sources must be a list of source ids")
        missing = [s for s in cited if s not in sources]
        if missing:
            fail(f"datasets.{flag}.sources names unknown source ids {missing}")
        for name, texts in entry["classes"].items():
            if not isinstance(texts, dict):
                fail(f"datasets.{flag}.classes.{name} must be an object with 'global' and 'local' lists")
            if not _is_text_list(texts.get("global"), allow_empty=False):
                fail(f"datasets.{flag}.classes.{name}.global must be a non-empty list of non-empty strings")
            if not _is_text_list(texts.get("local", []), allow_empty=True):
                fail(f"datasets.{flag}.classes.{name}.local must be a list of non-empty strings")
    return data


def load_knowledge(path: str = "") -> dict:
    """The bundled MedMNIST knowledge file (``path=""``) or a user file of the same structure, validated."""
    if not path:
        text = resources.files("hica_bench_hica").joinpath(KNOWLEDGE_FILE).read_text(encoding="utf-8")
        return validate_knowledge(json.loads(text), KNOWLEDGE_FILE)
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read descriptor file {file}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return validate_knowledge(data, str(file))


class KnowledgeDescriptors:
    """Curated global and local descriptors from a knowledge file (bundled MedMNIST file by default).

    A class the file does not cover (unknown dataset or class name) gets :class:`TemplateDescriptors` texts
    and a logged warning; ``coverage[dataset]`` maps each class name of the last ``describe`` of that
    dataset to ``"knowledge"`` or ``"template"``.
    """

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.knowledge = load_knowledge(path)
        self.coverage: dict[str, dict[str, str]] = {}

    def describe(self, dataset: str, class_names: Sequence[str]) -> Descriptors:
        classes = self.knowledge["datasets"].get(dataset, {}).get("classes", {})
        out, coverage = [], {}
        for name in class_names:
            entry = classes.get(name)
            if entry is None:
                out.append(TemplateDescriptors.describe_class(name))
                coverage[name] = "template"
            else:
                out.append({"global": list(entry["global"]), "local": list(entry.get("local", []))})
                coverage[name] = "knowledge"
        self.coverage[dataset] = coverage
        fallback = [n for n, how in coverage.items() if how == "template"]
        if fallback:
            log.warning("descriptor file %s has no entry for %s classes %s; using class-name templates for them",
                        self.path or KNOWLEDGE_FILE, dataset, fallback)
        return out


class FixedDescriptors:
    """Given descriptors, one ``{"global": [...], "local": [...]}`` per class in class order (a dataset's prompt file's,
    for HiCA and as the ``base`` of :class:`NoisyDescriptors`); not a registered plugin."""

    def __init__(self, described: Descriptors) -> None:
        self.described = [{"global": list(d["global"]), "local": list(d.get("local", []))} for d in described]

    def describe(self, dataset: str, class_names: Sequence[str]) -> Descriptors:
        if len(class_names) != len(self.described):
            raise ValueError(f"{len(self.described)} classes described, {len(class_names)} asked for")
        return [{"global": list(d["global"]), "local": list(d["local"])} for d in self.described]


CORRUPTIONS = ("word_drop", "word_swap", "unrelated_class")


class NoisyDescriptors:
    """A base generator's descriptors with exactly ``round(fraction * total)`` of them corrupted.

    ``base`` is any descriptor generator: through the registry (``noisy:base=NAME``, or HiCA's ``descriptors``
    option with ``noise`` > 0) it is the plugin of that name, resolved in the run's registry and built for it;
    constructed directly, the default ``"knowledge"`` (or None) is the bundled knowledge file's generator.

    ``total`` counts every global and local text of the call. Which texts are corrupted comes from
    ``numpy.random.default_rng(seed)``; how each one is corrupted comes from ``default_rng([seed, i])`` with
    ``i`` its position in class order (globals then locals per class), so the same (fraction, seed, base
    texts) always give the same result. Corruptions: ``word_drop`` (remove ~30 % of the words),
    ``word_swap`` (swap random pairs of different words), ``unrelated_class`` (replace the text with one of
    another class of the same dataset, or put another class's name in it). A corrupted text always
    differs from its original. ``corrupted_`` lists ``(class_name, "global"|"local", index)`` of the last
    call, in descriptor order; ``corruption_types_`` maps each of those tuples to its corruption.
    """

    def __init__(self, fraction: float = 0.3, base: Any = "knowledge", seed: int = 0) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise UserError(f"noisy descriptors: fraction must be between 0 and 1, got {fraction}")
        if base is None or (isinstance(base, str) and base == "knowledge"):  # constructed directly: the bundled file
            base = KnowledgeDescriptors()
        if not callable(getattr(base, "describe", None)):
            raise UserError(f"noisy descriptors: base must be a descriptor generator (the registry builds it from the "
                            f"name in the 'base' option), got {base!r}")
        self.base = base
        self.fraction, self.seed = float(fraction), int(seed)
        self.corrupted_: list[tuple[str, str, int]] = []
        self.corruption_types_: dict[tuple[str, str, int], str] = {}

    def describe(self, dataset: str, class_names: Sequence[str]) -> Descriptors:
        out = self.base.describe(dataset, class_names)
        slots = [(c, part, j) for c in range(len(out)) for part in ("global", "local") for j in range(len(out[c][part]))]
        n = int(round(self.fraction * len(slots)))
        chosen = np.sort(np.random.default_rng(self.seed).choice(len(slots), size=n, replace=False))
        self.corrupted_, self.corruption_types_ = [], {}
        originals = [{part: list(d[part]) for part in ("global", "local")} for d in out]
        for i in chosen.tolist():
            c, part, j = slots[i]
            text, kind = _corrupt(originals, c, part, j, list(class_names), np.random.default_rng([self.seed, i]))
            out[c][part][j] = text
            key = (class_names[c], part, j)
            self.corrupted_.append(key)
            self.corruption_types_[key] = kind
        return out


def _corrupt(texts: Descriptors, c: int, part: str, j: int, class_names: list[str],
             rng: np.random.Generator) -> tuple[str, str]:
    """Corrupt ``texts[c][part][j]``: try the corruptions in a seeded order, keep the first that changes it."""
    original = texts[c][part][j]
    for kind in rng.permutation(CORRUPTIONS).tolist():
        if kind == "word_drop":
            result = _word_drop(original, rng)
        elif kind == "word_swap":
            result = _word_swap(original, rng)
        else:
            result = _unrelated(texts, c, part, class_names, original, rng)
        if result is not None and result.strip() and result != original:
            return result, kind
    # Only reachable for a one-class dataset with a text that cannot be dropped from or swapped.
    return f"{original} an unrelated object", "unrelated_class"


def _word_drop(text: str, rng: np.random.Generator) -> str | None:
    words = text.split()
    if len(words) < 2:
        return None
    drop = set(rng.choice(len(words), size=max(1, round(0.3 * len(words))), replace=False).tolist())
    return " ".join(w for k, w in enumerate(words) if k not in drop)


def _word_swap(text: str, rng: np.random.Generator) -> str | None:
    words = text.split()
    if len(set(words)) < 2:
        return None
    original = list(words)
    for _ in range(max(1, len(words) // 5)):
        a, b = rng.choice(len(words), size=2, replace=False).tolist()
        words[a], words[b] = words[b], words[a]
    if words == original:  # the swaps cancelled out (or hit equal words): swap the first two different words
        a = 0
        b = next(k for k in range(1, len(words)) if words[k] != words[0])
        words[a], words[b] = words[b], words[a]
    return " ".join(words)


def _unrelated(texts: Descriptors, c: int, part: str, class_names: list[str], original: str,
               rng: np.random.Generator) -> str | None:
    others = [k for k in range(len(class_names)) if k != c]
    if not others:
        return None
    if rng.random() < 0.5:  # replace by a text of another class (same part), if one differs
        pool = sorted({t for k in others for t in texts[k][part] if t != original})
        if pool:
            return pool[int(rng.integers(len(pool)))]
    other = class_names[others[int(rng.integers(len(others)))]]
    own = re.compile(rf"(?<!\w){re.escape(class_names[c])}(?!\w)")
    if class_names[c] and own.search(original):  # "a medical image of malignant." -> "... of normal, benign."
        return own.sub(lambda _: other, original)
    words = original.split()
    at = int(rng.integers(len(words) + 1))
    return " ".join(words[:at] + [other] + words[at:])


SPECS = [
    PluginSpec("descriptor-generator", "templates", "Class-name prompt templates (global and local)",
               TemplateDescriptors),
    PluginSpec("descriptor-generator", "knowledge", "Curated global + fine-grained descriptors for every MedMNIST 2D "
               "class", KnowledgeDescriptors),
    PluginSpec("descriptor-generator", "noisy", "Corrupts a fraction of another generator's descriptors (robustness); "
               "base: any descriptor generator", NoisyDescriptors,
               {"fraction": Option(low=0, high=1), "seed": Option(low=0)}, components={"base": "descriptor-generator"}),
]

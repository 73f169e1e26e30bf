"""HiCA descriptor generators: the bundled MedMNIST knowledge file, templates, user files, noisy corruption."""

from __future__ import annotations

import json
import logging
import sys
from importlib import resources
from pathlib import Path

import medmnist
import pytest

try:
    import hica_bench_hica  # noqa: F401
except ImportError:  # the plugin is not pip-installed: import it from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hica_bench.errors import UserError
from hica_bench.registry import RunComponents, load_registry
from hica_bench_hica.descriptors import KnowledgeDescriptors, NoisyDescriptors, TemplateDescriptors

FLAGS_2D = [flag for flag in medmnist.INFO if not flag.endswith("3d")]
BREAST = ["malignant", "normal, benign"]


def class_names(flag: str) -> list[str]:
    labels = medmnist.INFO[flag]["label"]
    return [labels[str(i)] for i in range(len(labels))]


@pytest.fixture(scope="module")
def raw():
    return json.loads(resources.files("hica_bench_hica").joinpath("medmnist_knowledge.json").read_text(encoding="utf-8"))


def test_knowledge_file_covers_every_2d_medmnist_class_exactly(raw):
    assert len(FLAGS_2D) == 12 and raw["version"] == 1
    assert sorted(raw["datasets"]) == sorted(FLAGS_2D)
    for flag in FLAGS_2D:
        entry = raw["datasets"][flag]
        assert list(entry["classes"]) == class_names(flag), flag
        assert entry["modality"].strip()
        assert entry["sources"] and all(raw["sources"].get(s, "").strip() for s in entry["sources"]), flag
        for name, texts in entry["classes"].items():
            glob, local = texts["global"], texts["local"]
            assert 3 <= len(glob) <= 5 and 4 <= len(local) <= 8, (flag, name)
            assert all(isinstance(t, str) and t.strip() == t and t for t in glob + local), (flag, name)
            assert len(set(glob + local)) == len(glob) + len(local), f"duplicate descriptor in {flag}/{name}"
    cited = {s for entry in raw["datasets"].values() for s in entry["sources"]}
    assert cited == set(raw["sources"])  # no uncited source entries


def test_knowledge_descriptors_return_the_file_texts(raw):
    gen = KnowledgeDescriptors()
    out = gen.describe("breastmnist", BREAST)
    assert out == [raw["datasets"]["breastmnist"]["classes"][n] for n in BREAST]
    assert "posterior acoustic shadowing" in out[0]["local"]
    assert gen.coverage["breastmnist"] == {n: "knowledge" for n in BREAST}
    out[0]["global"].clear()  # the caller owns the returned lists
    assert gen.describe("breastmnist", BREAST)[0]["global"] == raw["datasets"]["breastmnist"]["classes"]["malignant"]["global"]
    # class order follows the caller, not the file
    files = raw["datasets"]["breastmnist"]["classes"]
    assert gen.describe("breastmnist", BREAST[::-1]) == [files[n] for n in BREAST[::-1]]


def test_templates_work_for_any_names():
    out = TemplateDescriptors().describe("anything", ["tumour", "no finding"])
    assert len(out) == 2
    for name, entry in zip(["tumour", "no finding"], out):
        assert entry["global"] and entry["local"]
        assert all(name in t for t in entry["global"] + entry["local"])
    assert "a region showing tumour." in out[0]["local"]


def test_unknown_dataset_and_class_fall_back_to_templates(caplog):
    gen = KnowledgeDescriptors()
    with caplog.at_level(logging.WARNING):
        out = gen.describe("mysterymnist", ["a", "b"])
    assert out == TemplateDescriptors().describe("mysterymnist", ["a", "b"])
    assert gen.coverage["mysterymnist"] == {"a": "template", "b": "template"}
    assert "mysterymnist" in caplog.text and "templates" in caplog.text
    mixed = gen.describe("breastmnist", ["malignant", "unknown lesion"])
    assert gen.coverage["breastmnist"] == {"malignant": "knowledge", "unknown lesion": "template"}
    assert mixed[1] == TemplateDescriptors().describe("x", ["unknown lesion"])[0]


def test_user_file_is_used(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"datasets": {"toy": {"classes": {"cat": {"global": ["a cat."], "local": ["whiskers"]}}}}}))
    gen = KnowledgeDescriptors(str(path))
    assert gen.describe("toy", ["cat"]) == [{"global": ["a cat."], "local": ["whiskers"]}]
    assert gen.describe("breastmnist", ["malignant"])[0]["global"][0] == "a medical image of malignant."  # not in this file


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ("[]", "'datasets'"),
    (json.dumps({"datasets": {}}), "non-empty 'datasets'"),
    (json.dumps({"datasets": {"toy": {"classes": {"cat": {"global": [], "local": []}}}}}), "datasets.toy.classes.cat.global"),
    (json.dumps({"datasets": {"toy": {"classes": {"cat": {"global": ["ok"], "local": "whiskers"}}}}}), "classes.cat.local"),
    (json.dumps({"datasets": {"toy": {"classes": {"cat": {"global": ["ok", ""]}}}}}), "non-empty strings"),
    (json.dumps({"datasets": {"toy": {"classes": {}}}}), "datasets.toy"),
    (json.dumps({"datasets": {"toy": {"sources": ["x"], "classes": {"c": {"global": ["ok"]}}}}}), "unknown source ids"),
    (json.dumps({"version": 2, "datasets": {"toy": {"classes": {"c": {"global": ["ok"]}}}}}), "version"),
])
def test_malformed_user_file_is_a_one_line_user_error(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        KnowledgeDescriptors(str(path))
    assert expected in str(err.value) and "\n" not in str(err.value) and "bad.json" in str(err.value)


def test_missing_user_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        KnowledgeDescriptors(str(tmp_path / "absent.json"))


def _flat(descriptors, names):
    return {(names[c], part, j): t for c, d in enumerate(descriptors) for part in ("global", "local") for j, t in enumerate(d[part])}


@pytest.mark.parametrize("base", ["knowledge", "templates"])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.55])
def test_noisy_corrupts_exactly_the_fraction(base, fraction):
    names = class_names("dermamnist")
    clean = _flat((KnowledgeDescriptors() if base == "knowledge" else TemplateDescriptors()).describe("dermamnist", names), names)
    components = RunComponents(load_registry())  # as HiCA builds it: the base named, resolved in the run's registry
    gen = components.build("descriptor-generator", "noisy", fraction=fraction, base=base, seed=3)
    assert [c.name for c in components.used] == ["noisy", base]
    assert isinstance(gen, NoisyDescriptors) and isinstance(gen.base, KnowledgeDescriptors if base == "knowledge" else TemplateDescriptors)
    noisy = _flat(gen.describe("dermamnist", names), names)
    assert noisy.keys() == clean.keys()  # same number of texts per class and part
    changed = {k for k in clean if noisy[k] != clean[k]}
    assert len(gen.corrupted_) == round(fraction * len(clean)) > 0
    assert changed == set(gen.corrupted_)  # every recorded corruption really changed its text, nothing else changed
    assert all(noisy[k].strip() for k in changed)


def test_noisy_is_deterministic_under_seed_and_differs_across_seeds():
    names = class_names("bloodmnist")
    first = NoisyDescriptors(0.3, seed=7)
    a = first.describe("bloodmnist", names)
    second = NoisyDescriptors(0.3, seed=7)
    assert second.describe("bloodmnist", names) == a and second.corrupted_ == first.corrupted_
    assert first.describe("bloodmnist", names) == a  # repeated calls too
    other = NoisyDescriptors(0.3, seed=8)
    b = other.describe("bloodmnist", names)
    assert b != a and set(other.corrupted_) != set(first.corrupted_)


def test_noisy_fraction_zero_is_the_base_and_one_changes_everything():
    names = class_names("octmnist")
    clean = KnowledgeDescriptors().describe("octmnist", names)
    zero = NoisyDescriptors(0.0)
    assert zero.describe("octmnist", names) == clean and zero.corrupted_ == []
    everything = NoisyDescriptors(1.0, seed=1)
    noisy = _flat(everything.describe("octmnist", names), names)
    assert all(noisy[k] != t for k, t in _flat(clean, names).items())
    assert len(everything.corrupted_) == len(noisy)


def test_noisy_corruption_kinds_do_what_they_say():
    names = class_names("pathmnist")
    clean = _flat(KnowledgeDescriptors().describe("pathmnist", names), names)
    gen = NoisyDescriptors(1.0, seed=0)
    noisy = _flat(gen.describe("pathmnist", names), names)
    kinds = gen.corruption_types_
    assert set(kinds.values()) == {"word_drop", "word_swap", "unrelated_class"}
    for key, kind in kinds.items():
        before, after = clean[key].split(), noisy[key].split()
        if kind == "word_drop":
            assert len(after) < len(before) and all(w in before for w in after)
        elif kind == "word_swap":
            assert sorted(after) == sorted(before) and after != before
        else:
            other_texts = {t for k, t in clean.items() if k[0] != key[0]}
            assert noisy[key] in other_texts or any(n in noisy[key] and n not in clean[key] for n in names if n != key[0])


def test_noisy_rejects_bad_options():
    with pytest.raises(UserError, match="fraction"):
        NoisyDescriptors(fraction=1.5)
    with pytest.raises(UserError, match="base"):
        NoisyDescriptors(base="gpt")
    with pytest.raises(UserError, match="unknown descriptor-generator 'gpt'"):
        RunComponents(load_registry()).build("descriptor-generator", "noisy", base="gpt")
    with pytest.raises(UserError, match="option 'base'|option base"):
        load_registry().choose("descriptor-generator", "noisy:base=gpt")

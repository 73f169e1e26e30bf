"""The ``concept-bottleneck`` method (plugins/baselines): the conformance kit on a tiny open_clip pair saved in open_clip's
own format, and concepts from a prompt file (split from tests/system/test_explain.py, whose checkpoint fixture it
uses)."""

from __future__ import annotations

from hica_bench.registry import load_registry
from test_explain import clip_checkpoint  # noqa: F401  (fixture: a tiny open_clip model saved as open_clip saves one)

REGISTRY = load_registry()


def test_concept_bottleneck_passes_the_conformance_kit_on_the_open_clip_pair(clip_checkpoint):
    from hica_bench import testing

    pair = REGISTRY.choose("encoder", f"open-clip:model=local-dir:{clip_checkpoint}").build(device="cpu")
    assert "random-init" not in pair.image.identity
    testing.check_method(REGISTRY.get("method", "concept-bottleneck").spec, pair=pair)


def test_concept_bottleneck_takes_its_concepts_from_a_prompt_file(tmp_path):
    """A prompt file's descriptors are the concepts of the classes it describes; the generator's fill the others."""
    from dataclasses import replace

    from hica_bench import prompts, testing
    from hica_bench_baselines.concepts import ConceptBottleneck

    task, test, _ = testing.toy_task(2, 5, needs=ConceptBottleneck.needs, components=testing.installed_components())
    path = tmp_path / "prompts.yaml"
    path.write_text("descriptors:\n  %s:\n    global: [a round dark mass]\n    local: [an angular margin, "
                    "posterior shadowing]\n" % task.class_names[0])
    task = replace(task, prompts=prompts.load(path, task.class_names, task.dataset))
    model = ConceptBottleneck().fit(task)
    assert model.concepts_[:3] == ["a round dark mass", "an angular margin", "posterior shadowing"]
    assert len(model.concepts_) > 3  # the other class's concepts come from the generator (knowledge, or templates)
    assert model.fit_info_["source"] == f"prompt file {path} (others: descriptor generator knowledge)"
    assert model.predict_proba(test).shape == (len(test), 2)

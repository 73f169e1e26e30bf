import textwrap

import pytest

from hica_bench.errors import UserError
from hica_bench.registry import Registry, load_registry, parse_choice


def _write_plugin(tmp_path, module, method_name):
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        from hica_bench import hookimpl
        from hica_bench.interfaces import PluginSpec

        @hookimpl
        def hica_bench_methods():
            return [PluginSpec("method", "{method_name}", "test method", dict, {{"alpha": 0.5, "steps": 10, "flag": False, "tag": "x"}})]
    """))


def test_first_party_plugins_are_found_through_entry_points():
    registry = load_registry()
    assert registry.get("method", "linear-probe").distribution == "hica-bench-baselines"
    assert registry.get("dataset", "breastmnist").distribution == "hica-bench-medmnist"
    assert len(registry.specs("dataset")) == 12


def test_autoload_can_be_disabled(monkeypatch):
    monkeypatch.setenv("HICA_BENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = load_registry()
    assert registry.specs("method") == {}
    with pytest.raises(UserError, match="No method plugins are installed"):
        registry.get("method", "linear-probe")


def test_duplicate_name_names_both_distributions(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_plugin(tmp_path, "dup_plugin_one", "linear-probe")
    registry = load_registry(["dup_plugin_one"])
    with pytest.raises(UserError) as info:
        registry.specs("method")
    assert "hica-bench-baselines" in str(info.value) and "-p dup_plugin_one" in str(info.value)


def test_unknown_name_suggests_close_matches():
    registry = load_registry()
    with pytest.raises(UserError, match="did you mean breastmnist"):
        registry.get("dataset", "breastmnis")
    with pytest.raises(UserError, match="Known: "):
        registry.get("method", "qwertyuiop")


def test_explicit_plugin_and_typed_options(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_plugin(tmp_path, "opt_plugin", "my-method")
    registry = load_registry(["opt_plugin"])
    choice = registry.choose("method", "my-method:alpha=0.25:steps=3:flag=yes")
    assert choice.options == {"alpha": 0.25, "steps": 3, "flag": True, "tag": "x"}
    assert choice.label == "my-method:alpha=0.25:flag=True:steps=3"
    assert registry.choose("method", "my-method:alpha=0.5").label == "my-method"  # defaults are not in the label
    for bad, message in [("my-method:steps=2.5", "must be a int"), ("my-method:beta=1", "has no option 'beta'"),
                         ("my-method:alpha=nan", "must be a float"), ("my-method:flag=maybe", "must be a bool")]:
        with pytest.raises(UserError, match=message):
            registry.choose("method", bad)


def test_parse_choice_keeps_colons_inside_values():
    name, options = parse_choice("biomedclip:model=hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224:pretrained=")
    assert name == "biomedclip"
    assert options == {"model": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "pretrained": ""}
    with pytest.raises(UserError):
        parse_choice(":x=1")


def test_unimportable_plugin_module_is_a_user_error():
    with pytest.raises(UserError, match="cannot import"):
        Registry().load_module("no_such_module_anywhere")

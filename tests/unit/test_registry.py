import re
import textwrap

import pytest

from hica_bench.errors import UserError
from hica_bench.registry import Registry, load_registry, parse_choice


def _write_plugin(tmp_path, module, method_name):
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        from hica_bench import hookimpl
        from hica_bench.interfaces import PluginSpec

        def build(alpha=0.5, steps=10, flag=False, tag="x"):
            return dict(alpha=alpha, steps=steps, flag=flag, tag=tag)

        @hookimpl
        def hica_bench_methods():
            return [PluginSpec("method", "{method_name}", "test method", build)]
    """))


def test_first_party_plugins_are_found_through_entry_points():
    registry = load_registry()
    assert registry.get("method", "linear-probe").distribution == "hica-bench-baselines"
    assert registry.get("dataset", "breastmnist").distribution == "hica-bench-medmnist"
    assert len(registry.specs("dataset")) == 19  # the 12 MedMNIST 2D sets, the 6 3D sets and folder
    assert registry.get("dataset", "folder").distribution == "hica-bench-folder"


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
    for bad, message in [("my-method:steps=2.5", "must be a whole number"), ("my-method:beta=1", "has no option 'beta'"),
                         ("my-method:alpha=nan", "must be a finite number"), ("my-method:flag=maybe", "must be true or false")]:
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


def test_every_kind_has_its_hook_and_nothing_else_does():
    import inspect

    from hica_bench import hookspecs
    from hica_bench.interfaces import KINDS
    from hica_bench.registry import hook_name, kind_named

    hooks = {name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("hica_bench_")}
    assert hooks == {hook_name(kind) for kind in KINDS}
    assert kind_named("losses") == "loss" and kind_named("roi-extractor") == "roi-extractor"
    with pytest.raises(UserError, match="unknown kind 'widgets'"):
        kind_named("widgets")


def test_the_default_suite_comes_from_the_plugins(monkeypatch):
    registry = load_registry()
    assert registry.default_suite("method") == ["zero-shot", "linear-probe", "prototype", "knn", "tip-adapter",
                                                "tip-adapter-f", "clip-adapter", "lp++", "coop"]
    assert registry.default_suite("dataset") == ["breastmnist", "pneumoniamnist"]  # in the plugin's own order
    assert registry.default_suite("encoder") == ["effnet-lite0-minilm"]
    monkeypatch.setenv("HICA_BENCH_PLUGINS", "hica-bench-medmnist,hica-bench-encoders,hica-bench-hica")
    assert load_registry().default_suite("method") == []  # without the baselines nothing is a default method


def test_options_that_name_components_are_checked_and_resolved():
    from hica_bench.registry import RunComponents

    registry = load_registry()
    hica = registry.choose("method", "hica:roi=grid")
    assert [(c.kind, c.name, c.distribution) for c in registry.components_of(hica)] == [
        ("roi-extractor", "grid", "hica-bench-hica"), ("descriptor-generator", "knowledge", "hica-bench-hica"),
        ("loss", "global-infonce", "hica-bench-hica"), ("loss", "local-infonce", "hica-bench-hica"),
        ("loss", "cross-margin", "hica-bench-hica")]
    with pytest.raises(UserError, match="option loss_cross=nope: unknown loss 'nope'"):
        registry.choose("method", "hica:loss_cross=nope")
    components = RunComponents(registry)
    with pytest.raises(UserError, match="loss 'cross-margin' has no option temperature"):
        components.build("loss", "cross-margin", temperature=0.1)
    with pytest.raises(ValueError, match="components are"):
        components.build("method", "linear-probe")
    assert components.build("loss", "cross-margin", margin=0.3).margin == 0.3
    assert [(c.name, c.options) for c in components.used] == [("cross-margin", {"margin": 0.3})]


def test_a_p_module_without_a_version_is_identified_by_its_source(tmp_path, monkeypatch):
    from hica_bench.registry import module_version

    monkeypatch.syspath_prepend(str(tmp_path))
    _write_plugin(tmp_path, "versionless_plugin", "versionless")
    registry = load_registry(["versionless_plugin"])
    registered = registry.get("method", "versionless")
    assert registered.distribution == "-p versionless_plugin" and registered.version.startswith("source-sha256:")
    import versionless_plugin

    (tmp_path / "versionless_plugin.py").write_text((tmp_path / "versionless_plugin.py").read_text() + "# edited\n")
    assert module_version(versionless_plugin) != registered.version  # an edit is a new version of the plugin


def test_a_spec_with_bad_declarations_is_left_out_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "bad_declarations.py").write_text(textwrap.dedent("""
        from hica_bench import hookimpl
        from hica_bench.interfaces import PluginSpec

        def with_roi(roi="grid"):
            return roi

        def with_m(m="x"):
            return m

        def nothing():
            return None

        @hookimpl
        def hica_bench_methods():
            return [PluginSpec("method", "typo", "names an option it lacks", with_roi, components={"rio": "roi-extractor"}),
                    PluginSpec("method", "wrong-kind", "a method option naming a method", with_m, components={"m": "method"}),
                    PluginSpec("method", "fine", "a good one", nothing)]

        @hookimpl
        def hica_bench_losses():
            return [PluginSpec("loss", "default-loss", "a component in the default suite", nothing, in_default_suite=True)]
    """))
    registry = load_registry(["bad_declarations"])
    assert "fine" in registry.specs("method") and not {"typo", "wrong-kind"} & set(registry.specs("method"))
    assert "default-loss" not in registry.specs("loss")
    problems = " ".join(registry.load_errors)
    assert "'typo' left out: components names 'rio', which is not one of its options" in problems
    assert "'wrong-kind' left out: components maps 'm' to 'method'" in problems
    assert "a loss cannot be in the default suite" in problems


def _scaled(scale: float = 1.0, mode: str = "a"):
    return scale, mode


@pytest.mark.parametrize("kind, search, problem", [
    ("loss", {"scale": (1.0, 2.0)}, "a loss cannot declare a search space"),
    ("method", {"scale": ()}, "must be a non-empty tuple of distinct candidate values"),
    ("method", {"scale": (1.0, 1.0)}, "must be a non-empty tuple of distinct candidate values"),
    ("method", {"scale": 1.0}, "must be a non-empty tuple of distinct candidate values"),
    ("method", {"scale": tuple(range(9)), "mode": tuple("abcdefgh")}, "its search space has 72 candidates; at most 64"),
])
def test_a_search_space_that_cannot_be_searched_is_refused_when_declared(kind, search, problem):
    from hica_bench.interfaces import PluginSpec, declaration_problem

    assert problem in declaration_problem(PluginSpec(kind, "x", "a spec", _scaled, search=search))


@pytest.mark.parametrize("search, problem", [
    ({"scael": (1.0, 2.0)}, "search names 'scael', which is not one of its options"),
    ({"scale": (1.0, "2")}, "search['scale'] holds '2', not a float like the default scale=1.0"),
    ({"scale": (1.0, -2.0)}, "search['scale'] holds -2.0, which must be >= 0"),
    ({"mode": ("a", "z")}, "search['mode'] holds 'z', which must be one of a, b"),
])
def test_a_search_space_that_does_not_fit_the_options_is_one_spec_error(search, problem):
    from hica_bench.interfaces import Option, PluginSpec, SpecError

    spec = PluginSpec("method", "x", "a spec", _scaled, {"scale": Option(low=0), "mode": Option(choices=("a", "b"))},
                      search=search)
    with pytest.raises(SpecError, match=re.escape(problem)):
        spec.options
    fine = PluginSpec("method", "x", "a spec", _scaled, {"scale": Option(low=0)}, search={"scale": (1.0, 2, 0.5)})
    assert fine.options == {"scale": 1.0, "mode": "a"}  # an int among float candidates is a number like the default

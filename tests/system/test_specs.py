"""Plugin specs are written once (issue 30): an option's default is its factory's (read from the signature), a spec
declares only what each option accepts, a factory may be named by string and is imported on first use, and a spec
whose declarations do not fit its factory is reported by name instead of breaking the registry."""

from __future__ import annotations

import dataclasses
import inspect
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

from conftest import TEST_PLUGINS, hica_bench, invoke
from hica_bench import testing
from hica_bench.errors import UserError
from hica_bench.interfaces import FIXED_ARGUMENTS, KINDS, Option, PluginSpec, SpecError
from hica_bench.registry import load_registry

FIRST_PARTY = {"hica-bench-medmnist", "hica-bench-folder", "hica-bench-encoders", "hica-bench-baselines",
               "hica-bench-hica"}
HEAVY = ("torch", "torchvision", "open_clip", "transformers", "timm", "monai", "sklearn")


def first_party() -> list:
    registered = [r for r in load_registry().all() if r.distribution in FIRST_PARTY]
    assert {r.distribution for r in registered} == FIRST_PARTY
    return registered


def signature_defaults(spec: PluginSpec) -> dict:
    """The options a spec should have, read here from its factory's signature on our own."""
    fixed = FIXED_ARGUMENTS.get(spec.kind, ())
    found = {}
    for name, parameter in inspect.signature(spec.load_factory()).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is not parameter.empty and name not in fixed:
            found[name] = parameter.default
        elif name in spec.defaults:  # only where the signature has no default
            found[name] = spec.defaults[name]
    return found


# --------------------------------------------------------------------------- first-party specs


def test_every_first_party_default_is_its_factorys():
    for registered in first_party():
        spec = registered.spec
        expected = signature_defaults(spec)
        assert list(spec.options.items()) == list(expected.items()), spec.name  # same names, values and order
        assert [type(v) for v in spec.options.values()] == [type(v) for v in expected.values()], spec.name
        testing.check_spec(spec, spec.kind)  # the kit's check of the same agreement
    # a default outside the signature only where the signature cannot give one: the folder's root (a fixed argument)
    written = {(r.spec.kind, r.spec.name): r.spec.defaults for r in first_party() if r.spec.defaults}
    assert written == {("dataset", "folder"): {"root": ""}}


def test_an_option_declares_no_default():
    assert [f.name for f in dataclasses.fields(Option)] == ["low", "high", "low_open", "choices"]
    with pytest.raises(TypeError):
        Option(0.07, low=0)  # the old spelling: a default first
    for registered in first_party():
        assert all(type(c) is Option for c in registered.spec.constraints.values()), registered.spec.name


def test_the_listing_shows_the_factories_defaults_and_the_constraints(monkeypatch):
    """What ``hica-bench list`` shows of each first-party spec, against its factory's signature read here."""
    from hica_bench.cli import listing

    tables = []

    class Capture:
        def __init__(self, *args, **kwargs):
            pass

        def print(self, table, *args, **kwargs):
            tables.append(table)

    monkeypatch.setattr(listing, "Console", Capture)
    code, _, err = invoke("list")
    assert code == 0, err
    columns = {column.header: list(column._cells) for column in tables[0].columns}
    shown = {(kind, name.removesuffix(" *")): options
             for name, kind, options in zip(columns["name"], columns["kind"], columns["options"])}
    for registered in first_party():
        spec = registered.spec
        expected = " ".join(f"{key}={value}" + (f" ({spec.constraints[key].describe()})" if key in spec.constraints
                                                else "") for key, value in signature_defaults(spec).items())
        assert shown[(spec.kind, spec.name)] == expected, spec.name
    assert shown[("method", "prototype")] == "temperature=0.05 (> 0)"
    assert shown[("encoder", "monai-3d")] == ("model=resnet18 (one of resnet10, resnet18, resnet34, resnet50, densenet121) "
                                              "checkpoint= size=64 (>= 16) text=minilm")
    assert shown[("dataset", "folder")].startswith("root= name= exclude= val_fraction=0.1 (within [0, 0.9])")


def test_hica_variants_are_factories_with_other_defaults():
    registry = load_registry()
    options = {name: registry.get("method", name).spec.options
               for name in ("hica", "hica-no-local", "hica-no-cross", "hica-no-stage1", "hica-encoder")}
    base = options["hica"]
    assert len(base) == 20 and "stage1_encoder" not in base  # the feature-adapter variants' identities as they were
    assert options["hica-no-local"] == {**base, "lambda1": 0.0}
    assert options["hica-no-cross"] == {**base, "lambda2": 0.0}
    assert options["hica-no-stage1"] == {**base, "stage1": False}
    assert list(options["hica-encoder"])[:20] == list(base) and options["hica-encoder"]["stage1_encoder"] is True
    assert len(options["hica-encoder"]) == 28
    built = registry.choose("method", "hica-encoder:stage2_blocks=1:lambda1=0.25").build()
    assert built.options["stage2_blocks"] == 1 and built.options["lambda1"] == 0.25 and "encoders" in built.needs


def test_loading_and_listing_import_no_heavy_library():
    """Every first-party family module is light: loading the registry and reading every spec's options (what
    ``hica-bench list`` does) imports none of torch, open_clip, transformers, timm, monai."""
    script = ("import sys; from hica_bench.registry import load_registry; r = load_registry(); "
              "[reg.spec.options for reg in r.all()]; assert not r.load_errors, r.load_errors; "
              f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


# --------------------------------------------------------------------------- a third party's specs


def _plugin(tmp_path, monkeypatch, name: str, source: str) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))


LAZY_IMPL = '''
    import numpy as np

    class Flat:
        """Uniform probabilities; ``temperature`` is only remembered."""
        needs = frozenset({"image_features"})

        def __init__(self, temperature=0.5, steps=3):
            self.temperature, self.steps = temperature, steps

        def fit(self, task):
            self.n_ = task.n_classes
            return self

        def predict_proba(self, features):
            return np.full((len(features), self.n_), 1 / self.n_)

    def card(device, ratio=2.0):
        return None

    def pair(device, ratio=2.0):
        raise RuntimeError("not built in these tests")
'''

LAZY_HOOKS = '''
    from hica_bench import hookimpl
    from hica_bench.interfaces import Option, PluginSpec

    @hookimpl
    def hica_bench_methods():
        return [PluginSpec("method", "flat", "uniform (tests)", "lazy_impl_specs:Flat",
                           {"temperature": Option(low=0, low_open=True)}),
                PluginSpec("method", "no-such-class", "its module exists, its class does not (tests)",
                           "lazy_impl_specs:Missing"),
                PluginSpec("method", "raises-on-import", "its module raises while importing (tests)",
                           "lazy_broken_specs:Flat")]

    @hookimpl
    def hica_bench_encoders():
        return [PluginSpec("encoder", "lazy-pair", "described by string too (tests)", "lazy_impl_specs:pair",
                           describe="lazy_impl_specs:card")]
'''


def test_a_factory_named_by_string_is_imported_on_first_use(tmp_path, monkeypatch):
    _plugin(tmp_path, monkeypatch, "lazy_impl_specs", LAZY_IMPL)
    _plugin(tmp_path, monkeypatch, "lazy_hooks_specs", LAZY_HOOKS)
    (tmp_path / "lazy_broken_specs.py").write_text("raise ImportError('a dependency is missing')\n")
    monkeypatch.delitem(sys.modules, "lazy_impl_specs", raising=False)
    registry = load_registry(["lazy_hooks_specs"])
    assert {"flat", "no-such-class", "raises-on-import"} <= set(registry.specs("method"))  # its module exists
    assert registry.load_errors == [] and "lazy_impl_specs" not in sys.modules  # nothing imported yet
    choice = registry.choose("method", "flat:temperature=0.25")
    assert "lazy_impl_specs" in sys.modules
    assert choice.options == {"temperature": 0.25, "steps": 3} and choice.label == "flat:temperature=0.25"
    assert choice.build().temperature == 0.25
    with pytest.raises(UserError, match=r"option temperature=0 of method 'flat' must be > 0"):
        registry.choose("method", "flat:temperature=0")
    with pytest.raises(UserError, match=r"method 'flat' has no option 'tau' \(options: steps, temperature\)"):
        registry.choose("method", "flat:tau=1")
    encoder = registry.choose("encoder", "lazy-pair:ratio=3")
    assert encoder.options == {"ratio": 3.0} and encoder.describe(device="cpu") is None
    # the module exists but the class does not, or the module raises: one line naming the plugin, when it is used
    with pytest.raises(UserError, match=r"plugin from -p lazy_hooks_specs: method 'no-such-class': its factory "
                                        r"lazy_impl_specs:Missing cannot be imported \(lazy_impl_specs has no Missing\)"):
        registry.choose("method", "no-such-class")
    with pytest.raises(UserError, match=r"method 'raises-on-import': its factory lazy_broken_specs:Flat cannot be "
                                        r"imported \(ImportError: a dependency is missing\)"):
        registry.get("method", "raises-on-import")
    with pytest.raises(SpecError, match="cannot be imported") as raised:  # the spec keeps its answer
        registry.specs("method")["no-such-class"].spec.options
    again = pickle.loads(pickle.dumps(raised.value))  # e.g. from a Ray worker to the driver
    assert str(again) == str(raised.value) and again.problem == raised.value.problem


def test_a_broken_string_factory_is_one_line_from_the_cli(tmp_path):
    (tmp_path / "lazy_impl_specs.py").write_text(textwrap.dedent(LAZY_IMPL))
    (tmp_path / "lazy_hooks_specs.py").write_text(textwrap.dedent(LAZY_HOOKS))
    (tmp_path / "lazy_broken_specs.py").write_text("raise ImportError('a dependency is missing')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")])}
    listed = hica_bench("-p", "lazy_hooks_specs", "list", "encoder", env=env)
    assert listed.returncode == 0 and "lazy-pair" in listed.stdout and "ratio=2.0" in listed.stdout, listed.stderr
    listed = hica_bench("-p", "lazy_hooks_specs", "list", "method", env=env)  # the broken row says why; the rest list
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert "no-such-class" in listed.stdout and "raises-on-import" in listed.stdout and "flat" in listed.stdout
    assert listed.stdout.count("unavailable:") == 2  # the two broken factories' rows say so (the table folds the why)
    broken = hica_bench("-p", "lazy_hooks_specs", "run", "--methods", "no-such-class", env=env)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr and len(broken.stderr.strip().splitlines()) == 1
    assert "method 'no-such-class': its factory lazy_impl_specs:Missing cannot be imported" in broken.stderr


def test_declarations_that_do_not_fit_the_factory_are_load_errors_naming_the_plugin(tmp_path, monkeypatch):
    _plugin(tmp_path, monkeypatch, "misfit_specs", '''
        from hica_bench import hookimpl
        from hica_bench.interfaces import Option, PluginSpec

        class Method:
            needs = frozenset({"image_features"})

            def __init__(self, alpha=0.5, steps=10):
                self.alpha, self.steps = alpha, steps

        def taking_more(device, **options):
            return options

        def dataset(root, size, download, cache_dir, flavour="plain"):
            return None

        def partial_dataset(root, size, cache_dir):
            return None

        @hookimpl
        def hica_bench_methods():
            return [PluginSpec("method", "typo", "a constraint for an option it lacks", Method, {"alhpa": Option(low=0)}),
                    PluginSpec("method", "twice", "a default in the spec for a parameter that has one", Method,
                               defaults={"alpha": 0.1}),
                    PluginSpec("method", "not-taken", "a default for a name its factory does not take", Method,
                               defaults={"gamma": 1}),
                    PluginSpec("method", "fine", "all in the signature", Method, {"steps": Option(low=1)})]

        @hookimpl
        def hica_bench_encoders():
            return [PluginSpec("encoder", "through-kwargs", "defaults for what **options takes", taking_more,
                               {"width": Option(low=1)}, defaults={"width": 4, "name": "x"})]

        @hookimpl
        def hica_bench_datasets():
            return [PluginSpec("dataset", "own-root", "a fixed argument offered as an option", dataset,
                               defaults={"root": ""}),
                    PluginSpec("dataset", "no-download", "does not take a fixed argument", partial_dataset)]
    ''')
    registry = load_registry(["misfit_specs"])
    assert set(registry.specs("method")) & {"typo", "twice", "not-taken", "fine"} == {"fine"}
    problems = "\n".join(registry.load_errors)
    for line in ["plugin from -p misfit_specs: method 'typo' left out: constraints names 'alhpa', which is not one of "
                 "its options (alpha, steps: read from the signature of its factory Method)",
                 "method 'twice' left out: defaults gives alpha=0.1, but its factory Method already has alpha=0.5; a "
                 "default is written once, in the signature",
                 "method 'not-taken' left out: defaults names gamma, which its factory Method does not take",
                 "dataset 'no-download' left out: its factory partial_dataset does not take download, which the core "
                 "passes to every dataset factory"]:
        assert line in problems, problems
    assert len(registry.load_errors) == 4
    assert registry.get("encoder", "through-kwargs").spec.options == {"width": 4, "name": "x"}
    assert registry.choose("encoder", "through-kwargs:width=8").build(device="cpu") == {"width": 8, "name": "x"}
    assert registry.get("dataset", "own-root").spec.options == {"root": "", "flavour": "plain"}
    assert registry.choose("method", "fine").options == {"alpha": 0.5, "steps": 10}


def test_the_kit_checks_a_spec_against_its_factory():
    class Method:
        needs = frozenset({"image_features"})

        def __init__(self, alpha=0.5):
            self.alpha = alpha

    testing.check_spec(PluginSpec("method", "ok", "fine", Method, {"alpha": Option(low=0)}))
    for spec, message in [
        (PluginSpec("method", "typo", "x", Method, {"alpha": Option(low=0), "beta": Option(low=0)}), "constraints names 'beta'"),
        (PluginSpec("method", "range", "x", Method, {"alpha": Option(low=1)}), "the default alpha=0.5 must be >= 1"),
        (PluginSpec("method", "by-string", "x", "hica_bench.no_such_module:Method"), "cannot be imported"),
        (PluginSpec("method", "old", "x", Method, {"alpha": 0.5}), "not an Option"),  # type: ignore[dict-item]
        (PluginSpec("encoder", "card", "x", lambda device, side=2: None, describe=lambda device: None),
         "its describe does not take ['side']"),
    ]:
        with pytest.raises(AssertionError, match=message.replace("[", r"\[").replace("(", r"\(")):
            testing.check_spec(spec)


def test_every_kind_has_its_fixed_arguments_documented():
    from hica_bench import hookspecs

    assert set(FIXED_ARGUMENTS) <= set(KINDS)
    for kind, fixed in FIXED_ARGUMENTS.items():
        doc = getattr(hookspecs, "hica_bench_" + kind.replace("-", "_") + "s").__doc__
        assert f"factory({', '.join(fixed)}, **options)" in doc

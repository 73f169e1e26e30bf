"""Specs that cannot be used (``hica-bench -p hostile_specs``): each is left out with one warning line, and the
listing and runs of every other plugin go on."""

from hica_bench import hookimpl
from hica_bench.interfaces import Option, PluginSpec


class Prior:
    needs = frozenset({"image_features"})


def list_default(sizes=[1, 2]):  # noqa: B006 (a default the CLI cannot give, on purpose)
    return Prior()


def negative_t(t=-1.0):
    return Prior()


def nan_t(t=float("nan")):
    return Prior()


def text_mode(mode="abc"):
    return Prior()


def without_default(x):
    return Prior()


@hookimpl
def hica_bench_methods():
    return [
        PluginSpec("method", "no-description", None, Prior),  # type: ignore[arg-type]
        PluginSpec("method", "bad name", "a name the command line cannot spell (tests)", Prior),
        PluginSpec("method", "list-default", "an option default of a type the CLI cannot give (tests)", list_default),
        PluginSpec("method", "out-of-its-range", "a default outside its own declared range (tests)", negative_t,
                   {"t": Option(low=0)}),
        PluginSpec("method", "nan-default", "a NaN default for a ranged option (tests)", nan_t, {"t": Option(low=0)}),
        PluginSpec("method", "text-range", "a numeric range on a text option (tests)", text_mode, {"mode": Option(low=0)}),
        PluginSpec("method", "constraints-none", "constraints that are not a dict (tests)", Prior, None),  # type: ignore[arg-type]
        PluginSpec("method", "default-in-spec", "a default written in the spec, not the signature (tests)", Prior,
                   {"t": 0.5}),  # type: ignore[dict-item]
        PluginSpec("method", "unknown-constraint", "a constraint for something its factory does not take (tests)",
                   negative_t, {"t": Option(high=0), "nope": Option(low=0)}),
        PluginSpec("method", "no-default", "a factory parameter without a default (tests)", without_default),
        PluginSpec("method", "missing-module", "a factory named by string whose module does not exist (tests)",
                   "no_such_module_anywhere.methods:Thing"),
        "not a spec at all",
        PluginSpec("method", "usable", "the one good spec of this module (tests)", Prior),
    ]

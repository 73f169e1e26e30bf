"""Plugin discovery: entry points -> pluggy -> one name -> spec map per kind.

Plugins come from the ``hica_bench`` entry-point group (unless ``HICA_BENCH_DISABLE_PLUGIN_AUTOLOAD``
is set; only the distributions named in ``HICA_BENCH_PLUGINS`` when that allow-list is set) and from
modules named explicitly (``hica-bench -p module``). A plugin that fails to import, or whose hook raises,
is left out and reported in ``load_errors``; the others still load. A name offered twice within a
kind is an error naming both distributions; an unknown name is answered with close matches.

A run resolves everything through one :class:`Registry`: what the user names (:meth:`Registry.choose`), what
the installed plugins declare as the default suite (:meth:`Registry.default_suite`), and what plugins build while
they run (:class:`RunComponents`, handed to methods as ``FewShotTask.components``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import pluggy

from hica_bench import hookspecs
from hica_bench.errors import PLUGIN_FAULTS, UserError, fault_text
from hica_bench.files import digest, file_sha256, short
from hica_bench.interfaces import COMPONENT_KINDS, KINDS, PluginSpec, SpecError, declaration_problem
from hica_bench.results import Component
from hica_bench.startup import collection_paused

ENTRY_POINT_GROUP = "hica_bench"
DISABLE_AUTOLOAD_ENV = "HICA_BENCH_DISABLE_PLUGIN_AUTOLOAD"
ALLOW_ENV = "HICA_BENCH_PLUGINS"  #: comma list of distribution names: load only their entry points


def plural(kind: str) -> str:
    """``dataset`` -> ``datasets``, ``loss`` -> ``losses``."""
    return kind + ("es" if kind.endswith("s") else "s")


def hook_name(kind: str) -> str:
    """The hook of :mod:`hica_bench.hookspecs` that offers ``kind``: ``roi-extractor`` -> ``hica_bench_roi_extractors``."""
    return "hica_bench_" + plural(kind).replace("-", "_")


def kind_named(text: str) -> str:
    """A kind from its singular or plural spelling, else a UserError listing the kinds."""
    for kind in KINDS:
        if text in (kind, plural(kind)):
            return kind
    raise UserError(f"unknown kind {text!r}; kinds are: {', '.join(KINDS)}")


@dataclass(frozen=True)
class Registered:
    """A spec together with where it came from."""

    spec: PluginSpec
    distribution: str  #: distribution name, or ``-p module`` for explicitly loaded modules
    version: str


#: An option every dataset takes, handled by the core (not passed to the plugin): a prompt file (:mod:`hica_bench.prompts`).
PROMPTS_OPTION = "prompts"
#: Options every dataset takes, handled by the core: its test split corrupted (:mod:`hica_bench.corruptions`).
CORRUPTION_OPTIONS = ("corruption", "severity")


@dataclass(frozen=True)
class Choice:
    """A spec chosen on the command line with its converted options, e.g. ``hica:lambda1=0.5``. A dataset may also
    carry a prompt file (``breastmnist:prompts=my.yaml``), which the core reads: ``prompts``; and a corruption of its
    test split (``breastmnist:corruption=jpeg_compression:severity=3``), which the core applies: ``corruption``."""

    registered: Registered
    options: dict[str, Any]
    prompts: str | None = None
    corruption: tuple[str, int] | None = None  #: (name, severity 1-5): :class:`hica_bench.corruptions.CorruptedDataset`

    @property
    def name(self) -> str:
        return self.registered.spec.name

    @property
    def label(self) -> str:
        """Canonical text: the name plus the options that differ from their defaults, sorted (a corruption last)."""
        if self.corruption is None:
            return self.base_label
        return f"{self.base_label}:corruption={self.corruption[0]}:severity={self.corruption[1]}"

    @property
    def base_label(self) -> str:
        """The label without a corruption: what tables show as the dataset (the corruption has columns of its own)."""
        defaults = self.registered.spec.options
        changed = {k: v for k, v in self.options.items() if defaults.get(k) != v}
        if self.prompts is not None:
            changed[PROMPTS_OPTION] = self.prompts
        return ":".join([self.name] + [f"{k}={v}" for k, v in sorted(changed.items())])

    @property
    def ref(self) -> Component:
        """This plugin as a result records it: kind, name, full options, distribution and version."""
        spec = self.registered.spec
        return Component(spec.kind, spec.name, dict(self.options), self.registered.distribution, self.registered.version)

    def build(self, **fixed: Any) -> Any:
        """The factory called with the kind's fixed arguments and the options; an option named like a fixed argument
        replaces it (the ``folder`` dataset's own ``root=`` in place of the data root). A dataset with a corruption
        comes back with its test split corrupted."""
        with collection_paused():  # a factory imports its libraries (torch, open_clip...) the first time
            built = self.registered.spec.load_factory()(**{**fixed, **self.options})
        if self.corruption is not None:
            from hica_bench.corruptions import CorruptedDataset

            built = CorruptedDataset(built, *self.corruption, plugin=self.name)
        return built

    def describe(self, **fixed: Any) -> Any:
        """An encoder's :class:`~hica_bench.interfaces.EncoderCard` from its spec's ``describe`` without building it;
        None when the spec has no ``describe`` or it cannot tell cheaply."""
        with collection_paused():
            describe = self.registered.spec.load_describe()
            return None if describe is None else describe(**fixed, **self.options)


class Registry:
    """All plugins of one process. Build with :func:`load_registry`."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("hica_bench")
        self.pm.add_hookspecs(hookspecs)
        self._origin: dict[int, tuple[str, str]] = {}  # id(plugin) -> (distribution, version)
        self.load_errors: list[str] = []
        self._specs: dict[str, dict[str, Registered]] | None = None
        self.recipe = Recipe()  #: how to load this registry again in another process (a Ray worker)

    # -- loading
    def load_entry_points(self, only: Iterable[str] | None = None) -> None:
        """Every entry point of the group, or only those of the distributions named in ``only``."""
        allowed = None if only is None else {_normal(name) for name in only}
        self.recipe = dataclasses.replace(self.recipe, entry_points=True, only=None if only is None else tuple(only))
        installed: set[str] = set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            installed.add(dist)
            if allowed is not None and _normal(dist) not in allowed:
                continue
            try:
                plugin = ep.load()
            except PLUGIN_FAULTS as exc:  # one broken plugin must not hide the others (nor sys.exit in it)
                self.load_errors.append(f"plugin {ep.name!r} from {dist} failed to import: {_one_line(exc)}")
                continue
            self._add(plugin, ep.name, dist, version)
        unknown = sorted((allowed or set()) - {_normal(d) for d in installed})
        if unknown:
            raise UserError(f"${ALLOW_ENV} / --plugins-only names {', '.join(unknown)}, which installs no hica_bench "
                            f"plugin (installed: {', '.join(sorted(installed)) or 'none'})")

    def load_module(self, module_name: str) -> None:
        try:
            module = importlib.import_module(module_name)
        except PLUGIN_FAULTS as exc:  # ImportError, or whatever the module raises (or exits with) while importing
            raise UserError(f"-p {module_name}: cannot import it ({_one_line(exc)})") from None
        self._add(module, module_name, f"-p {module_name}", module_version(module))
        file = Path(getattr(module, "__file__", "") or "")
        top = file.parents[module_name.count(".") + (file.name == "__init__.py")] if file.is_file() else None
        self.recipe = dataclasses.replace(self.recipe, modules=(*self.recipe.modules, module_name),
                                          paths=(*self.recipe.paths, *([str(top)] if top else [])))

    def _add(self, plugin: object, name: str, dist: str, version: str) -> None:
        if self.pm.is_registered(plugin):
            return
        self.pm.register(plugin, name=f"{dist}:{name}")
        self._origin[id(plugin)] = (dist, version)
        self._specs = None

    # -- lookup
    def specs(self, kind: str) -> dict[str, Registered]:
        if self._specs is None:
            self._specs = {k: self._collect(k) for k in KINDS}
        return self._specs[kind]

    def _collect(self, kind: str) -> dict[str, Registered]:
        found: dict[str, Registered] = {}
        for impl in getattr(self.pm.hook, hook_name(kind)).get_hookimpls():
            dist, version = self._origin.get(id(impl.plugin), (impl.plugin_name, "?"))
            try:
                offered = list(impl.function() or [])
            except PLUGIN_FAULTS as exc:  # a broken hook leaves out its own specs only
                self.load_errors.append(f"plugin from {dist}: {hook_name(kind)} failed: {_one_line(exc)}")
                continue
            for spec in offered:
                if not isinstance(spec, PluginSpec) or spec.kind != kind:  # leaves out that item only
                    shown = " ".join(repr(spec).split())[:60]
                    self.load_errors.append(f"plugin from {dist}: {hook_name(kind)} returned {shown} (a "
                                            f"{type(spec).__name__}), not a {kind} spec; left out")
                    continue
                problem = spec_problem(spec)
                if problem:
                    self.load_errors.append(f"plugin from {dist}: {kind} {spec.name!r} left out: {problem}")
                    continue
                if spec.name in found:
                    other = found[spec.name].distribution
                    raise UserError(f"{kind} {spec.name!r} is registered twice: by {other} and by {dist}")
                found[spec.name] = Registered(spec, dist, version)
        return found

    def get(self, kind: str, name: str) -> Registered:
        """The plugin ``name`` of ``kind``, its factory loaded (one named by string is imported here, on first use); an
        unknown name, or a spec that cannot be used, is a UserError naming it."""
        specs = self.specs(kind)
        if name in specs:
            registered = specs[name]
            try:
                registered.spec.load_factory()
            except SpecError as exc:
                raise UserError(f"plugin from {registered.distribution}: {exc}") from None
            return registered
        close = difflib.get_close_matches(name, list(specs), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        known = f" Known: {', '.join(sorted(specs))}." if specs else f" No {kind} plugins are installed."
        raise UserError(f"unknown {kind} {name!r}{hint}{known if not close else ''}")

    def choose(self, kind: str, text: str) -> Choice:
        """Parse ``name:key=value:key2=value`` against the named spec's declared options; options that name another
        plugin (``PluginSpec.components``) must name one that is installed."""
        name, options = parse_choice(text)
        registered = self.get(kind, name)
        prompts = None
        if kind == "dataset" and PROMPTS_OPTION not in registered.spec.options and PROMPTS_OPTION in options:
            prompts = options.pop(PROMPTS_OPTION)
            if not prompts:
                raise UserError(f"{text!r}: prompts= needs a file (a .yaml or .json prompt file; see docs/own-data.md)")
        corruption = None
        if kind == "dataset" and any(o in options and o not in registered.spec.options for o in CORRUPTION_OPTIONS):
            corruption = corruption_option(text, name, options.pop("corruption", None), options.pop("severity", None))
        choice = Choice(registered, convert_options(registered.spec, options), prompts, corruption)
        self.components_of(choice)
        return choice

    def components_of(self, choice: Choice, _outer: tuple[str, ...] = ()) -> tuple[Component, ...]:
        """The plugins ``choice``'s options name (``PluginSpec.components``), and those theirs name, in option order;
        a name that is not installed, or a plugin that names itself through others, is a UserError naming the option."""
        found: list[Component] = []
        for option, kind in choice.registered.spec.components.items():
            value = choice.options.get(option)
            if not value:
                continue
            where = f"{choice.registered.spec.kind} {choice.name!r} option {option}={value}"
            try:
                registered = self.get(kind, str(value))
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None
            if f"{kind}:{value}" in _outer:
                raise UserError(f"{where}: names itself through {' -> '.join(_outer)}")
            named = Choice(registered, dict(registered.spec.options))
            found += [named.ref, *self.components_of(named, (*_outer, f"{kind}:{value}"))]
        return tuple(found)

    def default_suite(self, kind: str) -> list[str]:
        """The names of ``kind`` the installed plugins declare as the default suite (``PluginSpec.in_default_suite``),
        in registration order."""
        return [name for name, registered in self.specs(kind).items() if registered.spec.in_default_suite]

    def all(self) -> Iterable[Registered]:
        for kind in KINDS:
            yield from self.specs(kind).values()


@dataclass(frozen=True)
class Recipe:
    """What a registry was loaded from (picklable): entry points (all, or those of the ``only`` distributions) and the
    ``-p`` modules with the folders they were imported from. Another process on the same installation loads the same
    plugins with :meth:`load` (a Ray worker: :mod:`hica_bench.executors`)."""

    entry_points: bool = False
    only: tuple[str, ...] | None = None
    modules: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()  #: where the ``-p`` modules were found (put on ``sys.path`` first)

    def load(self) -> "Registry":
        for path in reversed(self.paths):
            if path not in sys.path:
                sys.path.insert(0, path)
        registry = Registry()
        if self.entry_points:
            registry.load_entry_points(self.only)
        for module in self.modules:
            registry.load_module(module)
        return registry


class RunComponents:
    """The run's :class:`hica_bench.interfaces.Components`: builds ROI extractors, descriptor generators and losses
    from ``registry`` and records each one built in :attr:`used` (the runner makes one per cell, so ``used`` is what
    that cell's method built). A component's declared component options (``PluginSpec.components``) are built too,
    through this same object, and handed to its factory as objects."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.used: list[Component] = []

    def _registered(self, kind: str, name: str) -> Registered:
        if kind not in COMPONENT_KINDS:
            raise ValueError(f"components are {', '.join(COMPONENT_KINDS)}; {kind!r} is not one of them")
        return self.registry.get(kind, name)

    def options(self, kind: str, name: str) -> dict[str, Any]:
        return dict(self._registered(kind, name).spec.options)

    def build(self, kind: str, name: str, **options: Any) -> Any:
        registered = self._registered(kind, name)
        spec = registered.spec
        unknown = sorted(set(options) - set(spec.options))
        if unknown:
            raise UserError(f"{kind} {name!r} has no option {', '.join(unknown)} "
                            f"(options: {', '.join(sorted(spec.options)) or 'none'})")
        resolved = {**spec.options, **options}
        self.used.append(Choice(registered, resolved).ref)
        arguments = dict(resolved)
        for option, component_kind in spec.components.items():
            value = arguments.get(option)
            if isinstance(value, str) and value:
                arguments[option] = self.build(component_kind, value)
        return spec.load_factory()(**arguments)


def spec_problem(spec: PluginSpec) -> str | None:
    """What is wrong with a spec, or None, found while the registry loads (the rules are on
    :class:`~hica_bench.interfaces.PluginSpec`): its declarations, and its options against its factory's signature.
    A factory named by string is not imported here, only looked for: its module must exist (the rest is checked
    when the spec is first used, :meth:`Registry.get`)."""
    problem = declaration_problem(spec)
    if problem:
        return problem
    if isinstance(spec.factory, str):
        module = spec.factory.split(":")[0]
        try:
            found = importlib.util.find_spec(module)
        except PLUGIN_FAULTS as exc:  # a parent package that is missing, or raises while importing
            return f"its factory {spec.factory} cannot be imported ({_one_line(exc)})"
        return None if found is not None else f"its factory {spec.factory} cannot be imported (no module {module})"
    try:
        spec.options
    except SpecError as exc:
        return exc.problem
    return None


def load_registry(modules: Iterable[str] = ()) -> Registry:
    """Entry points (per the environment variables above), then ``modules``. ``load_errors`` is complete
    once the specs have been collected (the first :meth:`Registry.specs` call)."""
    registry = Registry()
    given = os.environ.get(ALLOW_ENV, "")
    allowed = [name.strip() for name in given.split(",")] if given else None
    if allowed is not None and not all(allowed):  # " , " names nothing: refused, as --plugins-only refuses it
        raise UserError(f"${ALLOW_ENV} takes a comma-separated list of distribution names; got {short(given)} "
                        "(unset it to load every installed plugin)")
    if os.environ.get(DISABLE_AUTOLOAD_ENV):
        if allowed:
            raise UserError(f"{DISABLE_AUTOLOAD_ENV} turns entry-point plugins off, yet ${ALLOW_ENV} / --plugins-only "
                            "names some to load; unset one of them")
    with collection_paused():  # imports every plugin's module
        if not os.environ.get(DISABLE_AUTOLOAD_ENV):
            registry.load_entry_points(allowed)
        for module in modules:
            registry.load_module(module)
    return registry


def module_version(module: Any) -> str:
    """A ``-p`` module's ``__version__``, else a digest of its source (every ``.py`` file of a package), so that
    editing a module loaded with ``-p`` changes the identity of the results it produces."""
    declared = getattr(module, "__version__", None)
    if declared:
        return str(declared)
    path = Path(getattr(module, "__file__", "") or "")
    if not path.is_file():
        return "?"
    sources = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    return "source-sha256:" + digest([[str(p.relative_to(path.parent)), file_sha256(p)] for p in sources], 16)


def _normal(name: str) -> str:
    """A distribution name in its normal form (PEP 503): ``Hica_Bench.Baselines`` -> ``hica-bench-baselines``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _one_line(exc: BaseException) -> str:
    return fault_text(exc)


_OPTION_START = re.compile(r":(?=[A-Za-z_][\w.-]*=)")


def corruption_option(text: str, name: str, corruption: str | None, severity: str | None) -> tuple[str, int]:
    """``corruption=NAME:severity=S`` of a dataset spec, checked against the dataset's corruption set."""
    from hica_bench import corruptions

    if not corruption or severity is None:
        raise UserError(f"{text!r}: a corruption needs both corruption=NAME and severity=1..5")
    try:
        level = int(severity)
    except ValueError:
        raise UserError(f"{text!r}: severity must be 1 to 5, got {severity!r}") from None
    corruptions.check(text, name, corruption, level)
    return corruption, level


def parse_choice(text: str) -> tuple[str, dict[str, str]]:
    """``hica:lambda1=0.5:tau=0.07`` -> ("hica", {"lambda1": "0.5", "tau": "0.07"}).

    A colon only starts an option when ``key=`` follows it, so values may contain colons
    (``model=hf-hub:microsoft/BiomedCLIP-...``).
    """
    text = text.strip()
    name, *parts = _OPTION_START.split(text)
    if not name or not re.fullmatch(r"[\w.+-]+", name):
        raise UserError(f"malformed name {text!r}: expected NAME or NAME:key=value:key=value")
    options: dict[str, str] = {}
    for part in parts:
        key, _, value = part.partition("=")
        if key in options:
            raise UserError(f"option {key!r} given twice in {text!r}")
        options[key] = value
    return name, options


def convert_options(spec: PluginSpec, raw: dict[str, str]) -> dict[str, Any]:
    """Fill defaults, convert each given value to the type of its default, and check it against the option's declared
    range or choices (:class:`hica_bench.interfaces.Option`)."""
    result = dict(spec.options)
    for key, value in raw.items():
        if key not in spec.options:
            allowed = ", ".join(sorted(spec.options)) or "none"
            raise UserError(f"{spec.kind} {spec.name!r} has no option {key!r} (options: {allowed})")
        result[key] = _convert(spec, key, value, spec.options[key])
        constraint = spec.constraints.get(key)
        problem = constraint.problem(result[key]) if constraint else None
        if problem:
            raise UserError(f"option {key}={value} of {spec.kind} {spec.name!r} {problem}")
    return result


def _convert(spec: PluginSpec, key: str, value: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            number = float(value)
            if number != number or number in (float("inf"), float("-inf")):  # NaN, inf
                raise ValueError
            return number
    except ValueError:
        kind = {"bool": "true or false", "int": "a whole number", "float": "a finite number"}[type(default).__name__]
        raise UserError(f"option {key}={value!r} of {spec.kind} {spec.name!r} must be {kind}") from None
    return value

"""What plugins build: the typed interfaces of every plugin kind, and the data the runner hands them.

Shapes use N = number of images, C = number of classes, D = embedding width, K = regions per image.
Arrays handed to plugins are numpy unless a signature says ``torch.Tensor``. No I/O lives here.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence, get_args, runtime_checkable

import numpy as np

from hica_bench.errors import PLUGIN_FAULTS, UserError, fault_text

#: The kinds of plugin, each offered by one hook of :mod:`hica_bench.hookspecs` (``hica_bench_<kind>s``).
Kind = Literal["dataset", "encoder", "method", "roi-extractor", "descriptor-generator", "loss", "protocol"]
KINDS: tuple[str, ...] = get_args(Kind)
#: Kinds that other plugins build while they run, through :class:`Components` (not named on the command line).
COMPONENT_KINDS = ("roi-extractor", "descriptor-generator", "loss")


#: The arguments the core passes to every factory of a kind, by name (see :mod:`hica_bench.hookspecs`); they are not
#: options. A kind not named here passes none: its factory receives the options only.
FIXED_ARGUMENTS: dict[str, tuple[str, ...]] = {"dataset": ("root", "size", "download", "cache_dir"), "encoder": ("device",)}


@dataclass(frozen=True, kw_only=True)
class Option:
    """The values one option accepts: a range, e.g. ``Option(low=0, low_open=True)`` for a temperature > 0 or
    ``Option(low=0, high=1)`` for a fraction, or choices, e.g. ``Option(choices=("cls", "mean"))``. It holds no default:
    the default is the factory's own (see :class:`PluginSpec`). The registry checks every value given on the command
    line, and every default, against it before anything runs; ``hica-bench list`` shows it."""

    low: float | None = None  #: smallest accepted value (inclusive unless ``low_open``)
    high: float | None = None  #: largest accepted value (inclusive)
    low_open: bool = False
    choices: tuple | None = None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not accepted, or None."""
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}"
        if (self.low is not None or self.high is not None) and value != value:  # NaN compares false with any bound
            return f"must be {self.describe()}, not NaN"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"must be {self.describe()}"
        if self.high is not None and value > self.high:
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.low is not None and self.high is not None:
            return f"within {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"<= {self.high:g}"
        return "any value"


class SpecError(UserError):
    """A spec cannot be used: its factory (or ``describe``) named as ``"package.module:Attr"`` cannot be imported, or
    its declarations do not fit the factory's signature. The message names the plugin (kind and name); ``problem`` is
    the message without that prefix."""

    def __init__(self, message: str, problem: str = "") -> None:
        super().__init__(message)
        self.problem = problem or message

    def __reduce__(self) -> tuple:  # picklable (a Ray worker's error reaches the driver)
        return type(self), (str(self), self.problem)


def _spec_error(spec: "PluginSpec", problem: str) -> SpecError:
    return SpecError(f"{spec.kind} {spec.name!r}: {problem}", problem)


@dataclass(frozen=True)
class PluginSpec:
    """One named thing a plugin offers (returned by the hooks in :mod:`hica_bench.hookspecs`), declared once, next to
    the class or function that builds it, scikit-learn style::

        PluginSpec("method", "prototype", "Nearest class mean on frozen features", Prototype,
                   {"temperature": Option(low=0, low_open=True)})

    ``factory`` builds it: a class or function, or the string ``"package.module:Attr"``, imported the first time the
    spec is used (its options read, or it is built) and remembered, so that a plugin whose module imports torch at
    the top does not import it while the registry loads (a hook's own module is imported then: keep heavy imports
    inside functions there, or name the factory by string).

    **Options and their defaults come from the factory's signature** (``inspect.signature``: a class's ``__init__``,
    a function's parameters, a ``functools.partial``'s remaining ones): every parameter with a default is an option
    with that default, except the fixed arguments the core passes to every factory of the kind
    (:data:`FIXED_ARGUMENTS`: a dataset's ``root``, ``size``, ``download``, ``cache_dir``; an encoder's ``device``).
    A variant with other defaults is another factory: ``functools.partial(HiCA, lambda1=0.0)``, or a small function.
    Defaults must be bool, int, float or str (what ``name:key=value`` converts to, by the type of the default).

    Where the signature cannot give a default, and only there, ``defaults`` gives it: a parameter without a default
    (e.g. a fixed argument the spec offers as an option, as the ``folder`` dataset's ``root``), or a name the
    factory takes through ``**options``. Anything else is refused when the registry loads the spec (a warning naming
    the plugin; the spec is left out): a parameter without a default that is neither fixed nor in ``defaults``, a
    ``defaults`` entry for a parameter that has a default (it is written once, in the signature) or that the factory
    does not take, a constraint or component naming something that is not an option, a default outside its own
    constraint, a factory that does not take the kind's fixed arguments. A factory named by string is not imported
    while the registry loads, only looked for (a module that does not exist is refused as above); the rest is checked
    when the spec is first used (its options read, as ``hica-bench list`` does, or a run choosing it), and a failure
    then is a one-line :class:`SpecError` naming the plugin.

    ``constraints`` maps options to the :class:`Option` (range or choices) each accepts; the CLI syntax
    ``name:key=value:key2=value`` is type-converted against the defaults and checked against the constraints before
    anything runs. ``options`` (read only) holds every option with its default, in the signature's order. The factory
    receives the converted options as keyword arguments, plus the kind's fixed arguments.

    ``components`` names the options whose value is the name of another plugin, with its kind, e.g. HiCA's
    ``{"roi": "roi-extractor", "loss_global": "loss"}``: the registry checks those names before anything runs,
    and each result records the plugin (distribution and version) in its identity. A component built through
    :class:`Components` gets such options as built objects, not names.

    ``in_default_suite``: this dataset, method or encoder belongs to what ``hica-bench run`` runs when the user names
    none (the core names no plugin; at most one encoder may claim it).
    """

    kind: Kind
    name: str
    description: str
    factory: Callable[..., Any] | str
    constraints: dict[str, Option] = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)
    in_default_suite: bool = False
    #: encoders only, optional: ``describe(device, **options)`` -> :class:`EncoderCard` (or None) without building the
    #: models, so a run whose features are all cached skips building them (see :class:`EncoderCard`); a callable or
    #: ``"package.module:Attr"``, as ``factory``
    describe: Callable[..., Any] | str | None = None
    #: defaults the factory's signature cannot give (see above); empty for almost every spec
    defaults: dict[str, Any] = field(default_factory=dict)
    #: methods only, optional: a small search space, option -> the candidate values the selection protocols
    #: (``few-shot-val``, ``support-cv``, ``oracle``) try, e.g. ``{"C": (0.01, 0.1, 1.0, 10.0, 100.0)}``; every
    #: combination is fitted once per cell, so keep the product small (at most :data:`MAX_SEARCH` candidates)
    search: dict[str, tuple] = field(default_factory=dict)
    _loaded: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def options(self) -> dict[str, Any]:
        """Every option with its default, read from the factory's signature (see above); imports a factory named by
        string on first use. Raises :class:`SpecError` when the spec cannot be used."""
        return dict(self._load()["options"])

    def load_factory(self) -> Callable[..., Any]:
        """The factory itself (a factory named by string imported on first use, then remembered)."""
        return self._load()["factory"]

    def load_describe(self) -> Callable[..., Any] | None:
        """``describe`` itself, or None (one named by string imported on first use, then remembered)."""
        if "describe" not in self._loaded:
            self._loaded["describe"] = None if self.describe is None else _load_ref(self, self.describe, "describe")
        return self._loaded["describe"]

    def _load(self) -> dict[str, Any]:
        """The factory and the options, worked out once (a failure too: it is raised again on every use)."""
        if "options" not in self._loaded and "error" not in self._loaded:
            try:
                problem = declaration_problem(self)
                if problem:
                    raise _spec_error(self, problem)
                factory = _load_ref(self, self.factory, "factory")
                self._loaded.update(factory=factory, options=_signature_options(self, factory))
            except SpecError as exc:
                self._loaded["error"] = exc
        if "error" in self._loaded:
            raise self._loaded["error"]
        return self._loaded


def declaration_problem(spec: PluginSpec) -> str | None:
    """What is wrong with what ``spec`` declares, found without loading its factory, or None."""
    if spec.kind not in KINDS:
        return f"its kind {spec.kind!r} is not one of {', '.join(KINDS)}"
    if not isinstance(spec.name, str) or not re.fullmatch(r"[\w.+-]+", spec.name):
        return f"its name {spec.name!r} cannot be spelled on the command line ([A-Za-z0-9_.+-])"
    if not isinstance(spec.description, str) or not spec.description.strip():
        return "it has no description"
    for what in ("factory", "describe"):
        ref = getattr(spec, what)
        if not (callable(ref) or (what == "describe" and ref is None) or (isinstance(ref, str) and _REF.fullmatch(ref))):
            return f"its {what} must be callable or a 'package.module:Attr' string, got {ref!r}"
    for field_name in ("constraints", "components", "defaults", "search"):
        if not isinstance(getattr(spec, field_name), dict):
            return f"its {field_name} must be a dict, got {type(getattr(spec, field_name)).__name__}"
    for key, constraint in spec.constraints.items():
        if not isinstance(constraint, Option):
            return (f"constraints[{key!r}] is {constraint!r}, not an Option: a spec declares only what an option "
                    "accepts (Option(low=..., high=..., choices=...)); its default is the factory's, in its signature")
    for option, kind in spec.components.items():
        if kind not in COMPONENT_KINDS:
            return f"components maps {option!r} to {kind!r}; it must be one of {', '.join(COMPONENT_KINDS)}"
    if spec.in_default_suite and spec.kind in COMPONENT_KINDS:
        return f"a {spec.kind} cannot be in the default suite (components are built by methods, not run)"
    if spec.search and spec.kind != "method":
        return f"a {spec.kind} cannot declare a search space (only methods are tuned by the selection protocols)"
    for option, values in spec.search.items():
        if not isinstance(values, (tuple, list)) or not values or len(set(map(repr, values))) != len(values):
            return f"search[{option!r}] must be a non-empty tuple of distinct candidate values, got {values!r}"
    if search_size(spec.search) > MAX_SEARCH:
        return f"its search space has {search_size(spec.search)} candidates; at most {MAX_SEARCH} (each is a fit per cell)"
    return None


#: The most candidates a method's search space may hold (the product of its options' value counts).
MAX_SEARCH = 64


def search_size(search: dict[str, Sequence]) -> int:
    size = 1
    for values in search.values():
        size *= len(values)
    return size


_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  #: ``package.module:Attr``


def _load_ref(spec: PluginSpec, ref: Any, what: str) -> Callable[..., Any]:
    """``ref`` itself when callable; a ``"package.module:Attr"`` string imported; else a :class:`SpecError`."""
    if callable(ref):
        return ref
    if not isinstance(ref, str) or not _REF.fullmatch(ref):
        raise _spec_error(spec, f"its {what} must be callable or a 'package.module:Attr' string, got {ref!r}")
    module_name, attribute = ref.split(":")
    try:
        found: Any = importlib.import_module(module_name)
    except PLUGIN_FAULTS as exc:  # ImportError, or whatever the module raises (or exits with) while importing
        raise _spec_error(spec, f"its {what} {ref} cannot be imported ({fault_text(exc)})") from None
    try:
        for part in attribute.split("."):
            found = getattr(found, part)
    except AttributeError:
        raise _spec_error(spec, f"its {what} {ref} cannot be imported ({module_name} has no {attribute})") from None
    if not callable(found):
        raise _spec_error(spec, f"its {what} {ref} is a {type(found).__name__}, not callable")
    return found


def _signature_options(spec: PluginSpec, factory: Callable[..., Any]) -> dict[str, Any]:
    """The options of ``spec`` with their defaults, from ``factory``'s signature and ``spec.defaults`` (the rules are
    on :class:`PluginSpec`); a :class:`SpecError` naming the plugin when they do not fit its declarations."""
    shown = spec.factory if isinstance(spec.factory, str) else getattr(factory, "__qualname__", None) or repr(factory)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError) as exc:
        raise _spec_error(spec, f"the signature of its factory {shown} cannot be read ({exc}); options and their "
                                "defaults come from it") from None
    fixed = FIXED_ARGUMENTS.get(spec.kind, ())
    given = dict(spec.defaults)
    options: dict[str, Any] = {}
    for name, parameter in parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.kind is parameter.POSITIONAL_ONLY:
            if name in fixed or name in given or parameter.default is parameter.empty:
                raise _spec_error(spec, f"its factory {shown} takes {name!r} by position only; the core passes "
                                        "arguments by name")
            continue
        if name in given:
            if parameter.default is not parameter.empty:
                raise _spec_error(spec, f"defaults gives {name}={given[name]!r}, but its factory {shown} already has "
                                        f"{name}={parameter.default!r}; a default is written once, in the signature")
            options[name] = given.pop(name)
        elif name in fixed:
            continue
        elif parameter.default is parameter.empty:
            raise _spec_error(spec, f"parameter {name!r} of its factory {shown} has no default; every option needs one "
                                    "in the factory's signature")
        else:
            options[name] = parameter.default
    takes_more = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    missing = [name for name in fixed if name not in parameters and not takes_more]
    if missing:
        raise _spec_error(spec, f"its factory {shown} does not take {', '.join(missing)}, which the core passes to "
                                f"every {spec.kind} factory")
    if given and not takes_more:
        raise _spec_error(spec, f"defaults names {', '.join(given)}, which its factory {shown} does not take")
    options.update(given)  # names the factory takes through **options
    for name, value in options.items():
        if not isinstance(value, (bool, int, float, str)):
            raise _spec_error(spec, f"option {name}={value!r} has type {type(value).__name__}; defaults must be bool, "
                                    "int, float or str")
    for field_name in ("constraints", "components", "search"):
        unknown = [name for name in getattr(spec, field_name) if name not in options]
        if unknown:
            verb = "is not one of its options" if len(unknown) == 1 else "are not among its options"
            raise _spec_error(spec, f"{field_name} names {', '.join(map(repr, unknown))}, which {verb} "
                                    f"({', '.join(options) or 'none'}: read from the signature of its factory {shown})")
    for name, constraint in spec.constraints.items():
        try:
            problem = constraint.problem(options[name])
        except TypeError:  # e.g. a numeric range declared for a text option
            problem = f"does not fit its declared range ({constraint.describe()})"
        if problem:
            raise _spec_error(spec, f"the default {name}={options[name]!r} {problem}")
    for name, values in spec.search.items():
        for value in values:
            default = options[name]
            if type(value) is not type(default) and not (isinstance(default, float) and type(value) is int):
                raise _spec_error(spec, f"search[{name!r}] holds {value!r}, not a {type(default).__name__} like the "
                                        f"default {name}={default!r}")
            problem = spec.constraints[name].problem(value) if name in spec.constraints else None
            if problem:
                raise _spec_error(spec, f"search[{name!r}] holds {value!r}, which {problem}")
    return options


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    ``images``: uint8, (N, H, W) grey or (N, H, W, 3) RGB; may be a read-only memory map, so index
    it in slices rather than converting it whole. ``labels``: int64, (N,), values in [0, C); for a ``multi-label``
    dataset int64 (N, C) in {0, 1}, one column per label (an image may have several, or none).
    """

    images: np.ndarray
    labels: np.ndarray


class FewShotDataset(Protocol):
    """A classification dataset with official train/val/test splits: single-label, or multi-label (``task``
    ``multi-label``: each label scored one-vs-rest, :func:`hica_bench.cell.one_vs_rest`)."""

    name: str  #: e.g. ``breastmnist``; the support sets are drawn by it (with k and seed), not by options or paths
    size: int  #: image side in pixels
    task: str  #: ``binary-class``, ``multi-class`` or ``multi-label``
    class_names: list[str]  #: C human-readable names, index = label
    identity: str  #: a digest of the content, the same on every machine and for every copy (feature-cache key, cell identity)
    #: optional: True when the splits hold 3D volumes, uint8 (N, D, H, W) (MedMNIST 3D); see :mod:`hica_bench.volumes`
    volumetric: bool

    def split(self, name: Literal["train", "val", "test"]) -> Split: ...


@dataclass(frozen=True)
class Prompts:
    """A dataset's class names, prompt templates and descriptors from a user's prompt file (any dataset:
    ``DATASET:prompts=FILE``; loaded and checked by :func:`hica_bench.prompts.load`). Its ``digest`` is part of every
    cell identity, so two prompt files never share a leaderboard row.

    Every method that puts class names into text uses ``classnames`` (a cell's ``task.class_names`` are these);
    those that build a prompt ensemble use ``templates`` (``{}`` is the class name) when given, else their own;
    those that use fine-grained descriptors (HiCA) use ``descriptors`` when given, else their generator's."""

    classnames: tuple[str, ...]  #: one per class, in the dataset's class order
    templates: tuple[str, ...] | None  #: None: the method's own templates
    #: one ``{"global": [...], "local": [...]}`` per class in class order (a class the file leaves out: None), or None
    descriptors: tuple[dict[str, tuple[str, ...]] | None, ...] | None
    source: str  #: the file, as given
    digest: str  #: sha256 of the content above (not of the file's bytes: comments and layout do not count)


# --------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class InputSpec:
    """How an image encoder wants its input: square ``size``, RGB, ``(x/255 - mean) / std``."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"


@runtime_checkable
class ImageEncoder(Protocol):
    """A frozen image encoder.

    ``identity`` is stable across processes and includes a digest of the weights, so two encoders
    with the same identity produce the same features (it keys the feature cache).
    ``encode(x)`` takes a float tensor (N, 3, size, size) already normalised per ``input_spec`` on the
    encoder's device and returns (N, D) features (not necessarily normalised). It is called under
    ``torch.inference_mode``. An encoder with spatial features may also offer
    ``dense(x) -> (N, D, h, w)`` for ROI pooling. A native 3D encoder sets ``volumetric = True``: ``encode`` then
    takes volumes (N, 1, size, size, size) prepared by :func:`hica_bench.volumes.preprocess_volumes` (a 2D encoder
    reads volumes slice by slice; see :mod:`hica_bench.volumes`).
    """

    identity: str
    input_spec: InputSpec
    embed_dim: int

    def encode(self, images: Any) -> Any: ...


@runtime_checkable
class TextEncoder(Protocol):
    """A frozen text encoder: ``encode(texts) -> (len(texts), D)`` float32 numpy.

    One that a method may fine-tune (HiCA's stage 1 on its descriptor corpus) also offers ``module``, the torch module
    holding its weights, and ``embed(texts) -> torch.Tensor`` (len(texts), D) on its device, computed through
    ``module`` with gradients; a method adapts a deep copy (:func:`hica_bench.adapting.adaptable_copy` does the same
    for image encoders), never the frozen one."""

    identity: str
    embed_dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class EncoderCard:
    """What a run needs to know of an encoder pair before it needs the models: the identities (which key the feature
    cache and every cell identity), the image input spec and whether the pair is aligned.

    An encoder spec's ``describe(device, **options)`` returns one without building anything (reading weight files
    for their digests at most), so a run whose features are all cached never builds the models; it may return None
    when it cannot tell that cheaply. The card must equal the built pair's :attr:`EncoderPair.card` (the run checks
    when it builds the pair, and so does :func:`hica_bench.testing.check_encoder_spec`)."""

    image: str  #: the image encoder's ``identity``
    input_spec: InputSpec
    text: str | None  #: the text encoder's ``identity``, None for an image-only pair
    aligned: bool
    volumetric: bool = False  #: the image encoder takes whole volumes (N, 1, S, S, S) (:mod:`hica_bench.volumes`)

    @property
    def random_init(self) -> bool:
        """The image weights are a random initialisation (the identity says so; results are labelled with it)."""
        return "random-init" in self.image


@dataclass
class EncoderPair:
    """What an encoder plugin's factory returns.

    ``aligned`` is True only when image and text embeddings live in one trained joint space (CLIP-style),
    so cosine similarity between them is meaningful. ``text`` may be None for image-only backbones.
    ``modules`` lists the torch modules involved (for methods that fine-tune; may be empty).
    """

    image: ImageEncoder
    text: TextEncoder | None
    aligned: bool
    device: str = "cpu"
    modules: dict[str, Any] = field(default_factory=dict)

    @property
    def card(self) -> EncoderCard:
        return EncoderCard(self.image.identity, self.image.input_spec,
                           None if self.text is None else self.text.identity, self.aligned,
                           bool(getattr(self.image, "volumetric", False)))


# --------------------------------------------------------------------------- methods


class Components(Protocol):
    """What a method (or a component) may build while it runs: ROI extractors, descriptor generators and losses,
    resolved in the run's own registry (entry points, ``-p`` modules and the allow-list alike), never a global one.

    ``build(kind, name, **options)`` builds the plugin ``name`` of ``kind`` (one of :data:`COMPONENT_KINDS`) with its
    default options updated by ``options`` (which must be options it declares); a name it does not know, or an
    option it does not declare, raises :class:`hica_bench.errors.UserError`. ``options(kind, name)`` gives the
    declared options and their defaults (e.g. to pass ``temperature`` only to a loss that takes one). What was built
    is recorded in the cell's result (``components_used``)."""

    def build(self, kind: str, name: str, **options: Any) -> Any: ...

    def options(self, kind: str, name: str) -> dict[str, Any]: ...


#: What a method may declare in ``needs``: ``image_features`` (the support images' frozen features,
#: ``task.support_features``; a method that declares neither it, ``train_features`` nor ``encoders`` gets None
#: there, and a grid of such methods, e.g. zero-shot alone, never encodes the train split; the test features are
#: always handed to ``predict_proba``),
#: ``class_texts`` / ``text_encoder`` (a text encoder must exist), ``aligned_encoders`` (an aligned pair),
#: ``train_features`` (frozen features of the whole, unlabeled train split), ``encoders`` (raw train images
#: plus the encoder modules, for methods that adapt the encoder: see ``encoder_`` in :class:`Method`).
Need = Literal["image_features", "class_texts", "text_encoder", "aligned_encoders", "train_features", "encoders"]
NEEDS: frozenset[str] = frozenset(get_args(Need))


@dataclass
class FewShotTask:
    """Everything a method may use for one (dataset, k, seed) cell.

    ``support_features`` (k*C, D) float32 are frozen image features of the support images (for a method that
    declares ``image_features``),
    ``support_labels`` (k*C,) int64, ``support_indices`` their indices in the train split.
    ``encoders`` gives access to the text encoder (and the image encoder for fine-tuning methods);
    ``train_images`` the lazy train split images for methods that declared the ``encoders`` need;
    ``train_features`` (N_train, D) frozen features of the whole train split for methods that declared
    ``train_features`` (labels are never handed over beyond the support set). ``cache_dir`` is a folder
    where a method may keep artifacts it can reuse across cells (key them by everything they depend on).
    ``components`` builds the ROI extractors, descriptor generators and losses the method uses (see
    :class:`Components`); name them in options the method's spec declares in ``PluginSpec.components``.
    ``prompts``: the user's prompt file for this dataset, or None (see :class:`Prompts`; ``class_names`` are then its
    ``classnames``).
    Methods must not modify any array they are handed. Randomness comes only from ``seed``.
    """

    dataset: str
    task: str
    class_names: list[str]
    support_features: np.ndarray | None  #: None unless the method declares ``image_features`` (see :data:`NEEDS`)
    support_labels: np.ndarray
    support_indices: np.ndarray
    k: int
    seed: int
    encoders: EncoderPair
    device: str = "cpu"
    train_images: np.ndarray | None = None
    train_features: np.ndarray | None = None
    cache_dir: Path | None = None
    components: Components | None = None
    prompts: Prompts | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


class Method(Protocol):
    """A few-shot classifier (scikit-learn habits: configure in the factory, learn in ``fit``).

    ``needs`` declares what the method uses, from :data:`Need`; the runner checks e.g. that a method
    needing ``aligned_encoders`` gets an aligned pair, and records ``not_applicable`` otherwise.
    ``fit(task)`` returns self and may raise :class:`hica_bench.errors.NotApplicable`.
    ``predict_proba(features)`` maps (N, D) test features to (N, C) float probabilities, rows summing to 1.
    After ``fit`` a method may set ``fit_info_``, a JSON-able dict of what it chose on the support set (a
    regularisation strength, how it validated); the runner records it in the result as ``fit_info``.
    A method may declare ``resources``, what one cell needs when cells run as Ray tasks (``--executor ray``): a dict
    of ``num_cpus``, ``num_gpus`` and ``memory`` (bytes), e.g. ``{"num_cpus": 2, "num_gpus": 1}``; default one CPU
    (and a quarter of a GPU on a CUDA run). The in-process executor ignores it.

    **Adapting the encoder.** A method that declares ``encoders`` gets ``task.encoders.modules`` and
    ``task.train_images`` and may adapt the image encoder during ``fit`` (fine-tuning, LoRA, HiCA's stage 1), always on
    a private copy (:func:`hica_bench.adapting.adaptable_copy`): changing the frozen encoder's weights in place fails
    the cell, since they serve every other cell and key the feature cache. It then sets ``encoder_``, an
    :class:`ImageEncoder` with the frozen one's ``input_spec`` and an ``identity`` of its own that includes a digest
    of the adapted weights (:class:`hica_bench.adapting.AdaptedImageEncoder`). The harness encodes the test images
    through it with the run's preprocessing, batch size, precision and device (eager; cached under that identity,
    never the frozen one's) and calls ``predict_proba`` on those features; the result records the adapted identity
    (``adapted_encoder``) and the encoding cost (``timings.adapted_encode_s``). Without ``encoder_`` (or with None)
    it predicts on the frozen test features, as every other method.

    **Explanations** (``hica-bench explain``, :mod:`hica_bench.explain`; both optional). Any method is explained by
    occlusion through ``predict_proba``. A method with a differentiable head may also offer ``head_(features)``:
    (N, D) torch features of the encoder it predicts with -> (N, C) torch logits whose softmax is ``predict_proba``,
    differentiable in the features (Grad-CAM's target is the predicted class's logit; the conformance kit checks
    the softmax). A method with regional evidence (HiCA) may offer ``regions_(images)``: uint8 images (N, H, W[, 3])
    -> per image a list of ``{"box": [x0, y0, x1, y1] in the images' pixels, "descriptor": str, "class": int,
    "similarity": float}``, or None.

    **Naming unseen classes** (optional; the ``base-to-novel`` protocol). A method that classifies by class texts
    (zero-shot, CoOp) may offer ``predict_proba_novel(features, class_names)``: after ``fit`` on the base classes,
    (N, D) test features -> (N, len(class_names)) probabilities among classes it was not fitted on, named by
    ``class_names`` (a prompt file's names when the dataset has one). A method without it is "not applicable on novel
    classes", its base score still reported.
    """

    needs: frozenset[str]

    def fit(self, task: FewShotTask) -> "Method": ...

    def predict_proba(self, features: np.ndarray) -> np.ndarray: ...


# --------------------------------------------------------------------------- protocols

#: How a cell's method options are chosen from its search space (:attr:`PluginSpec.search`): ``none`` (the method's
#: own defaults and rules), ``validation`` (each candidate fitted on the support, scored on the episode's validation
#: images), ``support-cv`` (cross-validation on the support alone), ``test`` (scored on the test split: the oracle,
#: which exists only to measure how much test-set tuning inflates a method).
SELECTIONS = ("none", "validation", "support-cv", "test")
#: What a selection may maximise (computed by :func:`hica_bench.metrics.classification_metrics`).
SELECTION_METRICS = ("balanced_acc", "acc", "auc")


@dataclass(frozen=True)
class Episode:
    """What one cell fits on and is scored on, as its protocol draws it for one (dataset, k, seed).

    ``support``: indices into the train split (sorted by class, then index), the images the method is fitted on.
    ``validation``: indices into ``validation_split`` (``"val"`` or ``"train"``), never overlapping the support, or
    None. ``selection`` (one of :data:`SELECTIONS`) and ``metric`` (one of :data:`SELECTION_METRICS`): how the
    method's options are chosen. The test split is always scored whole; under every selection but ``test`` it is read
    only for the final prediction."""

    support: np.ndarray
    validation: np.ndarray | None = None
    validation_split: str = "val"
    selection: str = "none"
    metric: str = "balanced_acc"
    #: base-to-novel: the classes the method is fitted on and scored among on their test images (base), and the classes
    #: it never sees, scored among themselves on theirs (novel, through ``predict_proba_novel``); None: every class
    classes: np.ndarray | None = None
    novel: np.ndarray | None = None

    @property
    def plain(self) -> bool:
        """A plain k-shot episode: no validation set, no selection, every class (its cells keep the identities they
        always had)."""
        return self.validation is None and self.selection == "none" and self.classes is None and self.novel is None


@runtime_checkable
class EvaluationProtocol(Protocol):
    """What a ``protocol`` plugin's factory returns (kind ``protocol``; :mod:`hica_bench.hookspecs`).

    ``title``: how tables name it, e.g. ``"oracle (test-set tuning)"``.
    ``check(labels, n_classes, shots, dataset, class_names)`` raises a :class:`~hica_bench.errors.UserError` (one line)
    when the dataset cannot run this protocol at these shots, before any cell runs; ``labels`` maps ``"train"`` and
    ``"val"`` to their label arrays (a split without images: an empty array).
    ``episode(labels, n_classes, k, seed, dataset)`` returns the cell's :class:`Episode`. It must be deterministic in
    its arguments (the same indices on every machine: draw them through :mod:`hica_bench.protocol`'s rules), and
    supports and validation sets should be nested across k (the k-shot ones inside the k'-shot ones for k < k')."""

    title: str

    def check(self, labels: dict[str, np.ndarray], n_classes: int, shots: Sequence[int], dataset: str,
              class_names: Sequence[str]) -> None: ...

    def episode(self, labels: dict[str, np.ndarray], n_classes: int, k: int, seed: int, dataset: str) -> Episode: ...


# --------------------------------------------------------------------------- HiCA building blocks


class ROIExtractor(Protocol):
    """``extract(images, k, dense=None)`` -> int64 tensor (N, K, 4) of boxes ``x0, y0, x1, y1`` in pixels of
    ``images`` (N, 3, S, S, normalised encoder input), with 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S.
    ``dense`` is the encoder's (N, D, h, w) feature map when it has one (for activation-based saliency).
    Deterministic: the same inputs give the same boxes."""

    def extract(self, images: Any, k: int, dense: Any = None) -> Any: ...


class DescriptorGenerator(Protocol):
    """``describe(dataset, class_names)`` -> one entry per class: ``{"global": [str, ...], "local": [str, ...]}``
    (at least one global text per class; local texts are fine-grained findings)."""

    def describe(self, dataset: str, class_names: Sequence[str]) -> list[dict[str, list[str]]]: ...


class Loss(Protocol):
    """A differentiable training loss: ``__call__(**tensors) -> scalar tensor``; each loss documents
    the keyword tensors it takes."""

    def __call__(self, **tensors: Any) -> Any: ...

"""The plugin conformance kit: checks a plugin author runs in their own tests, as scikit-learn's
``check_estimator``. Each ``check_*`` exercises one kind's contract (:mod:`hica_bench.interfaces`) and raises
``AssertionError`` saying what broke it::

    from hica_bench.testing import check_method
    from my_plugin import MyMethod, hica_bench_methods

    def test_conformance():
        check_method(MyMethod)                   # a class or zero-argument factory ...
        for spec in hica_bench_methods():        # ... or the specs your hook returns (default options)
            check_method(spec)

Methods are checked on small synthetic tasks built by the runner's own code (:func:`hica_bench.cell.build_task`,
with its checks of ``needs`` and of the probabilities): images with a class-specific bright block, features from a
tiny in-kit encoder pair (:func:`toy_pair`) through the extraction service, support sets from
:mod:`hica_bench.protocol`, components from the installed plugins, and only what the method declared in
``needs``. Nothing here needs pytest, data files or a network; the kit's own parts run on CPU in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hica_bench import cell, protocol
from hica_bench.data import preprocess
from hica_bench.errors import NotApplicable
from hica_bench.extraction import FeatureExtractor
from hica_bench.interfaces import (
    FIXED_ARGUMENTS,
    KINDS,
    NEEDS,
    Components,
    EncoderPair,
    FewShotTask,
    ImageEncoder,
    InputSpec,
    PluginSpec,
    SpecError,
    Split,
    TextEncoder,
    declaration_problem,
)

TASKS = cell.SUPPORTED_TASKS
#: (description, classes, shots) of the tasks every method must handle; the first must not be NotApplicable.
METHOD_TASKS = (("2 classes, 5 shots", 2, 5), ("2 classes, 1 shot", 2, 1), ("10 classes, 2 shots", 10, 2))
#: Shapes of the keyword tensors :func:`check_loss` builds when not given ``inputs``: B images, C classes,
#: D width, K regions per image, L local texts per class (the names hica-bench's own losses use).
LOSS_INPUTS = {
    "image_embeddings": ("B", "D"),
    "text_embeddings": ("C", "D"),
    "roi_embeddings": ("B", "K", "D"),
    "local_text_embeddings": ("C", "L", "D"),
    "logits": ("B", "C"),
    "labels": ("B",),
}
_SIZES = {"B": 6, "C": 3, "D": 8, "K": 2, "L": 3}


# --------------------------------------------------------------------------- the in-kit encoder pair


class ToyImageEncoder(torch.nn.Module):
    """A fixed random projection of 4x4-pooled pixels (implements :class:`~hica_bench.interfaces.ImageEncoder`,
    with ``dense`` for ROI pooling). Deterministic: the same weights in every process."""

    identity = "hica-bench-testing:toy-image:v1"
    input_spec = InputSpec(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    embed_dim = 32

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.project = torch.nn.Parameter(torch.randn(48, self.embed_dim, generator=generator) / 7, requires_grad=False)
        self.channels = torch.nn.Parameter(torch.randn(3, self.embed_dim, generator=generator), requires_grad=False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(images, 4).flatten(1) @ self.project

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(images, 4)  # (N, 3, 4, 4)
        return torch.einsum("nchw,cd->ndhw", pooled, self.channels)


class ToyTextEncoder:
    """Each text -> a unit vector seeded by its sha256 (implements :class:`~hica_bench.interfaces.TextEncoder`)."""

    identity = "hica-bench-testing:toy-text:v1"
    embed_dim = ToyImageEncoder.embed_dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:16], 16)).standard_normal(self.embed_dim)
                for t in texts]
        out = np.asarray(rows, dtype=np.float32).reshape(len(rows), self.embed_dim)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def toy_pair(text: bool = True, aligned: bool = True) -> EncoderPair:
    """The in-kit pair: ``aligned`` claims one joint space (as CLIP does); ``text=False`` gives an image-only pair."""
    image = ToyImageEncoder()
    return EncoderPair(image, ToyTextEncoder() if text else None, aligned=aligned and text, modules={"image": image})


# --------------------------------------------------------------------------- synthetic tasks


def toy_images(labels: np.ndarray, size: int = 28, seed: int = 0, rgb: bool = False) -> np.ndarray:
    """uint8 (N, size, size[, 3]): noise plus a bright block at the label's cell of a 4x4 grid (16 classes at most)."""
    rng = np.random.default_rng(seed)
    block = size // 4
    shape = (len(labels), size, size, 3) if rgb else (len(labels), size, size)
    images = rng.normal(90, 25, size=shape)
    for i, c in enumerate(labels):
        row, col = divmod(int(c) % 16, 4)
        images[i, row * block:(row + 1) * block, col * block:(col + 1) * block] += 120
    return np.clip(images, 0, 255).astype(np.uint8)


def installed_components() -> Components:
    """The components (ROI extractors, descriptor generators, losses) of the installed plugins, as a run resolves them."""
    from hica_bench.registry import RunComponents, load_registry

    return RunComponents(load_registry())


def toy_task(n_classes: int, k: int, seed: int = 0, needs: frozenset[str] = frozenset(), n_test: int = 24,
             cache_dir: Path | None = None, pair: EncoderPair | None = None,
             components: Components | None = None) -> tuple[FewShotTask, np.ndarray, np.ndarray]:
    """A task as the runner builds it (:func:`hica_bench.cell.build_task`), plus the test features and labels:
    (task, test_features, test_labels).

    Features come from ``pair`` (default: :func:`toy_pair`) through the extraction service. The pair and the optional
    fields follow ``needs`` exactly: aligned only for ``aligned_encoders``, a text encoder only for the text needs,
    ``train_features`` / ``train_images`` only when declared."""
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.arange(n_classes * (k + 3)) % n_classes).astype(np.int64)
    test_labels = rng.permutation(np.arange(n_test) % n_classes).astype(np.int64)
    text, aligned = bool(needs & {"text_encoder", "class_texts", "aligned_encoders"}), "aligned_encoders" in needs
    if pair is None:
        pair = toy_pair(text, aligned)
    else:
        assert pair.text is not None or not text, "this method needs a text encoder; the pair given has none"
        assert pair.aligned or not aligned, "this method needs an aligned pair; the pair given is not aligned"
        pair = EncoderPair(pair.image, pair.text if text else None, aligned, pair.device, pair.modules)
    train_images = toy_images(train_labels, seed=seed)
    train_images.setflags(write=False)  # the runner hands a read-only memory map
    extractor = FeatureExtractor.plain(pair)
    train_features = extractor.encode(train_images)
    test_features = extractor.encode(toy_images(test_labels, seed=seed + 1))
    dataset = f"hica-bench-testing-{n_classes}-classes"
    indices = protocol.sample_support(train_labels, n_classes, k, seed, dataset)
    names = ["benign", "malignant"] if n_classes == 2 else [f"cell type {chr(ord('a') + c)}" for c in range(n_classes)]
    task = cell.build_task(dataset=dataset, task=TASKS[n_classes > 2], class_names=names, train_features=train_features,
                             train_labels=train_labels, support=indices, k=k, seed=seed, pair=pair,
                             needs=frozenset(needs), train_images=lambda: train_images, cache_dir=cache_dir,
                             components=components)
    return task, test_features, test_labels


# --------------------------------------------------------------------------- checks


def _failures(check: Callable) -> Callable:
    """Whatever the plugin raises inside ``check`` becomes an AssertionError naming it."""
    @functools.wraps(check)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return check(*args, **kwargs)
        except AssertionError:
            raise
        except Exception as exc:
            raise AssertionError(f"{check.__name__}: the plugin raised {type(exc).__name__}: {exc}") from exc
    return wrapper


def check_spec(spec: PluginSpec, kind: str | None = None) -> None:
    """A :class:`PluginSpec` the registry and the CLI can use: a known kind, a name the ``NAME:key=value`` syntax
    can spell, a description, ``components`` / ``in_default_suite`` declarations the registry accepts, and options
    that agree with its factory's signature (:func:`check_spec_options`)."""
    assert isinstance(spec, PluginSpec), f"expected a PluginSpec, got {type(spec).__name__}"
    assert spec.kind in KINDS and (kind is None or spec.kind == kind), f"{spec.name!r}: kind {spec.kind!r}, expected {kind or KINDS}"
    assert isinstance(spec.name, str) and re.fullmatch(r"[\w.+-]+", spec.name), (
        f"{spec.name!r}: a name must match [A-Za-z0-9_.+-]+")
    assert isinstance(spec.description, str) and spec.description.strip(), f"{spec.name!r}: empty description"
    problem = declaration_problem(spec)
    assert problem is None, f"{spec.name!r}: {problem}"
    check_spec_options(spec)


def check_spec_options(spec: PluginSpec) -> None:
    """A spec's options agree with its factory's signature (the rules are on :class:`PluginSpec`): the factory (one
    named ``"package.module:Attr"`` is imported here) takes the kind's fixed arguments by name; every parameter with a
    default is an option with exactly that default (and its type), every option is a parameter (or a name the factory
    takes through ``**options``, its default in ``defaults``); each constraint and component names an option; defaults
    are of the types the CLI converts to (bool, int, float, str) and within their constraints; an encoder's
    ``describe`` takes the device and every option. Nothing is built."""
    assert isinstance(spec, PluginSpec), f"expected a PluginSpec, got {type(spec).__name__}"
    try:
        options = spec.options
        factory = spec.load_factory()
        describe = spec.load_describe()
    except SpecError as exc:
        raise AssertionError(str(exc)) from None
    where = f"{spec.name!r}"
    parameters = inspect.signature(factory).parameters
    fixed = FIXED_ARGUMENTS.get(spec.kind, ())
    takes_more = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for name, parameter in parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or (name in fixed and name not in options):
            continue
        assert name in options, f"{where}: its factory's parameter {name!r} is not an option"
        default = parameter.default if parameter.default is not parameter.empty else spec.defaults.get(name, parameter.empty)
        assert options[name] is default or (options[name] == default and type(options[name]) is type(default)), (
            f"{where}: option {name}={options[name]!r}, but its factory's signature says {name}={default!r}")
    for name, value in options.items():
        assert name in parameters or (takes_more and name in spec.defaults), (
            f"{where}: option {name!r} is not a parameter of its factory")
        assert re.fullmatch(r"[A-Za-z_][\w.-]*", name), f"{where}: option name {name!r} cannot be given on the command line"
        assert isinstance(value, (bool, int, float, str)), (
            f"{where}: option {name}={value!r} has type {type(value).__name__}; defaults must be bool, int, float or str")
        if name in spec.constraints:
            assert spec.constraints[name].problem(value) is None, (
                f"{where}: the default {name}={value!r} {spec.constraints[name].problem(value)}")
    for declared in ("constraints", "components"):
        unknown = set(getattr(spec, declared)) - set(options)
        assert not unknown, f"{where}: {declared} names {sorted(unknown)}, which are not options of its factory"
    missing = [name for name in fixed if name not in parameters and not takes_more]
    assert not missing, f"{where}: its factory does not take {missing}, which the core passes to every {spec.kind} factory"
    if describe is not None:
        accepted = inspect.signature(describe).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            lacking = [name for name in (*FIXED_ARGUMENTS.get(spec.kind, ()), *options) if name not in accepted]
            assert not lacking, f"{where}: its describe does not take {lacking} (it is called as the factory is)"


def _builder(thing: Any, kind: str, options: dict[str, Any] | None) -> tuple[str, Callable[[], Any]]:
    """(name, zero-argument builder) from a PluginSpec (default options updated with ``options``) or a factory."""
    if isinstance(thing, PluginSpec):
        check_spec(thing, kind)
        unknown = set(options or {}) - set(thing.options)
        assert not unknown, f"{thing.name!r} has no options {sorted(unknown)}"
        merged = {**thing.options, **(options or {})}
        factory = thing.load_factory()
        return thing.name, lambda: factory(**merged)
    assert callable(thing), f"expected a PluginSpec, a class or a factory, got {thing!r}"
    return getattr(thing, "__name__", repr(thing)), lambda: thing(**(options or {}))


def _snapshot(task: FewShotTask, test: np.ndarray) -> dict[str, Any]:
    arrays = {"support_features": task.support_features, "support_labels": task.support_labels,
              "support_indices": task.support_indices, "train_features": task.train_features, "test features": test}
    return {"class_names": list(task.class_names), **{k: v.copy() for k, v in arrays.items() if v is not None}}


def _assert_unmodified(name: str, label: str, before: dict[str, Any], task: FewShotTask, test: np.ndarray) -> None:
    now = {"class_names": task.class_names, "support_features": task.support_features, "support_labels": task.support_labels,
           "support_indices": task.support_indices, "train_features": task.train_features, "test features": test}
    for key, value in before.items():
        same = value == now[key] if key == "class_names" else np.array_equal(value, now[key])
        assert same, f"{name} ({label}): modified its input {key}; methods must not change what they are handed"


def _assert_proba(name: str, label: str, proba: Any, n: int, c: int) -> np.ndarray:
    """The runner's own check of ``predict_proba``'s answer, as an AssertionError."""
    try:
        return cell.check_proba(proba, n, c)
    except ValueError as exc:
        raise AssertionError(f"{name} ({label}): {exc}") from None


def _fit_predict(name: str, label: str, make: Callable[[], Any], task: FewShotTask, test: np.ndarray,
                 test_images: np.ndarray | None = None) -> np.ndarray:
    """Fit, then predict ``test`` (the frozen test features), or, when the method exposes an adapted ``encoder_``,
    ``test_images`` encoded through it as the runner does."""
    from hica_bench.adapting import weight_versions

    cell.seed_everything(task.seed)
    model = make()
    frozen = weight_versions(task.encoders.modules) if "encoders" in model.needs else None
    try:
        fitted = model.fit(task)
    except NotApplicable:
        raise
    except Exception as exc:
        raise AssertionError(f"{name} ({label}): fit raised {type(exc).__name__}: {exc} (does it use something "
                             f"it did not declare in needs={sorted(model.needs)}?)") from exc
    assert fitted is model, f"{name} ({label}): fit must return self"
    assert frozen is None or weight_versions(task.encoders.modules) == frozen, (
        f"{name} ({label}): fit changed the frozen encoder's weights or modes in place; adapt a copy "
        "(hica_bench.adapting.adaptable_copy) and expose it as encoder_")
    adapted = getattr(model, "encoder_", None)
    if adapted is not None:
        assert "encoders" in model.needs, f"{name} ({label}): sets encoder_ without declaring the encoders need"
        try:
            cell.check_adapted(adapted, task.encoders)
        except ValueError as exc:
            raise AssertionError(f"{name} ({label}): {exc}") from None
        assert test_images is not None, f"{name} ({label}): adapted the encoder, but no test images were given"
        test = FeatureExtractor.plain(EncoderPair(adapted, None, False, task.encoders.device)).encode(test_images)
    info = getattr(model, "fit_info_", None)
    if info is not None:
        assert isinstance(info, dict), f"{name} ({label}): fit_info_ must be a dict, got {type(info).__name__}"
        try:
            json.dumps(info, allow_nan=True)
        except TypeError as exc:
            raise AssertionError(f"{name} ({label}): fit_info_ is not JSON ({exc}); results record it as JSON") from None
    try:
        proba = model.predict_proba(test)
    except Exception as exc:
        raise AssertionError(f"{name} ({label}): predict_proba raised {type(exc).__name__}: {exc}") from exc
    proba = _assert_proba(name, label, proba, len(test), task.n_classes)
    again = model.predict_proba(test)
    assert np.array_equal(again, proba), f"{name} ({label}): predict_proba gave different results on a second call"
    one = _assert_proba(name, label, model.predict_proba(test[:1]), 1, task.n_classes)
    assert np.allclose(one, proba[:1], rtol=1e-5, atol=1e-6), (
        f"{name} ({label}): an image's probabilities depend on the other images predicted with it (--max-test changes them)")
    if callable(getattr(model, "head_", None)):  # explain's Grad-CAM target: its softmax must be predict_proba
        import torch

        features = torch.from_numpy(np.ascontiguousarray(test, dtype=np.float32)).requires_grad_(True)
        logits = model.head_(features)
        assert tuple(logits.shape) == proba.shape, f"{name} ({label}): head_ gave shape {tuple(logits.shape)}, not {proba.shape}"
        assert np.allclose(torch.softmax(logits.double(), dim=1).detach().numpy(), proba, atol=1e-4), (
            f"{name} ({label}): softmax(head_(features)) differs from predict_proba (max diff "
            f"{np.abs(torch.softmax(logits.double(), dim=1).detach().numpy() - proba).max():.3g})")
        assert logits.requires_grad, f"{name} ({label}): head_'s logits are not differentiable in the features"
        logits[:, int(proba[0].argmax())].sum().backward()
        assert features.grad is not None and torch.isfinite(features.grad).all(), (
            f"{name} ({label}): head_ gives no finite gradient in the features")
    return proba


@_failures
def check_method(method: Any, options: dict[str, Any] | None = None, pair: EncoderPair | None = None,
                 components: Components | None = None) -> None:
    """A :class:`~hica_bench.interfaces.Method` (a PluginSpec, a class or a zero-argument factory; ``options``
    override defaults): ``needs`` is declared from :data:`NEEDS`; on 2 classes × 5 shots, 2 × 1 and 10 × 2 it
    fits (``fit`` returns self; NotApplicable allowed except on the first task), predicts (N, C) float
    probabilities that are finite, non-negative and sum to 1, row by row independently of the batch; it never
    modifies its inputs; a fresh instance with the same seed gives bit-identical probabilities, and so does one
    that reuses the first's ``cache_dir``. A method that adapts the encoder (``encoder_``) must leave the frozen
    encoder's weights as they were and expose an image encoder with its own identity and the frozen input spec; the
    test images are then encoded through it, as the runner does, and everything above is checked on those. Features come from ``pair`` (default: the in-kit :func:`toy_pair`;
    a method that needs a real encoder's internals declines it with NotApplicable, which the raised
    AssertionError carries as ``__cause__``: check it with a real pair then). ``components``: what the tasks'
    ``components`` build from (default: the installed plugins, :func:`installed_components`)."""
    name, make = _builder(method, "method", options)
    try:
        needs = cell.check_needs(getattr(make(), "needs", None), toy_pair(), "the in-kit toy pair")
    except ValueError as exc:
        raise AssertionError(f"{name}: {exc}") from None
    components = components if components is not None else installed_components()
    with tempfile.TemporaryDirectory() as scratch:
        for number, (label, n_classes, k) in enumerate(METHOD_TASKS):
            task, test, test_labels = toy_task(n_classes, k, needs=needs, cache_dir=Path(scratch) / "first", pair=pair,
                                               components=components)
            images = toy_images(test_labels, seed=1)  # the images toy_task encoded (seed + 1): for an adapted encoder
            before = _snapshot(task, test)
            try:
                proba = _fit_predict(name, label, make, task, test, images)
            except NotApplicable as exc:
                if number == 0:
                    raise AssertionError(f"{name} ({label}): NotApplicable on the basic task ({exc})") from exc
                continue
            _assert_unmodified(name, label, before, task, test)
            if number == 0:  # determinism: a fresh cache folder, then the first one's artifacts
                for cache in ("fresh", "first"):
                    task.cache_dir = Path(scratch) / cache
                    again = _fit_predict(name, label, make, task, test, images)
                    assert np.array_equal(again, proba), (
                        f"{name} ({label}): not deterministic: the same seed gave different probabilities "
                        f"({'reusing its cache_dir' if cache == 'first' else 'fresh instance'}, max diff "
                        f"{np.abs(again - proba).max():.3g})")


@_failures
def check_encoder_card(card: Any, pair: EncoderPair) -> None:
    """What an encoder spec's ``describe`` returned (``card``) matches the pair its factory built with the same
    options: the same identities, input spec and ``aligned`` (a run trusts the card to find cached features)."""
    from hica_bench.interfaces import EncoderCard

    assert isinstance(card, EncoderCard), f"describe() returned {type(card).__name__}, not an EncoderCard"
    assert card == pair.card, f"describe() gave {card}, but the built pair is {pair.card}"


@_failures
def check_encoder(pair: Any) -> None:
    """An :class:`~hica_bench.interfaces.EncoderPair` as a factory returns it: the image encoder has an identity,
    an input spec and ``embed_dim``; on a grey and an RGB image preprocessed as the harness does it returns
    finite (N, embed_dim) features, the same twice, independent of batch composition, without modifying its
    input, and the harness's extraction agrees; ``dense`` (if offered) gives (N, D', h, w); the text encoder (if
    any) gives finite float32 (len(texts), D) numpy arrays, also for an empty list; ``aligned`` pairs have a
    text encoder of the image encoder's width."""
    assert isinstance(pair, EncoderPair), f"expected an EncoderPair, got {type(pair).__name__}"
    image = pair.image
    assert isinstance(image, ImageEncoder), f"{type(image).__name__} lacks identity, input_spec, embed_dim or encode"
    assert isinstance(image.identity, str) and image.identity, "image encoder identity must be a non-empty string"
    spec = image.input_spec
    assert isinstance(spec, InputSpec) and spec.size >= 1 and len(spec.mean) == 3 and len(spec.std) == 3 and min(spec.std) > 0, (
        f"bad input_spec {spec!r}")
    assert spec.interpolation in ("bicubic", "bilinear"), f"unknown interpolation {spec.interpolation!r}"
    assert isinstance(image.embed_dim, int) and image.embed_dim >= 1, f"embed_dim must be a positive int, got {image.embed_dim!r}"
    if getattr(image, "volumetric", False):
        _check_volume_encoder(pair)
    else:
        _check_image_encoder(pair)
    _check_text_encoder(pair)


def _check_image_encoder(pair: EncoderPair) -> None:
    """A 2D image encoder (see :func:`check_encoder`)."""
    image, spec = pair.image, pair.image.input_spec
    grey, rgb = toy_images(np.array([1])), toy_images(np.array([0]), rgb=True, seed=1)
    x = torch.cat([preprocess(grey, spec, pair.device), preprocess(rgb, spec, pair.device)])  # as the harness prepares them
    original = x.clone()
    with torch.inference_mode():
        features, single = image.encode(x), image.encode(x[:1])
        dense = image.dense(x) if hasattr(image, "dense") else None
    assert torch.equal(x, original), "image encoder modified its input batch"
    assert torch.is_tensor(features) and features.shape == (2, image.embed_dim), (
        f"encode returned {getattr(features, 'shape', type(features).__name__)}, expected (2, {image.embed_dim})")
    assert features.is_floating_point() and torch.isfinite(features).all(), "image features must be finite floats"
    assert torch.allclose(single.float(), features[:1].float(), rtol=1e-3, atol=1e-3 * float(features.abs().max()) + 1e-5), (
        "an image's features depend on the other images in its batch (eval mode?)")
    extracted = FeatureExtractor.plain(pair, batch_size=1).encode(grey)  # the harness's path, same image
    assert np.array_equal(extracted, single.float().cpu().numpy()) or pair.device != "cpu", (
        "image encoder is not deterministic on CPU (or the harness's extraction disagrees with encode)")
    if dense is not None:
        assert torch.is_tensor(dense) and dense.ndim == 4 and dense.shape[0] == 2 and min(dense.shape[2:]) >= 1, (
            f"dense returned {getattr(dense, 'shape', None)}, expected (N, D, h, w)")
        assert torch.isfinite(dense).all(), "dense features contain NaN or inf"


def _check_text_encoder(pair: EncoderPair) -> None:
    """The pair's text encoder, if any, and an aligned pair's widths (see :func:`check_encoder`)."""
    image = pair.image
    if pair.text is not None:
        text = pair.text
        assert isinstance(text, TextEncoder), f"{type(text).__name__} lacks identity, embed_dim or encode"
        assert isinstance(text.identity, str) and text.identity and isinstance(text.embed_dim, int) and text.embed_dim >= 1
        texts = ["a chest x-ray with pneumonia.", "normal breast tissue.", "x"]
        embedded = text.encode(texts)
        assert isinstance(embedded, np.ndarray) and embedded.dtype == np.float32 and embedded.shape == (3, text.embed_dim), (
            f"text encode returned {type(embedded).__name__} {getattr(embedded, 'dtype', '')} "
            f"{getattr(embedded, 'shape', '')}, expected float32 (3, {text.embed_dim})")
        assert np.isfinite(embedded).all(), "text embeddings contain NaN or inf"
        assert np.array_equal(text.encode(texts), embedded) or pair.device != "cpu", "text encoder is not deterministic"
        assert np.allclose(text.encode(texts[1:2]), embedded[1:2], rtol=1e-3, atol=1e-4), (
            "a text's embedding depends on the other texts encoded with it (padding?)")
        empty = text.encode([])
        assert isinstance(empty, np.ndarray) and empty.shape == (0, text.embed_dim), f"encode([]) gave {getattr(empty, 'shape', empty)!r}"
    if pair.aligned:
        assert pair.text is not None and pair.text.embed_dim == image.embed_dim, (
            "an aligned pair needs a text encoder of the image encoder's width")


def _check_volume_encoder(pair: EncoderPair) -> None:
    """A native 3D encoder (``volumetric``): on two volumes prepared as the harness prepares them it returns finite
    (2, embed_dim) features, the same twice, independent of batch composition, without modifying its input, and the
    harness's volume path agrees."""
    from hica_bench.volumes import encode_native, preprocess_volumes

    image = pair.image
    rng = np.random.default_rng(0)
    volumes = np.clip(rng.normal(90, 25, size=(2, 20, 20, 20)), 0, 255).astype(np.uint8)
    x = preprocess_volumes(volumes, image.input_spec, pair.device)
    original = x.clone()
    with torch.inference_mode():
        features, single, again = image.encode(x), image.encode(x[:1]), image.encode(x)
    assert torch.equal(x, original), "image encoder modified its input batch"
    assert torch.is_tensor(features) and features.shape == (2, image.embed_dim), (
        f"encode returned {getattr(features, 'shape', type(features).__name__)}, expected (2, {image.embed_dim})")
    assert features.is_floating_point() and torch.isfinite(features).all(), "image features must be finite floats"
    assert torch.equal(features, again) or pair.device != "cpu", "3D encoder is not deterministic on CPU"
    assert torch.allclose(single.float(), features[:1].float(), rtol=1e-3, atol=1e-3 * float(features.abs().max()) + 1e-5), (
        "a volume's features depend on the other volumes in its batch (eval mode?)")
    extracted = encode_native(volumes[:1], image, pair.device, batch_size=1)
    assert np.allclose(extracted, single.float().cpu().numpy(), rtol=1e-5, atol=1e-6) or pair.device != "cpu", (
        "the harness's volume path disagrees with encode")


@_failures
def check_dataset(dataset: Any) -> None:
    """A :class:`~hica_bench.interfaces.FewShotDataset`: name, size, a task the runner supports, at least two
    distinct class names (two for binary), an identity; train/val/test splits of uint8 images (N, S, S[, 3]) (volumes
    (N, S, S, S) when ``volumetric``)
    and int64 labels (N,) in [0, C) of the same length (``multi-label``: int64 (N, C) in {0, 1}), sliceable, the same
    on every call; every class in train (multi-label: every label has a positive train image)."""
    for attribute in ("name", "identity"):
        value = getattr(dataset, attribute, None)
        assert isinstance(value, str) and value, f"dataset {attribute} must be a non-empty string, got {value!r}"
    name, size = dataset.name, getattr(dataset, "size", None)
    assert isinstance(size, int) and size >= 1, f"{name}: size must be a positive int, got {size!r}"
    assert dataset.task in TASKS, f"{name}: task {dataset.task!r} is not one the runner supports {TASKS}"
    names = dataset.class_names
    assert isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) and n for n in names), (
        f"{name}: class_names must be a list of at least two names")
    assert len(set(names)) == len(names), f"{name}: class names repeat"
    assert dataset.task != "binary-class" or len(names) == 2, f"{name}: binary-class with {len(names)} classes"
    for split_name in ("train", "val", "test"):
        where = f"{name} {split_name}"
        split = dataset.split(split_name)
        assert isinstance(split, Split), f"{where}: split() returned {type(split).__name__}, not a Split"
        images, labels = split.images, split.labels
        assert isinstance(images, np.ndarray) and images.dtype == np.uint8, f"{where}: images must be a uint8 array"
        if getattr(dataset, "volumetric", False):
            assert images.ndim == 4 and images.shape[1:] == (size, size, size), (
                f"{where}: volumes have shape {images.shape}, expected (N, {size}, {size}, {size})")
        else:
            assert images.ndim in (3, 4) and images.shape[1:3] == (size, size) and (images.ndim == 3 or images.shape[3] == 3), (
                f"{where}: images have shape {images.shape}, expected (N, {size}, {size}[, 3])")
        multilabel = dataset.task == "multi-label"
        shape = f"(N, {len(names)})" if multilabel else "(N,)"
        assert isinstance(labels, np.ndarray) and labels.dtype == np.int64 and (
            labels.shape[1:] == (len(names),) if multilabel else labels.ndim == 1), (
            f"{where}: labels must be int64 {shape}, got {labels.dtype} {labels.shape}")
        assert len(labels) == len(images) >= 1, f"{where}: {len(images)} images but {len(labels)} labels"
        top = 1 if multilabel else len(names) - 1
        assert labels.min() >= 0 and labels.max() <= top, f"{where}: labels outside 0..{top}"
        assert images[:2].shape[0] == min(2, len(images)), f"{where}: images cannot be sliced"
        assert np.array_equal(dataset.split(split_name).labels, labels), f"{where}: labels differ between calls"
        if split_name == "train":
            present = np.flatnonzero(labels.sum(axis=0)) if multilabel else np.unique(labels)
            missing = sorted(set(range(len(names))) - set(present.tolist()))
            assert not missing, f"{where}: classes {missing} have no train images (no k-shot support possible)"


#: The label layouts :func:`check_protocol` draws episodes from: (description, train class sizes, val class sizes).
PROTOCOL_LAYOUTS = (("2 classes with a val split", (40, 60), (12, 9)), ("3 classes, no val split", (30, 25, 40), (0, 0, 0)),
                    ("5 classes, a small val split", (24, 30, 28, 26, 40), (2, 1, 3, 2, 2)))


def _layout(train: Sequence[int], val: Sequence[int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.permutation(np.repeat(np.arange(len(sizes)), sizes)).astype(np.int64)
            for name, sizes in (("train", train), ("val", val))}


@_failures
def check_protocol(protocol_plugin: Any, shots: Sequence[int] = (1, 2, 4), seeds: Sequence[int] = (0, 1),
                   options: dict[str, Any] | None = None) -> None:
    """An :class:`~hica_bench.interfaces.EvaluationProtocol` (or a :class:`PluginSpec` / zero-argument factory of one):
    a ``title``; on each of :data:`PROTOCOL_LAYOUTS`, for every k and seed its ``check`` accepts, ``episode`` returns an
    :class:`~hica_bench.interfaces.Episode` whose support has k train indices of each class, whose validation indices
    (if any) are in range and never overlap the support, with a known selection rule and metric; the same episode on
    every call (deterministic); supports and validation sets nested across k; and different seeds give different
    supports. ``check`` may refuse a layout or k with a :class:`~hica_bench.errors.UserError`, and nothing else.
    A transfer protocol (one with a ``support_from``: ``cross-dataset``) also matches a dataset's classes to themselves in
    order, and refuses (UserError) a target class the source lacks. ``options``: a spec's options for this check."""
    from hica_bench.errors import UserError
    from hica_bench.interfaces import SELECTION_METRICS, SELECTIONS, Episode

    if hasattr(protocol_plugin, "episode") and not isinstance(protocol_plugin, (type, PluginSpec)):
        label, made = type(protocol_plugin).__name__, protocol_plugin  # a built protocol
    else:
        label, make = _builder(protocol_plugin, "protocol", options)
        made = make()
    title = getattr(made, "title", None)
    assert isinstance(title, str) and title, f"{label}: title must be a non-empty string, got {title!r}"
    if getattr(made, "support_from", None):
        names = ["normal", "pneumonia", "effusion"]
        matched = np.asarray(made.match(names, list(reversed(names)), "kit-source", "kit-target"))
        assert matched.tolist() == [2, 1, 0], f"{label}: match() paired classes of the same name wrongly: {matched}"
        try:
            made.match(names[:2], names, "kit-source", "kit-target")
        except UserError:
            pass
        else:
            raise AssertionError(f"{label}: match() accepted a target class the source does not have")
    for what, train, val in PROTOCOL_LAYOUTS:
        labels = _layout(train, val)
        n = len(train)
        names = [f"class {c}" for c in range(n)]
        usable = []
        for k in shots:
            try:
                made.check(labels, n, [k], "kit", names)
            except UserError:
                continue
            usable.append(k)
        for seed in seeds:
            previous = None
            for k in usable:
                episode = made.episode(labels, n, k, seed, "kit")
                where = f"{label} on {what}, k={k}, seed={seed}"
                assert isinstance(episode, Episode), f"{where}: episode() returned {type(episode).__name__}"
                support = np.asarray(episode.support)
                assert support.dtype.kind == "i" and support.ndim == 1, f"{where}: support must be integer indices"
                assert support.min() >= 0 and support.max() < len(labels["train"]), f"{where}: support out of range"
                counts = np.bincount(labels["train"][support], minlength=n)
                fitted = np.arange(n) if episode.classes is None else np.asarray(episode.classes)
                expected = np.zeros(n, int)
                expected[fitted] = k
                assert (counts == expected).all(), (
                    f"{where}: the support has {counts.tolist()} images per class, expected {expected.tolist()}")
                if episode.novel is not None:
                    assert episode.classes is not None and not np.intersect1d(episode.classes, episode.novel).size, (
                        f"{where}: novel classes need base classes apart from them")
                assert episode.selection in SELECTIONS and episode.metric in SELECTION_METRICS, (
                    f"{where}: selection {episode.selection!r} / metric {episode.metric!r} unknown")
                if episode.validation is not None:
                    validation = np.asarray(episode.validation)
                    assert episode.validation_split in ("train", "val"), f"{where}: validation_split must be train or val"
                    pool = labels[episode.validation_split]
                    assert len(validation) and validation.min() >= 0 and validation.max() < len(pool), (
                        f"{where}: validation indices out of range")
                    if episode.validation_split == "train":
                        assert not np.intersect1d(validation, support).size, f"{where}: validation overlaps the support"
                elif episode.selection == "validation":
                    raise AssertionError(f"{where}: selection by validation without validation indices")
                again = made.episode(labels, n, k, seed, "kit")
                assert np.array_equal(again.support, episode.support) and (
                    (again.validation is None and episode.validation is None)
                    or np.array_equal(again.validation, episode.validation)), f"{where}: episodes differ between calls"
                if previous is not None:
                    assert set(previous.support.tolist()) <= set(support.tolist()), (
                        f"{where}: the support does not contain the smaller k's support (supports must be nested)")
                    if previous.validation is not None and episode.validation is not None and \
                            previous.validation_split == episode.validation_split:
                        assert set(np.asarray(previous.validation).tolist()) <= set(np.asarray(episode.validation).tolist()), (
                            f"{where}: the validation set does not contain the smaller k's (they must be nested)")
                previous = episode
        if usable and len(seeds) > 1:
            k = usable[-1]
            drawn = {tuple(np.asarray(made.episode(labels, n, k, seed, "kit").support).tolist()) for seed in seeds}
            assert len(drawn) > 1, f"{label} on {what}: every seed draws the same support at k={k}"


@_failures
def check_roi_extractor(extractor: Any, k: int = 3) -> None:
    """A :class:`~hica_bench.interfaces.ROIExtractor`: for a normalised (N, 3, S, S) batch, with and without a
    dense map, ``extract`` gives an int64 tensor (N, k, 4) of boxes with 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S,
    the same boxes twice, without modifying its inputs; k = 1 works too."""
    images = preprocess(toy_images(np.arange(2)), InputSpec(32, (0.5,) * 3, (0.5,) * 3, "bilinear"))
    dense = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    for kk in (k, 1):
        for given in (None, dense):
            x, d = images.clone(), None if given is None else given.clone()
            boxes = extractor.extract(x, kk) if d is None else extractor.extract(x, kk, dense=d)
            where = f"extract(k={kk}, dense={'None' if d is None else 'given'})"
            assert torch.is_tensor(boxes) and boxes.dtype == torch.int64 and tuple(boxes.shape) == (2, kk, 4), (
                f"{where} returned {getattr(boxes, 'dtype', type(boxes).__name__)} {tuple(getattr(boxes, 'shape', ()))}, "
                f"expected int64 (2, {kk}, 4)")
            x0, y0, x1, y1 = boxes.unbind(-1)
            size = images.shape[-1]
            assert ((0 <= x0) & (x0 < x1) & (x1 <= size) & (0 <= y0) & (y0 < y1) & (y1 <= size)).all(), (
                f"{where}: boxes outside 0 <= x0 < x1 <= {size}, 0 <= y0 < y1 <= {size}: {boxes.tolist()}")
            assert torch.equal(x, images) and (d is None or torch.equal(d, dense)), f"{where} modified its inputs"
            again = extractor.extract(x, kk) if d is None else extractor.extract(x, kk, dense=d)
            assert torch.equal(again, boxes), f"{where} is not deterministic"


@_failures
def check_descriptor_generator(generator: Any, cases: Sequence[tuple[str, Sequence[str]]] = (
        ("breastmnist", ("malignant", "normal, benign")),
        ("hica-bench-testing-unknown", ("round cells", "spiky cells", "no cells")))) -> None:
    """A :class:`~hica_bench.interfaces.DescriptorGenerator`: for each (dataset, class names) of ``cases`` (by
    default a MedMNIST dataset and one it cannot know), one dict per class with at least one global text and a
    list of local texts, all non-empty strings; the same on a second call; ``class_names`` left unmodified."""
    for dataset, class_names in cases:
        names = list(class_names)
        described = generator.describe(dataset, names)
        where = f"describe({dataset!r})"
        assert names == list(class_names), f"{where} modified class_names"
        assert isinstance(described, list) and len(described) == len(names), (
            f"{where} must return one entry per class ({len(names)}), got {type(described).__name__} of {len(described)}")
        for name, entry in zip(names, described):
            assert isinstance(entry, dict) and set(entry) >= {"global", "local"}, f"{where}[{name!r}] lacks global/local"
            for part in ("global", "local"):
                texts = entry[part]
                assert isinstance(texts, list) and all(isinstance(t, str) and t.strip() for t in texts), (
                    f"{where}[{name!r}][{part!r}] must be a list of non-empty strings")
            assert entry["global"], f"{where}[{name!r}] has no global text"
        assert generator.describe(dataset, list(class_names)) == described, f"{where} is not deterministic"


def loss_inputs(loss: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors for ``loss``'s required keyword parameters, by name (see :data:`LOSS_INPUTS`)."""
    call = loss.forward if isinstance(loss, torch.nn.Module) else loss.__call__
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, parameter in inspect.signature(call).parameters.items():
        if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) or parameter.default is not parameter.empty:
            continue
        assert name in LOSS_INPUTS, f"check_loss cannot build a tensor for {name!r}; pass inputs={{...}}"
        shape = tuple(_SIZES[d] for d in LOSS_INPUTS[name])
        inputs[name] = (torch.arange(shape[0]) % _SIZES["C"] if name == "labels"
                        else torch.randn(shape, generator=generator))
    return inputs


@_failures
def check_loss(loss: Any, inputs: dict[str, torch.Tensor] | None = None) -> None:
    """A :class:`~hica_bench.interfaces.Loss`: called with keyword tensors (``inputs``, or built by
    :func:`loss_inputs`) it returns a finite float scalar tensor, backpropagates finite gradients to its float
    inputs, gives the same value twice, and leaves its inputs unmodified."""
    inputs = loss_inputs(loss) if inputs is None else inputs
    originals = {k: v.detach().clone() for k, v in inputs.items()}
    leaves = {k: (v.detach().clone().requires_grad_() if v.is_floating_point() else v.clone()) for k, v in inputs.items()}
    value = loss(**leaves)
    assert torch.is_tensor(value) and value.ndim == 0 and value.is_floating_point(), (
        f"loss returned {type(value).__name__} {tuple(getattr(value, 'shape', ()))}, expected a float scalar tensor")
    assert torch.isfinite(value), f"loss is {float(value)}"
    assert value.requires_grad, "the loss is not differentiable with respect to any input"
    value.backward()
    grads = [v.grad for v in leaves.values() if v.is_floating_point()]
    assert any(g is not None for g in grads), "the loss is not differentiable with respect to any input"
    assert all(torch.isfinite(g).all() for g in grads if g is not None), "gradients contain NaN or inf"
    assert all(torch.equal(leaves[k].detach(), originals[k]) for k in inputs), "the loss modified its inputs"
    again = loss(**{k: v.detach() for k, v in leaves.items()})
    assert torch.equal(again.detach(), value.detach()), "the loss gives different values for the same inputs"

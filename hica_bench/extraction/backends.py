"""How an image encoder's forward pass runs: eager PyTorch, or an ONNX Runtime session of its exported graph.

A *forward* is a callable ``batch -> (N, D) tensor`` for a preprocessed float32 batch (N, 3, S, S) on the
device. :func:`build_forward` makes one for a chosen :class:`~hica_bench.extraction.tuning.ExtractionSettings`:

- ``eager``: ``encoder.encode`` under ``torch.inference_mode`` (the runner's caller), optionally with the image
  module and its input in channels-last memory format, AMP autocast on CUDA, or ``torch.compile``.
- ``onnxruntime``: the encoder's ``encode`` exported once with ``torch.onnx.export`` (dynamic batch axis) into
  ``<cache>/onnx/``, checked against eager on a fixed batch (:data:`ONNX_TOLERANCE`) and run on ONNX Runtime's
  CPU execution provider. Two exporters (:data:`EXPORTERS`): ``dynamo`` (torch.export, decompositions and
  onnxscript's optimiser: slow to export, fast to run: EfficientNet-Lite0 10-15 s export, 150-170 images/s on 2
  cores) and ``torchscript`` (tracing, then its shape arithmetic folded, :func:`_fold_trace`: Lite0 2.2-2.5 s, as
  fast as the dynamo graph; open_clip ViT-B/32 is refused, :func:`_trace_export`). Their graphs give
  features that differ in the last bits, so the exporter is part of the feature identity. Needs the optional ``onnxruntime``, ``onnx`` and ``onnxscript`` packages
  (``pip install hica-bench[onnx]``) and an encoder whose ``modules["image"]`` holds its weights. Its forward
  (:class:`OnnxForward`) also offers ``for_images``: the same features from the uint8 images as they are, the
  preprocessing done inside ONNX Runtime by a graph made per image shape, where that gives the same bits.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from hica_bench.errors import UserError, first_line
from hica_bench.files import atomic_dir, cannot_write, digest, remove_orphans
from hica_bench.interfaces import EncoderPair, ImageEncoder

BACKENDS = ("eager", "onnxruntime")
#: ONNX Runtime features must match eager ones on the check batch: max |ort - eager| <= this × max |eager|
ONNX_TOLERANCE = 1e-4
#: bump when the export recipe changes (part of the exported model's cache key)
EXPORT_VERSION = 1
EXPORTERS = ("dynamo", "torchscript")
#: the torchscript export's own recipe (its folder's key; the same features, so not the feature identity's):
#: 2: the traced graph's shape arithmetic folded (:func:`_fold_trace`)
TRACE_VERSION = 2

Forward = Callable[[Any], Any]


class BackendUnavailable(Exception):
    """This backend cannot run this encoder here; the message says why in one line."""


def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime version, or None when it (or the exporter's ``onnx``/``onnxscript``) is missing.
    Read from the installed distributions, not by importing them (onnxscript alone takes 0.7 s)."""
    import importlib.util
    from importlib import metadata

    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime", "onnxscript")):
        return None
    try:
        return metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:  # a build installed under another distribution name
        import onnxruntime

        return onnxruntime.__version__


def _autocast(device: str, precision: str):
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None and device.startswith("cuda") else contextlib.nullcontext()


def set_channels_last(pair: EncoderPair, on: bool) -> None:
    """Put the image module's weights in channels-last (or back in contiguous) memory format."""
    import torch

    module = pair.modules.get("image")
    if module is None:
        raise BackendUnavailable("channels-last needs an encoder that exposes its image module (modules['image'])")
    with torch.no_grad():
        module.to(memory_format=torch.channels_last if on else torch.contiguous_format)


def eager_forward(encoder: ImageEncoder, device: str, precision: str = "fp32", channels_last: bool = False,
                  compile: bool = False) -> Forward:
    """``encoder.encode`` as is (the image module must already be in the matching memory format)."""
    import torch

    encode = encoder.encode
    if compile:
        encode = _compiled(encoder)
    if channels_last:
        def forward(batch):
            with _autocast(device, precision):
                return encode(batch.contiguous(memory_format=torch.channels_last))
    else:
        def forward(batch):
            with _autocast(device, precision):
                return encode(batch)
    return forward


#: the most batch shapes a compiled encoder may be specialised on in one process (Dynamo's default is 8)
COMPILED_SHAPES_MAX = 64


def _compiled(encoder: ImageEncoder) -> Callable[[Any], Any]:
    """``torch.compile(encoder.encode)``, one graph per batch shape (``dynamic=False``: every batch of a shape runs the
    same kernels, so gives the same bits). Past its limit of graphs per function Dynamo would run the encoder eagerly
    without a word: other bits under the same feature identity (``compile`` is part of it). So the limit is raised to
    :data:`COMPILED_SHAPES_MAX` (a split's last, shorter batch is a shape of its own) and reaching it is an error,
    for the process (Dynamo's settings are global). A failure of the compilation (Dynamo, Inductor, a missing C++
    compiler or Triton, at a call with a new batch shape) or of that limit is a one-line :class:`UserError` naming
    the way out, not a traceback."""
    import torch
    import torch._dynamo.config as dynamo_config
    # torch has no public names for these; BackendCompilerFailed covers Inductor's errors
    from torch._dynamo import exc as dynamo_exc
    from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError

    limit_hit = getattr(dynamo_exc, "FailOnRecompileLimitHit", None)  # torch >= 2.6, as the settings below

    def failed(exc: BaseException) -> UserError:
        return UserError(f"--compile: torch.compile of {encoder.identity} failed ({type(exc).__name__}: "
                         f"{first_line(exc, 300)}); run without --compile")

    if limit_hit is not None and hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, COMPILED_SHAPES_MAX)
        dynamo_config.fail_on_recompile_limit_hit = True
    try:
        compiled = torch.compile(encoder.encode, dynamic=False)
    except RuntimeError as exc:  # Dynamo does not run on this Python
        raise failed(exc) from None

    def encode(batch):
        try:
            return compiled(batch)
        except (BackendCompilerFailed, InternalTorchDynamoError) as exc:
            raise failed(exc) from None
        except Exception as exc:  # the encoder's own errors pass as they are
            if limit_hit is None or not isinstance(exc, limit_hit):
                raise
            raise UserError(f"--compile: {encoder.identity} met more than {COMPILED_SHAPES_MAX} batch shapes in this "
                            f"process, each compiled anew (a split's last batch is one); run without --compile, or "
                            f"fewer datasets per run") from None
    return encode


def _onnx_dir(cache_dir: Path, encoder: ImageEncoder, exporter: str = "dynamo") -> Path:
    import torch

    parts = {"encoder": encoder.identity, "input_spec": repr(encoder.input_spec), "torch": torch.__version__,
             "export": EXPORT_VERSION}
    if exporter != "dynamo":  # the first exporter's folders keep their names
        parts["exporter"] = exporter
    if exporter == "torchscript":
        parts["trace"] = TRACE_VERSION
    return Path(cache_dir) / "onnx" / digest(parts, 20)


def export_record(pair: EncoderPair, cache_dir: Path, exporter: str = "dynamo") -> dict[str, Any] | None:
    """The record of this encoder's export by ``exporter`` in ``cache_dir`` (None: not exported yet, or unreadable)."""
    try:
        record = json.loads((_onnx_dir(cache_dir, pair.image, exporter) / "export.json").read_text())
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


def _check_batch(encoder: ImageEncoder, n: int = 3):
    """A fixed, seeded batch in the encoder's normalised input range (odd size: exercises the dynamic axis)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    size = encoder.input_spec.size
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


def export_onnx(pair: EncoderPair, cache_dir: Path, exporter: str = "dynamo") -> tuple[Path, dict[str, Any]]:
    """The encoder's ``encode`` as an ONNX file under ``cache_dir`` (exported once by ``exporter``, then reused) and
    its record: export seconds and the check against eager. Raises BackendUnavailable when it cannot be exported or
    the check fails (the failure is remembered too, so it is not retried every run)."""
    import torch

    encoder, module = pair.image, pair.modules.get("image")
    if module is None:
        raise BackendUnavailable("the encoder does not expose its image module (modules['image']), so it cannot be exported")
    folder = _onnx_dir(cache_dir, encoder, exporter)
    record_path = folder / "export.json"
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text())
            ok, reason = bool(record["ok"]), str(record.get("reason", ""))
        except (OSError, ValueError, KeyError, TypeError):  # damaged: export again, in a new folder
            shutil.rmtree(folder, ignore_errors=True)
        else:
            if not ok:
                raise BackendUnavailable(reason)
            return folder / "model.onnx", record

    example = _check_batch(encoder, 2)
    remove_orphans(folder.parent, folder.name)
    start = time.perf_counter()
    record: dict[str, Any] = {"identity": encoder.identity, "torch": torch.__version__, "tolerance": ONNX_TOLERANCE,
                              "exporter": exporter}
    with atomic_dir(folder) as partial:  # published whole (model and record) or not at all
        try:
            with _quiet():
                if exporter == "dynamo":
                    torch.onnx.export(_exported(encoder, module), (example,), partial / "model.onnx", dynamo=True,
                                      input_names=["images"], output_names=["features"],
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
                else:
                    _trace_export(_exported(encoder, module), example, partial / "model.onnx")
                    record["fold"] = _fold_trace(partial / "model.onnx", encoder)
            record.update(ok=True, export_s=time.perf_counter() - start)
            record.update(_compare(encoder, partial / "model.onnx"))
            if record["max_abs_diff"] > ONNX_TOLERANCE * record["max_abs_eager"]:
                record.update(ok=False, reason=f"ONNX Runtime features differ from eager by {record['max_abs_diff']:.2e} "
                                               f"(> {ONNX_TOLERANCE:g} × max |feature| {record['max_abs_eager']:.3g})")
        except BackendUnavailable as exc:
            record.update(ok=False, reason=str(exc))
        except OSError as exc:  # a full disk or no permission says nothing about the encoder: not remembered
            raise cannot_write(folder, exc) from None
        except Exception as exc:  # any exporter failure means: this encoder does not export cleanly
            record.update(ok=False, reason=f"torch.onnx.export failed: {type(exc).__name__}: {first_line(exc)}")
        if not record["ok"]:  # remember the failure, not a model that failed its check
            for leftover in partial.iterdir():
                leftover.unlink()
        try:
            (partial / "export.json").write_text(json.dumps(record, indent=1))
        except OSError as exc:
            raise cannot_write(folder, exc) from None
    record = json.loads(record_path.read_text())  # ours, or that of a process that published first
    if not record["ok"]:
        raise BackendUnavailable(record["reason"])
    return folder / "model.onnx", record


def _exported(encoder: ImageEncoder, module: Any) -> Any:
    """What is exported: a module whose forward is ``encoder.encode`` and whose weights are the image module's."""
    import torch

    class Encode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = module  # registers the weights, so they are exported as initialisers

        def forward(self, x):
            return encoder.encode(x)

    return Encode().eval()


def _trace_export(module: Any, example: Any, path: Path) -> None:
    """The torchscript exporter traces one call: Python control flow that depends on the data (a branch on a
    pixel, a loop over a tensor's values) would be frozen into the graph as the example took it, and the features
    silently wrong for other images. torch warns when tracing sees such a thing (``TracerWarning``); here that
    warning refuses the export instead."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), path, dynamo=False, input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    frozen = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if frozen:
        raise BackendUnavailable(f"torch.onnx.export failed: tracing would freeze data-dependent control flow "
                                 f"({' '.join(str(frozen[0].message).split())[:200]})")


#: the most rounds of folding a traced graph's shape arithmetic (each resolves at least one chain; Lite0 takes 7)
MAX_FOLD_ROUNDS = 32


def _fold_trace(path: Path, encoder: ImageEncoder) -> dict[str, Any]:
    """Fold a traced graph's shape arithmetic into constants, in place, when that keeps its features to the bit.

    Tracing records every ``x.shape[i]`` as ``Shape`` → ``Gather`` nodes even where the dimension is fixed (only the
    batch axis is dynamic): timm's TensorFlow-"same" convolutions work out their padding from the input's height
    and width at run time, so each stride-2 convolution of EfficientNet-Lite0 gets a chain of ~30 nodes ending in an
    explicit ``Pad``, which ONNX Runtime cannot fuse into the convolution and must run outside its blocked (NCHWc)
    layout, reordering the activations out and back around each one: the traced graph ran at ~0.6x the dynamo
    export's speed. onnxscript's optimiser folds such chains and fuses the pads into the convolutions, but it
    reads a dimension out of a shape only for a 1-D index, and tracing gathers with a scalar one:
    :func:`_static_dimension_rule` is that one missing rewrite (onnxscript's pattern API); the folding, the pad
    fusion and the clean-up are onnxscript's. Zero padding inside the convolution adds the same products in the same
    order, so the features should not move; that is checked: the folded graph must give the plain one's features to
    the bit on the check batch (and on one image on one thread), else the plain trace is kept. Returns what happened,
    for the export record."""
    import numpy as np

    plain = _check_outputs(path, encoder)
    start = time.perf_counter()
    folded_path = path.with_name("folded.onnx")
    try:
        model, before, rounds = _folded(path, folded_path)
        got = _check_outputs(folded_path, encoder)
    except OSError:  # a full disk says nothing about the graph: export_onnx does not remember it
        folded_path.unlink(missing_ok=True)
        raise
    except Exception as exc:  # onnxscript could not fold this graph: the plain trace is kept, and says why
        folded_path.unlink(missing_ok=True)
        return {"kept": False, "reason": f"the fold failed: {type(exc).__name__}: {first_line(exc)}"}
    record = {"nodes_before": before, "nodes_after": len(model.graph), "rounds": rounds,
              "fold_s": time.perf_counter() - start}
    if all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(got, plain)):
        folded_path.replace(path)
        return {**record, "kept": True}
    folded_path.unlink()
    return {**record, "kept": False, "reason": "the folded graph's features differ from the plain trace's"}


def _check_outputs(path: Path, encoder: ImageEncoder) -> list[Any]:
    """The graph's features of the check batch with ONNX Runtime's default threads, and of its first image on one
    thread (a run may use another batch size and thread count than the check)."""
    batch = _check_batch(encoder).numpy()
    return [ort_session(path, None).run(None, {"images": batch})[0],
            ort_session(path, 1).run(None, {"images": batch[:1]})[0]]


def _folded(path: Path, to: Path) -> tuple[Any, int, int]:
    """The traced graph at ``path`` folded and saved at ``to``: onnxscript's IR model of it, its node count before,
    and the rounds it took."""
    from onnxscript import ir, optimizer, rewriter
    from onnxscript.rewriter.rules import common

    model = ir.load(path)
    before = len(model.graph)
    rules = rewriter.RewriteRuleSet([_static_dimension_rule(), common.normalize_pad_format_conv_rule,
                                     common.fuse_pad_into_conv_rule])
    rounds = 0
    # a fused pad gives the next chain its input's shape, and the rule its dimensions
    for rounds in range(1, MAX_FOLD_ROUNDS + 1):
        count = len(model.graph)
        folded = optimizer.fold_constants_ir(model, onnx_shape_inference=True, should_fold=_small_fill).modified
        rewritten = rewriter.RewritePass(rules)(model).modified
        optimizer.remove_unused_nodes(model)
        if not (folded or rewritten or len(model.graph) != count):
            break
    ir.save(model, to)
    return model, before, rounds


def _small_fill(node: Any) -> bool | None:
    """onnxscript keeps ``ConstantOfShape`` unfolded (its output can be large); a padding chain's is a handful of
    zeros, which must fold for the chain to."""
    if node.op_type == "ConstantOfShape" and node.inputs and node.inputs[0] is not None:
        shape = node.inputs[0].const_value
        if shape is not None:
            import numpy as np

            return int(np.prod(shape.numpy())) <= 64
    return None


def _static_dimension_rule():
    """``Gather(Shape(x), k)`` with a constant scalar ``k`` where ``x``'s dimension ``k`` is a known number → that
    number (onnxscript folds this for a 1-D ``k`` only)."""
    import numpy as np
    from onnxscript import ir
    from onnxscript.rewriter import pattern

    def dimension(x, index, shape) -> int | None:
        """The dimension the Gather reads, when it is a known number (None: leave the Gather alone)."""
        k = index.const_value
        if k is None or k.numpy().ndim != 0 or x.shape is None:
            return None
        attributes = shape.producer().attributes
        dims = list(x.shape)[attributes.get_int("start", 0):attributes.get_int("end", None)]
        k = int(k.numpy())
        return dims[k] if -len(dims) <= k < len(dims) and isinstance(dims[k], int) else None

    class StaticDimension(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, index):
            return op.Gather(op.Shape(x, _allow_other_attributes=True, _outputs=["shape"]), index,
                             _allow_other_attributes=True)

        def check(self, context, x, index, shape, **_):
            result = pattern.MatchResult()
            if context.root.attributes.get_int("axis", 0) != 0:
                return result.fail("not a Gather on axis 0")
            return result if dimension(x, index, shape) is not None else result.fail("not a known dimension")

        def rewrite(self, op, x, index, shape, **_):
            return op.Constant(value=ir.tensor(np.array(dimension(x, index, shape), dtype=np.int64)))

    # the Shape may feed other nodes too (several Gathers of one shape): keep it, unused nodes are removed after
    return StaticDimension.rule(remove_nodes=False)


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress lines to stdout; keep them out of the run's output."""
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # _trace_export turns TracerWarning into an error inside this
        yield


def ort_session(path: Path, threads: int | None):
    """An ONNX Runtime CPU session of the graph at ``path`` (all graph optimisations; ``threads`` intra-op threads,
    None: ONNX Runtime's default), as every forward and check here makes it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _compare(encoder: ImageEncoder, path: Path) -> dict[str, float]:
    import numpy as np
    import torch

    batch = _check_batch(encoder)
    with torch.inference_mode():
        eager = encoder.encode(batch).float().numpy()
    got = ort_session(path, None).run(None, {"images": batch.numpy()})[0]
    if got.shape != eager.shape:
        raise BackendUnavailable(f"the exported model returns shape {got.shape}, eager {eager.shape}")
    return {"max_abs_diff": float(np.abs(got - eager).max()), "max_abs_eager": float(np.abs(eager).max())}


def onnx_forward(pair: EncoderPair, device: str, cache_dir: Path, threads: int | None, exporter: str = "dynamo") -> Forward:
    """An ONNX Runtime forward of the encoder (exported by ``exporter`` and checked on first use); CPU only."""
    if not device.startswith("cpu"):
        raise BackendUnavailable(f"the onnxruntime backend runs on CPU only (device {device!r}); use eager there")
    if onnxruntime_version() is None:
        raise BackendUnavailable("onnxruntime, onnx or onnxscript is not installed (pip install 'hica-bench[onnx]')")
    import torch

    path, _ = export_onnx(pair, cache_dir, exporter)
    return OnnxForward(ort_session(path, threads), path, pair.image.input_spec, threads)


#: bump when the recipe of the graphs that prepare the images themselves changes (part of their file names):
#: 1: Cast, layout, the resize as two MatMuls, Clip, Sub and Div in front of the exported graph
PREPARING_VERSION = 1
#: the most image shapes whose preparing graph a forward keeps a session of (each holds the weights and an arena of
#: its own: ~90 MiB for EfficientNet-Lite0 at batch 8); the oldest is dropped for a new shape
PREPARING_SESSIONS = 2


class OnnxForward:
    """The ONNX Runtime forward: ``forward(batch)`` runs the exported graph on a preprocessed batch (N, 3, S, S), as
    every forward does. ``forward.for_images(images)`` is, where it can be used, a forward that takes the uint8 images
    themselves, (N, H, W) or (N, H, W, 3) as a dataset's split holds them, and prepares them inside ONNX Runtime, as
    :func:`hica_bench.data.preprocess` does, in front of the same exported graph (:func:`preparing_graph`); the loop
    then only copies the images. Made once per image shape, and used only once
    it has given ``forward``'s features of :func:`~hica_bench.data.preprocess`'s batch to the bit, on random images
    of that shape (:func:`preparing_matches`): the same float32 operations (the resize's weights read off torch's
    kernel, as :func:`hica_bench.data.resize_by_products` uses them), then the same graph on the same numbers, so the
    feature identity does not change. The encoder loop (:func:`hica_bench.extraction.encode.encode_images`) takes it
    where there is one: on the 2-core VM, 384 BreastMNIST images at batch 8 ran at 1.01 of the raw forward's images/s
    against 0.95 preprocessing beside it (docs/benchmarks.md). A shape without one (its graph could not be made or
    loaded, or the check said no) is not tried again by this forward."""

    def __init__(self, session: Any, path: Path, spec: Any, threads: int | None) -> None:
        self._session, self._path, self._spec, self._threads = session, path, spec, threads
        self._lock = threading.Lock()
        self._preparing: dict[tuple[int, ...], Forward] = {}
        self._refused: set[tuple[int, ...]] = set()  # shapes without one: not tried again in this process

    def __call__(self, batch):
        import torch

        return torch.from_numpy(self._session.run(None, {"images": batch.numpy()})[0])

    def for_images(self, images: Any) -> Forward | None:
        """The forward for ``images``' uint8 batches as they are, or None (another dtype, a resize the graph does not
        do, a graph it could not make or that did not give the features' bits): then preprocess, as before."""
        import numpy as np

        shape = tuple(getattr(images, "shape", ())[1:])
        if getattr(images, "dtype", None) != np.uint8 or len(shape) not in (2, 3) or shape[2:] not in ((), (3,)):
            return None
        with self._lock:
            if shape in self._refused:
                return None
            if shape not in self._preparing:
                made = self._preparing_forward(shape)
                if made is None:
                    self._refused.add(shape)
                    return None
                if len(self._preparing) >= PREPARING_SESSIONS:
                    self._preparing.pop(next(iter(self._preparing)))
                self._preparing[shape] = made
            return self._preparing[shape]

    def _preparing_forward(self, shape: tuple[int, ...]) -> Forward | None:
        import torch

        session = None
        for attempt in range(2):  # a damaged file (it does not load) is written anew, once
            try:
                path = preparing_graph(self._path, self._spec, shape, anew=attempt > 0)
                if path is None:
                    return None
                session = ort_session(path, self._threads)
                break
            except Exception:  # a cache it cannot write, a graph it cannot edit: preprocessed batches, as before
                continue
        try:
            if session is None or not preparing_matches(self, session, self._spec, shape):
                return None
        except Exception:  # the check could not run (memory, an engine error): preprocessed batches, as before
            return None

        def forward(images):
            return torch.from_numpy(session.run(None, {"uint8_images": images})[0])

        return forward


def preparing_graph(path: Path, spec: Any, shape: tuple[int, ...], anew: bool = False) -> Path | None:
    """The exported graph at ``path`` with :func:`hica_bench.data.preprocess` in front of it for uint8 images of
    ``shape`` (H, W) or (H, W, 3), saved beside it once (``anew``: again, over a damaged one); where the export keeps
    its weights in a file of their own (the dynamo export), that file is read, so only the graph and the resize's
    weights are written; a graph with its weights inside (the folded trace) is written whole. None where the resize is
    not done so (a side over :data:`hica_bench.data.PRODUCTS_MAX_SIDE`).

    Its input is ``uint8_images`` (N, H, W[, 3]); then ``Cast`` to float32, ``Unsqueeze`` (grey) or ``Transpose``
    (RGB) to (N, C, H, W), where H x W is not S x S the resize as two ``MatMul`` (columns, then rows:
    :func:`hica_bench.data.resize_weights`' matrices) and ``Clip`` to 0-255, then ``Sub`` and ``Div`` by
    :func:`hica_bench.data.normalisation`'s (1, 3, 1, 1) constants, into ``images``, the exported graph's input."""
    import numpy as np

    from hica_bench import data

    height, width = shape[:2]
    channels = shape[2] if len(shape) == 3 else 1
    resize = (height, width) != (spec.size, spec.size)
    kernel = data.RESIZE_KERNELS.get(spec.interpolation)
    if resize and (max(height, width) > data.PRODUCTS_MAX_SIDE or kernel is None):
        return None
    target = path.with_name(f"preparing-{PREPARING_VERSION}-{height}x{width}x{channels}.onnx")
    if target.exists() and not anew:
        return target
    import onnx
    from onnx import helper, numpy_helper

    from hica_bench.files import atomic_write

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    (images,) = graph.input
    if images.name != "images":
        raise BackendUnavailable(f"the exported graph's input is {images.name!r}, not 'images'")
    mean, std = (np.array(values, dtype=np.float32).reshape(1, 3, 1, 1) for values in data.normalisation(spec))
    constants = {"prepare_mean": mean, "prepare_std": std, "prepare_axis": np.array([1], dtype=np.int64)}
    node = helper.make_node
    nodes = [node("Cast", ["uint8_images"], ["prepare_float"], to=onnx.TensorProto.FLOAT),
             node("Transpose", ["prepare_float"], ["prepare_nchw"], perm=[0, 3, 1, 2]) if channels == 3
             else node("Unsqueeze", ["prepare_float", "prepare_axis"], ["prepare_nchw"])]
    pixels = "prepare_nchw"
    if resize:
        constants.update(prepare_columns=data.resize_weights(kernel, width, spec.size, True).numpy(),
                         prepare_rows=data.resize_weights(kernel, height, spec.size, False).numpy(),
                         prepare_low=np.array(0.0, dtype=np.float32), prepare_high=np.array(255.0, dtype=np.float32))
        nodes += [node("MatMul", ["prepare_nchw", "prepare_columns"], ["prepare_across"]),
                  node("MatMul", ["prepare_rows", "prepare_across"], ["prepare_resized"]),
                  node("Clip", ["prepare_resized", "prepare_low", "prepare_high"], ["prepare_pixels"])]
        pixels = "prepare_pixels"
    nodes += [node("Sub", [pixels, "prepare_mean"], ["prepare_centred"]),
              node("Div", ["prepare_centred", "prepare_std"], ["images"])]
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    exported = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *exported])  # before the exported graph's first node (ONNX wants its nodes in order)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("uint8_images", onnx.TensorProto.UINT8, ["batch", *shape]))
    return atomic_write(target, model.SerializeToString())


def preparing_matches(forward: Forward, session: Any, spec: Any, shape: tuple[int, ...]) -> bool:
    """Whether ``session`` (:func:`preparing_graph`'s) gives ``forward``'s features of
    :func:`hica_bench.data.preprocess`'s batch to the bit, on random uint8 images of ``shape``, one alone and three
    together (the resize's first product is one matrix of N·C·H rows, and a matrix library may take another path for
    one row). Adding the resize's products in another order than torch's kernel differs in a large part of the pixels
    (data.py), so one random batch all but surely shows it; it is a check, not a proof, as for the resize by
    products. The exported graph after the preparation is the same, on the same numbers."""
    import numpy as np
    import torch

    from hica_bench.data import preprocess

    generator = torch.Generator().manual_seed(0)
    for count in (1, 3):
        images = torch.randint(0, 256, (count, *shape), generator=generator, dtype=torch.uint8).numpy()
        with torch.inference_mode():
            expected = forward(preprocess(images, spec)).numpy()
        got = session.run(None, {"uint8_images": images})[0]
        if got.shape != expected.shape or not np.array_equal(got.view(np.int32), expected.view(np.int32)):
            return False
    return True

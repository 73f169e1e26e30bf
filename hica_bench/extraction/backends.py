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
  (``pip install hica-bench[onnx]``) and an encoder whose ``modules["image"]`` holds its weights.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

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
        encode = torch.compile(encode, dynamic=False)
    if channels_last:
        def forward(batch):
            with _autocast(device, precision):
                return encode(batch.contiguous(memory_format=torch.channels_last))
    else:
        def forward(batch):
            with _autocast(device, precision):
                return encode(batch)
    return forward


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
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            record.update(ok=False, reason=f"torch.onnx.export failed: {type(exc).__name__}: {first_line}")
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
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        return {"kept": False, "reason": f"the fold failed: {type(exc).__name__}: {first_line}"}
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
    return [_session(path, None).run(None, {"images": batch})[0], _session(path, 1).run(None, {"images": batch[:1]})[0]]


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


def _session(path: Path, threads: int | None):
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
    got = _session(path, None).run(None, {"images": batch.numpy()})[0]
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
    return OnnxForward(_session(path, threads), path, pair.image.input_spec, threads)


#: bump when the pixels graph's recipe changes (part of its file name): 1: ``Sub`` then ``Div`` by (1, 3, 1, 1) constants
PIXELS_VERSION = 1


class OnnxForward:
    """The ONNX Runtime forward: ``forward(batch)`` runs the exported graph on a normalised batch (N, 3, S, S), as
    every forward does. ``forward.pixels`` (None where it is not to be used) runs the same graph with the
    normalisation put in front of it (:func:`pixels_graph`) on the pixels before normalising (``preprocess(...,
    normalised=False)``: (N, 1, S, S) for grey images, (N, 3, S, S) for RGB), so the engine, not the preprocessing
    thread beside it, writes its (N, 3, S, S) input. Made on first use, and used only once it has given
    ``forward``'s features to the bit on random pixels of both kinds (:func:`pixels_match`): the same ``Sub`` and
    ``Div`` of float32 numbers as :func:`hica_bench.data.preprocess`'s, then the same graph on the same numbers, so
    the feature identity does not change. The encoder loop (:func:`hica_bench.extraction.encode.encode_images`) takes
    it where there is one: on the 2-core VM, 384 BreastMNIST images at batch 16 ran at 0.988 of the raw forward's
    images/s against 0.937 normalising beside it (docs/benchmarks.md)."""

    def __init__(self, session: Any, path: Path, spec: Any, threads: int | None) -> None:
        self._session, self._path, self._spec, self._threads = session, path, spec, threads
        self._lock = threading.Lock()
        self._pixels: Forward | None | bool = False  # False: not made yet

    def __call__(self, batch):
        import torch

        return torch.from_numpy(self._session.run(None, {"images": batch.numpy()})[0])

    @property
    def pixels(self) -> Forward | None:
        with self._lock:
            if self._pixels is False:
                self._pixels = self._pixels_forward()
            return self._pixels

    def _pixels_forward(self) -> Forward | None:
        import torch

        try:
            session = _session(pixels_graph(self._path, self._spec), self._threads)
        except Exception:  # a cache it cannot write, a graph it cannot edit: the normalised batch, as before
            return None
        if not pixels_match(self, session, self._spec):
            return None

        def forward(pixels):
            return torch.from_numpy(session.run(None, {"pixels": pixels.numpy()})[0])

        return forward


def pixels_graph(path: Path, spec: Any) -> Path:
    """The exported graph at ``path`` with ``(pixels - mean) / std`` in front of it (:func:`hica_bench.data.normalisation`'s
    float32 constants, broadcast from (1, 3, 1, 1), so one input of (N, 1, S, S) or (N, 3, S, S) gives (N, 3, S, S)),
    saved beside it (once; it reads the same weights file, so only the graph is written): its input is ``pixels``,
    and ``images``, the exported graph's input, becomes the ``Div``'s output."""
    target = path.with_name(f"pixels-{PIXELS_VERSION}.onnx")
    if target.exists():
        return target
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from hica_bench.data import normalisation
    from hica_bench.files import atomic_write

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    (images,) = graph.input
    if images.name != "images":
        raise BackendUnavailable(f"the exported graph's input is {images.name!r}, not 'images'")
    mean, std = (np.array(values, dtype=np.float32).reshape(1, 3, 1, 1) for values in normalisation(spec))
    graph.initializer.extend([numpy_helper.from_array(mean, "pixels_mean"), numpy_helper.from_array(std, "pixels_std")])
    side = images.type.tensor_type.shape.dim[2:]
    pixels = helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT,
                                           ["batch", "channels", *(d.dim_value or d.dim_param for d in side)])
    nodes = [helper.make_node("Sub", ["pixels", "pixels_mean"], ["pixels_centred"]),
             helper.make_node("Div", ["pixels_centred", "pixels_std"], ["images"])]
    exported = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *exported])  # before the exported graph's first node (ONNX wants its nodes in order)
    del graph.input[:]
    graph.input.append(pixels)
    return atomic_write(target, model.SerializeToString())


def pixels_match(forward: Forward, session: Any, spec: Any) -> bool:
    """Whether ``session`` (:func:`pixels_graph`'s) gives ``forward``'s features to the bit on random pixels (0-255, not
    only whole numbers, as the resize leaves them) of a grey and an RGB batch: normalised by
    :func:`hica_bench.data.normalise` into ``forward``, as they are into ``session``."""
    import numpy as np
    import torch

    from hica_bench.data import normalise

    generator = torch.Generator().manual_seed(0)
    for channels in (1, 3):
        pixels = torch.rand((2, channels, spec.size, spec.size), generator=generator) * 255.0
        expected = forward(normalise(pixels, spec)).numpy()
        got = session.run(None, {"pixels": pixels.numpy()})[0]
        if got.shape != expected.shape or not np.array_equal(got.view(np.int32), expected.view(np.int32)):
            return False
    return True

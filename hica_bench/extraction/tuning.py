"""Feature-extraction settings chosen by measurement, remembered per encoder, device and input size.

:func:`choose` returns the :class:`ExtractionSettings` a run extracts with. Whatever the user fixed
(:class:`Requested`: ``--backend``, ``--batch-size``, ``--channels-last``, ``--threads``, ``--amp``,
``--compile``) is kept; every other knob is chosen by a short probe that times the encoder's forward on a
synthetic batch for each candidate and keeps the fastest:

1. backend × memory layout (eager NCHW, eager channels-last, ONNX Runtime when installed and exportable)
   at a middle batch size;
2. batch size for the winner, walking up and down from the middle while the rate improves;
3. thread count, when the machine offers more than one sensible value (torch's default vs. logical CPUs).

The probe's verdict is stored as JSON under ``<cache>/tuning/``, keyed by everything it depends on (encoder
identity, input spec, device and its model, torch / ONNX Runtime versions, CPU count, allocator, the fixed
knobs), so later runs reuse it without measuring. The allocator (transparent huge pages in torch's CPU
allocator, ``THP_MEM_ALLOC_ENABLE=1``) must be set before torch starts, so it is not probed in-process: the
CLI sets it (``hica-bench bench`` measures its effect against naive eager in a separate process).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hica_bench.errors import UserError
from hica_bench.extraction.backends import (BACKENDS, BackendUnavailable, Forward, eager_forward, export_onnx,
                                            onnx_forward, onnxruntime_version, set_channels_last)
from hica_bench.extraction.encode import forward_seconds
from hica_bench.extraction.encode import precision as compute_precision
from hica_bench.files import atomic_write, cannot_write, digest, file_lock
from hica_bench.interfaces import EncoderPair
from hica_bench.results import device_name

TUNING_VERSION = 1
CPU_BATCHES = (8, 16, 32, 64)
CUDA_BATCHES = (32, 64, 128, 256)
#: a candidate must beat the best so far by this factor to displace it (probe noise is a few percent)
MARGIN = 1.03


@dataclass(frozen=True)
class Requested:
    """What the user fixed: ``backend="auto"``, ``batch_size=0``, ``channels_last=None`` and ``threads=0`` mean
    "choose by measurement". The one place these knobs are validated (``run`` and ``bench`` both build one)."""

    backend: str = "auto"
    batch_size: int = 0
    channels_last: bool | None = None
    threads: int = 0
    amp: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("auto", *BACKENDS):
            raise UserError(f"--backend must be one of auto, {', '.join(BACKENDS)}; got {self.backend!r}")
        for option, value in (("--batch-size", self.batch_size), ("--threads", self.threads)):
            if not isinstance(value, int) or value < 0:
                raise UserError(f"{option} must be >= 0 (0 = choose by measurement), got {value}")


@dataclass(frozen=True)
class ExtractionSettings:
    """How features are extracted; recorded in every result (``environment.extraction``) and the run summary."""

    backend: str
    batch_size: int
    channels_last: bool
    threads: int
    precision: str  #: fp32, or bf16 / fp16 (CUDA autocast)
    compile: bool
    allocator: str  #: ``thp`` when torch's CPU allocator uses transparent huge pages, else ``default``
    pin_memory: bool  #: host batches are pinned and copied without blocking (CUDA)

    def describe(self) -> str:
        layout = ", channels-last" if self.channels_last else ""
        compiled = ", torch.compile" if self.compile else ""
        return (f"{self.backend}, batch {self.batch_size}{layout}{compiled}, {self.threads} threads, {self.precision}"
                f"{', THP allocator' if self.allocator == 'thp' else ''}{', pinned memory' if self.pin_memory else ''}")


@dataclass
class Tuning:
    settings: ExtractionSettings
    source: str  #: ``measured`` (probed now), ``remembered`` (an earlier probe) or ``given`` (nothing left to choose)
    probe: list[dict[str, Any]] = field(default_factory=list)  #: each timed candidate with its images/s
    probe_s: float = 0.0
    unavailable: dict[str, str] = field(default_factory=dict)  #: backend -> why it was not a candidate
    path: Path | None = None  #: where the verdict is remembered

    def describe(self) -> str:
        how = {"measured": f"chosen by a {self.probe_s:.0f} s probe", "remembered": "remembered from an earlier probe",
               "given": "as given"}[self.source]
        skipped = "".join(f"; {name} not used: {why}" for name, why in self.unavailable.items())
        return f"{self.settings.describe()} ({how}){skipped}"


def allocator() -> str:
    return "thp" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "default"


def build_forward(pair: EncoderPair, settings: ExtractionSettings, cache_dir: Path) -> Forward:
    """The forward for ``settings`` (puts the image module in the matching memory format; sets torch threads)."""
    import torch

    torch.set_num_threads(settings.threads)
    if settings.backend == "onnxruntime":
        if "image" in pair.modules:
            set_channels_last(pair, False)  # export the weights in their plain layout
        return onnx_forward(pair, pair.device, cache_dir, settings.threads)
    if "image" in pair.modules:
        set_channels_last(pair, settings.channels_last)
    return eager_forward(pair.image, pair.device, settings.precision, settings.channels_last, settings.compile)


def _rate(forward: Forward, batch: Any, device: str, repeats: int = 2) -> float:
    """Images/s of ``forward(batch)``: one untimed pass, then the fastest of ``repeats`` timed ones."""
    return len(batch) / min(forward_seconds(forward, batch, device, iterations=repeats, warmup=1))


def choose(pair: EncoderPair, requested: Requested, cache_dir: Path, log=None) -> Tuning:
    """The extraction settings for ``pair`` on its device (see the module docstring). ``log`` gets one line per
    probe step when given. Raises UserError when a backend the user asked for cannot run this encoder."""
    import torch

    device = pair.device
    cuda = device.startswith("cuda")
    if requested.threads:
        torch.set_num_threads(requested.threads)
    default_threads = torch.get_num_threads()
    base = ExtractionSettings(
        backend="eager", batch_size=requested.batch_size or (128 if cuda else 16),
        channels_last=bool(requested.channels_last), threads=default_threads,
        precision=compute_precision(device, requested.amp), compile=requested.compile,
        allocator=allocator(), pin_memory=cuda)

    unavailable: dict[str, str] = {}
    backends = list(BACKENDS) if requested.backend == "auto" else [requested.backend]
    if "onnxruntime" in backends:
        reason = None
        if cuda:
            reason = "runs on CPU only"
        elif onnxruntime_version() is None:
            reason = "not installed (pip install 'hica-bench[onnx]')"
        elif "image" not in pair.modules:
            reason = "the encoder does not expose its image module"
        elif requested.compile:
            reason = "--compile is an eager option"
        if reason:
            if requested.backend == "onnxruntime":
                raise UserError(f"--backend onnxruntime cannot run encoder {pair.image.identity.split(':')[0]!r}: {reason}")
            backends.remove("onnxruntime")
            unavailable["onnxruntime"] = reason
    layouts = [requested.channels_last] if requested.channels_last is not None else (
        [False, True] if "image" in pair.modules else [False])
    candidates = [replace(base, backend="eager", channels_last=c) for c in layouts if "eager" in backends]
    if "onnxruntime" in backends:
        candidates.append(replace(base, backend="onnxruntime", channels_last=False))
    batches = [requested.batch_size] if requested.batch_size else list(CUDA_BATCHES if cuda else CPU_BATCHES)
    cpus = os.cpu_count() or 1
    threads = [default_threads] if requested.threads or cuda else sorted({default_threads, cpus})

    if len(candidates) == 1 and len(batches) == 1 and len(threads) == 1:
        if candidates[0].backend == "onnxruntime":
            try:  # nothing to measure, but the export must work (it is cached for the run's forward)
                export_onnx(pair, cache_dir)
            except BackendUnavailable as exc:
                raise UserError(f"--backend onnxruntime: {exc}") from None
        return Tuning(replace(candidates[0], batch_size=batches[0]), "given", unavailable=unavailable)

    key = {
        "version": TUNING_VERSION, "encoder": pair.image.identity, "input_spec": repr(pair.image.input_spec),
        "device": device, "device_name": device_name(device), "torch": torch.__version__,
        "onnxruntime": onnxruntime_version(), "cpus": cpus, "allocator": allocator(),
        "requested": asdict(requested), "default_threads": default_threads,
    }
    path = Path(cache_dir) / "tuning" / f"{digest(key, 20)}.json"
    remembered = _remembered(path)
    if remembered is not None:
        return remembered
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(path.parent, exc) from None
    with file_lock(path.with_suffix(".lock")):  # a second run probing the same question waits, then reads the verdict
        remembered = _remembered(path)
        if remembered is not None:
            return remembered
        return _probe(pair, requested, cache_dir, log, device, cuda, candidates, batches, threads, unavailable, key, path)


def _remembered(path: Path) -> Tuning | None:
    """The verdict remembered at ``path``, or None (none yet, or unreadable, e.g. from another version: probe again)."""
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
        settings = ExtractionSettings(**stored["settings"])
        return Tuning(settings, "remembered", stored["probe"], stored["probe_s"], stored.get("unavailable", {}), path)
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return None


def _probe(pair, requested, cache_dir, log, device, cuda, candidates, batches, threads, unavailable, key, path) -> Tuning:
    """Time each candidate (see the module docstring) and remember the fastest."""
    import torch

    start = time.perf_counter()
    probe: list[dict[str, Any]] = []
    size = pair.image.input_spec.size
    forwards: dict[tuple, Forward] = {}

    def measure(settings: ExtractionSettings) -> float:
        torch.set_num_threads(settings.threads)
        layout_key = (settings.backend, settings.channels_last, settings.threads)
        if layout_key not in forwards:
            forwards[layout_key] = build_forward(pair, settings, cache_dir)
        elif settings.backend == "eager" and "image" in pair.modules:
            set_channels_last(pair, settings.channels_last)
        generator = torch.Generator().manual_seed(0)
        batch = (torch.rand(settings.batch_size, 3, size, size, generator=generator) * 2 - 1).to(device)
        rate = _rate(forwards[layout_key], batch, device)
        probe.append({**_knobs(settings), "images_per_s": round(rate, 2)})
        if log:
            log(f"probe {settings.describe()}: {rate:.1f} img/s")
        return rate

    middle = 16 if not cuda else 128
    middle = min(batches, key=lambda b: abs(b - middle))
    best, best_rate = None, 0.0
    for candidate in candidates:
        candidate = replace(candidate, batch_size=middle)
        try:
            rate = measure(candidate)
        except BackendUnavailable as exc:
            if requested.backend == candidate.backend:
                raise UserError(f"--backend {candidate.backend}: {exc}") from None
            unavailable[candidate.backend] = str(exc)
            continue
        if best is None or rate > best_rate * MARGIN:
            best, best_rate = candidate, rate
    assert best is not None  # eager is always a candidate unless the user asked for onnxruntime alone
    for direction in (1, -1):  # walk up, then down, from the middle while it keeps getting faster
        others = [b for b in batches if (b - middle) * direction > 0]
        for batch_size in sorted(others, reverse=direction < 0):
            candidate = replace(best, batch_size=batch_size)
            rate = measure(candidate)
            if rate <= best_rate * MARGIN:
                break
            best, best_rate = candidate, rate
    for count in threads:
        if count != best.threads:
            candidate = replace(best, threads=count)
            rate = measure(candidate)
            if rate > best_rate * MARGIN:
                best, best_rate = candidate, rate
    torch.set_num_threads(best.threads)
    if best.backend == "eager" and "image" in pair.modules:
        set_channels_last(pair, best.channels_last)
    choice = Tuning(best, "measured", probe, time.perf_counter() - start, unavailable, path)
    _remember(path, key, choice)
    return choice


def _knobs(settings: ExtractionSettings) -> dict[str, Any]:
    return {k: v for k, v in asdict(settings).items() if k in ("backend", "batch_size", "channels_last", "threads")}


def _remember(path: Path, key: dict[str, Any], choice: Tuning) -> None:
    atomic_write(path, json.dumps({
        "key": key, "settings": asdict(choice.settings), "probe": choice.probe, "probe_s": choice.probe_s,
        "unavailable": choice.unavailable, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, indent=1))

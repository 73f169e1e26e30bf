"""``hica-bench bench`` (report version 5): encoder throughput of four variants, measured in one run.

Variants, each as images/s with its ratio to naive eager:

- **naive**: naive eager, what a user writes without tuning: ``encoder.encode`` exactly as the encoder plugin
  builds it, fp32, on an NCHW-contiguous batch that is already preprocessed on the device (no data loading),
  under ``torch.inference_mode``, with torch's default thread count and its default CPU allocator
  (``THP_MEM_ALLOC_ENABLE`` unset), batch ``--naive-batch-size`` (default 64, CLIP_benchmark's default).
- **eager-tuned**: the eager backend with the settings :func:`hica_bench.extraction.tuning.choose` picks for it (batch
  size, memory layout, threads; THP allocator), the raw forward on a preprocessed batch.
- **onnxruntime**: the same for the ONNX Runtime backend; where it cannot run (not installed, not on CPU, the
  encoder is not exportable) the report gives the one-line reason instead of numbers.
- **harness**: what ``hica-bench run`` does: the settings ``choose`` picks for the user's options (backend auto
  by default), then :meth:`hica_bench.extraction.FeatureExtractor.features` over the images with a fresh, throw-away
  feature cache each repeat: memory-mapped read, preprocessing, forward, copy to host, cache write. Its report also
  has the seconds per stage and its overhead ratio: harness images/s ÷ raw forward images/s of the same
  forward, measured in the same worker right before and right after each extraction (the mean of the two).

Every variant runs in a long-lived worker process of its own (``python -m hica_bench.bench --worker``, JSON
lines on stdin/stdout), so the allocator can differ (naive: without THP; the others with
``THP_MEM_ALLOC_ENABLE=1``) and one variant's memory does not disturb another's. Workers build the encoder and
dataset through the plugin registry exactly as the CLI does (all workers at once); the set-up that follows
(tuning probe, ONNX export, warm-up) is untimed and runs one worker at a time, so a probe or export happens
once, undisturbed, and is remembered under the cache folder for the others and later runs. Then the
workers measure *in turns*: each repeat, each variant once, one at a time, so load from other processes hits
all alike; ratios to naive are taken per repeat (pairwise) and the report has their medians with min and max.
A worker resumes cold after the others measured, so every variant's timed passes follow ``--warmup`` untimed passes
of its own forward; the harness times its raw forward (after the warm-up), then its extraction, then its raw forward
again (after the warm-up), and its overhead line divides by the mean of the two (version 2 warmed up once at set-up,
so the extraction ran cold and the raw forward after it warm). Its extraction so starts warmer than the other
variants' timed passes: a raw forward ran a median 2.7 % faster after an extraction than before it (5 repeats of one
bench run; 3.5 % over 14 in one process), which bounds what this adds to the harness's ratio to naive. Where the
harness's engine prepares the images itself (ONNX Runtime's ``for_images``: another session of the graph than the
raw forward's), that session gets its ``--warmup`` untimed passes too, right before the extraction: the raw
forward's session's threads spin on after its last pass and took the cores from the other session's first pass
(63 against 33 ms a pass on 2 cores, in one process; after a 100 ms pause, 39 ms), which a run pays once, when it
moves from the probe to its extraction, and the bench paid every repeat (version 4).
All variants see the same ``--images`` N images of the split; the raw variants time ceil(N / batch) forward
passes of a batch made of those images.

Each repeat also times a **matmul ceiling** (``torch.mm`` of square matrices, best of a few, in the harness's
worker: THP allocator, its thread count, its precision on CUDA) as GFLOP/s. **FLOPs per image** are counted
with ``torch.utils.flop_counter.FlopCounterMode`` over one ``encoder.encode`` of a single preprocessed image
(convolutions and matrix products, multiply-add = 2 FLOPs); each variant's achieved GFLOP/s is its images/s ×
GFLOP/image, shown as a fraction of the ceiling. The **feature check** compares every variant's features of
the first images (the harness: its extraction's output) with naive eager's: max |difference| must be at most the
variant's precision's :func:`feature_tolerance` × max |eager feature| (fp32: the ONNX export's 1e-4; AMP on CUDA:
that precision's rounding admitted, :data:`FEATURE_TOLERANCE`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hica_bench.errors import UserError

#: 3: a warm-up before each timed pass series; the overhead line's raw forward before and after; 4: the harness's own
#: engine warmed up too where it prepares the images itself (another session than the raw forward's); 5: the feature
#: check's tolerance follows each variant's precision (:data:`FEATURE_TOLERANCE`), the harness's extraction path is
#: warmed up at set-up, and the peak GPU memory is the measured passes' alone (not the matmul ceiling's matrices)
BENCH_VERSION = 5
VARIANTS = ("naive", "eager-tuned", "onnxruntime", "harness")
THP_ENV = "THP_MEM_ALLOC_ENABLE"
#: images whose features every variant compares with naive eager's
CHECK_IMAGES = 16
#: side of the square matrices of the matmul ceiling, and the timed products (the best counts)
CEILING_SIZE = {"cpu": 2048, "cuda": 8192}
CEILING_PASSES = 3
#: the feature check's allowed max |variant - naive fp32| as a fraction of max |naive feature|, by the variant's compute
#: precision: fp32 is the ONNX export's tolerance (:data:`hica_bench.extraction.backends.ONNX_TOLERANCE`); under AMP the
#: features carry the precision's rounding, which no tolerance of 1e-4 admits. Measured with EfficientNet-Lite0 on 64
#: BreastMNIST and 64 PneumoniaMNIST images, CPU autocast against fp32: fp16 0.012-0.015, bf16 0.195-0.206 (per-image
#: cosine >= 0.96); the limits below are 2.5x those. Under AMP the check catches gross faults (other weights, images
#: prepared differently: ~1), not bits; the fp32 variants' check is the precise one.
FEATURE_TOLERANCE = {"fp16": 0.04, "bf16": 0.5}
NAIVE_DEFINITION = (
    "naive eager: encoder.encode exactly as the encoder plugin builds it, fp32, NCHW-contiguous input already "
    "preprocessed on the device (no data loading), under torch.inference_mode, torch's default thread count and "
    "default CPU allocator (THP_MEM_ALLOC_ENABLE unset), batch --naive-batch-size")


class WorkerFailed(Exception):
    """A bench worker crashed or died; the message names the variant and says why in one line."""


# --------------------------------------------------------------------------- parent side


@dataclass(frozen=True)
class Job:
    """What each worker needs to build the encoder and the images exactly as the CLI does."""

    plugins: list[str]  #: ``-p`` modules of the parent (the allow-list travels in the environment)
    encoder: str  #: the ``--encoder`` text, NAME or NAME:opt=value
    dataset: str
    split: str
    size: int
    images: int
    device: str
    data_root: str | None
    cache_dir: str
    requested: dict[str, Any]  #: the user's fixed extraction knobs (``tuning.Requested`` as a dict)
    naive_batch_size: int
    warmup: int
    scratch: str  #: this run's temporary folder (throw-away caches, feature files)
    sys_path: list[str]  #: the parent's import path, so ``-p`` modules import in the workers too


class _Worker:
    """One variant's worker process, spoken to with one JSON line per command and per answer."""

    def __init__(self, variant: str, job: Job, log: Callable[[str], None]) -> None:
        self.variant, self.log = variant, log
        env = dict(os.environ)
        if variant == "naive":
            env.pop(THP_ENV, None)
        else:
            env[THP_ENV] = "1"
        self.stderr_path = Path(job.scratch) / f"{variant}.stderr"
        with self.stderr_path.open("w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "hica_bench.bench", "--worker", variant], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died() from None

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        self.send(message)
        return self.answer()

    def answer(self) -> dict[str, Any]:
        """The next answer (log lines on the way go to the log)."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise self._died()
            answer = json.loads(line)
            if "log" in answer:
                self.log(f"{self.variant}: {answer['log']}")
            elif "user_error" in answer:
                raise UserError(answer["user_error"])
            elif "error" in answer:
                raise WorkerFailed(f"bench worker {self.variant!r} failed: {answer['error']}")
            else:
                return answer

    def _died(self) -> WorkerFailed:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        lines = [line.strip() for line in self.stderr_path.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else "nothing on stderr"
        return WorkerFailed(f"bench worker {self.variant!r} died (exit code {code}): {last}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "per_repeat": [float(v) for v in values]}


def check_counts(images: int, repeats: int, naive_batch_size: int, warmup: int) -> None:
    if min(images, repeats, naive_batch_size) < 1 or warmup < 0:
        raise UserError("--images, --repeats and --naive-batch-size must be >= 1 and --warmup >= 0")


def bench(
    plugins: list[str],
    encoder: str,
    encoder_label: str,
    dataset: str,
    dataset_label: str,
    split: str,
    size: int,
    images: int,
    device: str,
    data_root: str | None,
    cache_dir: Path,
    requested: Any,
    naive_batch_size: int = 64,
    warmup: int = 1,
    repeats: int = 5,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Set up one worker per variant, measure them in turns ``repeats`` times; return the JSON-ready report
    (see the module docstring). ``requested`` is the user's :class:`hica_bench.extraction.tuning.Requested`."""
    from hica_bench.environment import environment

    check_counts(images, repeats, naive_batch_size, warmup)
    log = log or (lambda line: None)
    started = time.perf_counter()
    workers: dict[str, _Worker] = {}
    with tempfile.TemporaryDirectory(prefix="hica-bench-bench-", dir=cache_dir) as scratch:
        job = Job(list(plugins), encoder, dataset, split, size, images, device, data_root, str(cache_dir),
                  asdict(requested), naive_batch_size, warmup, scratch, [p for p in sys.path if p])
        try:
            ready: dict[str, dict[str, Any]] = {}
            log(f"starting {len(VARIANTS)} worker processes ({', '.join(VARIANTS)}); each builds the encoder and dataset")
            # the first alone (an encoder or dataset that cannot be built is found by one process, not four), then the
            # others at the same time
            for group in (VARIANTS[:1], VARIANTS[1:]):
                for variant in group:
                    workers[variant] = _Worker(variant, job, log)
                    workers[variant].send(asdict(job))
                for variant in group:
                    workers[variant].answer()
            for variant in VARIANTS:  # one after another: a probe or export happens once, then is remembered
                log(f"setting up {variant}")
                setup_start = time.perf_counter()
                ready[variant] = workers[variant].ask({"cmd": "setup"})
                ready[variant]["setup_s"] = time.perf_counter() - setup_start
                if not ready[variant]["available"]:
                    log(f"{variant}: not available: {ready[variant]['reason']}")
                    workers.pop(variant).close()
            measured = [v for v in VARIANTS if v in workers]
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in measured}
            ceiling: list[dict[str, Any]] = []
            for repeat in range(repeats):
                for variant in measured:  # in turns: one measures while the others wait
                    runs[variant].append(workers[variant].ask({"cmd": "measure", "repeat": repeat}))
                ceiling.append(workers["harness"].ask({"cmd": "ceiling"}))
                log(f"repeat {repeat + 1}/{repeats}: " + ", ".join(
                    f"{v} {runs[v][-1]['images_per_s']:.1f}" for v in measured) + f" img/s; matmul "
                    f"{ceiling[-1]['gflops_per_s']:.0f} GFLOP/s")
            peaks = {v: workers[v].ask({"cmd": "peak"}) for v in measured}
        except WorkerFailed as exc:  # its traceback is in the scratch folder, which goes: keep the workers' stderr
            kept = _keep_logs(Path(scratch), cache_dir)
            raise WorkerFailed(f"{exc} (the workers' stderr: {kept})" if kept else str(exc)) from None
        finally:
            for worker in workers.values():
                worker.close()
        features = {v: np.load(Path(scratch) / f"{v}-features.npy") for v in measured}

    gflop = ready["naive"]["gflop_per_image"]
    ceiling_gflops = _spread([c["gflops_per_s"] for c in ceiling])
    naive_ips = [r["images_per_s"] for r in runs["naive"]]
    eager = features["naive"]
    max_eager = float(np.abs(eager).max())
    variants: dict[str, Any] = {}
    for variant in VARIANTS:
        info = ready[variant]
        entry: dict[str, Any] = {"available": info["available"]}
        if not info["available"]:
            variants[variant] = {**entry, "reason": info["reason"]}
            continue
        ips = [r["images_per_s"] for r in runs[variant]]
        ratios = [v / n for v, n in zip(ips, naive_ips)]
        achieved = float(np.median(ips)) * gflop
        diff = float(np.abs(features[variant] - eager).max())
        tolerance = feature_tolerance(info["settings"]["precision"])
        entry.update({
            "settings": info["settings"],
            "describe": info["describe"],
            "tuning": info.get("tuning"),
            "worker": info["worker"],
            "images_timed": runs[variant][0]["images"],
            "images_per_s": _spread(ips),
            "ratio_to_naive": _spread(ratios),
            "gflops_per_s": achieved,
            "fraction_of_ceiling": achieved / ceiling_gflops["median"] if ceiling_gflops["median"] > 0 else None,
            "peak_rss_mb": peaks[variant]["peak_rss_mb"],
            "peak_rss_scope": peaks[variant]["peak_rss_scope"],  #: measurement: since its set-up ended
            "peak_gpu_mb": peaks[variant]["peak_gpu_mb"],  #: CUDA only
            "setup_s": info["setup_s"],
            "features_max_abs_diff": diff,
            "features_tolerance": tolerance,
            "features_within_tolerance": diff <= tolerance * max_eager,
        })
        if info.get("export"):
            entry["onnx_export"] = info["export"]
        if info["settings"]["compile"]:  # graphs compiled inside its timed passes (a recompile there is timed)
            entry["compiles_while_timed"] = sum(r["compiles"] for r in runs[variant])
        if variant == "harness":
            raw = [r["raw_images_per_s"] for r in runs[variant]]
            overhead = [h / r for h, r in zip(ips, raw)]
            # the forward calls alone, inside the extraction, against the raw forward: what preprocessing running beside
            # them costs (the rest of the overhead is time outside the forward: first batch, cache write)
            inside = [r["images"] / r["stages"]["forward"] / raw_rate for r, raw_rate in zip(runs[variant], raw)]
            stages = {name: float(np.median([r["stages"][name] for r in runs[variant]]))
                      for name in ("total", "preprocess", "forward", "cache_write")}
            # preprocessing runs in a background thread, overlapped with the forward (encode.encode_images), so
            # it is timed on its own after the extraction and is not subtracted from the total; where the engine
            # prepares the images itself, the forward calls include that, and the loop only copies the images
            stages["other"] = stages["total"] - stages["forward"] - stages["cache_write"]
            entry["prepares_images"] = all(r.get("prepares_images", False) for r in runs[variant])
            entry.update({
                "raw_images_per_s": _spread(raw),  #: its own forward on a preprocessed batch, same worker, before and after
                "overhead_ratio": _spread(overhead),  #: harness ÷ raw, per repeat
                "forward_ratio": _spread(inside),  #: the harness's forward calls' images/s ÷ raw, per repeat
                "recorded_images_per_s": float(np.median([r["recorded_images_per_s"] for r in runs[variant]])),
                "stage_seconds": stages,
            })
        variants[variant] = entry
    harness = variants["harness"]
    return {
        "bench_version": BENCH_VERSION,
        "encoder": encoder_label,
        "encoder_identity": ready["naive"]["encoder_identity"],
        "dataset": dataset_label,
        "split": split,
        "size": size,
        "input_size": ready["naive"]["input_size"],
        "images": images,
        "device": device,
        "repeats": repeats,
        "warmup": warmup,
        "naive_batch_size": naive_batch_size,
        "naive_definition": NAIVE_DEFINITION,
        "requested": asdict(requested),
        "variants": variants,
        "ceiling": {"gflops_per_s": ceiling_gflops, "matrix_size": ceiling[0]["size"], "dtype": ceiling[0]["dtype"],
                    "threads": ceiling[0]["threads"], "allocator": ceiling[0]["allocator"],
                    "what": "torch.mm of two square matrices, best of a few products, in the harness's worker"},
        "flops_per_image": {"gflop": gflop, "counted_with": "torch.utils.flop_counter.FlopCounterMode, one encoder.encode "
                                                            "of a single preprocessed image (conv and matmul ops)"},
        "feature_check": {
            "images": int(len(eager)), "reference": "naive eager (fp32)", "tolerance": harness["features_tolerance"],
            "precision": harness["settings"]["precision"],
            "max_abs_eager": max_eager, "allowed_abs_diff": harness["features_tolerance"] * max_eager,
            "harness_backend": harness["settings"]["backend"],
            "harness_max_abs_diff": harness["features_max_abs_diff"],
            "harness_within_tolerance": harness["features_within_tolerance"],
        },
        "wall_s": time.perf_counter() - started,
        "environment": asdict(environment(device)),
    }


def feature_tolerance(precision: str) -> float:
    """The feature check's tolerance for a variant computing in ``precision`` (:data:`FEATURE_TOLERANCE`)."""
    from hica_bench.extraction.backends import ONNX_TOLERANCE

    return FEATURE_TOLERANCE.get(precision, ONNX_TOLERANCE)


def _keep_logs(scratch: Path, cache_dir: Path) -> Path | None:
    """Every worker's stderr (the last :data:`MAX_LOG_BYTES` of each), copied out of the run's scratch folder into
    ``<cache>/bench-logs/`` (replacing the last failed run's); returns that folder, or None where it cannot be written
    (the failure is then reported without it)."""
    kept = cache_dir / "bench-logs"
    try:
        kept.mkdir(parents=True, exist_ok=True)
        for old in kept.glob("*.stderr"):
            old.unlink(missing_ok=True)
        for log in scratch.glob("*.stderr"):
            with log.open("rb") as source:
                source.seek(max(0, log.stat().st_size - MAX_LOG_BYTES))
                (kept / log.name).write_bytes(source.read(MAX_LOG_BYTES))
    except OSError:
        return None
    return kept


MAX_LOG_BYTES = 1 << 20  #: the most of a worker's stderr kept (its end, where the traceback is)


def print_report(report: dict[str, Any], console: Any) -> None:
    """The report as a rich table and a few lines (what ``hica-bench bench`` prints on stdout)."""
    from rich.markup import escape
    from rich.table import Table

    variants = report["variants"]
    ceiling = report["ceiling"]["gflops_per_s"]["median"]
    table = Table(title=escape(f"{report['encoder']} on {report['dataset']} {report['split']} ({report['size']} → "
                               f"{report['input_size']} px), {report['images']} images, {report['device']}, "
                               f"median of {report['repeats']} repeats in turns"))
    for column, justify in (("variant", "left"), ("settings", "left"), ("img/s (min – max)", "right"),
                            ("× naive", "right"), ("GFLOP/s", "right"), ("% of matmul ceiling", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for name, entry in variants.items():
        if not entry["available"]:
            table.add_row(name, escape(f"not available: {entry['reason']}"), "—", "—", "—", "—")
            continue
        ips, ratio = entry["images_per_s"], entry["ratio_to_naive"]
        fraction = entry["fraction_of_ceiling"]
        table.add_row(name, escape(entry["describe"]), f"{ips['median']:.1f} ({ips['min']:.1f} – {ips['max']:.1f})",
                      f"{ratio['median']:.2f} ({ratio['min']:.2f} – {ratio['max']:.2f})", f"{entry['gflops_per_s']:.1f}",
                      "—" if fraction is None else f"{100 * fraction:.1f} %")
    console.print(table)
    c = report["ceiling"]
    console.print(f"matmul ceiling: {ceiling:.1f} GFLOP/s (median; {c['gflops_per_s']['min']:.1f} – "
                  f"{c['gflops_per_s']['max']:.1f}), torch.mm {c['matrix_size']}² {c['dtype']}, {c['threads']} threads; "
                  f"encoder {report['flops_per_image']['gflop']:.3f} GFLOP/image", markup=False, highlight=False)
    check = report["feature_check"]
    diffs = ", ".join(f"{name} {entry['features_max_abs_diff']:.1e}" for name, entry in variants.items()
                      if entry["available"] and name != "naive")
    console.print(f"features vs naive eager on the first {check['images']} images: max |diff| {diffs}; allowed "
                  f"{check['allowed_abs_diff']:.1e} ({check['tolerance']:g} × max |feature| {check['max_abs_eager']:.3g}"
                  + ("" if check["precision"] == "fp32" else f", the harness computing in {check['precision']}") + "); "
                  f"harness ({check['harness_backend']}) "
                  f"{'within' if check['harness_within_tolerance'] else 'NOT within'} tolerance", markup=False, highlight=False)
    for name, entry in variants.items():
        if entry.get("compiles_while_timed"):
            console.print(f"torch.compile compiled {entry['compiles_while_timed']} graph(s) inside {name}'s timed passes: "
                          f"their compile time is in its figures", markup=False, highlight=False)
    export = variants["onnxruntime"].get("onnx_export")
    if export:
        console.print(f"ONNX export check ({export.get('identity', '')}): max |ort - eager| {export['max_abs_diff']:.1e} "
                      f"≤ {export['tolerance']:g} × {export['max_abs_eager']:.3g}", markup=False, highlight=False)
    harness = variants["harness"]
    overhead, stages = harness["overhead_ratio"], harness["stage_seconds"]
    console.print(f"harness overhead: harness / raw forward of the same settings {overhead['median']:.3f} "
                  f"({overhead['min']:.3f} – {overhead['max']:.3f}); seconds per repeat (median): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in stages.items() if k != "preprocess")
                  + (f"; ONNX Runtime prepared the images itself (copying them: {stages['preprocess']:.4f} s alone), "
                     f"and the harness's forward calls, preparation included, ran at "
                     if harness.get("prepares_images") else
                     f"; preprocessing {stages['preprocess']:.2f} s alone, overlapped with the forward in the harness, "
                     f"whose forward calls ran at ")
                  + f"{harness['forward_ratio']['median']:.3f} of the raw forward's rate",
                  markup=False, highlight=False)
    console.print("peak RSS per worker: " + ", ".join(f"{name} {entry['peak_rss_mb']:.0f} MiB" for name, entry in variants.items()
                                                      if entry["available"]), markup=False, highlight=False)
    console.print(f"wall time: {report['wall_s']:.1f} s", highlight=False)


# --------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _Subset:
    """The first ``n`` images of one split of ``dataset``, as a dataset of its own (for the extraction service)."""

    dataset: Any
    split_name: str
    n: int

    @property
    def name(self) -> str:
        return self.dataset.name

    @property
    def identity(self) -> str:
        return f"{self.dataset.identity}|{self.split_name}[:{self.n}]"

    def split(self, name: str):
        from hica_bench.interfaces import Split

        full = self.dataset.split(self.split_name)
        return Split(full.images[: self.n], full.labels[: self.n])


def _reset_peak_rss() -> str:
    """Start the peak-RSS count afresh (Linux: ``/proc/self/clear_refs``); returns what the peak will cover."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return "measurement"
    except OSError:
        return "process"


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class _Variant:
    """One variant inside its worker: built (in parallel with the other workers), set up (one worker at a time:
    tuning, forward, warm-up), then measured on command."""

    def __init__(self, variant: str, job: dict[str, Any]) -> None:
        from hica_bench.registry import load_registry

        for path in job["sys_path"]:
            if path not in sys.path:
                sys.path.append(path)
        self.variant, self.job = variant, job
        self.device = device = job["device"]
        self.cuda = device.startswith("cuda")
        self.cache_dir = Path(job["cache_dir"])
        registry = load_registry(job["plugins"])
        pair = registry.choose("encoder", job["encoder"]).build(device=device)
        dataset = registry.choose("dataset", job["dataset"]).build(root=job["data_root"], size=job["size"], download=False,
                                                                   cache_dir=self.cache_dir)
        self.subset = _Subset(dataset, job["split"], job["images"])
        self.images = self.subset.split(job["split"]).images
        self.pair, self.encoder = pair, pair.image

    def setup(self, log: Callable[[str], None]) -> dict[str, Any]:
        """Choose the settings and build the forward (untimed), save the check features, warm up; the ``ready``
        answer: settings, worker facts, and what the parent needs from this variant."""
        import torch

        from hica_bench.data import preprocess
        from hica_bench.extraction import FeatureExtractor
        from hica_bench.extraction.backends import BackendUnavailable, export_onnx
        from hica_bench.extraction.tuning import ExtractionSettings, Requested, allocator

        variant, job, device, pair = self.variant, self.job, self.device, self.pair
        requested = Requested(**job["requested"])
        self.ready: dict[str, Any] = {"available": True, "encoder_identity": self.encoder.identity,
                                      "input_size": self.encoder.input_spec.size}
        check_images = self.images[:CHECK_IMAGES]
        if variant == "naive":
            self.settings = ExtractionSettings("eager", job["naive_batch_size"], False, torch.get_num_threads(), "fp32",
                                               False, allocator(), False)
            encode = self.encoder.encode
            self.forward = lambda batch: encode(batch)
            self.extractor = FeatureExtractor(pair, settings=self.settings, forward=self.forward, reference=False)
            self.ready["gflop_per_image"] = self._gflop_per_image(preprocess(self.images[:1], self.encoder.input_spec, device))
        else:
            if variant == "eager-tuned":
                requested = replace(requested, backend="eager")
            elif variant == "onnxruntime":
                requested = replace(requested, backend="onnxruntime")
            try:
                self.extractor = FeatureExtractor(pair, self.cache_dir, requested, reference=False, log=log)
                tuned = self.extractor.tuning
                self.settings = tuned.settings
                self.forward = self.extractor.forward()
            except (UserError, BackendUnavailable) as exc:
                if variant != "onnxruntime":
                    raise UserError(f"{variant}: {exc}") from None
                self.ready.update(available=False, reason=" ".join(str(exc).split()))
                return self.ready
            self.ready["tuning"] = {"source": tuned.source, "probe_s": tuned.probe_s, "unavailable": tuned.unavailable,
                                    "path": str(tuned.path) if tuned.path else None}
            if self.settings.backend == "onnxruntime":
                self.ready["export"] = export_onnx(pair, self.cache_dir, self.settings.onnx_exporter)[1]
        self.ready.update(settings=asdict(self.settings), describe=self.settings.describe())
        self.ready["worker"] = {"pid": os.getpid(), THP_ENV: os.environ.get(THP_ENV), "allocator": allocator(),
                                "torch_threads": torch.get_num_threads()}
        # the raw batch: the bench's images, cycled to a full batch, preprocessed on the device (NCHW contiguous); an
        # inference tensor, as the extraction's batches are (a compiled forward is specialised on that too: a normal
        # tensor here would leave the extraction's first call a recompile, timed in its first repeat)
        batch_size = self.settings.batch_size
        with torch.inference_mode():
            self.batch = preprocess(np.take(self.images, np.arange(batch_size) % len(self.images), axis=0),
                                    self.encoder.input_spec, device)
        self.passes = math.ceil(len(self.images) / batch_size)
        if variant != "harness":  # the harness's features come from its first extraction
            self._save_features(self.extractor.encode(check_images))
        else:  # its extraction's path warmed up (untimed) on the batches it times, the last short one too: a compiled
            self.extractor.encode(self.images)  # forward is specialised on each batch's shape (a first-repeat recompile)
        # a compiled forward's first pass on the raw batch compiles (its shape or tensor kind may be new): never timed
        self._raw(max(self.job["warmup"], 1 if self.settings.compile else 0))
        self.peak_scope = _reset_peak_rss()
        self.peak_gpu_mb: float | None = 0.0 if self.cuda else None
        return self.ready

    def _save_features(self, features: np.ndarray) -> None:
        np.save(Path(self.job["scratch"]) / f"{self.variant}-features.npy", features[:CHECK_IMAGES])

    def _gflop_per_image(self, image: Any) -> float:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            self.encoder.encode(image)
        return counter.get_total_flops() / 1e9

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def _raw(self, passes: int) -> float:
        """Seconds of ``passes`` timed forward passes of the preprocessed batch (each synchronised on CUDA)."""
        from hica_bench.extraction.encode import forward_seconds

        return sum(forward_seconds(self.forward, self.batch, self.device, iterations=passes))

    def _warm_raw(self) -> float:
        """Seconds of the timed passes of a repeat, after ``--warmup`` untimed ones."""
        self._raw(self.job["warmup"])
        return self._raw(self.passes)

    def measure(self, repeat: int) -> dict[str, Any]:
        graphs = _compiled_graphs() if self.settings.compile else None
        if self.cuda:  # the peak of the measured passes alone (the ceiling's matrices come and go between them)
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        if self.variant != "harness":
            seconds = self._warm_raw()
            images = self.passes * len(self.batch)
            measured = {"images": images, "seconds": seconds, "images_per_s": images / seconds}
        else:
            measured = self._harness(repeat)
        if self.cuda:
            self.peak_gpu_mb = max(self.peak_gpu_mb, torch.cuda.max_memory_allocated(self.device) / 2**20)
        if graphs is not None:  # graphs compiled inside the timed passes: 0 where the set-up warmed every shape up
            measured["compiles"] = _compiled_graphs() - graphs
        return measured

    def _harness(self, repeat: int) -> dict[str, Any]:
        """One extraction of the images into a fresh feature cache through the service, as ``run`` does, with its
        stages, bracketed by the raw forward alone: before it and after it, each after the warm-up passes (their mean
        is the overhead line's raw rate, so a drift of the machine's speed during the repeat falls on both sides
        alike, and the extraction does not start cold while its yardstick runs warm)."""
        import torch

        from hica_bench.data import preprocess
        from hica_bench.extraction import FeatureExtractor
        from hica_bench.extraction.cache import FeatureCache

        forward_s = 0.0

        def timing(forward):
            def timed(batch):
                nonlocal forward_s
                start = time.perf_counter()
                out = forward(batch)
                self._sync()
                forward_s += time.perf_counter() - start
                return out
            return timed

        timed = timing(self.forward)
        preparing = getattr(self.forward, "for_images", None)
        prepares = preparing(self.images) if preparing is not None else None
        if prepares is not None:  # the loop runs the engine that prepares the images itself: timed as well
            def for_images(images):
                chosen = preparing(images)
                return None if chosen is None else timing(chosen)

            timed.for_images = for_images

        s = self.settings
        n = len(self.images)
        with tempfile.TemporaryDirectory(prefix=f"harness-{repeat}-", dir=self.job["scratch"]) as tmp:
            extractor = FeatureExtractor(self.pair, Path(tmp), settings=s, forward=timed, reference=False)
            raw_s = self._warm_raw()
            if prepares is not None:  # its own engine's warm-up, as the raw forward's (module docstring)
                for _ in range(self.job["warmup"]):
                    prepares(np.array(self.images[: s.batch_size]))
            self._sync()
            start = time.perf_counter()
            features, extraction = extractor.features(self.subset, self.job["split"])
            self._sync()
            total = time.perf_counter() - start
            if repeat == 0:
                self._save_features(features)
            start = time.perf_counter()
            kept: dict[str, Any] = {}  # into kept buffers, as the loop preprocesses
            with torch.inference_mode():
                for begin in range(0, n, s.batch_size):
                    if prepares is not None:  # what the loop does then: copy the images
                        np.array(self.images[begin : begin + s.batch_size])
                    else:
                        preprocess(self.images[begin : begin + s.batch_size], self.encoder.input_spec, self.device,
                                   kept)
            self._sync()
            preprocess_s = time.perf_counter() - start
            start = time.perf_counter()
            FeatureCache(Path(tmp)).put("stage-timing", features, {"bench": "cache-write"})
            cache_write_s = time.perf_counter() - start
        raw_s = (raw_s + self._warm_raw()) / 2
        return {"images": n, "seconds": total, "images_per_s": n / total, "prepares_images": prepares is not None,
                "recorded_images_per_s": n / extraction.seconds,  # as results record it: without the cache write
                "raw_images_per_s": self.passes * len(self.batch) / raw_s,
                "stages": {"total": total, "preprocess": preprocess_s, "forward": forward_s, "cache_write": cache_write_s}}

    def peak(self) -> dict[str, Any]:
        """Peak memory since the set-up ended: process RSS (and on CUDA the device memory torch allocated during the
        measured passes)."""
        return {"peak_rss_mb": _peak_rss_mb(), "peak_rss_scope": self.peak_scope, "peak_gpu_mb": self.peak_gpu_mb}

    def ceiling(self) -> dict[str, Any]:
        """GFLOP/s of the best of a few ``torch.mm`` of square matrices (this worker's threads and allocator)."""
        import torch

        from hica_bench.extraction.tuning import allocator

        n = CEILING_SIZE["cuda" if self.cuda else "cpu"]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.settings.precision, torch.float32) if self.cuda \
            else torch.float32
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=generator).to(self.device, dtype)
        b = torch.randn(n, n, generator=generator).to(self.device, dtype)
        out = torch.empty(n, n, device=self.device, dtype=dtype)
        best = float("inf")
        with torch.inference_mode():
            for step in range(CEILING_PASSES + 1):
                self._sync()
                start = time.perf_counter()
                torch.mm(a, b, out=out)
                self._sync()
                if step:  # the first product is a warm-up
                    best = min(best, time.perf_counter() - start)
        return {"gflops_per_s": 2 * n**3 / best / 1e9, "size": n, "dtype": str(dtype).replace("torch.", ""),
                "threads": torch.get_num_threads(), "allocator": allocator()}


def _compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process (Dynamo's own counter; torch has no public one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _worker(variant: str) -> int:
    """A worker's main loop: the job on the first stdin line, then one command per line until ``exit``."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints of libraries must not break the protocol

    def send(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    def fail(exc: BaseException) -> None:
        traceback.print_exc()
        sys.stderr.flush()
        send({"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"})

    line = sys.stdin.readline()
    if not line:
        return 0
    try:
        state = _Variant(variant, json.loads(line))
    except UserError as exc:
        send({"user_error": " ".join(str(exc).split())})
        return 2
    except Exception as exc:  # reported to the parent in one line; the traceback goes to stderr
        fail(exc)
        return 1
    send({"built": os.getpid()})
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "exit":
                break
            if command["cmd"] == "setup":
                send(state.setup(lambda text: send({"log": text})))
            elif command["cmd"] == "measure":
                send(state.measure(command["repeat"]))
            elif command["cmd"] == "ceiling":
                send(state.ceiling())
            elif command["cmd"] == "peak":
                send(state.peak())
            else:
                raise ValueError(f"unknown command {command['cmd']!r}")
        except UserError as exc:
            send({"user_error": " ".join(str(exc).split())})
            return 2
        except Exception as exc:
            fail(exc)
            return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker" and sys.argv[2] in VARIANTS:
        sys.exit(_worker(sys.argv[2]))
    sys.exit("usage: python -m hica_bench.bench --worker {" + ",".join(VARIANTS) + "} (started by `hica-bench bench`)")

"""``hica-bench bench``: encoder throughput of the raw forward loop versus the harness's feature-extraction path.

Both paths see the same images of one dataset split, the same batch size and the same precision:

- **raw** (timm's benchmark loop): ``encoder.encode`` on one batch that is already preprocessed on the device,
  ``warmup`` untimed passes first; then timed passes, synchronised on CUDA.
- **harness**: :func:`hica_bench.features.split_features` on ``batches × batch_size`` images, exactly as a run
  calls it: memory-mapped reads, preprocessing, forward, copy to host, feature-cache write (a fresh cache each
  repeat, so every repeat is a miss).

The two interleave batch by batch: after each harness batch (through ``split_features``' per-batch hook) comes
one timed raw pass, whose time is taken out of the harness's. So load from other processes hits both alike,
which matters on a shared machine. Each repeat gives one images/s per path and their ratio; the report has
medians over repeats with min and max as the spread, ``ratio`` = the median of the per-repeat ratios
harness / raw, and a per-stage breakdown of the harness (preprocessing, forward, cache write, other).
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hica_bench.cache import FeatureCache
from hica_bench.data import preprocess
from hica_bench.errors import UserError
from hica_bench.features import ReferenceProbe, forward_seconds, precision, split_features
from hica_bench.interfaces import EncoderPair, FewShotDataset, Split
from hica_bench.results import environment

BENCH_VERSION = 1


@dataclass(frozen=True)
class _Subset:
    """The first ``n`` images of one split of ``dataset``, as a dataset of its own (for ``split_features``)."""

    dataset: FewShotDataset
    split_name: str
    n: int

    @property
    def name(self) -> str:
        return self.dataset.name

    @property
    def identity(self) -> str:
        return f"{self.dataset.identity}|{self.split_name}[:{self.n}]"

    def split(self, name: str) -> Split:
        full = self.dataset.split(self.split_name)
        return Split(full.images[: self.n], full.labels[: self.n])


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "per_repeat": [float(v) for v in values]}


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def bench(
    encoders: EncoderPair,
    encoder_label: str,
    dataset: FewShotDataset,
    split: str,
    device: str,
    batch_size: int,
    amp: bool = True,
    channels_last: bool = False,
    warmup: int = 2,
    batches: int = 10,
    repeats: int = 5,
    scratch_dir: Path | None = None,
) -> dict[str, Any]:
    """Measure both paths and return the JSON-ready report (see the module docstring).

    ``scratch_dir`` holds the throw-away feature caches of the harness repeats (default: the system temp folder).
    """
    import torch

    if min(batch_size, batches, repeats) < 1 or warmup < 0:
        raise UserError("--batch-size, --batches and --repeats must be >= 1 and --warmup >= 0")
    n = batches * batch_size
    available = len(dataset.split(split).labels)
    if available < n:
        raise UserError(f"{dataset.name} {split} has {available} images, fewer than --batches × --batch-size = {n}; "
                        "lower one of them")
    encoder = encoders.image
    if channels_last:
        module = encoders.modules.get("image")
        if module is None:
            raise UserError("--channels-last needs an encoder that exposes its image module (EncoderPair.modules['image'])")
        module.to(memory_format=torch.channels_last)
    cuda = device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    subset = _Subset(dataset, split, n)
    images = subset.split(split).images

    raw_batch = preprocess(images[:batch_size], encoder.input_spec, device)
    if channels_last:
        raw_batch = raw_batch.contiguous(memory_format=torch.channels_last)
    forward_seconds(encoder, raw_batch, device, amp, iterations=0, warmup=warmup)

    def repeat() -> dict[str, Any]:
        """One harness extraction of the n images with one timed raw pass after each of its batches."""
        probe = ReferenceProbe(encoder, raw_batch, device, amp, every=1, passes=batches)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with tempfile.TemporaryDirectory(prefix="hica-bench-bench-", dir=scratch_dir) as tmp:
            cache = FeatureCache(Path(tmp))
            sync()
            start = time.perf_counter()
            features, extraction = split_features(cache, subset, split, encoder, device, batch_size, amp, probe)
            sync()
            seconds = time.perf_counter() - start - probe.paused_s
            stages = _stages(features, images, encoder, device, batch_size, cache, sync)
        return {"raw_ips": n / sum(probe.times), "step_s": float(np.median(probe.times)), "forward": float(sum(probe.times)),
                "harness_ips": n / seconds, "recorded_ips": n / (extraction.seconds - probe.paused_s),
                "harness_total": seconds, "peak": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None, **stages}

    runs = [repeat() for _ in range(repeats)]
    raw_ips, harness_ips = [r["raw_ips"] for r in runs], [r["harness_ips"] for r in runs]
    ratios = [h / r for h, r in zip(harness_ips, raw_ips)]
    stage_s = {name: float(np.median([r[name] for r in runs])) for name in ("preprocess", "cache_write", "forward", "harness_total")}
    stage_s["other"] = stage_s["harness_total"] - stage_s["forward"] - stage_s["preprocess"] - stage_s["cache_write"]
    return {
        "bench_version": BENCH_VERSION,
        "encoder": encoder_label,
        "encoder_identity": encoder.identity,
        "dataset": dataset.name,
        "split": split,
        "size": getattr(dataset, "size", None),
        "input_size": encoder.input_spec.size,
        "images": n,
        "device": device,
        "batch_size": batch_size,
        "amp": amp,
        "precision": precision(device, amp),
        "channels_last": channels_last,
        "warmup": warmup,
        "batches": batches,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "raw": {"images_per_s": _spread(raw_ips), "step_ms_median": 1000 * float(np.median([r["step_s"] for r in runs]))},
        # recorded_images_per_s: as results record it (extraction time without the cache write)
        "harness": {"images_per_s": _spread(harness_ips), "recorded_images_per_s": float(np.median([r["recorded_ips"] for r in runs]))},
        "peak_memory_mb": max(r["peak"] for r in runs) if cuda else None,  #: CUDA, both paths (they interleave)
        "ratio": float(np.median(ratios)),  #: median of the paired per-repeat ratios
        "ratio_per_repeat": ratios,
        "stage_seconds": stage_s,
        "peak_rss_mb": _peak_rss_mb(),
        "environment": environment(device),
    }


def _stages(features, images, encoder, device, batch_size, cache, sync) -> dict[str, float]:
    """Seconds of the harness's non-forward stages over the same images: preprocessing (memory-mapped read,
    copy, resize, normalise; to the device) and the cache write."""
    import torch

    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for begin in range(0, len(images), batch_size):
            preprocess(images[begin : begin + batch_size], encoder.input_spec, device)
    sync()
    preprocess_s = time.perf_counter() - start
    start = time.perf_counter()
    cache.put("stage-timing", features, {"bench": "cache-write"})
    return {"preprocess": preprocess_s, "cache_write": time.perf_counter() - start}

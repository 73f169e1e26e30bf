"""The encoder loop and its timing: images -> features in batches (with the next batch prepared in the background),
the timed forward every measurement uses, and the plain eager yardstick measured during an extraction.

Only :class:`hica_bench.extraction.FeatureExtractor` calls :func:`encode_images`; everything else asks the service.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable

import numpy as np

from hica_bench.data import preprocess, release_pages
from hica_bench.extraction.backends import Forward, eager_forward
from hica_bench.interfaces import ImageEncoder


def precision(device: str, amp: bool) -> str:
    """The compute precision used by :func:`encode_images` (part of the cache key)."""
    if not amp or not device.startswith("cuda"):
        return "fp32"
    import torch

    # bf16 only where the GPU computes in it (Ampere and later); torch's default also says yes where it is emulated
    # (a T4 or V100), which runs slower than fp16 there (torch before 2.5 has no such argument, nor emulation)
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        native = torch.cuda.is_bf16_supported()
    return "bf16" if native else "fp16"


def encode_images(
    images: np.ndarray,
    encoder: ImageEncoder,
    device: str,
    batch_size: int,
    amp: bool = True,
    on_batch: Callable[[int], None] | None = None,
    forward: Forward | None = None,
    first: np.ndarray | None = None,
) -> np.ndarray:
    """(N, H, W[, 3]) uint8, possibly memory-mapped -> (N, D) float32, reading ``batch_size`` images at a time.
    ``forward`` runs the encoder (see :mod:`hica_bench.extraction.backends`); default: eager ``encoder.encode``.
    ``first``: the first batch's features, already computed with this very forward and batch (the settings probe
    times real batches and hands its winner's over), so that batch is not encoded again.

    One background thread (the process's, kept between calls: :func:`_preprocessing_thread`) reads and preprocesses
    the next batch while ``forward`` runs on the current one (unless the engine prepares the images itself, below),
    into one of two sets of kept buffers (no ~10 MB allocation per batch; on the CPU the two sets are kept between
    calls too: :func:`kept_buffers`). On 2 cores
    preprocessing cannot hide behind an engine that uses both: its CPU time is the harness's cost. With preprocessing
    4x cheaper and its buffers kept, the loop ran 0.95-0.96 of the raw ONNX Runtime forward's images/s (in-process,
    384 BreastMNIST images, batch 16, 8 rounds in turns; 0.90 before). A forward whose engine prepares the images
    itself (ONNX Runtime's ``for_images``, :class:`~hica_bench.extraction.backends.OnnxForward`) gets the uint8 images
    as they are, an array's small batches (:data:`INLINE_MAX_BYTES`) copied in this thread: the loop then ran at 1.08 of
    that raw forward (128 images, batch 8, 20 rounds in turns). ``on_batch`` is called after each batch, in
    this thread, once that prefetch has finished, so it never overlaps with it."""
    import torch

    forward = forward or eager_forward(encoder, device, precision(device, amp))
    # an engine that prepares the images itself (ONNX Runtime's, backends.OnnxForward) gets them as they are
    preparing = getattr(forward, "for_images", None)
    done = len(first) if first is not None and len(images) else 0
    prepares = preparing(images) if preparing is not None and done < len(images) else None
    run = prepares or forward
    out = np.empty((len(images), encoder.embed_dim), dtype=np.float32)

    threads = torch.get_num_threads()  # the kept thread keeps the count it first ran with: give it the caller's

    def load(start: int):
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if prepares is not None:
            batch = np.array(images[start : start + batch_size])  # a copy: the engine reads it while pages are released
        else:
            with torch.inference_mode():
                batch = preprocess(images[start : start + batch_size], encoder.input_spec, device,
                                   buffers[(start // batch_size) % 2])
        release_pages(images)  # the batch is copied: unmap the pages read, so RSS does not grow with N
        return batch

    if done:
        assert done == min(batch_size, len(images)), "first must be the features of the first batch"
        out[:done] = first
        if on_batch:
            on_batch(done)
    # two sets of preprocessing buffers, taken in turns: the batch being encoded and the one being prepared
    shelf = kept_buffers() if device.startswith("cpu") else None
    buffers: tuple[dict, dict] = shelf.take() if shelf is not None else ({}, {})
    # an array's small batch for an engine that prepares it itself is a copy of a few KB, taken here, in turn: handing
    # it to the thread and back cost more than that (a 128-image split at batch 8 ran at 1.01 of the raw forward's
    # images/s through the thread, 1.08 without it: docs/benchmarks.md); larger batches (whose pages a cold cache may
    # have to read from disk) and images computed as they are read (corruptions) still get the thread
    inline = (prepares is not None and isinstance(images, np.ndarray)
              and images.itemsize * int(np.prod(images.shape[1:])) * batch_size <= INLINE_MAX_BYTES)
    submit = _at_once if inline else _preprocessing_thread().submit
    pending = None
    try:
        with torch.inference_mode():
            pending = submit(load, done) if done < len(images) else None
            for start in range(done, len(images), batch_size):
                batch = pending.result()
                following = start + batch_size
                pending = submit(load, following) if following < len(images) else None
                features = run(batch)
                out[start : start + len(batch)] = features.float().cpu().numpy()
                if on_batch:
                    if pending is not None:
                        wait([pending])
                    on_batch(len(batch))
    finally:  # on an error, the batch being prepared is finished before this returns (nothing runs on behind it)
        if pending is not None:
            wait([pending])
        if shelf is not None:  # no batch is being prepared into them any more
            shelf.give_back(buffers)
    return out


#: the largest batch (bytes of uint8 images) that :func:`encode_images` copies in its own thread for an engine that
#: prepares the images itself (8 images of 224 x 224 x 3 are 1.2 MB; 64 slices of 64 x 64, 262 KB)
INLINE_MAX_BYTES = 2**20


def _at_once(work: Callable, *args) -> Future:
    """``work(*args)`` run now, in this thread, as a finished future (its result, or its exception when asked)."""
    future: Future = Future()
    try:
        future.set_result(work(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


@functools.cache
def _preprocessing_thread() -> ThreadPoolExecutor:
    """The one background thread that preprocesses batches for :func:`encode_images`, started on first use and kept
    for the process: a new thread's first torch operation starts a team of OpenMP workers of its own (7.4 ms for the
    first 8-image resize on 2 cores, against 0.5 ms on a thread that has run one before), which a thread per call paid
    for every split (and every chunk of a volume split). Calls from several threads share it: their batches are
    prepared in turn, each into its own call's buffers (two first calls at the same instant may each start one; the
    spare ends when its caller drops it). A forked child starts a new one (the parent's thread does not exist
    there)."""
    return ThreadPoolExecutor(1, thread_name_prefix="hica-bench-preprocess")


#: the most bytes of preprocessing buffers (both sets) kept between calls of :func:`encode_images`; larger ones (big
#: batches of large inputs) are freed when their call ends, as before
KEPT_BUFFERS_MAX_BYTES = 128 * 2**20


class _Shelf:
    """One pair of preprocessing buffer sets, lent to one call of :func:`encode_images` at a time (a call that finds
    it lent out starts its own pair, which is kept afterwards if the shelf is empty by then)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: tuple[dict, dict] | None = None

    def take(self) -> tuple[dict, dict]:
        with self._lock:
            kept, self._kept = self._kept, None
        return kept if kept is not None else ({}, {})

    def give_back(self, buffers: tuple[dict, dict]) -> None:
        size = sum(tensor.untyped_storage().nbytes() for kept in buffers for tensor in kept.values())
        if size <= KEPT_BUFFERS_MAX_BYTES:
            with self._lock:
                if self._kept is None:
                    self._kept = buffers


@functools.cache
def kept_buffers() -> _Shelf:
    """The process's preprocessing buffers on the CPU, kept between calls of :func:`encode_images`. A call that allocated
    its own (~26 MB for batches of 16 grey images at 224 px; ~103 MB, then held by the process, at batch 64)
    page-faulted them in: up to 2,700 page faults per split on the bench's 2-core VM (glibc had handed the last call's
    blocks back to the system), before the first forward and beside it. In ``hica-bench bench`` (medians of four runs
    before, five after) the harness's time outside its forward calls and cache write went from 20.9 to 12.8 ms a repeat,
    its forward calls from 0.961 to 0.969 of the raw forward's rate (docs/benchmarks.md). CUDA keeps none here: torch's
    caching allocator already reuses its blocks. A forked child starts empty."""
    return _Shelf()


def _after_fork_in_child() -> None:
    _preprocessing_thread.cache_clear()
    kept_buffers.cache_clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def forward_seconds(forward: Forward, batch, device: str, iterations: int, warmup: int = 0,
                    outputs: list | None = None) -> list[float]:
    """Seconds of each of ``iterations`` timed ``forward(batch)`` calls after ``warmup`` untimed ones (timm's
    benchmark loop): ``batch`` is already preprocessed on ``device``; on CUDA the device is synchronised before
    and after every timed call. ``outputs`` (a list) receives the last call's features as float32 numpy."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        for step in range(warmup + iterations):
            sync()
            start = time.perf_counter()
            features = forward(batch)
            sync()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    if outputs is not None:
        outputs.append(features.float().cpu().numpy())
    return times


REFERENCE_BATCH = 8  #: images in the plain eager yardstick's fixed batch, whatever the extraction's batch size
REFERENCE_PASSES = 7  #: timed yardstick passes per extraction (each paired with the extraction's rate before it)
#: the yardstick (2 warm-up and REFERENCE_PASSES timed passes of REFERENCE_BATCH images: 72 images) is measured on a
#: split only when it adds at most a quarter to that split's pass; a smaller split (a zero-shot run's test split
#: alone: 156 images of BreastMNIST) goes without, and its results carry no harness efficiency for the gate
REFERENCE_MIN_IMAGES = 4 * (2 + REFERENCE_PASSES) * REFERENCE_BATCH


class ReferenceProbe:
    """A per-batch hook (``on_batch``) for :func:`encode_images` that measures the plain eager forward
    (``encoder.encode`` on a fixed preprocessed batch of :data:`REFERENCE_BATCH` images, whatever backend and
    batch size the extraction uses) during the extraction it is compared with, so both see the same machine
    load: the run's machine-independent yardstick.

    After every ``every``-th extraction batch it times one pass (at most ``passes`` times); the first time it
    also runs ``warmup`` untimed passes, because the first eager calls are slow (measured on 2 cores: pass 1 at
    ~50 %, pass 2 at ~80 % of the later rate). The spacing is fixed, not spread over the split: an eager pass
    after many batches of another backend runs partly cold (~33 against ~48 images/s), so a spacing that grew
    with the split would make the yardstick depend on the dataset's size. Single passes scatter by 20-30 % on a
    shared 2-core machine, hence the median of 7. ``paused_s`` is the time the hook took: take it out of the
    extraction's seconds. ``images_per_s`` is the median raw rate (None until a pass ran, e.g. on a cache hit).
    """

    def __init__(self, encoder: ImageEncoder, batch, device: str, amp: bool, every: int = 1,
                 passes: int = REFERENCE_PASSES, warmup: int = 2) -> None:
        self.batch, self.device = batch, device
        self.forward = eager_forward(encoder, device, precision(device, amp))
        self.every, self.passes, self.warmup = max(1, every), passes, warmup
        self.times: list[float] = []
        self.pairs: list[tuple[float, float]] = []  #: (the extraction's images/s since the previous pass, this pass's s)
        self.paused_s = 0.0
        self._batches = 0
        self._images, self._since = 0, time.perf_counter()

    @classmethod
    def for_split(cls, encoder: ImageEncoder, images: np.ndarray, device: str, batch_size: int, amp: bool = True,
                  passes: int = REFERENCE_PASSES, warmup: int = 2) -> "ReferenceProbe":
        """A pass after every 4th batch of the extraction of ``images`` in batches of ``batch_size`` (more often
        when the split has fewer than ``4 * passes`` batches); the fixed batch is their first :data:`REFERENCE_BATCH`."""
        n_batches = -(-len(images) // batch_size)
        batch = preprocess(images[:REFERENCE_BATCH], encoder.input_spec, device)
        return cls(encoder, batch, device, amp, every=min(4, n_batches // passes), passes=passes, warmup=warmup)

    def __call__(self, count: int) -> None:
        start = time.perf_counter()
        self._batches += 1
        if self._batches == 1:  # the first batch pays the start-up (a session to build, cold caches): not paired
            self._since = start
        else:
            self._images += count
        if self._batches % self.every == 0 and len(self.times) < self.passes:
            harness = self._images / (start - self._since) if self._images and start > self._since else None
            warmup, self.warmup = self.warmup, 0
            self.times += forward_seconds(self.forward, self.batch, self.device, iterations=1, warmup=warmup)
            if harness is not None:
                self.pairs.append((harness, self.times[-1]))
            self._images, self._since = 0, time.perf_counter()
        self.paused_s += time.perf_counter() - start

    @property
    def images_per_s(self) -> float | None:
        return len(self.batch) / float(np.median(self.times)) if self.times else None

    @property
    def ratios(self) -> list[float]:
        """Each timed pass paired with the extraction's rate just before it: harness images/s ÷ plain eager images/s,
        measured seconds apart, so both saw the same machine load."""
        return [harness * seconds / len(self.batch) for harness, seconds in self.pairs]

    @property
    def paired_efficiency(self) -> float | None:
        """The median of :attr:`ratios` (None without a pass)."""
        return float(np.median(self.ratios)) if self.ratios else None

    @property
    def spread(self) -> float | None:
        """The run's own noise on :attr:`paired_efficiency`: the interquartile range of :attr:`ratios` relative to their
        median (None with fewer than 3 pairs)."""
        ratios = self.ratios
        if len(ratios) < 3:
            return None
        q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
        return float((q75 - q25) / q50)


class CpuContention:
    """The share of the machine's CPU time that *other* processes used between :meth:`start` and :meth:`stop`
    (0: the machine was ours; 0.5 on 2 cores: a busy loop took one whole core), from psutil's system-wide and
    per-process counters. A throughput measured under contention says less about the code than about the machine:
    ``hica-bench check`` widens its bound by it. None where psutil cannot read the counters."""

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None
        self.share: float | None = None

    @staticmethod
    def _now() -> tuple[float, float, float] | None:
        try:
            import psutil

            system = psutil.cpu_times()
            busy = sum(system) - system.idle - getattr(system, "iowait", 0.0)
            own = psutil.Process().cpu_times()
            return time.perf_counter(), busy, own.user + own.system
        except Exception:  # no psutil, or counters this platform does not give
            return None

    def start(self) -> "CpuContention":
        self._start = self._now()
        return self

    def stop(self) -> float | None:
        end = self._now()
        if self._start is None or end is None:
            return None
        import os

        wall, machine = end[0] - self._start[0], os.cpu_count() or 1  # the counters cover every CPU of the machine
        if wall <= 0:
            return None
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        self.share = float(min(1.0, max(0.0, others / (wall * machine))))
        return self.share

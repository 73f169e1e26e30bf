"""The one feature-extraction service: images of a dataset split -> features, with a record of what produced them.

``hica-bench run``, ``hica-bench bench`` and the conformance kit all get features from a :class:`FeatureExtractor`;
nothing else runs an encoder over a split. It owns, in this package:

- :mod:`.tuning`: the extraction settings (backend, batch size, layout, threads), chosen by measurement once per
  encoder and machine and remembered in the cache folder, or fixed by the user;
- :mod:`.backends`: how the encoder's forward runs (eager PyTorch, or ONNX Runtime on an exported graph);
- :mod:`.encode`: the batch loop, and the plain eager yardstick (:class:`~.encode.ReferenceProbe`) measured during
  each dataset's first encoder pass, for the throughput gate;
- :mod:`.cache`: the content-addressed feature cache;
- :mod:`.bench`: ``hica-bench bench``, the throughput report.

A feature's value is determined by its :class:`FeatureIdentity` and the dataset's identity and split: that is the
feature-cache key, and the :class:`FeatureIdentity` is part of every result's cell identity, so the same identity
means the same feature bits. It holds the encoder identity with the weights digest, preprocessing, precision, backend
and device type, and, for the eager backend, the batch size, thread count, memory layout and ``torch.compile``: they
pick PyTorch's kernels and their order of summation, which moves EfficientNet-Lite0's features by up to 1.4e-6
relative (measured on 64 BreastMNIST images: channels-last against NCHW at any batch size; batch 8 with 1 thread
against batch 16 with 2). ONNX Runtime's features were bit-identical across batch sizes 8-64 and 1-2 threads, so for
it those are how fast it runs, not what it computes (recorded in :class:`ExtractionRecord` and each result's
``environment.extraction``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hica_bench.data import preprocessing_id, split_identity
from hica_bench.errors import UserError
from hica_bench.extraction.backends import Forward
from hica_bench.extraction.cache import FeatureCache
from hica_bench.extraction.encode import REFERENCE_MIN_IMAGES, CpuContention, ReferenceProbe, encode_images, precision
from hica_bench.extraction.tuning import ExtractionSettings, Requested, Tuning, Work, allocator, build_forward, choose
from hica_bench.interfaces import EncoderPair, FewShotDataset

__all__ = ["FeatureExtractor", "FeatureIdentity", "ExtractionRecord", "ExtractionSettings", "Requested", "Tuning", "Work"]


@dataclass(frozen=True)
class FeatureIdentity:
    """Everything that determines a feature's value besides the image itself."""

    encoder: str  #: the image encoder's identity (includes a digest of its weights)
    preprocessing: str  #: :func:`hica_bench.data.preprocessing_id` of its input spec
    precision: str  #: fp32, or bf16 / fp16 (CUDA autocast)
    backend: str  #: eager or onnxruntime (they agree within a tolerance, not bit for bit)
    device: str  #: cpu or cuda (fp32 features of the two differ in the last bits)
    batch_size: int | None = None  #: eager only (None: the backend's features do not depend on it)
    threads: int | None = None  #: eager only
    channels_last: bool | None = None  #: eager only
    compile: bool | None = None  #: eager only
    exporter: str | None = None  #: onnxruntime only, when not the first exporter (``dynamo``): their graphs' bits differ
    volume: str | None = None  #: volumes only: how they were read (:mod:`hica_bench.volumes`: the slices and pooling, or native 3D)

    def as_dict(self) -> dict[str, Any]:
        """The fields that apply (the eager-only ones are left out for other backends): the cache key's and the cell
        identity's form."""
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass
class ExtractionRecord:
    """How one split's features were obtained: from the cache, or computed (with the settings and the speed)."""

    dataset: str  #: the dataset's name
    dataset_identity: str
    split: str
    n_images: int
    features: FeatureIdentity
    cache_key: str
    cached: bool
    seconds: float = 0.0  #: encoding time, without the reference probe's passes
    settings: ExtractionSettings | None = None  #: how it ran (None: from the cache)
    reference_images_per_s: float | None = None  #: the plain eager yardstick, when measured during this pass
    paired_efficiency: float | None = None  #: median of its interleaved harness ÷ yardstick pairs (ReferenceProbe)
    efficiency_spread: float | None = None  #: their relative interquartile range: the run's own noise
    cpu_contention: float | None = None  #: share of the machine's CPU time other processes used during the pass

    @property
    def images_per_s(self) -> float | None:
        return None if self.cached or self.seconds <= 0 else self.n_images / self.seconds


class FeatureExtractor:
    """Features of ``pair``'s image encoder on its device.

    ``requested``: the knobs the user fixed (the rest are chosen by :func:`.tuning.choose` the first time
    :attr:`settings` is needed). ``settings`` instead fixes every knob (nothing is probed). ``cache_dir``: the
    feature cache, tuning verdicts and ONNX exports (None: no cache; then ``settings`` must be given).
    ``forward``: a forward to use instead of the one the settings build (``hica-bench bench`` passes a timed one).
    ``reference``: measure the plain eager yardstick during each dataset's first computed split of at least
    :data:`~.encode.REFERENCE_MIN_IMAGES` images. ``work``: what the run will encode, when known (a probe then times
    real batches of it, within a budget set by its size, and hands over the first batch it encoded).
    ``pair`` may be a :class:`hica_bench.encoder_pairs.LazyEncoderPair`: its card gives the identity, and its models are
    built only when a split has to be computed (or settings probed).
    """

    def __init__(self, pair: EncoderPair, cache_dir: Path | None = None, requested: Requested | None = None, *,
                 settings: ExtractionSettings | None = None, forward: Forward | None = None, reference: bool = True,
                 log: Callable[[str], None] | None = None, work: Work | None = None,
                 volume: Any = None) -> None:
        from hica_bench.volumes import VolumeOptions

        if cache_dir is None and settings is None:
            raise ValueError("a FeatureExtractor without a cache folder needs fixed settings")
        self.pair = pair
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.cache = None if cache_dir is None else FeatureCache(self.cache_dir)
        self.requested = requested or Requested()
        self._tuning = None if settings is None else Tuning(settings, "given")
        self._forward = forward
        self.reference = reference
        self.log = log
        self.work = work
        self.records: list[ExtractionRecord] = []  #: every split served, in order
        self.volume = volume or VolumeOptions()  #: how a 2D encoder reads volumes (:mod:`hica_bench.volumes`)

    @classmethod
    def plain(cls, pair: EncoderPair, batch_size: int = 16, amp: bool = False) -> "FeatureExtractor":
        """Eager ``encode`` at ``batch_size`` with torch's current threads, no cache, no probe, no yardstick."""
        import torch

        device = pair.device
        settings = ExtractionSettings("eager", batch_size, False, torch.get_num_threads(), precision(device, amp), False,
                                      allocator(), device.startswith("cuda"))
        return cls(pair, settings=settings, reference=False)

    # -- settings and identity
    @property
    def tuning(self) -> Tuning:
        """The extraction settings and how they were chosen (probed on first use, then remembered)."""
        if self._tuning is None:
            self._tuning = choose(self.pair, self.requested, self.cache_dir, self.log, self.work)
        return self._tuning

    @property
    def settings(self) -> ExtractionSettings:
        return self.tuning.settings

    @property
    def identity(self) -> FeatureIdentity:
        settings = self.settings
        kernels = {}
        if settings.backend == "eager":  # see the module docstring: these move eager features, not ONNX Runtime's
            kernels = {"batch_size": settings.batch_size, "threads": settings.threads,
                       "channels_last": settings.channels_last, "compile": settings.compile}
        elif settings.onnx_exporter != "dynamo":
            kernels = {"exporter": settings.exporter}
        card = self.pair.card  # a lazily built pair is not built for this
        return FeatureIdentity(card.image, preprocessing_id(card.input_spec), settings.precision,
                               settings.backend, self.pair.device.split(":")[0], **kernels)

    def identity_for(self, dataset: FewShotDataset) -> FeatureIdentity:
        """The feature identity of ``dataset``'s features: :attr:`identity`, plus how volumes are read for a dataset of
        volumes (2D datasets: :attr:`identity` itself)."""
        from hica_bench import volumes

        if not volumes.volumetric(dataset):
            return self.identity
        how = volumes.NATIVE if self.pair.card.volumetric else self.volume.describe()  # the card: nothing is built
        return dataclasses.replace(self.identity, volume=how)

    def forward(self) -> Forward:
        """The forward of the chosen settings (built once, on first use: a run served from the cache never builds it)."""
        if self._forward is None:  # the probe's own, when it just measured these settings
            self._forward = self.tuning.forward or build_forward(self.pair, self.settings, self.cache_dir)
        return self._forward

    # -- features
    def encode(self, images: np.ndarray, on_batch: Callable[[int], None] | None = None,
               first: np.ndarray | None = None) -> np.ndarray:
        """(N, H, W[, 3]) uint8 images (may be memory-mapped) -> (N, D) float32 features; not cached. ``first``: the
        first batch's features, when already computed with these settings."""
        settings = self.settings
        return encode_images(images, self.pair.image, self.pair.device, settings.batch_size,
                             amp=settings.precision != "fp32", on_batch=on_batch, forward=self.forward(), first=first)

    def features(self, dataset: FewShotDataset, split: str, on_batch: Callable[[int], None] | None = None,
                 rows: int | None = None, compute: bool = True) -> tuple[np.ndarray, ExtractionRecord]:
        """Features of ``dataset.split(split)`` (of its first ``rows`` images when given, e.g. ``--max-test``): from the
        cache when a valid entry exists, else computed and stored. A prefix is its own cache entry (``rows`` is part of
        its key, so it is never taken for the whole split); it is also sliced from a cached whole split. It is
        encoded up to the next batch boundary, so each of its rows comes from the same batch as in the whole split and
        both ways give the same bits. ``on_batch(n)`` is called after each computed batch (progress). ``compute=False``:
        (None, None) instead of computing what the cache does not hold (an executor then computes it elsewhere)."""
        identity = self.identity_for(dataset)
        # the split's own content: a corrupted dataset's train split is the clean one (its features are shared)
        parts = {"features": identity.as_dict(), "dataset": split_identity(dataset, split), "split": split}
        if rows is not None and rows < len(dataset.split(split).labels):
            whole = self.cache.get(FeatureCache.key(parts), count_miss=False) if self.cache is not None else None
            if whole is not None:
                return self._served(dataset, split, whole[:rows], identity, FeatureCache.key(parts))
            parts["rows"] = rows
        key = FeatureCache.key(parts)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is None and not compute:
            return None, None
        if cached is None and self.cache is not None:
            with self.cache.computing(key) as cached:  # another run sharing the cache may be computing them now
                if cached is None:
                    return self._compute(dataset, split, identity, key, parts, on_batch)
        if cached is None:
            return self._compute(dataset, split, identity, key, parts, on_batch)
        return self._served(dataset, split, cached, identity, key)

    def adapted(self, encoder: Any, dataset: FewShotDataset, split: str = "test", rows: int | None = None
                ) -> tuple[np.ndarray, ExtractionRecord]:
        """Features of ``dataset.split(split)`` (its first ``rows``) through an *adapted* image encoder, a method's
        ``encoder_`` (see :class:`hica_bench.interfaces.Method`): the same preprocessing, batch size, precision, threads
        and device as this run's frozen features, on the eager backend in the plain memory layout, without
        ``torch.compile`` (an adapted copy is neither exported to ONNX nor compiled: it is used once), and cached under
        the adapted encoder's own identity, never the frozen one's. Not counted in this extractor's records (they
        describe the frozen passes)."""
        return self.through(encoder).features(dataset, split, rows=rows)

    def through(self, encoder: Any) -> "FeatureExtractor":
        """The service for an adapted image encoder (a method's ``encoder_``): this run's preprocessing, batch size,
        precision, threads and device, on the eager backend in the plain memory layout without ``torch.compile``,
        caching under the adapted encoder's own identity (see :meth:`adapted`)."""
        settings = dataclasses.replace(self.settings, backend="eager", channels_last=False, compile=False, exporter=None)
        pair = EncoderPair(encoder, None, False, self.pair.device, {})
        return FeatureExtractor(pair, self.cache_dir, settings=settings, reference=False)

    def _served(self, dataset: FewShotDataset, split: str, features: np.ndarray, identity: FeatureIdentity,
                key: str) -> tuple[np.ndarray, ExtractionRecord]:
        record = ExtractionRecord(dataset.name, dataset.identity, split, len(features), identity, key, True)
        self.records.append(record)
        return features, record

    def _compute(self, dataset: FewShotDataset, split: str, identity: FeatureIdentity, key: str, parts: dict[str, Any],
                 on_batch: Callable[[int], None] | None) -> tuple[np.ndarray, ExtractionRecord]:
        record = ExtractionRecord(dataset.name, dataset.identity, split, 0, identity, key, False)
        images = dataset.split(split).images
        rows = parts.get("rows")
        if rows is not None:  # up to the batch boundary: each row is computed in the very batch the whole split has
            images = images[: -(-rows // self.settings.batch_size) * self.settings.batch_size]
        from hica_bench import volumes

        probe = None
        if (self.reference and self.reference_for(dataset.identity) is None  # each dataset's first encoder pass ...
                and not volumes.volumetric(dataset)  # (the yardstick times 2D images)
                and getattr(dataset, "corruption", None) is None  # (a corrupted split's time includes corrupting it)
                and len(images) >= REFERENCE_MIN_IMAGES):  # ... that is long enough for the yardstick to be worth it
            probe = ReferenceProbe.for_split(self.pair.image, images, self.pair.device, self.settings.batch_size,
                                             self.settings.precision != "fp32")
            on_batch = _both(on_batch, probe)
        first, kept = None, self.tuning.first_batch
        if kept is not None and kept[0] == (dataset.identity, split) and kept[1] == self.settings.batch_size:
            first, self.tuning.first_batch = kept[2], None  # the probe's winner encoded this batch while being timed
        contention = CpuContention().start()
        start = time.perf_counter()
        if volumes.volumetric(dataset):
            features = self._volumes(images, on_batch)[:rows]
        else:
            features = self.encode(images, on_batch, first)[:rows]
        record.seconds = time.perf_counter() - start
        record.cpu_contention = contention.stop()
        if probe is not None and probe.images_per_s:
            record.seconds -= probe.paused_s
            record.reference_images_per_s = probe.images_per_s
            record.paired_efficiency, record.efficiency_spread = probe.paired_efficiency, probe.spread
        record.n_images, record.settings = len(features), self.settings
        if self.cache is not None:
            self.cache.put(key, features, parts)
        self.records.append(record)
        return features, record

    def _volumes(self, images: Any, on_batch: Callable[[int], None] | None) -> np.ndarray:
        """A split of volumes (N, D, H, W): natively through a 3D encoder, else slice by slice through :meth:`encode`,
        pooled per volume (:mod:`hica_bench.volumes`); ``on_batch`` counts volumes."""
        from hica_bench import volumes

        if images.ndim != 4:
            raise UserError(f"expected volumes (N, D, H, W), got images of shape {tuple(images.shape)}")
        if volumes.native(self.pair.image):
            return volumes.encode_native(images, self.pair.image, self.pair.device, self.settings.batch_size, on_batch)
        return volumes.encode_sliced(images, self.volume, lambda flat: self.encode(flat), on_batch)

    def reference_for(self, dataset_identity: str) -> float | None:
        """The plain eager images/s measured during this dataset's first computed split (None if none was computed)."""
        return next((r.reference_images_per_s for r in self.records
                     if r.dataset_identity == dataset_identity and r.reference_images_per_s), None)

    def throughput(self, dataset_identity: str) -> dict[str, float]:
        """This run's encoder images/s over the splits of this dataset it computed (empty when all came from the
        cache), with the plain eager yardstick beside it (``hica-bench check`` compares their ratio)."""
        computed = [r for r in self.records if r.dataset_identity == dataset_identity and not r.cached]
        seconds = sum(r.seconds for r in computed)
        if seconds <= 0:
            return {}
        out = {"encoder_images_per_s": sum(r.n_images for r in computed) / seconds}
        measured = next((r for r in computed if r.reference_images_per_s), None)
        if measured is not None:
            out.update(reference_images_per_s=measured.reference_images_per_s,
                       paired_efficiency=measured.paired_efficiency, efficiency_spread=measured.efficiency_spread)
        contentions = [(r.cpu_contention, r.seconds) for r in computed if r.cpu_contention is not None]
        if contentions:
            out["cpu_contention"] = sum(c * s for c, s in contentions) / max(sum(s for _, s in contentions), 1e-9)
        return out

    def describe(self) -> dict[str, Any]:
        """The settings as recorded in each result's ``environment.extraction``."""
        return asdict(self.settings)


def _both(first, second):
    """One per-batch hook calling ``first`` (may be None) and then ``second``."""
    def hook(count: int) -> None:
        if first:
            first(count)
        second(count)

    return hook

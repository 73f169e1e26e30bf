"""The one feature-extraction service (hica_bench.extraction.FeatureExtractor): what run, bench and the kit all use."""

from __future__ import annotations

import re

import numpy as np

from conftest import REPO, TEST_PLUGINS
from hica_bench.extraction import FeatureExtractor, Requested
from hica_bench.registry import load_registry


def _pixels_pair():
    import sys

    sys.path.insert(0, str(TEST_PLUGINS))
    try:
        return load_registry(["pixel_encoder"]).choose("encoder", "pixels").build(device="cpu")
    finally:
        sys.path.remove(str(TEST_PLUGINS))


def test_features_are_cached_keyed_by_their_identity_and_recorded(medmnist_root, tmp_path):
    registry = load_registry()
    dataset = registry.choose("dataset", "breastmnist").build(root=str(medmnist_root), size=28, download=False,
                                                              cache_dir=tmp_path)
    pair = _pixels_pair()
    fixed = Requested(backend="eager", batch_size=32, channels_last=False, threads=2)
    extractor = FeatureExtractor(pair, tmp_path, fixed)
    assert extractor.tuning.source == "given"
    features, record = extractor.features(dataset, "test")
    assert features.shape == (156, pair.image.embed_dim) and features.dtype == np.float32
    assert not record.cached and record.n_images == 156 and record.settings.batch_size == 32
    assert record.features == extractor.identity and record.features.backend == "eager" and record.features.device == "cpu"
    assert record.dataset_identity == dataset.identity and dataset.identity.startswith("medmnist/breastmnist@28/sha256:")
    assert record.reference_images_per_s is None  # 156 images: too few for the yardstick's 72 to be worth it
    assert set(extractor.throughput(dataset.identity)) == {"encoder_images_per_s", "cpu_contention"}
    _, train = extractor.features(dataset, "train")
    assert train.reference_images_per_s > 0  # the plain eager yardstick, measured during this first long enough pass
    assert set(extractor.throughput(dataset.identity)) == {"encoder_images_per_s", "reference_images_per_s", "paired_efficiency",
                                                       "efficiency_spread", "cpu_contention"}

    again = FeatureExtractor(pair, tmp_path, fixed)
    cached, record2 = again.features(dataset, "test")
    assert record2.cached and record2.cache_key == record.cache_key and np.array_equal(cached, features)
    assert again.throughput(dataset.identity) == {}  # nothing computed: no speed to report

    # eager kernels depend on batch size and threads: another feature identity, computed anew (here bit-equal: the
    # pixels encoder only reshapes)
    other = FeatureExtractor(pair, tmp_path, Requested(backend="eager", batch_size=8, channels_last=False, threads=1))
    recomputed, record3 = other.features(dataset, "test")
    assert not record3.cached and record3.cache_key != record.cache_key
    assert (other.identity.batch_size, other.identity.threads, extractor.identity.batch_size) == (8, 1, 32)
    assert np.array_equal(recomputed, features)

    plain = FeatureExtractor.plain(pair, batch_size=7).encode(dataset.split("test").images)
    assert np.array_equal(plain, features)  # batch size does not change the pixels encoder's features


def test_no_other_code_path_produces_features():
    """Only the service runs the encoder over images: ``encode_images`` and the feature cache are used in
    hica_bench/extraction/ alone (the plan, bench and the kit call the service; text embeddings are cached by its
    ``texts`` module)."""
    users = {}
    for path in sorted((REPO / "hica_bench").rglob("*.py")):
        text = path.read_text()
        for name in ("encode_images(", "FeatureCache(", "split_features("):
            if name in text:
                users.setdefault(name, set()).add(path.relative_to(REPO).as_posix())
    assert users["encode_images("] == {"hica_bench/extraction/__init__.py", "hica_bench/extraction/encode.py"}
    assert users["FeatureCache("] == {"hica_bench/extraction/__init__.py", "hica_bench/extraction/texts.py",
                                      "hica_bench/bench.py"}
    assert "split_features(" not in users
    for consumer in ("plan.py", "testing.py", "bench.py"):
        assert re.search(r"FeatureExtractor[.(]", (REPO / "hica_bench" / consumer).read_text()), consumer
    bench = (REPO / "hica_bench" / "bench.py").read_text()
    assert "FeatureCache(Path(tmp)).put(" in bench  # bench only times a cache write of features it already has


def test_the_kit_gets_its_features_from_the_service():
    from hica_bench import testing

    task, test, labels = testing.toy_task(2, 3)
    pair = testing.toy_pair(text=False, aligned=False)
    again = FeatureExtractor.plain(pair).encode(testing.toy_images(labels, seed=1))
    assert np.array_equal(again, test) and task.components is None


def test_cached_texts_are_served_exactly_and_a_copy_is_the_encoders_own(tmp_path):
    """A lazy pair's text encoder with a cache folder: a second ``encode`` of the same texts is read from the cache
    (equal bits, the pair not built again), other texts are not; a deep copy (what an adapting method changes) is the
    plugin's own encoder copied, never the cache wrapper or the frozen encoder; pickling gives the built encoder."""
    import copy
    import pickle

    from hica_bench import testing
    from hica_bench.encoder_pairs import LazyEncoderPair

    builds = []

    def build():
        builds.append(1)
        return testing.toy_pair()

    card = testing.toy_pair().card
    lazy = LazyEncoderPair(card, build, "toy", "cpu", tmp_path)
    first = lazy.text.encode(["a chest x-ray", "a skin lesion"])
    assert len(builds) == 1 and len(list((tmp_path / "texts").glob("*.npy"))) == 1
    again = LazyEncoderPair(card, build, "toy", "cpu", tmp_path)
    assert np.array_equal(again.text.encode(["a chest x-ray", "a skin lesion"]), first) and len(builds) == 1
    other = again.text.encode(["a skin lesion", "a chest x-ray"])  # the order is part of the key
    assert len(builds) == 2 and np.array_equal(other, first[::-1])
    frozen = lazy.pair().text
    copied = copy.deepcopy(lazy.text)
    assert isinstance(copied, testing.ToyTextEncoder) and copied is not frozen
    assert type(pickle.loads(pickle.dumps(lazy.text))) is testing.ToyTextEncoder
    assert lazy.text.identity == frozen.identity and lazy.text.embed_dim == frozen.embed_dim


def test_batches_are_prepared_on_one_kept_thread_and_a_forked_child_starts_its_own(medmnist_root, tmp_path):
    """The background thread that prepares batches is started once per process and kept (a new thread's first torch
    operation starts an OpenMP team of its own: ~7 ms per split on 2 cores); a forked child, where the parent's thread
    does not exist, starts its own instead of waiting on it forever."""
    import os
    import signal
    import threading
    import time

    images = np.load(medmnist_root / "breastmnist.npz")["test_images"][:40]
    extractor = FeatureExtractor.plain(_pixels_pair(), batch_size=8)
    first = extractor.encode(images)

    def preparing() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("hica-bench-preprocess")]

    kept = preparing()
    assert len(kept) == 1
    for _ in range(3):
        np.testing.assert_array_equal(extractor.encode(images), first)
    assert preparing() == kept

    out = tmp_path / "child.npy"
    pid = os.fork()
    if pid == 0:  # the child: encode, save, leave without running the parent's exit handlers
        code = 1
        try:
            from hica_bench.extraction.encode import kept_buffers

            if kept_buffers().take() == ({}, {}):  # the parent's buffers stay the parent's
                np.save(out, extractor.encode(images))
                code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child's encoding did not finish in 120 s")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    np.testing.assert_array_equal(np.load(out), first)


def test_the_cpu_preprocessing_buffers_are_kept_between_calls_up_to_their_limit(medmnist_root, monkeypatch):
    """A split's two sets of preprocessing buffers are the ones the previous split used (a new pair was page-faulted
    in per split: 2,000-2,700 faults on the bench's VM), with the same features as a pair of its own; one over
    ``KEPT_BUFFERS_MAX_BYTES`` is freed when its call ends; a call while another holds the pair starts its own, and
    the shelf keeps one pair."""
    from hica_bench.extraction import encode

    images = np.load(medmnist_root / "breastmnist.npz")["test_images"][:40]
    extractor = FeatureExtractor.plain(_pixels_pair(), batch_size=8)
    encode.kept_buffers.cache_clear()  # an empty shelf: not what earlier tests in this process left there
    first = extractor.encode(images)
    shelf = encode.kept_buffers()

    def on_the_shelf() -> tuple[dict, dict]:
        kept = shelf.take()
        shelf.give_back(kept)
        return kept

    def storages() -> set[int]:
        return {tensor.untyped_storage().data_ptr() for buffers in on_the_shelf() for tensor in buffers.values()}

    kept = storages()
    names = {name for buffers in on_the_shelf() for name in buffers}
    # per set: the resized batch, the normalised one, the first of the resize's products where they run, and the
    # normalisation's divisors (data.py)
    divisors = "divisors [127.5, 127.5, 127.5] on cpu"
    assert {"resized", "out", divisors} <= names <= {"resized", "across", "out", divisors}
    assert len(kept) == 2 * len(names)
    for _ in range(2):
        np.testing.assert_array_equal(extractor.encode(images), first)
        assert storages() == kept
    np.testing.assert_array_equal(extractor.encode(images[:13]), first[:13])  # a shorter batch: rows of the same pair
    assert storages() == kept

    held = shelf.take()  # as if another call were encoding now: this one starts a pair of its own ...
    np.testing.assert_array_equal(extractor.encode(images), first)
    own = storages()
    assert len(own) == len(kept) and own.isdisjoint(kept)  # ... kept, as the shelf was empty when it ended
    shelf.give_back(held)  # the other call ends: the shelf is full, so its pair is freed
    assert storages() == own

    monkeypatch.setattr(encode, "KEPT_BUFFERS_MAX_BYTES", 1024)
    encode.kept_buffers.cache_clear()
    np.testing.assert_array_equal(extractor.encode(images), first)
    assert encode.kept_buffers().take() == ({}, {})
    encode.kept_buffers.cache_clear()


def test_the_kept_thread_prepares_with_the_callers_torch_threads(medmnist_root):
    """A thread keeps the torch thread count it first ran with, so the kept preparing thread is given the caller's
    on every call (``--threads`` and a probe's choice reach preprocessing as they did with a thread per call)."""
    import threading

    import torch

    from hica_bench.interfaces import EncoderPair

    class NotingEncoder:
        """The pixels encoder, noting the torch thread count of each preparing thread that reads its input spec."""

        def __init__(self, inner) -> None:
            self.inner, self.seen = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        @property
        def input_spec(self):
            if threading.current_thread().name.startswith("hica-bench-preprocess"):
                self.seen.append(torch.get_num_threads())
            return self.inner.input_spec

    images = np.load(medmnist_root / "breastmnist.npz")["test_images"][:24]
    encoder = NotingEncoder(_pixels_pair().image)
    before = torch.get_num_threads()
    try:
        for count in (2, 1, 2):
            torch.set_num_threads(count)
            encoder.seen.clear()
            FeatureExtractor.plain(EncoderPair(encoder, None, False), batch_size=8).encode(images)
            assert encoder.seen and set(encoder.seen) == {count}, (count, encoder.seen)
    finally:
        torch.set_num_threads(before)


def test_amp_precision_is_bf16_only_where_the_gpu_computes_in_it(monkeypatch):
    """On CUDA with AMP: bf16 where torch says the GPU has it natively (asked without emulation: a T4 or V100 emulates
    it, slower than fp16), else fp16; a torch without that argument is asked plainly; the CPU is always fp32."""
    import torch

    from hica_bench.extraction.encode import precision

    asked = []

    def native_only(including_emulation=True):  # as torch >= 2.5 on a GPU that emulates bf16 (compute capability 7)
        asked.append(including_emulation)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", native_only)
    assert precision("cuda", True) == "fp16" and asked == [False]
    assert precision("cuda", False) == precision("cpu", True) == "fp32" and asked == [False]

    def older_torch():  # torch before 2.5: no argument, no emulation
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", older_torch)
    assert precision("cuda:0", True) == "bf16"


def test_the_bench_feature_check_admits_each_precision_s_rounding():
    from hica_bench.bench import FEATURE_TOLERANCE, feature_tolerance
    from hica_bench.extraction.backends import ONNX_TOLERANCE

    assert feature_tolerance("fp32") == ONNX_TOLERANCE == 1e-4
    assert feature_tolerance("fp16") == FEATURE_TOLERANCE["fp16"] < feature_tolerance("bf16") == FEATURE_TOLERANCE["bf16"]
    # above the rounding measured under CPU autocast (fp16 <= 0.015, bf16 <= 0.206 of max |feature|), below a fault (~1)
    assert 0.015 < feature_tolerance("fp16") < 0.1 and 0.206 < feature_tolerance("bf16") < 1

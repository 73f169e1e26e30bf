"""The run's plain-eager yardstick (``ReferenceProbe``) on tiny in-process encoders (split from
tests/system/test_bench.py)."""

import statistics
import time


class CountingEncoder:
    """A tiny real image encoder (mean colour) that records the batch size of every call."""

    identity = "counting-v1"
    embed_dim = 3

    def __init__(self):
        from hica_bench.interfaces import InputSpec

        self.input_spec = InputSpec(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
        self.calls = []

    def encode(self, images):
        self.calls.append(len(images))
        return images.mean(dim=(2, 3))


def test_reference_probe_times_warm_passes_at_a_fixed_spacing():
    """The run's plain-eager yardstick (``features.ReferenceProbe``, used by ``hica-bench run``)."""
    import numpy as np

    from hica_bench.extraction.encode import REFERENCE_BATCH, ReferenceProbe, encode_images

    encoder = CountingEncoder()
    images = np.random.default_rng(0).integers(0, 255, (100, 28, 28), dtype=np.uint8)
    probe = ReferenceProbe.for_split(encoder, images, "cpu", batch_size=10, passes=3, warmup=2)
    assert probe.images_per_s is None  # nothing timed before the extraction
    features = encode_images(images, encoder, "cpu", 10, on_batch=probe)
    assert features.shape == (100, 3)
    # 10 extraction batches; a timed raw pass of the fixed 8 images after batches 3, 6 and 9 (every 10 // 3), the
    # 2 untimed warm-up passes before the first of them, none after that
    raw = [REFERENCE_BATCH] * 3
    assert encoder.calls == [10] * 3 + raw + [10] * 3 + raw[:1] + [10] * 3 + raw[:1] + [10] and len(probe.times) == 3
    assert probe.paused_s >= sum(probe.times) > 0
    assert probe.images_per_s == REFERENCE_BATCH / statistics.median(probe.times)

    # a longer split: the spacing stays at every 4th batch (not 30 // 3), so the yardstick does not depend on its size
    encoder.calls.clear()
    long = ReferenceProbe.for_split(encoder, np.tile(images, (3, 1, 1)), "cpu", batch_size=10, passes=3, warmup=0)
    encode_images(np.tile(images, (3, 1, 1)), encoder, "cpu", 10, on_batch=long)
    assert encoder.calls == ([10] * 4 + raw[:1]) * 3 + [10] * 18 and len(long.times) == 3


class LoadedEncoder(CountingEncoder):
    """Each call sleeps ``per_image`` seconds per image; ``per_image`` triples half-way, as if a neighbour started."""

    def __init__(self) -> None:
        super().__init__()
        self.per_image = 0.002

    def encode(self, images):
        time.sleep(self.per_image * len(images))
        return super().encode(images)


def test_reference_probe_pairs_each_pass_with_the_extraction_just_before_it():
    import numpy as np

    from hica_bench.extraction.encode import ReferenceProbe, encode_images

    encoder = LoadedEncoder()
    images = np.random.default_rng(0).integers(0, 255, (120, 28, 28), dtype=np.uint8)
    probe = ReferenceProbe.for_split(encoder, images, "cpu", batch_size=10, passes=4, warmup=0)

    def on_batch(count):
        probe(count)
        if probe._batches == 6:  # the machine gets busy: everything is 3x slower from here on
            encoder.per_image = 0.006

    encode_images(images, encoder, "cpu", 10, on_batch=on_batch)
    assert len(probe.pairs) == len(probe.times) == 4  # after batches 3, 6, 9, 12 (every 12 // 4); batch 1 not paired
    ratios = probe.ratios
    assert ratios == [harness * seconds / 8 for harness, seconds in probe.pairs]
    assert probe.paired_efficiency == statistics.median(ratios)
    rates = [harness for harness, _ in probe.pairs]
    assert rates[-1] < rates[0] / 2  # the extraction did slow down ...
    assert max(ratios) / min(ratios) < 1.5 and probe.spread < 0.3  # ... and each pass with it: the ratio held

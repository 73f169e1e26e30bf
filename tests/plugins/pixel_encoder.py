"""A tiny real encoder for fast CLI tests, loaded with ``hica-bench -p pixel_encoder``: mean-pooled pixels.

It is a genuine third-party-style plugin (public interfaces only); tests that are about real
pretrained encoders use the encoders plugin instead.
"""

from hica_bench import hookimpl
from hica_bench.interfaces import EncoderPair, InputSpec, PluginSpec


class PixelEncoder:
    identity = "test-pixels-16px-v1"
    input_spec = InputSpec(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    embed_dim = 3 * 16 * 16

    def encode(self, images):
        return images.reshape(len(images), -1)


@hookimpl
def hica_bench_encoders():
    return [PluginSpec("encoder", "pixels", "raw 16x16 pixels (tests)", lambda device: EncoderPair(PixelEncoder(), None, False, device))]

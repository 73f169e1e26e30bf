"""A tiny real encoder for fast CLI tests, loaded with ``hica-bench -p pixel_encoder``: mean-pooled pixels.

It is a genuine third-party-style plugin (public interfaces only); tests that are about real
pretrained encoders use the encoders plugin instead.
"""

from hica_bench import hookimpl
from hica_bench.interfaces import EncoderPair, InputSpec, PluginSpec


class PixelEncoder:
    def __init__(self, side: int = 16) -> None:
        self.identity = f"test-pixels-{side}px-v1"
        self.input_spec = InputSpec(side, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
        self.embed_dim = 3 * side * side

    def encode(self, images):
        return images.reshape(len(images), -1)


@hookimpl
def hica_bench_encoders():
    return [PluginSpec("encoder", "pixels", "raw pixels, side x side (tests)",
                       lambda device, side=16: EncoderPair(PixelEncoder(side), None, False, device)),
            PluginSpec("encoder", "pixels-doubled", "the pixels times two (tests: a forward torch.compile compiles)",
                       lambda device: EncoderPair(DoubledPixelEncoder(), None, False, device))]


class DoubledPixelEncoder(PixelEncoder):
    """The pixels times two: arithmetic, for which ``torch.compile`` (Inductor) writes and compiles a C++ kernel on the
    CPU (the plain pixels are a reshape, which needs none)."""

    def __init__(self) -> None:
        super().__init__(16)
        self.identity = "test-pixels-doubled-v1"

    def encode(self, images):
        return images.reshape(len(images), -1) * 2.0

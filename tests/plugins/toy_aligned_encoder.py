"""The conformance kit's aligned toy pair as an encoder plugin, loaded with ``hica-bench -p toy_aligned_encoder``: a
fast pair on which zero-shot runs (a random projection and hashed texts: the code path, not the accuracy)."""

from hica_bench import hookimpl
from hica_bench.interfaces import EncoderPair, PluginSpec
from hica_bench.testing import ToyImageEncoder, ToyTextEncoder


def _pair(device):
    image = ToyImageEncoder()
    return EncoderPair(image, ToyTextEncoder(), True, device, {"image": image})


@hookimpl
def hica_bench_encoders():
    return [PluginSpec("encoder", "toy-aligned", "the conformance kit's aligned toy pair (tests)", _pair)]

"""The conformance kit's aligned toy pair as an encoder plugin, loaded with ``hica-bench -p toy_aligned_encoder``: a
fast pair on which zero-shot runs (a random projection and hashed texts: the code path, not the accuracy).

``toy-described`` is the same pair with a ``describe`` (so a run builds it only when it needs the models); every
build is counted in :data:`BUILDS`, and ``lie=True`` makes its card disagree with what it builds (a broken plugin)."""

from hica_bench import hookimpl
from hica_bench.interfaces import EncoderCard, EncoderPair, PluginSpec
from hica_bench.testing import ToyImageEncoder, ToyTextEncoder

BUILDS: list[str] = []  #: the device of each build of toy-described, in order


def _pair(device):
    image = ToyImageEncoder()
    return EncoderPair(image, ToyTextEncoder(), True, device, {"image": image})


def _described(device, lie=False):
    BUILDS.append(device)
    return _pair(device)


def _card(device, lie=False):
    return EncoderCard(ToyImageEncoder.identity + (":not-what-is-built" if lie else ""), ToyImageEncoder.input_spec,
                       ToyTextEncoder.identity, aligned=True)


@hookimpl
def hica_bench_encoders():
    return [PluginSpec("encoder", "toy-aligned", "the conformance kit's aligned toy pair (tests)", _pair),
            PluginSpec("encoder", "toy-described", "toy-aligned with a describe hook (tests)", _described,
                       describe=_card)]

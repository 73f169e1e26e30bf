"""A cheap real encoder at 224 px input, loaded with ``hica-bench -p pooled_encoder``: the first channel
average-pooled to 4 × 4 (16 numbers per image).

Its input is full-size (224 px) but its output tiny, so a run's memory is the harness's own (images
read, batches preprocessed), not the features'. A genuine third-party-style plugin (public interfaces only).
"""

from hica_bench import hookimpl
from hica_bench.interfaces import EncoderPair, InputSpec, PluginSpec


class PooledEncoder:
    identity = "test-pooled-224px-4x4-v1"
    input_spec = InputSpec(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    embed_dim = 16

    def encode(self, images):
        import torch.nn.functional as F

        return F.adaptive_avg_pool2d(images[:, :1], 4).reshape(len(images), -1)


@hookimpl
def hica_bench_encoders():
    return [PluginSpec("encoder", "pooled224", "first channel average-pooled to 4x4 at 224 px input (tests)",
                       lambda device: EncoderPair(PooledEncoder(), None, False, device))]

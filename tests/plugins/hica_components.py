"""A user's own HiCA building blocks, loaded with ``hica-bench -p hica_components`` (public interfaces only): an ROI
extractor and a loss that HiCA uses by name (``hica:roi=corners:loss_global=cosine-ce``).

Both count their calls in a file named by ``$HICA_TEST_COMPONENT_CALLS`` (when set), so a test can see that a run
really called them, not just that it built them.
"""

import os

import torch
import torch.nn.functional as F

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec


def _count(what: str) -> None:
    path = os.environ.get("HICA_TEST_COMPONENT_CALLS")
    if path:
        with open(path, "a") as handle:
            handle.write(what + "\n")


class Corners:
    """K boxes of half the image side, at the corners (then the centre), the same for every image."""

    def __init__(self, fraction: float = 0.5):
        self.fraction = fraction

    def extract(self, images, k, dense=None):
        _count("corners")
        size = images.shape[-1]
        side = max(1, int(size * self.fraction))
        anchors = [(0, 0), (size - side, 0), (0, size - side), (size - side, size - side), ((size - side) // 2,) * 2]
        boxes = [(x, y, x + side, y + side) for x, y in (anchors * k)[:k]]
        return torch.tensor(boxes, dtype=torch.int64, device=images.device).expand(len(images), -1, -1).clone()


class CosineCE(torch.nn.Module):
    """Cross-entropy of cosine logits (image -> class text only): a one-directional stand-in for the global InfoNCE."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, *, image_embeddings, text_embeddings, labels):
        _count("cosine-ce")
        logits = F.normalize(image_embeddings, dim=-1) @ F.normalize(text_embeddings, dim=-1).T / self.temperature
        return F.cross_entropy(logits, labels.long())


@hookimpl
def hica_bench_roi_extractors():
    return [PluginSpec("roi-extractor", "corners", "four corner boxes (tests)", Corners)]


@hookimpl
def hica_bench_losses():
    return [PluginSpec("loss", "cosine-ce", "cosine cross-entropy, image -> text (tests)", CosineCE)]

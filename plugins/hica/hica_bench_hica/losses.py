"""HiCA's three alignment losses: ``L = L_global + λ1·L_local + λ2·L_cross`` (arXiv 2501.09294, stage 2).

Each loss is an object without parameters of its own, called with keyword tensors (the
:class:`hica_bench.interfaces.Loss` contract), that returns a scalar; torch is imported when a loss is called, so the
module is light to import (the registry loads its specs). Embeddings are L2-normalised inside, so callers may pass raw projections;
similarities are cosine similarities. Shapes: B images, C classes, D embedding width, K regions per image,
L local descriptors per class. ``labels`` are class indices in [0, C).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hica_bench.errors import UserError
from hica_bench.interfaces import Option, PluginSpec

if TYPE_CHECKING:
    import torch


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., D) x (M, D) -> (..., M) cosine similarities, computed in float32."""
    import torch.nn.functional as F

    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


class GlobalInfoNCE:
    """InfoNCE between whole-image embeddings and one text embedding per class.

    ``loss(image_embeddings=(B, D), text_embeddings=(C, D), labels=(B,) int64) -> scalar``, with
    logits = cos(image, text) / temperature, shape (B, C).

    * image -> text: cross-entropy of each image's logits row against its label.
    * text -> image (``symmetric=True``): for each class c present in the batch, InfoNCE over the batch
      images (softmax over column c of the logits) with every image of class c a positive; the class's
      loss is the mean of -log softmax over its positives (multi-positive, SupCon-style). Averaged over
      the classes present, so classes without images contribute nothing (and cause no NaN).

    The result is the image -> text term, or the mean of both directions when symmetric. With one image
    per class and labels = arange(C) it is exactly the CLIP loss.
    """

    def __init__(self, temperature: float = 0.07, symmetric: bool = True):
        self.temperature = _check_temperature(temperature)
        self.symmetric = bool(symmetric)

    def __call__(self, *, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        labels = labels.long()
        logits = _cosine(image_embeddings, text_embeddings) / self.temperature  # (B, C)
        image_to_text = F.cross_entropy(logits, labels)
        if not self.symmetric:
            return image_to_text
        positives = F.one_hot(labels, logits.shape[1]).to(logits.dtype)  # (B, C)
        log_prob = logits.log_softmax(dim=0)  # over the images, per class
        counts = positives.sum(0)
        per_class = -(log_prob * positives).sum(0) / counts.clamp(min=1)
        text_to_image = per_class[counts > 0].mean()
        return (image_to_text + text_to_image) / 2


class LocalInfoNCE:
    """Multi-positive InfoNCE between region embeddings and fine-grained (local) text descriptors.

    ``loss(roi_embeddings=(B, K, D), local_text_embeddings=(C, L, D), labels=(B,) int64,
    local_mask=(C, L) bool or None) -> scalar``. ``local_mask[c, l]`` is True for a real descriptor and
    False for a padded slot (classes may have different numbers of descriptors; None = all real).
    Each region r of image i is scored against every real descriptor (c, l), s = cos / temperature;
    its positives are the descriptors of its own class y_i, and its loss is
    ``-log( sum_{l in pos} exp(s) / sum_{all real (c, l)} exp(s) )``, averaged over regions and images.
    Every class that occurs in ``labels`` must have at least one real descriptor.
    """

    def __init__(self, temperature: float = 0.07):
        self.temperature = _check_temperature(temperature)

    def __call__(self, *, roi_embeddings: torch.Tensor, local_text_embeddings: torch.Tensor,
                 labels: torch.Tensor, local_mask: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        labels = labels.long()
        n_classes, n_local, _ = local_text_embeddings.shape
        if local_mask is None:
            local_mask = torch.ones(n_classes, n_local, dtype=torch.bool, device=local_text_embeddings.device)
        local_mask = local_mask.to(local_text_embeddings.device, torch.bool)
        valid = local_mask.reshape(-1)  # (C*L,)
        if not local_mask.any(dim=1)[labels].all():
            raise ValueError("every class in `labels` needs at least one unmasked local descriptor")
        scores = _cosine(roi_embeddings, local_text_embeddings.reshape(n_classes * n_local, -1))
        scores = scores / self.temperature  # (B, K, C*L)
        slot_class = torch.arange(n_classes, device=valid.device).repeat_interleave(n_local)  # (C*L,)
        positive = (slot_class[None, :] == labels[:, None]) & valid[None, :]  # (B, C*L)
        all_terms = scores.masked_fill(~valid, float("-inf")).logsumexp(dim=-1)
        pos_terms = scores.masked_fill(~positive[:, None, :], float("-inf")).logsumexp(dim=-1)
        return (all_terms - pos_terms).mean()


class CrossMargin:
    """Hinge pushing mismatched image/text similarities below the matched one by a margin δ.

    ``loss(image_embeddings=(B, D), text_embeddings=(C, D), labels=(B,) int64) -> scalar``
    = mean over all (i, j) with j != y_i of ``max(0, δ + s(i, j) - s(i, y_i))``, s = cosine similarity.
    Exactly zero when every matched similarity exceeds each of its image's mismatched ones by more than δ;
    zero (still connected to the graph) when C = 1.
    """

    def __init__(self, margin: float = 0.2):
        if margin < 0:
            raise UserError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)

    def __call__(self, *, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        labels = labels.long()
        sims = _cosine(image_embeddings, text_embeddings)  # (B, C)
        matched = sims.gather(1, labels[:, None])  # (B, 1)
        mismatched = ~F.one_hot(labels, sims.shape[1]).bool()
        hinge = (self.margin + sims - matched).clamp(min=0)
        if not mismatched.any():
            return hinge.sum() * 0
        return hinge[mismatched].mean()


SPECS = [
    PluginSpec("loss", "global-infonce", "InfoNCE between image embeddings and class text embeddings (symmetric)",
               GlobalInfoNCE, {"temperature": Option(low=0, low_open=True)}),
    PluginSpec("loss", "local-infonce", "Multi-positive InfoNCE between ROI embeddings and fine-grained descriptors",
               LocalInfoNCE, {"temperature": Option(low=0, low_open=True)}),
    PluginSpec("loss", "cross-margin", "Hinge: mismatched image/text similarity at least δ below the matched one",
               CrossMargin, {"margin": Option(low=0)}),
]

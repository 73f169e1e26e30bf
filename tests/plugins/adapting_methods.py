"""Methods that adapt the encoder, and a tiny torch encoder to adapt, for the tests of the adapting contract
(``hica-bench -p adapting_methods``). A genuine third-party-style plugin: public interfaces and helpers only.

- encoder ``torch-pixels``: 4x4-average-pooled pixels through a fixed random linear layer (a torch module, listed in
  ``modules['image']``), with the conformance kit's toy text encoder (not aligned);
- ``reveal``: nearest class mean on the frozen features; ``fit_info`` records a digest of the test features it was
  handed (``tag`` only tells two instances apart in one grid);
- ``shift``: adapts a copy of the encoder (adds ``amount`` to its bias) and exposes it as ``encoder_``;
- ``shift-hidden``: adapts a copy the same way but exposes nothing (the harness must hand it the frozen features);
- ``in-place``: adds to the frozen encoder's own bias (the harness must fail the cell);
- ``same-identity``: exposes an adapted copy under the frozen encoder's identity (the harness must fail the cell);
- ``train-mode``: leaves the frozen encoder in train mode (the harness must fail the cell and put it back in eval).
"""

import hashlib

import numpy as np
import torch

from hica_bench import hookimpl
from hica_bench.adapting import AdaptedImageEncoder, adaptable_copy, weights_digest
from hica_bench.interfaces import EncoderPair, InputSpec, PluginSpec
from hica_bench.testing import ToyTextEncoder


class TorchPixels(torch.nn.Module):
    input_spec = InputSpec(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    embed_dim = 24

    def __init__(self) -> None:
        super().__init__()
        self.identity = "test-torch-pixels-v1"
        self.linear = torch.nn.Linear(48, self.embed_dim)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            self.linear.weight.copy_(torch.randn(self.embed_dim, 48, generator=generator) / 7)
            self.linear.bias.zero_()
        self.requires_grad_(False)

    def encode(self, images):
        return self.linear(torch.nn.functional.avg_pool2d(images, 4).flatten(1))


class Reveal:
    needs = frozenset({"image_features"})

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    def fit(self, task):
        x = task.support_features.astype(np.float64)
        self.means_ = np.stack([x[task.support_labels == c].mean(axis=0) for c in range(task.n_classes)])
        self.fit_info_ = {}
        return self

    def predict_proba(self, features):
        self.fit_info_["test_features"] = hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest()
        distances = ((features[:, None, :] - self.means_[None]) ** 2).sum(-1)
        logits = -(distances - distances.min(axis=1, keepdims=True)) / max(distances.std(), 1e-9)
        proba = np.exp(logits)
        return proba / proba.sum(axis=1, keepdims=True)


class Shift(Reveal):
    needs = frozenset({"image_features", "encoders"})
    expose, same_identity = True, False

    def __init__(self, amount: float = 0.5) -> None:
        super().__init__()
        self.amount = amount

    def fit(self, task):
        super().fit(task)
        image, module = adaptable_copy(task.encoders)
        with torch.no_grad():
            module.linear.bias.add_(self.amount)
        if self.expose:
            identity = task.encoders.image.identity if self.same_identity else (
                f"{task.encoders.image.identity}+shift:sha256={weights_digest(module.named_parameters())}")
            self.encoder_ = AdaptedImageEncoder(image, identity)
        return self


class ShiftHidden(Shift):
    expose = False


class SameIdentity(Shift):
    same_identity = True


class InPlace(Reveal):
    needs = frozenset({"image_features", "encoders"})

    def fit(self, task):
        with torch.no_grad():
            task.encoders.modules["image"].linear.bias.add_(1.0)
        return super().fit(task)


class TrainMode(Reveal):
    needs = frozenset({"image_features", "encoders"})

    def __init__(self) -> None:  # no options (Reveal's tag is not one of this method's)
        super().__init__()

    def fit(self, task):
        task.encoders.modules["image"].train()  # left in train mode: later passes would not be the frozen encoder's
        return super().fit(task)


@hookimpl
def hica_bench_encoders():
    def build(device):
        image = TorchPixels().to(device)
        return EncoderPair(image, ToyTextEncoder(), False, device, {"image": image})

    return [PluginSpec("encoder", "torch-pixels", "pooled pixels through a fixed linear layer (tests)", build)]


@hookimpl
def hica_bench_methods():
    return [PluginSpec("method", "reveal", "nearest class mean; records the test features' digest (tests)", Reveal),
            PluginSpec("method", "shift", "adapts a copy of the encoder and exposes it (tests)", Shift,
                       search={"amount": (0.5, 0.0, 2.0)}),
            PluginSpec("method", "shift-hidden", "adapts a copy, exposes nothing (tests)", ShiftHidden),
            PluginSpec("method", "same-identity", "exposes an adapted copy under the frozen identity (tests)",
                       SameIdentity),
            PluginSpec("method", "in-place", "changes the frozen encoder's weights (tests)", InPlace),
            PluginSpec("method", "train-mode", "leaves the frozen encoder in train mode (tests)", TrainMode)]

"""Fine-tuning baseline: LP-FT (Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022), the fine-tuning the MICCAI 2024 few-shot medical VLM benchmark reports and MedIMeta
finds competitive beyond about 5 shots.

1. LP: the linear probe (:class:`~hica_bench_baselines.frozen.LinearProbe`: logistic regression on the L2-normalised
   frozen support features, C by cross-validation on the support set) initialises the head.
2. FT: a private copy of the image encoder (:func:`hica_bench.adapting.adaptable_copy`) has its last ``blocks``
   blocks and everything after them (:func:`hica_bench.adapting.tail_parameters`; ``full=true``: every weight)
   trained together with the head, cross-entropy on the support images, AdamW, ``steps`` steps of at most
   ``batch_size`` images, cosine learning-rate decay. Normalisation layers keep their running statistics (eval mode:
   a 2-image batch would otherwise replace ImageNet's), only their affine weights train.

Prediction: softmax of the head over the L2-normalised features of the adapted encoder, which the harness computes
for the test images (``encoder_``). Defaults and why: ``steps=50`` and ``lr=1e-4``: at 20 shots on 2 CPU cores a
cell then takes about a minute with EfficientNet-Lite0 (each step runs the whole encoder forward); LP-FT's point is
a small learning rate from a good head, so 50 steps move the tail without forgetting. ``blocks=1``: the last stage of
a CNN or the last transformer block, plus the head layers after it.
"""

from __future__ import annotations

import math

import numpy as np

from hica_bench.errors import NotApplicable
from hica_bench.interfaces import FewShotTask, Option, PluginSpec
from hica_bench_baselines.common import POSITIVE, softmax_numpy
from hica_bench_baselines.frozen import LinearProbe


class FineTune:
    """LP-FT on the image encoder (see the module docstring)."""

    needs = frozenset({"image_features", "encoders"})

    def __init__(self, blocks: int = 1, full: bool = False, steps: int = 50, lr: float = 1e-4, head_lr: float = 1e-3,
                 batch_size: int = 32, weight_decay: float = 0.0) -> None:
        self.blocks, self.full, self.steps, self.lr, self.head_lr = blocks, full, steps, lr, head_lr
        self.batch_size, self.weight_decay = batch_size, weight_decay

    def fit(self, task: FewShotTask) -> "FineTune":
        import torch

        from hica_bench.adapting import AdaptedImageEncoder, adaptable_copy, tail_parameters, weights_digest
        from hica_bench.data import preprocess

        if "image" not in task.encoders.modules:
            raise NotApplicable("the encoder pair exposes no image module (modules['image']) to fine-tune")
        probe = LinearProbe().fit(task)  # LP: the head starts from the cross-validated linear probe
        encoder, module = adaptable_copy(task.encoders)
        named = list(module.named_parameters()) if self.full else tail_parameters(module, self.blocks)
        for _, parameter in named:
            parameter.requires_grad_(True)
        head = torch.nn.Linear(encoder.embed_dim, task.n_classes).to(task.device)
        with torch.no_grad():
            coef = np.asarray(probe.model_.coef_, dtype=np.float32)
            bias = np.asarray(probe.model_.intercept_, dtype=np.float32)
            if task.n_classes == 2 and coef.shape[0] == 1:  # scikit-learn's binary form: one row, logit of class 1
                coef, bias = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
            head.weight.copy_(torch.from_numpy(coef))
            head.bias.copy_(torch.from_numpy(bias))
        images = np.asarray(task.train_images[np.sort(task.support_indices)])
        images = images[np.argsort(np.argsort(task.support_indices))]  # back to support order
        x = preprocess(images, encoder.input_spec, task.device)
        y = torch.from_numpy(np.asarray(task.support_labels, dtype=np.int64)).to(task.device)
        optimiser = torch.optim.AdamW([{"params": [p for _, p in named], "lr": self.lr},
                                       {"params": head.parameters(), "lr": self.head_lr}], weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / self.steps)))
        generator = torch.Generator().manual_seed(int(task.seed))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if task.device.startswith("cuda") else None
        self.loss_history_ = []
        for _ in range(self.steps):
            batch = torch.randperm(len(x), generator=generator)[: self.batch_size].to(task.device)
            with autocast if autocast is not None else torch.enable_grad():
                features = torch.nn.functional.normalize(encoder.encode(x[batch]).float(), dim=1)
                loss = torch.nn.functional.cross_entropy(head(features), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            self.loss_history_.append(float(loss.detach()))
        for _, parameter in named:
            parameter.requires_grad_(False)
        self.linear_ = head.eval()
        tag = "full" if self.full else f"last{self.blocks}"
        self.encoder_ = AdaptedImageEncoder(
            encoder, f"{task.encoders.image.identity}+finetune-{tag}:sha256={weights_digest(named)}")
        self.fit_info_ = {"C": probe.C_, "trained_tensors": len(named),
                          "trained_parameters": int(sum(p.numel() for _, p in named)),
                          "loss_first_last": [self.loss_history_[0], self.loss_history_[-1]] if self.loss_history_ else []}
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(features, dtype=np.float32)), dim=1)
            return softmax_numpy(self.linear_.cpu()(x))

    def head_(self, features):
        """Differentiable logits from (N, D) torch features of the fine-tuned encoder: the trained linear head on
        the L2-normalised features."""
        import torch

        return self.linear_.cpu()(torch.nn.functional.normalize(features.float().cpu(), dim=1))


SPECS = [
    PluginSpec("method", "finetune", "LP-FT fine-tuning: linear probe, then the image encoder's last blocks "
               "(full=true: all of it) and the head trained together; predicts through the adapted encoder", FineTune,
               {"blocks": Option(low=1), "steps": Option(low=1), "lr": POSITIVE, "head_lr": POSITIVE,
                "batch_size": Option(low=1), "weight_decay": Option(low=0)},
               search={"lr": (1e-4, 1e-5, 1e-3)}),  # 3 fine-tunings per cell (+ the refit), each as costly as one
]

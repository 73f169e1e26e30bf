"""Pieces the baselines share: feature normalisation, the zero-shot text classifier, seeded training helpers."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from hica_bench.errors import NotApplicable
from hica_bench.interfaces import FewShotTask, Option

#: What an option that must be > 0 accepts (a temperature, a learning rate, a logit scale).
POSITIVE = Option(low=0, low_open=True)

#: Prompt ensemble for zero-shot (CLIP-style); ``{}`` is the class name from the dataset. A dataset's prompt file
#: (``DATASET:prompts=FILE``, ``task.prompts``) replaces it with its own ``templates``.
TEMPLATES = (
    "a medical image of {}.",
    "a photo of {}.",
    "an image showing {}.",
    "a scan with findings of {}.",
    "{}.",
)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def require_aligned(task: FewShotTask, method: str) -> None:
    """NotApplicable unless the task comes with an aligned image-text pair (the runner checks ``needs`` too)."""
    if not task.encoders.aligned or task.encoders.text is None:
        raise NotApplicable(f"{method} needs an aligned image-text encoder pair")


def templates(task: FewShotTask) -> tuple[str, ...]:
    """The prompt ensemble of ``task``: its prompt file's templates when it gives some, else :data:`TEMPLATES`."""
    return task.prompts.templates if task.prompts is not None and task.prompts.templates else TEMPLATES


def class_text_embeddings(task: FewShotTask) -> np.ndarray:
    """The zero-shot classifier: (C, D) L2-normalised mean of each class's text embeddings over the prompt ensemble
    (:func:`templates`) with the task's class names (a prompt file's ``classnames`` when it gives them)."""
    ensemble = templates(task)
    texts = [template.format(name) for name in task.class_names for template in ensemble]
    embedded = l2_normalise(task.encoders.text.encode(texts))
    per_class = embedded.reshape(task.n_classes, len(ensemble), -1).mean(axis=1)
    text = l2_normalise(per_class)
    if task.support_features is not None and text.shape[1] != task.support_features.shape[1]:
        raise ValueError(f"image features are {task.support_features.shape[1]}-d but text embeddings {text.shape[1]}-d")
    return text


def few_shot_epochs(k: int) -> int:
    """CoOp's few-shot schedule (also the MICCAI 2024 medical few-shot benchmark's): 50 epochs at 1 shot,
    100 at 2-4 shots, 200 from 5 shots on (CoOp reports 8 and 16 shots at 200)."""
    return 50 if k == 1 else 100 if k <= 4 else 200


def generator(seed: int):
    """A CPU torch generator seeded from the task seed (all random draws of a method come from it)."""
    import torch

    return torch.Generator().manual_seed(int(seed))


def minibatches(n: int, batch_size: int, gen) -> Iterator:
    """One epoch of shuffled index batches (the last one may be smaller)."""
    import torch

    order = torch.randperm(n, generator=gen)
    yield from order.split(batch_size)


def dassl_schedule(optimizer, epochs: int, warmup_lr: float = 1e-5):
    """CoOp's (Dassl) learning-rate schedule, stepped once per epoch: one warm-up epoch at the constant
    ``warmup_lr``, then cosine annealing of the base rate over ``epochs``."""
    import torch

    base = optimizer.param_groups[0]["lr"]

    def factor(epoch: int) -> float:
        return warmup_lr / base if epoch < 1 else 0.5 * (1 + math.cos(math.pi * epoch / epochs))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def softmax_numpy(logits) -> np.ndarray:
    """Row-wise softmax of a torch tensor, in float64, as numpy."""
    import torch

    return torch.softmax(logits.detach().double(), dim=1).cpu().numpy()

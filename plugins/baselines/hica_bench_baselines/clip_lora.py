"""CLIP-LoRA (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPR Workshops 2024):
low-rank updates of the query, key and value projections in every attention layer of both towers of an aligned CLIP
pair, trained with cross-entropy on the support set, the class texts going through the adapted text tower.

The paper's settings are the defaults: rank 2, alpha 1, learning rate 2e-4 (AdamW, weight decay 1e-2, cosine
decay), batch 32, 500 × k iterations (k shots per class), the template "a photo of a {}." (or a prompt file's
templates). Deviations, on purpose: no LoRA dropout (the paper's 0.25 acts on a layer's input, and the update here is
in weight space, see below) and no augmentation of the support images (they are preprocessed once, as the harness
preprocesses the test images).

Why a small wrapper and not peft: peft's LoRA replaces ``nn.Linear`` layers, while open_clip's attention
(``nn.MultiheadAttention`` or its own ``Attention``) keeps query, key and value in one packed ``in_proj_weight``,
which peft cannot give a separate low-rank update per projection. :class:`PackedLoRA` is a torch parametrization of
that packed weight, ``W + (alpha / r) · [B_q A_q; B_k A_k; B_v A_v]`` (B zero-initialised, so training starts from
the pretrained model), and the same parametrization covers separate ``q_proj``/``k_proj``/``v_proj`` Linear layers
(Hugging Face CLIP). After training the updates are merged into the weights, so the test images run at the frozen
model's speed. Not applicable to unaligned pairs: CLIP-LoRA classifies by image-text similarity in one joint space.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from hica_bench.errors import NotApplicable
from hica_bench.interfaces import FewShotTask, Option, PluginSpec
from hica_bench_baselines.common import POSITIVE, require_aligned, softmax_numpy

PAPER_TEMPLATE = ("a photo of a {}.",)


def _packed_lora(rows: int, columns: int, parts: int, rank: int, alpha: float, generator):
    import torch

    class PackedLoRA(torch.nn.Module):
        """``W`` -> ``W + scale · concat_i(B_i A_i)`` over ``parts`` equal row blocks of ``W`` (q, k, v)."""

        def __init__(self) -> None:
            super().__init__()
            self.scale = alpha / rank
            self.a = torch.nn.ParameterList()
            self.b = torch.nn.ParameterList()
            for _ in range(parts):
                a = torch.empty(rank, columns)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                self.a.append(torch.nn.Parameter(a))
                self.b.append(torch.nn.Parameter(torch.zeros(rows // parts, rank)))

        def forward(self, weight):
            delta = torch.cat([b @ a for a, b in zip(self.a, self.b)])
            return weight + self.scale * delta.to(weight.dtype)

    return PackedLoRA()


def add_lora(model, rank: int, alpha: float, seed: int) -> list:
    """Puts a LoRA parametrization on every packed ``in_proj_weight`` and every ``q_proj``/``k_proj``/``v_proj``
    Linear weight of ``model``; returns the (module, attribute) pairs parametrized."""
    import torch
    from torch.nn.utils import parametrize

    generator = torch.Generator().manual_seed(int(seed))
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(getattr(module, "in_proj_weight", None), torch.nn.Parameter):
            weight = module.in_proj_weight
            lora = _packed_lora(weight.shape[0], weight.shape[1], 3, rank, alpha, generator).to(weight.device)
            parametrize.register_parametrization(module, "in_proj_weight", lora)
            done.append((module, "in_proj_weight"))
        elif isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj"):
            lora = _packed_lora(module.weight.shape[0], module.weight.shape[1], 1, rank, alpha, generator)
            parametrize.register_parametrization(module, "weight", lora.to(module.weight.device))
            done.append((module, "weight"))
    return done


class ClipLoRA:
    """CLIP-LoRA (see the module docstring)."""

    needs = frozenset({"image_features", "aligned_encoders", "class_texts", "encoders"})

    def __init__(self, rank: int = 2, alpha: float = 1.0, lr: float = 2e-4, iterations: int = 0, batch_size: int = 32,
                 weight_decay: float = 1e-2) -> None:
        self.rank, self.alpha, self.lr, self.iterations = rank, alpha, lr, iterations
        self.batch_size, self.weight_decay = batch_size, weight_decay

    def fit(self, task: FewShotTask) -> "ClipLoRA":
        import torch
        from torch.nn.utils import parametrize

        from hica_bench.adapting import AdaptedImageEncoder, adaptable_copy, weights_digest
        from hica_bench.data import preprocess
        from hica_bench_baselines.common import templates

        require_aligned(task, "clip-lora")
        if "model" not in task.encoders.modules or not hasattr(task.encoders.text, "embed"):
            raise NotApplicable("clip-lora needs an aligned pair that exposes its model (modules['model']) and a text "
                                "encoder with embed(); this pair does not")
        memo: dict = {}
        image, model = adaptable_copy(task.encoders, "model", memo)
        text = copy.deepcopy(task.encoders.text, memo)  # the same copied model: LoRA on both towers of one CLIP
        parametrized = add_lora(model, self.rank, self.alpha, task.seed)
        if not parametrized:
            raise NotApplicable("clip-lora found no query/key/value projections (packed in_proj_weight, or "
                                "q_proj/k_proj/v_proj) in this model")
        lora = [p for module, attribute in parametrized
                for p in module.parametrizations[attribute][0].parameters()]
        ensemble = templates(task) if task.prompts is not None and task.prompts.templates else PAPER_TEMPLATE
        prompts = [template.format(name) for name in task.class_names for template in ensemble]
        images = np.asarray(task.train_images[np.sort(task.support_indices)])
        images = images[np.argsort(np.argsort(task.support_indices))]
        x = preprocess(images, image.input_spec, task.device)
        y = torch.from_numpy(np.asarray(task.support_labels, dtype=np.int64)).to(task.device)
        iterations = self.iterations or 500 * task.k
        optimiser = torch.optim.AdamW(lora, lr=self.lr, weight_decay=self.weight_decay, betas=(0.9, 0.999))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, iterations, eta_min=1e-6)
        scale = float(getattr(model, "logit_scale", torch.tensor(math.log(100.0))).exp().clamp(max=100))
        generator = torch.Generator().manual_seed(int(task.seed))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if task.device.startswith("cuda") else None
        self.loss_history_ = []
        for _ in range(iterations):
            batch = torch.randperm(len(x), generator=generator)[: self.batch_size].to(task.device)
            with autocast if autocast is not None else torch.enable_grad():
                classes = self._class_embeddings(text, prompts, len(ensemble), torch)
                features = torch.nn.functional.normalize(image.encode(x[batch]).float(), dim=1)
                loss = torch.nn.functional.cross_entropy(scale * features @ classes.T, y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            self.loss_history_.append(float(loss.detach()))
        with torch.no_grad():
            digest = weights_digest([(f"{i}", p) for i, p in enumerate(lora)])
            for module, attribute in parametrized:  # merge: the test images run at the frozen model's speed
                parametrize.remove_parametrizations(module, attribute, leave_parametrized=True)
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            self.class_embeddings_ = self._class_embeddings(text, prompts, len(ensemble), torch).float().cpu()
        self.scale_ = scale
        self.encoder_ = AdaptedImageEncoder(
            image, f"{task.encoders.image.identity}+clip-lora-r{self.rank}-a{self.alpha:g}:sha256={digest}")
        self.fit_info_ = {"iterations": iterations, "lora_parameters": int(sum(p.numel() for p in lora)),
                          "projections": len(parametrized), "templates": list(ensemble),
                          "loss_first_last": [self.loss_history_[0], self.loss_history_[-1]]}
        return self

    @staticmethod
    def _class_embeddings(text, prompts: list[str], per_class: int, torch):
        embedded = torch.nn.functional.normalize(text.embed(prompts).float(), dim=1)
        return torch.nn.functional.normalize(embedded.reshape(-1, per_class, embedded.shape[1]).mean(1), dim=1)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        import torch

        x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(features, dtype=np.float32)), dim=1)
        return softmax_numpy(self.scale_ * x @ self.class_embeddings_.T)

    def head_(self, features):
        """Differentiable logits from (N, D) torch features of the adapted image tower: scaled cosine to the class
        texts through the adapted text tower."""
        import torch

        x = torch.nn.functional.normalize(features.float().to(self.class_embeddings_.device), dim=1)
        return self.scale_ * x @ self.class_embeddings_.T


SPECS = [
    PluginSpec("method", "clip-lora", "CLIP-LoRA: low-rank updates of q/k/v in both towers of an aligned pair "
               "(the paper's rank 2, lr 2e-4, 500 x shots iterations; iterations=N overrides); aligned pairs only",
               ClipLoRA, {"rank": Option(low=1), "alpha": POSITIVE, "lr": POSITIVE, "iterations": Option(low=0),
                          "batch_size": Option(low=1), "weight_decay": Option(low=0)},
               search={"lr": (2e-4, 1e-4, 5e-4)}),  # 3 LoRA trainings per cell (+ the refit)
]

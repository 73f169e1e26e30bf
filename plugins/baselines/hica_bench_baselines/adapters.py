"""Few-shot CLIP adapters on frozen features: Tip-Adapter, Tip-Adapter-F, CLIP-Adapter, LP++.

All four blend the zero-shot classifier (:func:`~hica_bench_baselines.common.class_text_embeddings`, the
same prompt ensemble as ``zero-shot``) with what they learn from the support set, so they need an aligned
image-text pair. The harness hands over only the support set (no validation split); what each method does
where its paper validates is stated in its docstring and in docs/plugins/baselines.md.
"""

from __future__ import annotations

import numpy as np

from hica_bench.interfaces import FewShotTask, Option, PluginSpec
from hica_bench_baselines.common import (
    POSITIVE,
    class_text_embeddings,
    dassl_schedule,
    few_shot_epochs,
    generator,
    l2_normalise,
    minibatches,
    require_aligned,
    softmax_numpy,
)

ALIGNED = frozenset({"aligned_encoders", "class_texts", "image_features"})


class TipAdapter:
    """Tip-Adapter (Zhang et al., ECCV 2022), training-free.

    Cache keys = L2-normalised support features, values = one-hot labels. For a normalised test feature f:
    ``logits = logit_scale * f Wᵀ + alpha * exp(-beta * (1 - f Kᵀ)) V`` (W: zero-shot text classifier).
    Defaults: the paper's alpha = 1, beta = 5.5. The paper then searches alpha and beta on a validation
    split; here ``search=true`` does that search by leave-one-out on the support set (each support sample
    scored against the cache without its own key) over the paper's ImageNet grid (beta: 200 steps on
    [0.1, 7), alpha: 20 steps on [0.1, 3)), best accuracy, ties by lower log-loss; at 1 shot there is
    nothing to leave out and the defaults stay. The chosen values are ``alpha_`` and ``beta_``.
    """

    needs = ALIGNED
    BETAS = 0.1 + np.arange(200) * (7.0 - 0.1) / 200
    ALPHAS = 0.1 + np.arange(20) * (3.0 - 0.1) / 20

    def __init__(self, alpha: float = 1.0, beta: float = 5.5, logit_scale: float = 100.0, search: bool = False) -> None:
        self.alpha, self.beta, self.logit_scale, self.search = alpha, beta, logit_scale, search

    def fit(self, task: FewShotTask) -> "TipAdapter":
        require_aligned(task, "tip-adapter")
        self.text_ = class_text_embeddings(task)
        self.keys_ = l2_normalise(task.support_features)
        self.values_ = np.eye(task.n_classes)[task.support_labels]
        self.alpha_, self.beta_ = self.alpha, self.beta
        if self.search and task.k >= 2:
            self.alpha_, self.beta_ = self._leave_one_out(task.support_labels)
        searched = self.search and task.k >= 2
        self.fit_info_ = {"alpha": float(self.alpha_), "beta": float(self.beta_),
                          "validation": "leave-one-out search on the support set" if searched else "none: paper defaults"}
        return self

    def _leave_one_out(self, labels: np.ndarray) -> tuple[float, float]:
        from scipy.special import log_softmax

        zero_shot = self.logit_scale * self.keys_ @ self.text_.T
        similarity = self.keys_ @ self.keys_.T
        best = (-1.0, np.inf, self.alpha, self.beta)
        for beta in self.BETAS:
            affinity = np.exp(-beta * (1 - similarity))
            np.fill_diagonal(affinity, 0.0)  # leave the sample's own key out
            cache = affinity @ self.values_
            for alpha in self.ALPHAS:
                logits = zero_shot + alpha * cache
                acc = float(np.mean(logits.argmax(1) == labels))
                loss = float(-log_softmax(logits, axis=1)[np.arange(len(labels)), labels].mean())
                if acc > best[0] or (acc == best[0] and loss < best[1]):
                    best = (acc, loss, float(alpha), float(beta))
        return best[2], best[3]

    def logits(self, features: np.ndarray) -> np.ndarray:
        f = l2_normalise(features)
        cache = np.exp(-self.beta_ * (1 - f @ self.keys_.T)) @ self.values_
        return self.logit_scale * f @ self.text_.T + self.alpha_ * cache

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        from scipy.special import softmax

        return softmax(self.logits(features), axis=1)

    def head_(self, features):
        """Differentiable :meth:`logits` from (N, D) torch features (explain's Grad-CAM target)."""
        import torch

        f = torch.nn.functional.normalize(features.float(), dim=1)

        def tensor(value):
            return torch.as_tensor(np.asarray(value), dtype=torch.float32, device=f.device)

        cache = torch.exp(-self.beta_ * (1 - f @ tensor(self.keys_).T)) @ tensor(self.values_)
        return self.logit_scale * f @ tensor(self.text_).T + self.alpha_ * cache


class TipAdapterF:
    """Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned (paper: 20 epochs, AdamW lr 1e-3, eps 1e-4,
    cosine annealing per step, batch 256, cross-entropy on the Tip-Adapter logits; values stay one-hot).

    Deviations: frozen un-augmented support features (the paper trains on augmented images); alpha and beta
    stay at the paper's defaults (1, 5.5) instead of the paper's search on a validation split after
    training, and the final keys are used (no best-epoch selection, which needs a validation split).
    """

    needs = ALIGNED

    def __init__(self, alpha: float = 1.0, beta: float = 5.5, lr: float = 1e-3, epochs: int = 20,
                 batch_size: int = 256, logit_scale: float = 100.0) -> None:
        self.alpha, self.beta, self.lr, self.epochs = alpha, beta, lr, epochs
        self.batch_size, self.logit_scale = batch_size, logit_scale

    def _logits(self, f, keys):
        import torch

        cache = torch.exp(-self.beta * (1 - f @ keys.T)) @ self.values_
        return self.logit_scale * f @ self.text_.T + self.alpha * cache

    def fit(self, task: FewShotTask) -> "TipAdapterF":
        import torch

        require_aligned(task, "tip-adapter-f")
        self.device_ = task.device
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=self.device_)
        self.text_ = as_tensor(class_text_embeddings(task))
        self.values_ = as_tensor(np.eye(task.n_classes)[task.support_labels])
        x = as_tensor(l2_normalise(task.support_features))
        y = torch.as_tensor(task.support_labels, device=self.device_)
        keys = torch.nn.Parameter(x.clone())
        optimizer = torch.optim.AdamW([keys], lr=self.lr, eps=1e-4)
        steps = self.epochs * -(-len(x) // self.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        gen, self.losses_ = generator(task.seed), []
        for _ in range(self.epochs):
            for batch in minibatches(len(x), self.batch_size, gen):
                batch = batch.to(self.device_)
                loss = torch.nn.functional.cross_entropy(self._logits(x[batch], keys), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                self.losses_.append(loss.item())
        self.keys_ = keys.detach()
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        import torch

        f = torch.as_tensor(l2_normalise(features), dtype=torch.float32, device=self.device_)
        with torch.no_grad():
            return softmax_numpy(self._logits(f, self.keys_))

    def head_(self, features):
        """Differentiable logits (the fine-tuned cache model plus zero-shot) from (N, D) torch features."""
        import torch

        return self._logits(torch.nn.functional.normalize(features.float(), dim=1).to(self.device_), self.keys_)


class ClipAdapter:
    """CLIP-Adapter (Gao et al., IJCV 2023), visual adapter.

    ``A(f) = ReLU(W2 ReLU(W1 f))`` (bias-free, bottleneck D/``reduction``) on the raw image feature,
    ``f' = ratio * A(f) + (1 - ratio) * f``, logits = ``logit_scale`` x cosine(f', zero-shot text classifier).
    Paper defaults: reduction 4, ratio 0.2. Training follows CoOp's Dassl recipe that the official code runs
    under: SGD (momentum 0.9, weight decay 5e-4), batch 32, one warm-up epoch at 1e-5 then cosine, epochs
    by shots (:func:`~hica_bench_baselines.common.few_shot_epochs`); lr 0.01 as in the LP++ / MICCAI 2024
    re-implementations (the official repository publishes no config). Deviations: frozen un-augmented
    support features; no ratio search or best-epoch selection on a validation split (fixed defaults).
    """

    needs = ALIGNED

    def __init__(self, ratio: float = 0.2, reduction: int = 4, lr: float = 0.01, epochs: int = 0,
                 batch_size: int = 32, logit_scale: float = 100.0) -> None:
        self.ratio, self.reduction, self.lr, self.epochs = ratio, reduction, lr, epochs
        self.batch_size, self.logit_scale = batch_size, logit_scale

    def _logits(self, features):
        import torch

        mixed = self.ratio * self.adapter_(features) + (1 - self.ratio) * features
        return self.logit_scale * torch.nn.functional.normalize(mixed, dim=1) @ self.text_.T

    def fit(self, task: FewShotTask) -> "ClipAdapter":
        import torch
        from torch import nn

        require_aligned(task, "clip-adapter")
        self.device_ = task.device
        self.text_ = torch.as_tensor(class_text_embeddings(task), dtype=torch.float32, device=self.device_)
        x = torch.as_tensor(np.asarray(task.support_features), dtype=torch.float32, device=self.device_)
        y = torch.as_tensor(task.support_labels, device=self.device_)
        d = x.shape[1]
        with torch.random.fork_rng(devices=[]):  # torch's default init, drawn from the task seed
            torch.manual_seed(task.seed)
            self.adapter_ = nn.Sequential(nn.Linear(d, d // self.reduction, bias=False), nn.ReLU(),
                                          nn.Linear(d // self.reduction, d, bias=False), nn.ReLU()).to(self.device_)
        epochs = self.epochs or few_shot_epochs(task.k)
        optimizer = torch.optim.SGD(self.adapter_.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        scheduler = dassl_schedule(optimizer, epochs)
        gen, self.losses_ = generator(task.seed), []
        for _ in range(epochs):
            for batch in minibatches(len(x), self.batch_size, gen):
                batch = batch.to(self.device_)
                loss = torch.nn.functional.cross_entropy(self._logits(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                self.losses_.append(loss.item())
            scheduler.step()
        self.adapter_.eval()
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        import torch

        f = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=self.device_)
        with torch.no_grad():
            return softmax_numpy(self._logits(f))

    def head_(self, features):
        """Differentiable logits (adapter blend, cosine to the class texts) from (N, D) torch features."""
        return self._logits(features.float().to(self.device_))


class LPPlusPlus:
    """LP++ (Huang et al., CVPR 2024): ``logits = W f + b + alpha ⊙ (f Tᵀ)`` on L2-normalised features,
    T the zero-shot text classifier, alpha one blending weight per class.

    As the official code: W starts at the per-class sums of support features, alpha at
    250 x the mean support image-text cosine (class-wise init, Eq. 15), b at 0. Full-batch block
    majorise-minimise: every epoch an SGD step (momentum 0.9) on W, b with the Lipschitz step 4N / λmax(FᵀF)
    (Eq. 10), every ``alpha_every``-th epoch a gradient step on alpha with step N / (4 max_c Σ_i (f_i·t_c)²)
    (Eq. 11); 300 epochs. No validation is needed (the paper's point). Deviation: the alpha step uses the
    current gradient (the official code never clears alpha's gradient, so it steps along the running sum).
    """

    needs = ALIGNED

    def __init__(self, epochs: int = 300, alpha_every: int = 10) -> None:
        self.epochs, self.alpha_every = epochs, alpha_every

    def _logits(self, f):
        return f @ self.weight_.T + self.bias_ + self.alpha_ * (f @ self.text_.T)

    def fit(self, task: FewShotTask) -> "LPPlusPlus":
        import torch

        require_aligned(task, "lp++")
        self.device_ = task.device
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=self.device_)
        x = l2_normalise(task.support_features)
        text = class_text_embeddings(task)
        n, labels = len(x), task.support_labels
        one_hot = np.eye(task.n_classes)[labels]
        text_logits = x @ text.T
        class_means = one_hot.T @ text_logits / one_hot.sum(0)[:, None]  # (C, C): class c's mean cosine to t_c'
        lr_w = 4 * n / np.linalg.norm(x, ord=2) ** 2
        lr_alpha = n / (4 * (text_logits ** 2).sum(0).max())
        self.text_ = as_tensor(text)
        self.weight_ = torch.nn.Parameter(as_tensor(one_hot.T @ x))
        self.bias_ = torch.nn.Parameter(torch.zeros(task.n_classes, device=self.device_))
        self.alpha_init_, self.lr_w_, self.lr_alpha_ = 250 * float(class_means.mean()), float(lr_w), float(lr_alpha)
        self.alpha_ = torch.nn.Parameter(torch.full((task.n_classes,), self.alpha_init_, device=self.device_))
        features, y = as_tensor(x), torch.as_tensor(labels, device=self.device_)
        optimizer = torch.optim.SGD([self.weight_, self.bias_], lr=lr_w, momentum=0.9)
        self.losses_ = []
        for epoch in range(self.epochs):
            loss = torch.nn.functional.cross_entropy(self._logits(features), y)
            optimizer.zero_grad()
            self.alpha_.grad = None
            loss.backward()
            optimizer.step()
            if (epoch + 1) % self.alpha_every == 0:
                with torch.no_grad():
                    self.alpha_ -= lr_alpha * self.alpha_.grad
            self.losses_.append(loss.item())
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        import torch

        f = torch.as_tensor(l2_normalise(features), dtype=torch.float32, device=self.device_)
        with torch.no_grad():
            return softmax_numpy(self._logits(f))

    def head_(self, features):
        """Differentiable logits (linear probe plus class-wise blended text logits) from (N, D) torch features."""
        import torch

        return self._logits(torch.nn.functional.normalize(features.float(), dim=1).to(self.device_))


SPECS = [
    PluginSpec("method", "tip-adapter", "Tip-Adapter (training-free cache model + zero-shot, aligned pairs only); "
               "search=true: alpha/beta by leave-one-out on the support set", TipAdapter,
               {"alpha": Option(low=0), "beta": Option(low=0), "logit_scale": POSITIVE}, in_default_suite=True,
               search={"alpha": (1.0, 0.5, 2.0), "beta": (5.5, 1.0, 10.0)}),
    PluginSpec("method", "tip-adapter-f", "Tip-Adapter-F: cache keys fine-tuned on the support set (aligned pairs only)",
               TipAdapterF, {"alpha": Option(low=0), "beta": Option(low=0), "lr": POSITIVE, "epochs": Option(low=1),
                             "batch_size": Option(low=1), "logit_scale": POSITIVE}, in_default_suite=True,
               search={"alpha": (1.0, 0.5, 2.0), "beta": (5.5, 1.0, 10.0)}),
    PluginSpec("method", "clip-adapter", "CLIP-Adapter: residual bottleneck MLP on image features (aligned pairs only); "
               "epochs=0: 50/100/200 by shots", ClipAdapter,
               {"ratio": Option(low=0, high=1), "reduction": Option(low=1), "lr": POSITIVE, "epochs": Option(low=0),
                "batch_size": Option(low=1), "logit_scale": POSITIVE}, in_default_suite=True,
               search={"ratio": (0.2, 0.4, 0.6, 0.8)}),
    PluginSpec("method", "lp++", "LP++: linear probe blended class-wise with text embeddings, Lipschitz step sizes "
               "(aligned pairs only)", LPPlusPlus, {"epochs": Option(low=1), "alpha_every": Option(low=1)},
               in_default_suite=True, search={"epochs": (300, 100, 1000)}),  # its step sizes are not tuned (Lipschitz)
]

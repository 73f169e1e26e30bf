"""The baselines the few-shot VLM literature reports, registered under the ``hica_bench`` entry point.

Here: zero-shot, linear probe, nearest class mean (prototype). In sibling modules: kNN (:mod:`.knn`),
Tip-Adapter, Tip-Adapter-F, CLIP-Adapter, LP++ (:mod:`.adapters`) and CoOp (:mod:`.coop`). All work on
frozen image features handed over by the runner, L2-normalised first as CLIP-style evaluations do. Two adapt the
encoder and predict through it: fine-tuning (LP-FT, :mod:`.finetune`) and CLIP-LoRA (:mod:`.clip_lora`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.special import softmax

from hica_bench import hookimpl
from hica_bench.interfaces import FewShotTask, Option, PluginSpec
from hica_bench_baselines.adapters import ClipAdapter, LPPlusPlus, TipAdapter, TipAdapterF
from hica_bench_baselines.common import TEMPLATES, class_text_embeddings, l2_normalise, require_aligned, templates
from hica_bench_baselines.coop import CoOp
from hica_bench_baselines.knn import KNN

__all__ = ["TEMPLATES", "l2_normalise", "ZeroShot", "LinearProbe", "Prototype", "KNN", "TipAdapter", "TipAdapterF",
           "ClipAdapter", "LPPlusPlus", "CoOp"]


class ZeroShot:
    """Cosine similarity to each class's prompt-ensemble text embedding, times ``logit_scale``, softmax.

    Needs an aligned image-text pair; the support set is not used.
    """

    needs = frozenset({"aligned_encoders", "class_texts"})

    def __init__(self, logit_scale: float = 100.0) -> None:
        self.logit_scale = logit_scale

    def fit(self, task: FewShotTask) -> "ZeroShot":
        require_aligned(task, "zero-shot")
        self.class_embeddings_ = class_text_embeddings(task)
        self.fit_info_ = {"templates": len(templates(task)), "class_names": list(task.class_names),
                          "prompt_file": None if task.prompts is None else task.prompts.source}
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        if features.shape[1] != self.class_embeddings_.shape[1]:
            raise ValueError(f"image features are {features.shape[1]}-d but text embeddings {self.class_embeddings_.shape[1]}-d")
        return softmax(self.logit_scale * l2_normalise(features) @ self.class_embeddings_.T, axis=1)

    def head_(self, features):
        """Differentiable logits from (N, D) torch features (``hica-bench explain``'s Grad-CAM target): the logit of
        a class is ``logit_scale`` x the cosine to its text embedding."""
        return self.logit_scale * _cosines(features, self.class_embeddings_)


def _cosines(features, rows: np.ndarray):
    """Cosine of each (N, D) torch feature with each row of ``rows`` (already L2-normalised), differentiably."""
    import torch

    normalised = torch.nn.functional.normalize(features.float(), dim=1)
    return normalised @ torch.as_tensor(rows, dtype=torch.float32, device=features.device).T


class LinearProbe:
    """Multinomial logistic regression (scikit-learn, lbfgs, L2) on L2-normalised features.

    Regularisation: with ``C=0`` (default) the inverse strength C is chosen from ``Cs`` by stratified
    k-fold cross-validation on the support set (min(k, 5) folds, log-loss) when k >= 2; at k = 1 there
    is nothing to validate on and ``C_one_shot`` is used. A positive ``C`` fixes it.
    """

    needs = frozenset({"image_features"})
    Cs = (0.1, 1.0, 10.0, 100.0, 1000.0)

    def __init__(self, C: float = 0.0, C_one_shot: float = 10.0, max_iter: int = 2000) -> None:
        self.C, self.C_one_shot, self.max_iter = C, C_one_shot, max_iter

    def fit(self, task: FewShotTask) -> "LinearProbe":
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold

        x, y = l2_normalise(task.support_features), task.support_labels
        if self.C > 0 or task.k < 2:
            self.C_ = self.C if self.C > 0 else self.C_one_shot
            self.model_ = LogisticRegression(C=self.C_, max_iter=self.max_iter).fit(x, y)
            self.fit_info_ = {"C": self.C_, "validation": "none: C fixed" if self.C > 0 else "none: 1 shot, C_one_shot"}
        else:
            folds = StratifiedKFold(n_splits=min(task.k, 5), shuffle=True, random_state=task.seed)
            search = GridSearchCV(
                LogisticRegression(max_iter=self.max_iter), {"C": list(self.Cs)}, cv=folds, scoring="neg_log_loss"
            ).fit(x, y)
            self.model_, self.C_ = search.best_estimator_, float(search.best_params_["C"])
            self.fit_info_ = {"C": self.C_, "validation": f"stratified {folds.n_splits}-fold CV on the support set (log-loss)"}
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(l2_normalise(features))

    def head_(self, features):
        """Differentiable logits from (N, D) torch features: the logistic regression's decision function on the
        L2-normalised features (binary: logits (0, w.x + b), whose softmax is its ``predict_proba``)."""
        import torch

        x = torch.nn.functional.normalize(features.float(), dim=1)
        weight = torch.as_tensor(self.model_.coef_, dtype=torch.float32, device=x.device)
        bias = torch.as_tensor(self.model_.intercept_, dtype=torch.float32, device=x.device)
        logits = x @ weight.T + bias
        return torch.cat([torch.zeros_like(logits), logits], dim=1) if logits.shape[1] == 1 else logits


class Prototype:
    """Nearest class mean: cosine similarity to each class's mean normalised support feature,
    divided by ``temperature``, softmax."""

    needs = frozenset({"image_features"})

    def __init__(self, temperature: float = 0.05) -> None:
        self.temperature = temperature

    def fit(self, task: FewShotTask) -> "Prototype":
        x = l2_normalise(task.support_features)
        means = np.stack([x[task.support_labels == c].mean(axis=0) for c in range(task.n_classes)])
        self.prototypes_ = l2_normalise(means)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return softmax(l2_normalise(features) @ self.prototypes_.T / self.temperature, axis=1)

    def head_(self, features):
        """Differentiable logits from (N, D) torch features: cosine to each prototype / ``temperature``."""
        return _cosines(features, self.prototypes_) / self.temperature


@hookimpl
def hica_bench_methods() -> list[PluginSpec]:
    """Every baseline on frozen features is in the default suite (``hica-bench run`` without ``--methods``); those
    that adapt the encoder (``finetune``: about a minute per 20-shot cell on 2 CPU cores) are named explicitly."""
    return [replace(spec, in_default_suite=True) for spec in _specs()] + _adapting_specs()


def _finetune(**options):
    from hica_bench_baselines.finetune import FineTune

    return FineTune(**options)


def _clip_lora(**options):
    from hica_bench_baselines.clip_lora import ClipLoRA

    return ClipLoRA(**options)


def _concept_bottleneck(**options):
    from hica_bench_baselines.concepts import ConceptBottleneck

    return ConceptBottleneck(**options)


def _adapting_specs() -> list[PluginSpec]:
    """The methods named explicitly (not in the default suite): those that adapt the encoder, and the concept
    bottleneck (aligned pairs only; its concepts come from a descriptor generator)."""
    return [
        PluginSpec("method", "concept-bottleneck", "Concept bottleneck (label-free/LaBo CBM): image-descriptor "
                   "similarities of an aligned pair as concept scores, sparse (L1) logistic regression on them; "
                   "lists the top concepts per class", _concept_bottleneck,
                   {"descriptors": "knowledge", "C": Option(0.0, low=0), "C_one_shot": _positive(0.5),
                    "top": Option(5, low=1), "max_iter": Option(5000, low=1)},
                   components={"descriptors": "descriptor-generator"}),
        PluginSpec("method", "finetune", "LP-FT fine-tuning: linear probe, then the image encoder's last blocks "
                   "(full=true: all of it) and the head trained together; predicts through the adapted encoder",
                   _finetune, {"blocks": Option(1, low=1), "full": False, "steps": Option(50, low=1), "lr": _positive(1e-4),
                               "head_lr": _positive(1e-3), "batch_size": Option(32, low=1),
                               "weight_decay": Option(0.0, low=0)}),
        PluginSpec("method", "clip-lora", "CLIP-LoRA: low-rank updates of q/k/v in both towers of an aligned pair "
                   "(the paper's rank 2, lr 2e-4, 500 x shots iterations; iterations=N overrides); aligned pairs only",
                   _clip_lora, {"rank": Option(2, low=1), "alpha": _positive(1.0), "lr": _positive(2e-4),
                                "iterations": Option(0, low=0), "batch_size": Option(32, low=1),
                                "weight_decay": Option(1e-2, low=0)}),
    ]


def _positive(default: float) -> Option:
    return Option(default, low=0, low_open=True)


def _specs() -> list[PluginSpec]:
    return [
        PluginSpec("method", "zero-shot", "Zero-shot: cosine similarity to prompt-ensemble class text embeddings (aligned pairs only)",
                   ZeroShot, {"logit_scale": _positive(100.0)}),
        PluginSpec("method", "linear-probe", "Linear probe: logistic regression on frozen features, C by support-set CV",
                   LinearProbe, {"C": Option(0.0, low=0), "C_one_shot": _positive(10.0), "max_iter": Option(2000, low=1)}),
        PluginSpec("method", "prototype", "Nearest class mean (prototype) on frozen features, cosine similarity",
                   Prototype, {"temperature": _positive(0.05)}),
        PluginSpec("method", "knn", "Cosine kNN on frozen features, exp(cos/temperature)-weighted votes; neighbours=0: "
                   "largest odd <= sqrt(support size), at most k", KNN, {"neighbours": Option(0, low=0), "temperature": _positive(0.07)}),
        PluginSpec("method", "tip-adapter", "Tip-Adapter (training-free cache model + zero-shot, aligned pairs only); "
                   "search=true: alpha/beta by leave-one-out on the support set", TipAdapter,
                   {"alpha": Option(1.0, low=0), "beta": Option(5.5, low=0), "logit_scale": _positive(100.0), "search": False}),
        PluginSpec("method", "tip-adapter-f", "Tip-Adapter-F: cache keys fine-tuned on the support set (aligned pairs only)",
                   TipAdapterF, {"alpha": Option(1.0, low=0), "beta": Option(5.5, low=0), "lr": _positive(1e-3),
                                 "epochs": Option(20, low=1), "batch_size": Option(256, low=1), "logit_scale": _positive(100.0)}),
        PluginSpec("method", "clip-adapter", "CLIP-Adapter: residual bottleneck MLP on image features (aligned pairs only); "
                   "epochs=0: 50/100/200 by shots", ClipAdapter,
                   {"ratio": Option(0.2, low=0, high=1), "reduction": Option(4, low=1), "lr": _positive(0.01),
                    "epochs": Option(0, low=0), "batch_size": Option(32, low=1), "logit_scale": _positive(100.0)}),
        PluginSpec("method", "lp++", "LP++: linear probe blended class-wise with text embeddings, Lipschitz step sizes "
                   "(aligned pairs only)", LPPlusPlus, {"epochs": Option(300, low=1), "alpha_every": Option(10, low=1)}),
        PluginSpec("method", "coop", "CoOp: learned prompt context through the frozen text tower (aligned pairs only); "
                   "epochs=0: 50/100/200 by shots", CoOp,
                   {"n_ctx": Option(16, low=1), "lr": _positive(0.002), "epochs": Option(0, low=0), "batch_size": Option(32, low=1),
                    "init_std": _positive(0.02), "logit_scale": _positive(100.0)}),
    ]

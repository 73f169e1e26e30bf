"""The baselines on frozen features that need nothing but them (and, for zero-shot, the class texts): zero-shot,
linear probe, nearest class mean (prototype). L2-normalised first, as CLIP-style evaluations do. Fine-tuning
(:mod:`.finetune`) starts from the linear probe here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy.special import softmax

from hica_bench.interfaces import FewShotTask, Option, PluginSpec
from hica_bench_baselines.common import POSITIVE, class_text_embeddings, l2_normalise, require_aligned, templates


class ZeroShot:
    """Cosine similarity to each class's prompt-ensemble text embedding, times ``logit_scale``, softmax.

    Needs an aligned image-text pair; the support set is not used.
    """

    needs = frozenset({"aligned_encoders", "class_texts"})

    def __init__(self, logit_scale: float = 100.0) -> None:
        self.logit_scale = logit_scale

    def fit(self, task: FewShotTask) -> "ZeroShot":
        require_aligned(task, "zero-shot")
        self.task_ = task  # its encoders and prompt ensemble name unseen classes (base-to-novel)
        self.class_embeddings_ = class_text_embeddings(task)
        self.fit_info_ = {"templates": len(templates(task)), "class_names": list(task.class_names),
                          "prompt_file": None if task.prompts is None else task.prompts.source}
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        if features.shape[1] != self.class_embeddings_.shape[1]:
            raise ValueError(f"image features are {features.shape[1]}-d but text embeddings {self.class_embeddings_.shape[1]}-d")
        return softmax(self.logit_scale * l2_normalise(features) @ self.class_embeddings_.T, axis=1)

    def predict_proba_novel(self, features: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        """Base-to-novel: the same prompt ensemble with the names of classes it was not fitted on."""
        text = class_text_embeddings(dataclasses.replace(self.task_, class_names=list(class_names)))
        return softmax(self.logit_scale * l2_normalise(features) @ text.T, axis=1)

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


SPECS = [
    PluginSpec("method", "zero-shot", "Zero-shot: cosine similarity to prompt-ensemble class text embeddings (aligned "
               "pairs only)", ZeroShot, {"logit_scale": POSITIVE}, in_default_suite=True),
    PluginSpec("method", "linear-probe", "Linear probe: logistic regression on frozen features, C by support-set CV",
               LinearProbe, {"C": Option(low=0), "C_one_shot": POSITIVE, "max_iter": Option(low=1)},
               in_default_suite=True, search={"C": (1.0, 0.01, 0.1, 10.0, 100.0)}),
    PluginSpec("method", "prototype", "Nearest class mean (prototype) on frozen features, cosine similarity",
               Prototype, {"temperature": POSITIVE}, in_default_suite=True,
               search={"temperature": (0.05, 0.01, 0.1, 0.5)}),
]

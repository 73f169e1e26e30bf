"""Concept bottleneck: interpretable by design, after label-free CBMs (Oikarinen et al., 2023) and LaBo (Yang et al.,
2023), on an aligned image-text pair.

Concepts are the fine-grained descriptors of every class (global and local texts; from the dataset's prompt file
where it gives them, else from the descriptor generator named by ``descriptors``, e.g. ``knowledge``: the curated
MedMNIST file), deduplicated. An image's concept scores are its cosine similarities to each concept's text embedding,
standardised per concept on the support set (as label-free CBMs normalise concept activations). A sparse (L1)
logistic regression on those scores predicts the class; its weights say which concepts each class rests on, and
``fit_info_`` lists the top ones per class (the report shows them). The L1 strength C is chosen as the linear probe
chooses its C (stratified k-fold log-loss on the support set from 2 shots on; ``C_one_shot`` at 1 shot).

Not applicable on an unaligned pair: a cosine between an image and a text embedding of two unrelated spaces is no
concept score.
"""

from __future__ import annotations

import numpy as np

from hica_bench.errors import NotApplicable
from hica_bench.interfaces import FewShotTask, Option, PluginSpec
from hica_bench_baselines.common import POSITIVE, l2_normalise


class ConceptBottleneck:
    """Sparse linear classifier on image ↔ descriptor similarities (see the module docstring)."""

    needs = frozenset({"image_features", "aligned_encoders", "class_texts"})
    Cs = (0.05, 0.1, 0.5, 1.0, 5.0)

    def __init__(self, descriptors: str = "knowledge", C: float = 0.0, C_one_shot: float = 0.5, top: int = 5,
                 max_iter: int = 5000) -> None:
        self.descriptors, self.C, self.C_one_shot, self.top, self.max_iter = descriptors, C, C_one_shot, top, max_iter

    def _concepts(self, task: FewShotTask) -> tuple[list[str], str]:
        """(the concept texts, where they came from)."""
        given = task.prompts.descriptors if task.prompts is not None else None
        own = None
        if given is None or None in given:
            if task.components is None:
                raise ValueError("concept-bottleneck builds its descriptor generator through task.components; this task "
                                 "has none")
            own = task.components.build("descriptor-generator", self.descriptors).describe(task.dataset,
                                                                                           list(task.class_names))
        described = [d if given is not None and d is not None else own[c]
                     for c, d in enumerate(given if given is not None else [None] * task.n_classes)]
        source = (f"prompt file {task.prompts.source}" + (f" (others: descriptor generator {self.descriptors})"
                                                           if None in given else "")
                  if given is not None else f"descriptor generator {self.descriptors}")
        texts = [t for d in described for t in [*d.get("global", ()), *d.get("local", ())]]
        concepts = list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))
        if len(concepts) < 2:
            raise ValueError(f"{source} gives {len(concepts)} concept(s); a bottleneck needs at least 2")
        return concepts, source

    def _scores(self, features: np.ndarray) -> np.ndarray:
        return (l2_normalise(features) @ self.concept_embeddings_.T - self.mean_) / self.scale_

    def fit(self, task: FewShotTask) -> "ConceptBottleneck":
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold

        if not task.encoders.aligned or task.encoders.text is None:
            raise NotApplicable("concept-bottleneck scores concepts by image-text cosine similarity, which needs an "
                                "aligned image-text encoder pair")
        self.concepts_, source = self._concepts(task)
        embedded = l2_normalise(task.encoders.text.encode(self.concepts_))
        if embedded.shape[1] != task.support_features.shape[1]:
            raise ValueError(f"image features are {task.support_features.shape[1]}-d but text embeddings "
                             f"{embedded.shape[1]}-d")
        self.concept_embeddings_ = embedded
        raw = l2_normalise(task.support_features) @ embedded.T
        self.mean_, self.scale_ = raw.mean(axis=0), np.maximum(raw.std(axis=0), 1e-6)
        x, y = self._scores(task.support_features), task.support_labels
        model = LogisticRegression(l1_ratio=1.0, solver="saga", max_iter=self.max_iter)
        if self.C > 0 or task.k < 2:
            self.C_ = self.C if self.C > 0 else self.C_one_shot
            self.model_ = model.set_params(C=self.C_).fit(x, y)
            validation = "none: C fixed" if self.C > 0 else "none: 1 shot, C_one_shot"
        else:
            folds = StratifiedKFold(n_splits=min(task.k, 5), shuffle=True, random_state=task.seed)
            search = GridSearchCV(model, {"C": list(self.Cs)}, cv=folds, scoring="neg_log_loss").fit(x, y)
            self.model_, self.C_ = search.best_estimator_, float(search.best_params_["C"])
            validation = f"stratified {folds.n_splits}-fold CV on the support set (log-loss)"
        weights = self.class_weights_()
        self.fit_info_ = {
            "concepts": len(self.concepts_), "source": source, "C": self.C_, "validation": validation,
            "nonzero": int((np.abs(weights) > 1e-8).any(axis=0).sum()),
            # saga's iterations against max_iter: a sparse fit that stopped at the limit is said to have done so
            "converged": bool(np.max(self.model_.n_iter_) < self.max_iter),
            "top_concepts": {name: [[self.concepts_[j], round(float(weights[c, j]), 4)]
                                    for j in np.argsort(-weights[c], kind="stable")[:self.top] if weights[c, j] > 1e-8]
                             for c, name in enumerate(task.class_names)},
        }
        return self

    def class_weights_(self) -> np.ndarray:
        """(C, concepts): how much each concept's score raises each class's logit (binary: class 1 gets the
        regression's weights, class 0 their negation)."""
        coef = np.asarray(self.model_.coef_, dtype=np.float64)
        return np.vstack([-coef, coef]) if coef.shape[0] == 1 else coef

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(self._scores(features))

    def head_(self, features):
        """Differentiable logits from (N, D) torch features: standardised concept scores through the regression
        (binary: logits (0, w.s + b))."""
        import torch

        def tensor(value):
            return torch.as_tensor(np.asarray(value), dtype=torch.float32, device=features.device)

        x = torch.nn.functional.normalize(features.float(), dim=1) @ tensor(self.concept_embeddings_).T
        scores = (x - tensor(self.mean_)) / tensor(self.scale_)
        logits = scores @ tensor(self.model_.coef_).T + tensor(self.model_.intercept_)
        return torch.cat([torch.zeros_like(logits), logits], dim=1) if logits.shape[1] == 1 else logits


SPECS = [
    PluginSpec("method", "concept-bottleneck", "Concept bottleneck (label-free/LaBo CBM): image-descriptor "
               "similarities of an aligned pair as concept scores, sparse (L1) logistic regression on them; "
               "lists the top concepts per class", ConceptBottleneck,
               {"C": Option(low=0), "C_one_shot": POSITIVE, "top": Option(low=1), "max_iter": Option(low=1)},
               components={"descriptors": "descriptor-generator"}),
]

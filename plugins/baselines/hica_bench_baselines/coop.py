"""CoOp (Zhou et al., IJCV 2022): learned context vectors in front of the class-name tokens, trained through
the frozen text tower.

:class:`PromptTower` works with the text encoders the encoders plugin builds, duck-typed on what they expose:
open_clip towers (``.model.encode_text`` + ``.tokenizer``: CLIP-style ``token_embedding`` transformers and
Hugging Face towers such as BiomedCLIP's PubMedBERT), sentence-transformers models (MiniLM) and plain Hugging
Face models with mean pooling. The context replaces the word embeddings of ``n_ctx`` placeholder tokens
(``"X X … X <class name>."``, CoOp's class-token-at-end layout) through a forward hook on the tower's
word-embedding layer, so each tower's own positional embeddings, masks, pooling and projection apply.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from hica_bench.errors import NotApplicable
from hica_bench.interfaces import FewShotTask, Option, PluginSpec
from hica_bench_baselines.common import (
    POSITIVE,
    dassl_schedule,
    few_shot_epochs,
    generator,
    l2_normalise,
    minibatches,
    require_aligned,
    softmax_numpy,
)


class PromptTower:
    """``tower(ctx)`` -> (C, D) text features of ``"<ctx_1 … ctx_n> <class name>."``, differentiable in ``ctx``
    (n_ctx, ctx_dim); the tower's weights stay frozen and untouched. Raises NotApplicable for a text encoder
    that exposes no usable tower."""

    def __init__(self, text_encoder: Any, class_names: Sequence[str], n_ctx: int, device: str) -> None:
        import torch

        prompts = [" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in class_names]
        model = getattr(text_encoder, "model", None)
        tokenizer = getattr(text_encoder, "tokenizer", None)
        name = getattr(text_encoder, "identity", type(text_encoder).__name__)
        self.start = 1  # after the start token ([SOT] / [CLS])
        if model is not None and hasattr(model, "get_text_features") and hasattr(text_encoder, "embed"):
            # transformers CLIP / SigLIP (hf_clip): the tower's token embedding, the encoder's own tokenisation
            embeddings = getattr(getattr(model, "text_model", None), "embeddings", None)
            if embeddings is None or not hasattr(embeddings, "token_embedding"):
                raise NotApplicable(f"coop: cannot find the token embedding of the text tower of {name}")
            self.embedding = embeddings.token_embedding
            ids = tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"]
            if ids.shape[1] > 1 and ids[0, 0] == ids[0, 1]:  # no start token (SigLIP): the context comes first
                self.start = 0
            self._encode = lambda: text_encoder.embed(prompts)
        elif model is not None and hasattr(model, "encode_text") and callable(tokenizer):  # open_clip
            tower = getattr(model, "text", model)
            ids = tokenizer(prompts).to(device)
            if hasattr(tower, "token_embedding"):
                self.embedding = tower.token_embedding
            elif hasattr(getattr(tower, "transformer", None), "get_input_embeddings"):  # e.g. BiomedCLIP
                self.embedding = tower.transformer.get_input_embeddings()
                pad = tower.config.pad_token_id  # padding is masked: drop the all-padding tail
                ids = ids[:, : int((ids != pad).sum(1).max())]
            else:
                raise NotApplicable(f"coop: cannot find the token embedding of the open_clip text tower of {name}")
            self._encode = lambda: model.encode_text(ids)
        elif isinstance(model, torch.nn.Sequential) and hasattr(model, "tokenize"):  # sentence-transformers
            preprocess = getattr(model, "preprocess", model.tokenize)  # `tokenize` before sentence-transformers 6
            features = {k: v.to(device) if hasattr(v, "to") else v for k, v in preprocess(prompts).items()}
            ids = features["input_ids"]
            transformer = next((m for m in model if hasattr(m, "auto_model")), None)
            if transformer is None:
                raise NotApplicable(f"coop: the sentence-transformers model {name} has no Hugging Face transformer module")
            self.embedding = transformer.auto_model.get_input_embeddings()
            self._encode = lambda: model(dict(features))["sentence_embedding"]
        elif model is not None and hasattr(model, "get_input_embeddings") and callable(tokenizer):  # Hugging Face, mean pooling
            batch = tokenizer(prompts, padding=True, return_tensors="pt").to(device)
            ids = batch["input_ids"]
            self.embedding = model.get_input_embeddings()

            def encode():
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

            self._encode = encode
        else:
            raise NotApplicable(f"coop needs a text tower it can feed context vectors to; {name} exposes none "
                                "(supported: open_clip, transformers CLIP/SigLIP, sentence-transformers and Hugging "
                                "Face text encoders)")
        self.n_ctx, self.ctx_dim = n_ctx, int(self.embedding.weight.shape[1])
        placeholders = ids[:, self.start:self.start + n_ctx]
        if placeholders.shape[1] != n_ctx or not bool((placeholders == placeholders[0, 0]).all()) or (
                self.start == 1 and ids[0, 0] == ids[0, 1]):
            raise NotApplicable(f"coop: the tokenizer of {name} does not give one token per context placeholder after a start token")

    def __call__(self, ctx):
        import torch

        def replace(module, args, output):
            context = ctx.to(output.dtype).unsqueeze(0).expand(len(output), -1, -1)
            return torch.cat([output[:, :self.start], context, output[:, self.start + self.n_ctx:]], dim=1)

        handle = self.embedding.register_forward_hook(replace)
        try:
            return self._encode().float()
        finally:
            handle.remove()


class CoOp:
    """CoOp with a unified context of ``n_ctx`` (16) vectors, initialised N(0, ``init_std``² = 0.02²), the class
    token at the end. Logits = ``logit_scale`` x cosine(normalised image feature, prompt text feature).
    Training as CoOp's Dassl recipe: SGD lr 0.002 (momentum 0.9, weight decay 5e-4), batch 32, one warm-up
    epoch at 1e-5 then cosine; epochs by shots (50 at 1 shot, 100 at 2-4, 200 from 5; ``epochs`` fixes it).
    Gradients reach only the context (``torch.autograd.grad``); the encoder is never modified.
    Deviations: frozen un-augmented support features instead of augmented images; fp32; the logit scale is
    fixed (CLIP's trained value, 100) rather than read from the model; no validation (CoOp uses none).
    """

    needs = frozenset({"aligned_encoders", "class_texts", "text_encoder", "image_features"})

    def __init__(self, n_ctx: int = 16, lr: float = 0.002, epochs: int = 0, batch_size: int = 32,
                 init_std: float = 0.02, logit_scale: float = 100.0) -> None:
        self.n_ctx, self.lr, self.epochs, self.batch_size = n_ctx, lr, epochs, batch_size
        self.init_std, self.logit_scale = init_std, logit_scale

    def fit(self, task: FewShotTask) -> "CoOp":
        require_aligned(task, "coop")
        self.text_encoder_ = task.encoders.text  # the learned context names unseen classes through it (base-to-novel)
        tower = PromptTower(task.encoders.text, task.class_names, self.n_ctx, task.device)
        return self.learn(tower, task.support_features, task.support_labels, task.k, task.seed, task.device)

    def learn(self, tower: PromptTower, features: np.ndarray, labels: np.ndarray, k: int, seed: int,
              device: str = "cpu") -> "CoOp":
        """Train the context on (features, labels) through ``tower``; ``losses_`` holds every step's loss."""
        import torch

        self.device_ = device
        x = torch.as_tensor(l2_normalise(features), dtype=torch.float32, device=device)
        y = torch.as_tensor(np.asarray(labels), device=device)
        gen = generator(seed)
        ctx = torch.nn.Parameter((torch.randn(self.n_ctx, tower.ctx_dim, generator=gen) * self.init_std).to(device))
        with torch.no_grad():
            width = tower(ctx).shape[1]
        if width != x.shape[1]:
            raise ValueError(f"image features are {x.shape[1]}-d but the prompt features {width}-d")
        epochs = self.epochs or few_shot_epochs(k)
        optimizer = torch.optim.SGD([ctx], lr=self.lr, momentum=0.9, weight_decay=5e-4)
        scheduler = dassl_schedule(optimizer, epochs)
        self.losses_ = []
        with torch.enable_grad():
            for _ in range(epochs):
                for batch in minibatches(len(x), self.batch_size, gen):
                    batch = batch.to(device)
                    loss = torch.nn.functional.cross_entropy(self._logits(x[batch], tower(ctx)), y[batch])
                    (ctx.grad,) = torch.autograd.grad(loss, [ctx])
                    optimizer.step()
                    self.losses_.append(loss.item())
                scheduler.step()
        with torch.no_grad():
            self.text_ = torch.nn.functional.normalize(tower(ctx), dim=1)
        self.ctx_ = ctx.detach()
        return self

    def _logits(self, image, text):
        import torch

        return self.logit_scale * image @ torch.nn.functional.normalize(text, dim=1).T

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        import torch

        f = torch.as_tensor(l2_normalise(features), dtype=torch.float32, device=self.device_)
        with torch.no_grad():
            return softmax_numpy(self._logits(f, self.text_))

    def predict_proba_novel(self, features: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        """Base-to-novel: the learned context before the names of classes it was not trained on (CoOp's
        generalisation test, as in CoCoOp)."""
        import torch

        tower = PromptTower(self.text_encoder_, class_names, self.n_ctx, self.device_)
        f = torch.as_tensor(l2_normalise(features), dtype=torch.float32, device=self.device_)
        with torch.no_grad():
            return softmax_numpy(self._logits(f, torch.nn.functional.normalize(tower(self.ctx_), dim=1)))

    def head_(self, features):
        """Differentiable logits (cosine to the learned-context class texts) from (N, D) torch features."""
        import torch

        return self._logits(torch.nn.functional.normalize(features.float(), dim=1).to(self.device_), self.text_)


SPECS = [
    PluginSpec("method", "coop", "CoOp: learned prompt context through the frozen text tower (aligned pairs only); "
               "epochs=0: 50/100/200 by shots", CoOp,
               {"n_ctx": Option(low=1), "lr": POSITIVE, "epochs": Option(low=0), "batch_size": Option(low=1),
                "init_std": POSITIVE, "logit_scale": POSITIVE}, in_default_suite=True,
               search={"n_ctx": (16, 4, 8)}),
]

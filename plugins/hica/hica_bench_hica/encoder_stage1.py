"""HiCA's stage 1 on the encoders themselves, as the paper describes it (``stage1_encoder=true``; see
:mod:`hica_bench_hica.method` for the objectives and the defaults): a private copy of the image encoder fine-tuned
DeepCluster-style on the unlabeled train images, a copy of the text encoder fine-tuned on the descriptor corpus.
:class:`EncoderStage1` is one cell's stage 1: it owns the copies, the tensors it trains and the support images.

Cached per (image and text encoder identities, dataset, the train images used, the corpus, the stage-1 options) in
``task.cache_dir/hica-stage1/`` as safetensors of the trained tensors only, so every cell of a dataset reuses one
stage 1 and exposes the same adapted encoder identity (the harness then encodes the test images once).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from hica_bench.adapting import AdaptedImageEncoder, adaptable_copy, tail_parameters, weights_digest
from hica_bench.data import preprocess
from hica_bench.files import atomic_path, digest
from hica_bench.interfaces import FewShotTask

log = logging.getLogger(__name__)

BATCH = 32
VERSION = "hica-stage1-encoder-v1"
OPTIONS = ("stage1_blocks", "stage1_text_layers", "stage1_encoder_epochs", "stage1_max_images", "stage1_encoder_lr",
           "stage1_text_lr", "stage1_clusters", "stage1_epochs", "tau")


def _trainable_text(text: Any) -> bool:
    return text is not None and hasattr(text, "embed") and hasattr(text, "module")


def _amp(device: str, torch):
    """bf16 autocast on CUDA (the encoder's steps), nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()


def _train_visual(o: dict[str, Any], image: Any, named: list, images: np.ndarray, device: str, torch) -> None:
    """DeepCluster on the image encoder's tail: per epoch, encode, k-means, a fresh linear cluster head, one pass of
    cross-entropy with clusters sampled uniformly (its remedy against a trivial solution)."""
    from sklearn.cluster import KMeans

    n_clusters = max(2, min(o["stage1_clusters"], len(images) // 2))
    generator = torch.Generator().manual_seed(0)
    for _, parameter in named:
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW([p for _, p in named], lr=o["stage1_encoder_lr"], weight_decay=1e-4)
    for epoch in range(o["stage1_encoder_epochs"]):
        with torch.no_grad(), _amp(device, torch):
            encoded = np.concatenate([
                torch.nn.functional.normalize(image.encode(preprocess(images[s:s + BATCH], image.input_spec, device)).float(),
                                              dim=1).cpu().numpy() for s in range(0, len(images), BATCH)])
        pseudo = torch.from_numpy(KMeans(n_clusters=n_clusters, n_init=1, random_state=epoch, max_iter=100)
                                  .fit(encoded).labels_.astype(np.int64))
        with torch.random.fork_rng(devices=[]):  # the head's default init must not draw from the global generator
            head = torch.nn.Linear(encoded.shape[1], n_clusters)
        torch.nn.init.normal_(head.weight, std=0.01, generator=generator)  # on the CPU, with stage 1's own generator
        torch.nn.init.zeros_(head.bias)
        head = head.to(device)
        head_optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
        weights = 1.0 / torch.bincount(pseudo, minlength=n_clusters).clamp(min=1).float()
        order = torch.multinomial(weights[pseudo], len(images), replacement=True, generator=generator)
        for batch in order.split(BATCH):
            x = preprocess(images[batch.numpy()], image.input_spec, device)
            with _amp(device, torch):
                logits = head(torch.nn.functional.normalize(image.encode(x).float(), dim=1))
            loss = torch.nn.functional.cross_entropy(logits, pseudo[batch].to(device))
            optimiser.zero_grad()
            head_optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            head_optimiser.step()
    for _, parameter in named:
        parameter.requires_grad_(False)


def train_text(o: dict[str, Any], text: Any, named: list, corpus: list[str], corpus_class: list[int], torch) -> None:
    """Supervised-contrastive fine-tuning of the text tail: descriptors of one class are positives."""
    classes = torch.tensor(corpus_class)
    eye = torch.eye(len(classes))
    positives = (classes[:, None] == classes[None, :]).float() - eye
    if positives.sum() == 0:
        return
    has = positives.sum(1) > 0
    for _, parameter in named:
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW([p for _, p in named], lr=o["stage1_text_lr"], weight_decay=0.01)
    for _ in range(o["stage1_epochs"]):
        z = torch.nn.functional.normalize(text.embed(corpus).float().cpu(), dim=1)
        logits = z @ z.T / o["tau"] - eye * 1e9
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        loss = -((log_prob * positives).sum(1)[has] / positives.sum(1)[has]).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for _, parameter in named:
        parameter.requires_grad_(False)


class EncoderStage1:
    """Stage 1 on the encoders for one cell. It owns what it works on: the private copies of the encoders it adapts
    (``image``, ``text``; ``module``: the image copy's torch module), the tensors it trained (``stage1_tensors``, and
    ``stage2_tensors`` when stage 2 trains the encoder's last blocks too) and the support images (uint8, in support
    order) it encodes. ``options`` are the method's (:class:`~hica_bench_hica.method.HiCAEncoder`).

    In order: :meth:`adapt` (train or load from the cache), :meth:`support_features`, optionally :meth:`stage2_trunk`,
    then :meth:`exposed`, the adapted image encoder the harness encodes the test images through."""

    def __init__(self, task: FewShotTask, options: dict[str, Any], support_images: np.ndarray) -> None:
        self.task, self.options, self.support_images = task, options, support_images
        self.image: Any = None
        self.text: Any = None
        self.module: Any = None
        self.stage1_tensors: list = []  #: (name, parameter) of the image copy that stage 1 trained
        self.stage2_tensors: list = []  #: (name, parameter) that stage 2 trains too (``stage2_blocks`` > 0)
        self.stage2 = False  #: whether :meth:`stage2_trunk` put the encoder's last blocks into stage 2

    def adapt(self, corpus: list[str], corpus_class: list[int], torch) -> dict[str, Any]:
        """Adapt the copies (the image encoder, and the text encoder when it can be): train, or load from the cache.
        Returns the ``fit_info`` entries."""
        from safetensors.torch import load_file, save_file

        o, task = self.options, self.task
        image, module = adaptable_copy(task.encoders)
        visual = tail_parameters(module, o["stage1_blocks"])
        text, textual, text_note = task.encoders.text, [], "frozen: stage1_text_layers=0"
        if o["stage1_text_layers"] > 0 and _trainable_text(text):
            text = copy.deepcopy(task.encoders.text)
            text_module = text.module
            for parameter in text_module.parameters():
                parameter.requires_grad_(False)
            textual = tail_parameters(text_module, o["stage1_text_layers"])
            text_note = f"last {o['stage1_text_layers']} layer(s) fine-tuned on the descriptor corpus"
        elif o["stage1_text_layers"] > 0:
            text_note = "frozen: the text encoder offers no module/embed to fine-tune"
        train = task.train_images
        chosen = np.sort(np.random.default_rng(0).permutation(len(train))[: o["stage1_max_images"]])
        images = np.asarray(train[chosen])
        key = digest([VERSION, task.encoders.image.identity, task.encoders.text.identity, task.dataset,
                      hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(), list(corpus),
                      list(corpus_class), {k: o[k] for k in OPTIONS}], 24)
        path = Path(task.cache_dir) / "hica-stage1" / f"{key}.safetensors" if task.cache_dir else None
        cached = False
        if path is not None and path.exists():
            try:
                state = load_file(str(path))
                wanted = [(f"{prefix}{name}", parameter) for prefix, named in (("v.", visual), ("t.", textual))
                          for name, parameter in named]
                if set(state) != {key for key, _ in wanted} or any(state[k].shape != p.shape for k, p in wanted):
                    raise ValueError("its tensors are not the ones this stage 1 trains")
                with torch.no_grad():  # checked first: a stale entry never leaves half its tensors in the copy
                    for key, parameter in wanted:
                        parameter.copy_(state[key].to(parameter.device))
                cached = True
            except Exception as exc:  # corrupt or stale: retrain, never trust it
                log.warning("HiCA encoder stage-1 cache %s unreadable (%s); retraining", path.name, exc)
        if not cached:
            _train_visual(o, image, visual, images, task.device, torch)
            if textual:
                train_text(o, text, textual, corpus, corpus_class, torch)
            if path is not None:
                state = {f"v.{n}": p.detach().cpu().contiguous() for n, p in visual}
                state |= {f"t.{n}": p.detach().cpu().contiguous() for n, p in textual}
                with atomic_path(path) as tmp:
                    save_file(state, str(tmp))
        self.image, self.text, self.module, self.stage1_tensors = image, text, module, visual
        return {"stage1": "encoder", "stage1_cached": cached, "stage1_images": int(len(images)),
                "stage1_image_parameters": int(sum(p.numel() for _, p in visual)), "stage1_text": text_note}

    def support_features(self, torch) -> np.ndarray:
        """(k*C, D) float32 features of the support images through the adapted image encoder."""
        images, image, device = self.support_images, self.image, self.task.device
        with torch.no_grad():
            return np.concatenate([image.encode(preprocess(images[s:s + BATCH], image.input_spec, device)).float().cpu().numpy()
                                   for s in range(0, len(images), BATCH)]).astype(np.float32)

    def stage2_trunk(self, optimiser: Any, torch):
        """Stage 2 on the image encoder's last ``stage2_blocks`` blocks too: they join ``optimiser``; returns a
        function giving the support images' features with gradients (re-encoded at each step)."""
        o = self.options
        named = tail_parameters(self.module, o["stage2_blocks"])
        for _, parameter in named:
            parameter.requires_grad_(True)
        optimiser.add_param_group({"params": [p for _, p in named], "lr": o["stage1_encoder_lr"]})
        self.stage2_tensors, self.stage2 = named, True
        x = preprocess(self.support_images, self.image.input_spec, self.task.device)
        return lambda: self.image.encode(x)

    def exposed(self) -> AdaptedImageEncoder:
        """The adapted image encoder as ``encoder_``: its identity extends the frozen one's with the digest of the
        tensors stage 1 (and stage 2) trained."""
        if self.stage2:
            for _, parameter in self.stage2_tensors:
                parameter.requires_grad_(False)
            named, tag = list(self.stage1_tensors) + list(self.stage2_tensors), "hica-stage1+2"
        else:
            named, tag = self.stage1_tensors, "hica-stage1"
        identity = f"{self.task.encoders.image.identity}+{tag}:sha256={weights_digest(named)}"
        return AdaptedImageEncoder(self.image, identity)

"""HiCA: two-stage adaptation of a frozen image/text encoder pair for few-shot classification.

Stage 1 (domain pretraining, no labels; cached per encoder × dataset × descriptor corpus):
  * visual: a residual MLP adapter ``a`` on the frozen pooled image features of the *whole unlabeled train
    split*, trained DeepCluster-style: k-means pseudo-labels on the adapted features, re-clustered every
    ``stage1_recluster`` epochs, cross-entropy through a linear cluster head.
  * text: a residual MLP adapter ``b`` on the frozen text embeddings of the dataset's descriptor corpus,
    trained contrastively (descriptors of the same class are positives, SupCon-style).
  This is the fast variant (``hica`` and its ablations): an adapter on cached features costs seconds on 2 CPU
  cores, where re-running the encoder over the train split for every DeepCluster epoch costs minutes.

Stage 1 as the paper describes it (``stage1_encoder=true``, the ``hica-encoder`` variant; cached the same way):
  * visual: the last ``stage1_blocks`` blocks of a private copy of the image encoder (and the layers after them)
    are fine-tuned DeepCluster-style on the unlabeled train split's images (at most ``stage1_max_images``, a fixed
    random subset): each of ``stage1_encoder_epochs`` epochs re-encodes them, re-clusters (k-means,
    ``stage1_clusters``), and trains the tail through a new linear cluster head, clusters sampled uniformly;
  * text: the last ``stage1_text_layers`` layers of a copy of the text encoder are fine-tuned on the descriptor
    corpus with the same supervised-contrastive objective (when the text encoder offers ``module`` and ``embed``;
    else it stays frozen, and ``fit_info`` says so).
  Stage 2 then aligns the adapted encoders' features (no feature adapters); with ``stage2_blocks`` > 0 the last
  blocks of the image encoder train in stage 2 too. The harness encodes the test images through the adapted image
  encoder (``encoder_``). Defaults and why: 3 epochs over at most 1024 images, the last block, lr 1e-4 (image) and
  2e-5 (text: BERT-style fine-tuning): stage 1 then takes about 2 minutes once per dataset on 2 CPU cores with
  EfficientNet-Lite0 (each epoch encodes the images twice: to cluster, then to train), and every cell reuses it;
  ``stage2_blocks=0`` because a 2-40 image support set would over-fit a trunk block and each of the 150 stage-2
  steps would then run the encoder.

Stage 2 (hierarchical contrastive alignment on the k-shot support set): projection heads ``g_v`` (image)
and ``g_t`` (text) into a shared space, trained with
  L = L_global + λ1·L_local + λ2·L_cross
  * L_global: InfoNCE between support image embeddings g_v(a(f)) and class text embeddings g_t(b(t_c))
    (t_c = mean of the class's global descriptors);
  * L_local: InfoNCE between K ROI embeddings per support image (dense encoder features pooled inside the
    boxes of an ROI extractor, one encoder pass per image, when the encoder's map has its embedding's width; else,
    e.g. unprojected ViT tokens, each box's crop re-encoded) and the fine-grained local descriptors;
  * L_cross: hinge pushing mismatched image/text similarities at least δ below the matched one.
Prediction: softmax over cosine(g_v(a(f)), g_t(b(t_c))) / τ.

Its building blocks are plugins, built through ``task.components`` from the run's own registry, so a user's plugin
(installed, or loaded with ``-p``) can replace any of them by name: the descriptor generator (``descriptors``; with
``noise`` > 0 wrapped in ``noisy``), the ROI extractor (``roi``) and the three losses (``loss_global``,
``loss_local``, ``loss_cross``). A loss gets ``temperature`` (from ``tau``) or ``margin`` (from ``delta``) when it
declares that option, and is called with the keyword tensors of the loss it replaces (see :mod:`.losses`).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hica_bench.errors import NotApplicable
from hica_bench.files import atomic_path, digest
from hica_bench.interfaces import Components, FewShotTask, Option, PluginSpec

log = logging.getLogger(__name__)

def _adapter(width: int, hidden: int):
    """x + MLP(x), the MLP's last layer zero-initialised so the adapter starts as the identity."""
    import torch.nn as nn

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

        def forward(self, x):
            return x + self.mlp(x)

    return Residual()


class HiCA:
    """The HiCA method (see the module docstring) with stage 1 on cached features: the ``hica`` variant and its
    ablations. :class:`HiCAEncoder` runs stage 1 on the encoders themselves.

    Its options are this signature (the registry reads them and their defaults from it; :data:`RANGES` says what each
    accepts): ``lambda1`` the weight of the local (ROI ↔ fine-grained descriptor) loss, ``lambda2`` the weight of the
    cross-category margin loss, ``delta`` its margin δ (cosine units), ``tau`` the temperature of both InfoNCE losses
    and of prediction, ``rois`` K regions per image, ``roi`` the ROI extractor (``hica-bench list roi-extractor``),
    ``descriptors`` the descriptor generator (templates, knowledge, noisy), ``noise`` the fraction of descriptors the
    ``noisy`` generator corrupts (0 = clean), ``loss_global`` / ``loss_local`` / ``loss_cross`` the image ↔ class-text,
    ROI ↔ descriptor and cross-category margin losses (``hica-bench list loss``), ``dim`` the shared embedding width of
    the projection heads, ``epochs`` stage 2's full-batch steps, ``lr`` and ``weight_decay`` its optimiser's,
    ``stage1`` whether stage 1 runs, and ``stage1_epochs``, ``stage1_clusters``, ``stage1_recluster`` (epochs between
    two k-means) and ``stage1_lr`` those of stage 1."""

    def __init__(self, lambda1: float = 0.5, lambda2: float = 0.5, delta: float = 0.2, tau: float = 0.07,
                 rois: int = 4, roi: str = "saliency", descriptors: str = "knowledge", noise: float = 0.0,
                 loss_global: str = "global-infonce", loss_local: str = "local-infonce",
                 loss_cross: str = "cross-margin", dim: int = 256, epochs: int = 150, lr: float = 1e-3,
                 weight_decay: float = 1e-4, stage1: bool = True, stage1_epochs: int = 30, stage1_clusters: int = 32,
                 stage1_recluster: int = 5, stage1_lr: float = 1e-3) -> None:
        options = {name: value for name, value in locals().items() if name != "self"}
        self.options = {**options, "stage1_encoder": False}
        self._declare_needs()

    def _declare_needs(self) -> None:
        o = self.options
        needs = {"image_features", "text_encoder", "class_texts"}
        if o["stage1"] and not o["stage1_encoder"]:
            needs.add("train_features")
        if o["lambda1"] > 0 or o["stage1_encoder"]:
            needs.add("encoders")  # raw images + the image encoder: ROI features, stage 1 on the encoder
        self.needs = frozenset(needs)

    # ------------------------------------------------------------------ components
    @staticmethod
    def _components(task: FewShotTask) -> Components:
        if task.components is None:
            raise ValueError("HiCA builds its descriptor generator, ROI extractor and losses through task.components; "
                             "this task has none (the runner and hica_bench.testing.toy_task provide them)")
        return task.components

    def _loss(self, components: Components, option: str, **settings):
        """The loss named by ``option``, given those of ``settings`` it declares (temperature, margin)."""
        name = self.options[option]
        accepted = components.options("loss", name)
        return components.build("loss", name, **{k: v for k, v in settings.items() if k in accepted})

    def _descriptors(self, task: FewShotTask) -> list[dict[str, list[str]]]:
        """Each class's global and local texts: the dataset's prompt file's descriptors where it gives them (the
        ``descriptors`` generator's for the classes it leaves out), else the generator's; with ``noise`` > 0 a
        fraction of them corrupted (the ``noisy`` generator's rules)."""
        o = self.options
        components = self._components(task)
        given = task.prompts.descriptors if task.prompts is not None else None
        if given is not None:
            from hica_bench_hica.descriptors import FixedDescriptors, NoisyDescriptors

            own = components.build("descriptor-generator", o["descriptors"]).describe(task.dataset, list(task.class_names))
            fixed = FixedDescriptors([{"global": list(d["global"]), "local": list(d["local"])} if d else own[c]
                                      for c, d in enumerate(given)])
            label = f"prompt file {task.prompts.source}" + (f" (others: {o['descriptors']})" if None in given else "")
            generator = NoisyDescriptors(fraction=o["noise"], base=fixed, seed=0) if o["noise"] > 0 else fixed
            label = f"noisy:fraction={o['noise']}:base={label}:seed=0" if o["noise"] > 0 else label
        elif o["noise"] > 0:
            generator = components.build("descriptor-generator", "noisy", fraction=o["noise"], base=o["descriptors"], seed=0)
            label = f"noisy:fraction={o['noise']}:base={o['descriptors']}:seed=0"
        else:
            generator, label = components.build("descriptor-generator", o["descriptors"]), o["descriptors"]
        described = generator.describe(task.dataset, list(task.class_names))
        if len(described) != task.n_classes or any(not d.get("global") for d in described):
            raise ValueError(f"descriptor generator {label!r} gave no global text for some class")
        self.descriptor_label_ = label
        return described

    # ------------------------------------------------------------------ stage 1
    def _stage1(self, task: FewShotTask, texts_by_class: list[list[str]], text_features: np.ndarray, torch,
                width: int):
        """Train (or load from the cache) the visual and text adapters; returns (a, b) as torch modules (identities
        without stage 1, or when stage 1 adapted the encoders instead)."""
        from safetensors.torch import load_file, save_file

        o = self.options
        with torch.random.fork_rng(devices=[]):  # stage 1 is shared by every cell: its seed is fixed
            torch.manual_seed(0)
            visual = _adapter(width, 512)
            textual = _adapter(text_features.shape[1], 256)
        if not o["stage1"] or o["stage1_encoder"]:
            return visual.eval(), textual.eval()  # identity adapters (zero-initialised residuals)
        train = task.train_features
        key = digest([
            "hica-stage1-v1", task.encoders.image.identity, task.encoders.text.identity, task.dataset,
            hashlib.sha256(np.ascontiguousarray(train).tobytes()).hexdigest(), texts_by_class,
            {k: o[k] for k in ("stage1_epochs", "stage1_clusters", "stage1_recluster", "stage1_lr")},
        ], 24)
        path = Path(task.cache_dir) / "hica-stage1" / f"{key}.safetensors" if task.cache_dir else None
        if path is not None and path.exists():
            try:
                state = load_file(str(path))
                visual.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("v.")})
                textual.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("t.")})
                self.stage1_cached_ = True
                return visual.eval(), textual.eval()
            except Exception as exc:  # corrupt or stale: retrain, never trust it
                log.warning("HiCA stage-1 cache %s unreadable (%s); retraining", path.name, exc)
        self.stage1_cached_ = False
        generator = torch.Generator().manual_seed(0)
        self._train_visual(visual, torch.from_numpy(_normalise(train)).float(), generator, torch)
        class_of = np.concatenate([[c] * len(t) for c, t in enumerate(texts_by_class)])
        self._train_text(textual, torch.from_numpy(_normalise(text_features)).float(), torch.from_numpy(class_of), torch)
        if path is None:  # no cache folder given: nothing is kept
            return visual.eval(), textual.eval()
        state = {f"v.{k}": v.contiguous() for k, v in visual.state_dict().items()}
        state |= {f"t.{k}": v.contiguous() for k, v in textual.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
        return visual.eval(), textual.eval()

    def _train_visual(self, visual, features, generator, torch) -> None:
        """DeepCluster on the adapter: k-means on adapted features -> pseudo-labels -> cross-entropy."""
        from sklearn.cluster import KMeans

        o = self.options
        n_clusters = min(o["stage1_clusters"], len(features) // 2)
        head = torch.nn.Linear(features.shape[1], n_clusters)
        optimiser = torch.optim.AdamW(list(visual.parameters()) + list(head.parameters()), lr=o["stage1_lr"], weight_decay=1e-4)
        batch = 256
        for epoch in range(o["stage1_epochs"]):
            if epoch % o["stage1_recluster"] == 0:
                with torch.no_grad():
                    adapted = torch.nn.functional.normalize(visual(features), dim=1).numpy()
                kmeans = KMeans(n_clusters=n_clusters, n_init=1, random_state=epoch, max_iter=100).fit(adapted)
                pseudo = torch.from_numpy(kmeans.labels_.astype(np.int64))
                torch.nn.init.normal_(head.weight, std=0.01, generator=generator)  # new clusters: new head
                torch.nn.init.zeros_(head.bias)
                # DeepCluster's remedy against a trivial solution: sample clusters uniformly
                weights = 1.0 / torch.bincount(pseudo, minlength=n_clusters).clamp(min=1).float()
            order = torch.multinomial(weights[pseudo], len(features), replacement=True, generator=generator)
            for start in range(0, len(order), batch):
                idx = order[start : start + batch]
                logits = head(torch.nn.functional.normalize(visual(features[idx]), dim=1))
                loss = torch.nn.functional.cross_entropy(logits, pseudo[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()

    def _train_text(self, textual, embeddings, classes, torch) -> None:
        """Refine the text side on the descriptor corpus: same-class descriptors are positives (SupCon)."""
        o = self.options
        optimiser = torch.optim.AdamW(textual.parameters(), lr=o["stage1_lr"], weight_decay=1e-4)
        same = (classes[:, None] == classes[None, :]).float()
        eye = torch.eye(len(classes))
        positives = same - eye
        if positives.sum() == 0:
            return
        for _ in range(o["stage1_epochs"] * 5):
            z = torch.nn.functional.normalize(textual(embeddings), dim=1)
            logits = z @ z.T / o["tau"] - eye * 1e9
            log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
            has = positives.sum(1) > 0
            loss = -((log_prob * positives).sum(1)[has] / positives.sum(1)[has]).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

    # ------------------------------------------------------------------ ROIs
    def _roi_features(self, task: FewShotTask, torch, encoder) -> np.ndarray:
        """(N_support, K, D) features of ``encoder`` pooled inside K ROIs per support image (one encoder pass); the
        boxes are kept in ``support_boxes_`` (N_support, K, 4), in pixels of the encoder's input."""
        extractor = self._components(task).build("roi-extractor", self.options["roi"])
        self._roi_extractor, self._roi_encoder, self._device = extractor, encoder, task.device
        boxes, pooled = self._regions(_support_images(task), torch)
        self.support_boxes_ = boxes
        return pooled

    def _regions(self, images: np.ndarray, torch) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (N, K, 4) in pixels of the encoder's input, features (N, K, D) pooled inside them) of uint8
        ``images``, with the ROI extractor and encoder ``fit`` used."""
        from hica_bench.data import preprocess
        from hica_bench_hica.rois import roi_pool

        encoder, extractor = self._roi_encoder, self._roi_extractor
        out, all_boxes = [], []
        with torch.inference_mode():
            for start in range(0, len(images), 16):
                x = preprocess(images[start : start + 16], encoder.input_spec, self._device)
                dense = encoder.dense(x) if hasattr(encoder, "dense") else None
                boxes = extractor.extract(x, self.options["rois"], dense)
                if dense is not None and dense.shape[1] == encoder.embed_dim:  # a map in the embedding's own space
                    pooled = roi_pool(dense.float(), boxes, x.shape[-1])
                else:  # no dense map, or one of another width (e.g. unprojected ViT tokens): re-encode each crop
                    pooled = torch.stack([
                        encoder.encode(torch.stack([
                            torch.nn.functional.interpolate(x[i : i + 1, :, y0:y1, x0:x1], size=x.shape[-2:], mode="bilinear")[0]
                            for x0, y0, x1, y1 in boxes[i].tolist()
                        ])).float()
                        for i in range(len(x))
                    ])
                out.append(pooled.cpu().numpy())
                all_boxes.append(np.asarray(boxes.cpu() if hasattr(boxes, "cpu") else boxes, dtype=np.int64))
        return np.concatenate(all_boxes), np.concatenate(out).astype(np.float32)

    # ------------------------------------------------------------------ fit / predict
    def fit(self, task: FewShotTask) -> "HiCA":
        import torch

        if task.encoders.text is None:
            raise NotApplicable("HiCA needs a text encoder for the class descriptors")
        o = self.options
        described = self._descriptors(task)
        global_texts = [d["global"] for d in described]
        local_texts = [d.get("local") or d["global"] for d in described]
        corpus = [t for texts in global_texts for t in texts] + [t for texts in local_texts for t in texts]
        corpus_class = [c for c, texts in enumerate(global_texts) for _ in texts] + [c for c, texts in enumerate(local_texts) for _ in texts]
        by_class = [[t for t, c in zip(corpus, corpus_class) if c == k] for k in range(task.n_classes)]
        image_encoder, text_encoder, support_features = task.encoders.image, task.encoders.text, task.support_features
        self.encoder_, self.fit_info_ = None, {}
        self._roi_extractor = None
        stage1 = None  # stage 1 on the encoders (HiCAEncoder): the adapted copies and what trained them
        if o["stage1_encoder"]:
            from hica_bench_hica.encoder_stage1 import EncoderStage1

            stage1 = EncoderStage1(task, o, _support_images(task))
            self.fit_info_.update(stage1.adapt(corpus, corpus_class, torch))
            image_encoder, text_encoder = stage1.image, stage1.text
            support_features = stage1.support_features(torch)
        corpus_features = np.asarray(text_encoder.encode(corpus), dtype=np.float32)
        ordered = np.argsort(corpus_class, kind="stable")
        visual, textual = self._stage1(task, by_class, corpus_features[ordered], torch, support_features.shape[1])
        for module in (visual, textual):
            module.requires_grad_(False)

        n_global = sum(len(t) for t in global_texts)
        with torch.no_grad():
            text_all = textual(torch.from_numpy(_normalise(corpus_features)).float())
            support = visual(torch.from_numpy(_normalise(support_features)).float())
        class_text = torch.stack([text_all[:n_global][torch.tensor(corpus_class[:n_global]) == c].mean(0) for c in range(task.n_classes)])
        local_lengths = [len(t) for t in local_texts]
        local = torch.zeros(task.n_classes, max(local_lengths), text_all.shape[1])
        mask = torch.zeros(task.n_classes, max(local_lengths), dtype=torch.bool)
        cursor = n_global
        for c, length in enumerate(local_lengths):
            local[c, :length] = text_all[cursor : cursor + length]
            mask[c, :length] = True
            cursor += length
        labels = torch.from_numpy(np.asarray(task.support_labels, dtype=np.int64))
        rois = None
        if o["lambda1"] > 0:
            with torch.no_grad():
                raw = torch.from_numpy(self._roi_features(task, torch, image_encoder))
                rois = visual(torch.nn.functional.normalize(raw, dim=-1))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(task.seed)
            image_head = torch.nn.Linear(support.shape[1], o["dim"])
            text_head = torch.nn.Linear(class_text.shape[1], o["dim"])
        params = list(image_head.parameters()) + list(text_head.parameters())
        optimiser = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
        trunk = None  # stage 2 on the encoder's last blocks too: the support images, re-encoded at every step
        if stage1 is not None and o["stage2_blocks"] > 0:
            trunk = stage1.stage2_trunk(optimiser, torch)
        components = self._components(task)
        global_loss = self._loss(components, "loss_global", temperature=o["tau"])
        local_loss = self._loss(components, "loss_local", temperature=o["tau"]) if rois is not None else None
        cross_loss = self._loss(components, "loss_cross", margin=o["delta"]) if o["lambda2"] > 0 else None
        self.loss_history_ = []
        for _ in range(o["epochs"]):
            if trunk is not None:
                support = visual(torch.nn.functional.normalize(trunk().float().cpu(), dim=1))  # heads live on the CPU
            image_embeddings = image_head(support)
            text_embeddings = text_head(class_text)
            loss = global_loss(image_embeddings=image_embeddings, text_embeddings=text_embeddings, labels=labels)
            if rois is not None:
                loss = loss + o["lambda1"] * local_loss(
                    roi_embeddings=image_head(rois), local_text_embeddings=text_head(local), labels=labels, local_mask=mask
                )
            if cross_loss is not None:
                loss = loss + o["lambda2"] * cross_loss(image_embeddings=image_embeddings, text_embeddings=text_embeddings, labels=labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            self.loss_history_.append(loss.item())
        self._visual, self._image_head = visual, image_head.eval()
        with torch.no_grad():
            self.class_embeddings_ = torch.nn.functional.normalize(text_head(class_text), dim=1)
            # what regions_ matches each region against: every class's local descriptors, in the shared space
            self._local_embeddings = torch.nn.functional.normalize(text_head(local), dim=-1)
        self._local_mask, self.local_texts_ = mask, [list(texts) for texts in local_texts]
        if stage1 is not None:
            self.encoder_ = stage1.exposed()
        self.fit_info_ = {"descriptors": self.descriptor_label_, **self.fit_info_}
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = self._visual(torch.from_numpy(_normalise(features)).float())
            z = torch.nn.functional.normalize(self._image_head(x), dim=1)
            logits = z @ self.class_embeddings_.T / self.options["tau"]
            return torch.softmax(logits.double(), dim=1).numpy()

    def head_(self, features):
        """Differentiable logits from (N, D) torch features of the (adapted) image encoder: cosine of the projected
        image embedding to each class's text embedding / ``tau`` (``predict_proba``'s logits)."""
        import torch

        x = self._visual(torch.nn.functional.normalize(features.float().cpu(), dim=1))
        z = torch.nn.functional.normalize(self._image_head(x), dim=1)
        return z @ self.class_embeddings_.T / self.options["tau"]

    def regions_(self, images: np.ndarray) -> list[list[dict]] | None:
        """HiCA's evidence for uint8 ``images``: per image, its K ROI boxes (from the ROI extractor and encoder ``fit``
        used; ``box`` in the images' own pixels, x0, y0, x1, y1), each with the local descriptor (of any class) its
        projected embedding matches best, that class and the cosine similarity in the shared space. None when the
        method used no regions (``lambda1`` = 0)."""
        import torch

        if getattr(self, "_roi_extractor", None) is None:
            return None
        boxes, pooled = self._regions(np.asarray(images), torch)
        scale_y = images.shape[1] / self._roi_encoder.input_spec.size
        scale_x = images.shape[2] / self._roi_encoder.input_spec.size
        with torch.no_grad():
            x = self._visual(torch.nn.functional.normalize(torch.from_numpy(pooled), dim=-1))
            z = torch.nn.functional.normalize(self._image_head(x), dim=-1)  # (N, K, dim)
            similarity = torch.einsum("nkd,cld->nkcl", z, self._local_embeddings)
            similarity = similarity.masked_fill(~self._local_mask[None, None], float("-inf"))
        found = []
        for i in range(len(images)):
            regions = []
            for r in range(boxes.shape[1]):
                flat = int(similarity[i, r].flatten().argmax())
                c, d = divmod(flat, similarity.shape[-1])
                x0, y0, x1, y1 = boxes[i, r].tolist()
                regions.append({"box": [int(np.floor(x0 * scale_x)), int(np.floor(y0 * scale_y)),
                                        int(np.ceil(x1 * scale_x)), int(np.ceil(y1 * scale_y))],
                                "box_encoder_pixels": [x0, y0, x1, y1], "class": c,
                                "descriptor": self.local_texts_[c][d], "similarity": round(float(similarity[i, r, c, d]), 4)})
            found.append(regions)
        return found


class HiCAEncoder(HiCA):
    """HiCA with stage 1 on the encoders themselves, as the paper describes it (the ``hica-encoder`` variant; see the
    module docstring and :class:`~hica_bench_hica.encoder_stage1.EncoderStage1`). Its options are HiCA's and these:
    ``stage1_encoder`` (false: stage 1 on features, as :class:`HiCA`), ``stage1_blocks`` the image encoder blocks
    fine-tuned in stage 1 (with the layers after them), ``stage1_text_layers`` the text encoder layers fine-tuned on
    the descriptor corpus (0: the text encoder stays frozen), ``stage1_encoder_epochs``, ``stage1_max_images``,
    ``stage1_encoder_lr``, ``stage1_text_lr``, and ``stage2_blocks`` the image encoder blocks also trained in stage 2
    (0: the stage-1 encoder stays fixed). A class of its own so that the feature-adapter variants' options, and so
    their results' identities, stay as they were before it existed."""

    def __init__(self, stage1_encoder: bool = True, stage1_blocks: int = 1, stage1_text_layers: int = 1,
                 stage1_encoder_epochs: int = 3, stage1_max_images: int = 1024, stage1_encoder_lr: float = 1e-4,
                 stage1_text_lr: float = 2e-5, stage2_blocks: int = 0, **hica: Any) -> None:
        own = {name: value for name, value in locals().items() if name not in ("self", "hica", "__class__")}
        super().__init__(**hica)
        self.options.update(own)
        self._declare_needs()

    # HiCA's options reach HiCA.__init__ through **hica; the signature the registry reads (and help() shows) names
    # them, with HiCA's defaults, then these, so that each default is written once.
    __init__.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
          for signature in (inspect.signature(HiCA.__init__), inspect.signature(__init__))
          for name, parameter in signature.parameters.items()
          if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD),
    ])


_POSITIVE = Option(low=0, low_open=True)
#: what each HiCA option accepts (the registry checks them before a run starts)
RANGES = {
    "lambda1": Option(low=0), "lambda2": Option(low=0), "delta": Option(low=0), "tau": _POSITIVE, "rois": Option(low=1),
    "noise": Option(low=0, high=1), "dim": Option(low=1), "epochs": Option(low=1), "lr": _POSITIVE,
    "weight_decay": Option(low=0), "stage1_epochs": Option(low=1), "stage1_clusters": Option(low=2),
    "stage1_recluster": Option(low=1), "stage1_lr": _POSITIVE,
}
#: ... and those of :class:`HiCAEncoder`'s own
ENCODER_RANGES = {
    "stage1_blocks": Option(low=1), "stage1_text_layers": Option(low=0), "stage1_encoder_epochs": Option(low=1),
    "stage1_max_images": Option(low=4), "stage1_encoder_lr": _POSITIVE, "stage1_text_lr": _POSITIVE,
    "stage2_blocks": Option(low=0),
}
#: HiCA's options that name other plugins (checked before a run starts; recorded in each result's identity)
COMPONENTS = {"roi": "roi-extractor", "descriptors": "descriptor-generator", "loss_global": "loss",
              "loss_local": "loss", "loss_cross": "loss"}

#: HiCA and its ablations: each variant is HiCA with other defaults (a ``functools.partial``), or HiCAEncoder
SPECS = [
    PluginSpec("method", "hica", "HiCA: stage-1 domain adaptation + hierarchical contrastive alignment (global + local "
               "+ cross)", HiCA, RANGES, COMPONENTS, search={"lambda1": (0.5, 1.0), "lambda2": (0.5, 1.0),
                                                             "delta": (0.2, 0.5)}),
    PluginSpec("method", "hica-no-local", "HiCA ablation: without the local ROI ↔ descriptor loss (λ1 = 0)",
               partial(HiCA, lambda1=0.0), RANGES, COMPONENTS),
    PluginSpec("method", "hica-no-cross", "HiCA ablation: without the cross-category margin loss (λ2 = 0)",
               partial(HiCA, lambda2=0.0), RANGES, COMPONENTS),
    PluginSpec("method", "hica-no-stage1", "HiCA ablation: without stage-1 domain pretraining",
               partial(HiCA, stage1=False), RANGES, COMPONENTS),
    PluginSpec("method", "hica-encoder", "HiCA as in the paper: stage 1 fine-tunes the image encoder's last blocks "
               "(DeepCluster on the train images) and the text encoder's last layers (descriptor corpus); predicts "
               "through the adapted encoder", HiCAEncoder, {**RANGES, **ENCODER_RANGES}, COMPONENTS,
               # stage 1 is cached and shared by the 8 candidates: each costs a stage 2 and one encoding of the
               # validation images through its adapted encoder
               search={"lambda1": (0.5, 1.0), "lambda2": (0.5, 1.0), "delta": (0.2, 0.5)}),
]


def _support_images(task: FewShotTask) -> np.ndarray:
    """The support images (uint8), in support order (read from the lazy train split in index order)."""
    images = np.asarray(task.train_images[np.sort(task.support_indices)])
    return images[np.argsort(np.argsort(task.support_indices))]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

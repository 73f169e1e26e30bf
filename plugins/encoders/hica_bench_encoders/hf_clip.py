"""Hugging Face ``transformers`` CLIP and SigLIP checkpoints as aligned pairs: PubMedCLIP, PLIP, any CLIPModel or
SiglipModel folder (``AutoModel``), with the checkpoint's own tokenizer and image processor config.

``path`` is a local folder (``config.json``, weights, tokenizer files, ``preprocessor_config.json``: what
``save_pretrained`` writes and what the Hub repositories hold) or a Hub repository name (HF cache first, then the
network; offline, one line says what to download). The identity is the digest of the folder's weight files. The
image embedding is ``get_image_features`` (the projected pooled token), the text embedding ``get_text_features``;
SigLIP's text tower is fed ``max_length`` padding, as it was trained.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from hica_bench.errors import UserError
from hica_bench.interfaces import EncoderPair, InputSpec, PluginSpec
from hica_bench_encoders.text import folder_digest, encode_batched
from hica_bench_encoders.weights import HUB_PATH, first_line, hf_input_spec, hub_folder, state_dict_sha256

#: Hugging Face repositories of the named checkpoints (the first run downloads them into the HF cache)
PUBMEDCLIP, PLIP, SIGLIP = "flaviagiammarino/pubmed-clip-vit-base-patch32", "vinid/plip", "google/siglip-base-patch16-224"

def pooled(output: Any) -> Any:
    """``get_image_features``/``get_text_features`` give a tensor (transformers 4) or an output whose
    ``pooler_output`` is the embedding (transformers 5)."""
    import torch

    return output if torch.is_tensor(output) else output.pooler_output


def fold(tokens: Any, prefix: int) -> Any:
    """(N, T, C) vision tokens -> (N, C, h, w), without the first ``prefix`` (class) tokens."""
    tokens = tokens[:, prefix:]
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise ValueError(f"cannot fold {tokens.shape[1]} patch tokens into a square map")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


class HFCLIPImage:
    """``encode(x)`` = ``model.get_image_features(pixel_values=x)``; ``dense(x)`` = the vision tower's patch tokens."""

    def __init__(self, model: Any, identity: str, input_spec: InputSpec, embed_dim: int) -> None:
        self.model, self.identity, self.input_spec, self.embed_dim = model, identity, input_spec, embed_dim
        self.prefix = 0 if model.config.model_type == "siglip" else 1  # CLIP has a class token; SigLIP pools by attention

    def encode(self, images: Any) -> Any:
        return pooled(self.model.get_image_features(pixel_values=images))

    def dense(self, images: Any) -> Any:
        return fold(self.model.vision_model(pixel_values=images).last_hidden_state, self.prefix)


class HFCLIPText:
    """``encode(texts)`` = ``model.get_text_features`` of the checkpoint's tokenizer's ids, as float32 numpy."""

    def __init__(self, model: Any, tokenizer: Any, identity: str, device: str, embed_dim: int) -> None:
        self.model, self.tokenizer, self.identity, self.device, self.embed_dim = model, tokenizer, identity, device, embed_dim
        text = model.config.text_config
        self.siglip = model.config.model_type == "siglip"
        self.max_length = int(getattr(text, "max_position_embeddings", 77) or 77)

    @property
    def module(self):
        """The text tower's modules (for methods that fine-tune a copy of this encoder: see ``embed``)."""
        import torch

        parts = {"text_model": self.model.text_model}
        if isinstance(getattr(self.model, "text_projection", None), torch.nn.Module):
            parts["text_projection"] = self.model.text_projection
        return torch.nn.ModuleDict(parts)

    def embed(self, texts: Sequence[str]):
        """(len(texts), D) text embeddings as a torch tensor with gradients."""
        batch = self.tokenizer(list(texts), padding="max_length" if self.siglip else True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        inputs = {"input_ids": batch["input_ids"].to(self.device)}
        if not self.siglip and "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"].to(self.device)
        return pooled(self.model.get_text_features(**inputs))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return encode_batched(self.embed, texts, self.embed_dim)


def build_pair(device: str, path: str, name: str) -> EncoderPair:
    """A transformers CLIPModel/SiglipModel checkpoint (``path``: folder or Hub name) as an aligned pair, ``name``
    the encoder's (in its identity and messages)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    if not path:
        raise UserError(f"{name} needs path=<a local model folder or a Hugging Face repo name>")
    folder = hub_folder(path, f"{name} model", "path")
    try:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise UserError(f"cannot load {name} from {folder} ({first_line(exc)})") from None
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise UserError(f"{name}: {folder} holds a {type(model).__name__}, not an image-text model such as CLIPModel "
                        "or SiglipModel")
    model.requires_grad_(False)  # frozen: a method adapts a copy
    spec = hf_input_spec(folder, name)
    identity = f"{name}:{model.config.model_type}:sha256={folder_digest(folder) or state_dict_sha256(model)}"
    try:
        with torch.inference_mode():
            embed_dim = int(pooled(model.get_image_features(
                pixel_values=torch.zeros(1, 3, spec.size, spec.size, device=device))).shape[-1])
    except Exception as exc:  # e.g. a processor size the vision tower's position embeddings do not fit
        raise UserError(f"{name}: {folder} does not encode a {spec.size} px image as its processor config says "
                        f"({first_line(exc)})") from None
    image = HFCLIPImage(model, identity, spec, embed_dim)
    text = HFCLIPText(model, tokenizer, f"{identity}/text", device, embed_dim)
    return EncoderPair(image, text, aligned=True, device=device, modules={"model": model, "image": model.vision_model})


def hf_clip_pair(device: str, path: str = "") -> EncoderPair:
    """Any CLIPModel or SiglipModel checkpoint; ``path`` is required."""
    return build_pair(device, path, "hf-clip")


def pubmedclip_pair(device: str, path: str = PUBMEDCLIP) -> EncoderPair:
    return build_pair(device, path, "pubmedclip")


def plip_pair(device: str, path: str = PLIP) -> EncoderPair:
    return build_pair(device, path, "plip")


def siglip_pair(device: str, path: str = SIGLIP) -> EncoderPair:
    return build_pair(device, path, "siglip")


SPECS = [
    PluginSpec("encoder", "hf-clip", f"Any transformers CLIPModel or SiglipModel checkpoint, aligned. path: {HUB_PATH}; "
               "required.", hf_clip_pair),
    PluginSpec("encoder", "pubmedclip", f"PubMedCLIP (CLIP ViT-B/32 fine-tuned on ROCO), aligned. path: {HUB_PATH} "
               f"(default {PUBMEDCLIP}).", pubmedclip_pair),
    PluginSpec("encoder", "plip", f"PLIP (CLIP ViT-B/32 on OpenPath pathology tweets), aligned. path: {HUB_PATH} "
               f"(default {PLIP}).", plip_pair),
    PluginSpec("encoder", "siglip", f"SigLIP (transformers SiglipModel), aligned. path: {HUB_PATH} (default {SIGLIP}).",
               siglip_pair),
]

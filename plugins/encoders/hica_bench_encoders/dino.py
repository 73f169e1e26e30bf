"""DINOv2 and RAD-DINO (self-supervised ViTs, ``transformers`` ``Dinov2Model``) as image-only encoders, with dense
features for ROI pooling; a stand-alone text encoder beside them for methods that read class texts (not aligned).

``path`` is a local folder (``config.json``, weights, ``preprocessor_config.json``) or a Hub repository name (HF
cache first, then the network). ``pool=cls`` embeds an image by its class token after the final norm (the
``pooler_output``: what DINOv2's linear probes and RAD-DINO's model card use), ``pool=mean`` by the mean of its
patch tokens. The input spec comes from the checkpoint's own image processor config; the identity from the digest
of the folder's weight files. (DINOv2 is also reachable through ``timm:model=vit_small_patch14_dinov2...``.)
"""

from __future__ import annotations

from typing import Any

from hica_bench.errors import UserError
from hica_bench.interfaces import EncoderPair, InputSpec, Option, PluginSpec
from hica_bench_encoders.hf_clip import fold
from hica_bench_encoders.text import folder_digest, build_text
from hica_bench_encoders.weights import HUB_PATH, first_line, hf_input_spec, hub_folder, state_dict_sha256

POOLS = ("cls", "mean")
DINOV2, RAD_DINO = "facebook/dinov2-small", "microsoft/rad-dino"  #: their Hugging Face repositories


class DinoImage:
    """``encode(x)``: the class token (``pool=cls``) or the mean patch token (``pool=mean``), after the final norm;
    ``dense(x)``: the patch tokens as a (N, C, h, w) map."""

    def __init__(self, model: Any, identity: str, input_spec: InputSpec, pool: str) -> None:
        self.model, self.identity, self.input_spec, self.pool = model, identity, input_spec, pool
        self.embed_dim = int(model.config.hidden_size)
        self.prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)

    def encode(self, images: Any) -> Any:
        output = self.model(pixel_values=images)
        if self.pool == "cls":
            return output.pooler_output
        return output.last_hidden_state[:, self.prefix:].mean(dim=1)

    def dense(self, images: Any) -> Any:
        return fold(self.model(pixel_values=images).last_hidden_state, self.prefix)


def dino_pair(device: str, path: str, pool: str, text: str, name: str) -> EncoderPair:
    """A DINOv2-family checkpoint (``path``: folder or Hub name) + the ``text`` encoder (not aligned)."""
    from transformers import AutoModel

    if pool not in POOLS:
        raise UserError(f"{name} pool={pool!r}: must be one of {', '.join(POOLS)}")
    folder = hub_folder(path, f"{name} model", "path")
    try:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    except Exception as exc:
        raise UserError(f"cannot load {name} from {folder} ({first_line(exc)})") from None
    if model.config.model_type not in ("dinov2", "dinov2_with_registers"):
        raise UserError(f"{name}: {folder} holds a {model.config.model_type} model, not DINOv2")
    model.requires_grad_(False)  # frozen: a method adapts a copy
    spec = hf_input_spec(folder, name)
    identity = f"{name}:{pool}:sha256={folder_digest(folder) or state_dict_sha256(model)}"
    image = DinoImage(model, identity, spec, pool)
    return EncoderPair(image, build_text(text, device), aligned=False, device=device, modules={"image": model})


def dinov2_pair(device: str, path: str = DINOV2, pool: str = "cls", text: str = "minilm") -> EncoderPair:
    return dino_pair(device, path, pool, text, "dinov2")


def rad_dino_pair(device: str, path: str = RAD_DINO, pool: str = "cls", text: str = "minilm") -> EncoderPair:
    return dino_pair(device, path, pool, text, "rad-dino")


SPECS = [
    PluginSpec("encoder", "dinov2", f"DINOv2 (transformers), image only, dense features; pool: cls or mean (patch "
               f"tokens). path: {HUB_PATH} (default {DINOV2}). text: as for timm. Not aligned.", dinov2_pair,
               {"pool": Option(choices=POOLS)}),
    PluginSpec("encoder", "rad-dino", f"RAD-DINO (DINOv2 on chest X-rays, transformers), image only, dense features; "
               f"pool: cls or mean. path: {HUB_PATH} (default {RAD_DINO}). text: as for timm. Not aligned.",
               rad_dino_pair, {"pool": Option(choices=POOLS)}),
]

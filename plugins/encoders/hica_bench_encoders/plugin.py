"""The ``hica_bench_encoders`` hook: it collects the encoder pairs each family module declares beside its factories
(:mod:`.timm_encoders`, :mod:`.openclip_encoders`, :mod:`.monai3d`, :mod:`.hf_clip`, :mod:`.dino`, :mod:`.medclip`).

Every factory is ``factory(device, **options) -> EncoderPair`` with models in eval mode on ``device``; its options and
their defaults are its signature's. Identities are ``<family>:<model>:sha256=<digest>``: the checkpoint file's sha256,
or for weights not read from one file (random init with seed 0) the sha256 of the state dict. The family modules
import torch, timm, open_clip, transformers and monai only inside functions, so loading the registry stays light.
"""

from __future__ import annotations

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec
from hica_bench_encoders import dino, hf_clip, medclip, monai3d, openclip_encoders, timm_encoders


@hookimpl
def hica_bench_encoders() -> list[PluginSpec]:
    return [*timm_encoders.SPECS, *openclip_encoders.SPECS, *monai3d.SPECS, *hf_clip.SPECS, *dino.SPECS,
            *medclip.SPECS]

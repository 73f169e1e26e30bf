"""Where the encoders and methods run: ``--device auto``, ``cpu`` or ``cuda[:N]`` resolved to a device torch can
use, without importing torch when no GPU driver is there."""

from __future__ import annotations

import os

from hica_bench.errors import UserError


def gpu_driver_present() -> bool:
    """Whether a GPU driver is there for torch to use (NVIDIA's ``libcuda`` loads, or ROCm's ``/dev/kfd`` exists, and
    ``CUDA_VISIBLE_DEVICES`` does not hide every device). Without one torch sees no GPU, so ``--device auto`` is the
    CPU without importing torch (0.5 GB and 3 s for a CUDA wheel: a run served from the cache needs no torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    if os.path.exists("/dev/kfd"):
        return True
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def resolve_device(requested: str) -> str:
    if requested == "cpu":
        return "cpu"
    if requested == "auto" and not gpu_driver_present():
        return "cpu"
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA device is available (use --device cpu or auto)")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {requested!r}")
    return requested

"""3D volumes (MedMNIST 3D: (N, D, H, W) uint8) through the one extraction service.

A dataset says it holds volumes with ``volumetric = True`` (see :class:`hica_bench.interfaces.FewShotDataset`). Its
volumes are encoded one of two ways, and the way is part of the feature identity (cache key, cell identity):

- **By slices, with any 2D encoder** (``--slice-axis``, ``--slice-pool``): each volume is cut into 2D slices along
  axis 0, 1 or 2 of (D, H, W) (``planes``: along all three), the slices go through the extraction service's own
  encoder path in batches (preprocessing, backend, batch size, precision as for 2D images), and their features are
  pooled per volume by their mean (default) or element-wise max (``planes`` pools the slices of all three axes
  together). Volumes are cut a few at a time (:data:`CHUNK_SLICES` slices), so memory stays flat whatever the split.
  Default: axis 0, mean: the cheapest faithful summary (one pass over D slices), and the pooling a linear probe on
  averaged slice features expects.
- **Natively, with a 3D encoder** (an image encoder with ``volumetric = True``, e.g. ``monai-3d``): each volume is
  scaled like a grey image (``x/255``, the spec's first mean and std), resized trilinearly to ``size³``, and encoded
  whole as (N, 1, S, S, S), eager, in batches.

Bad input (one line, exit 2): a slice axis other than 0, 1, 2 or planes, a pool other than mean or max, a 3D encoder
on a 2D dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from hica_bench.data import release_pages
from hica_bench.errors import UserError

AXES = ("0", "1", "2", "planes")
POOLS = ("mean", "max")
CHUNK_SLICES = 256  #: about how many 2D slices are cut and encoded at once (whole volumes)


@dataclass(frozen=True)
class VolumeOptions:
    """How a 2D encoder reads volumes: the slice axis (``0``, ``1``, ``2`` or ``planes``) and the pooling."""

    axis: str = "0"
    pool: str = "mean"

    def __post_init__(self) -> None:
        if str(self.axis) not in AXES:
            raise UserError(f"--slice-axis must be 0, 1, 2 or planes (the axes of a (D, H, W) volume), got {self.axis!r}")
        if self.pool not in POOLS:
            raise UserError(f"--slice-pool must be mean or max, got {self.pool!r}")
        object.__setattr__(self, "axis", str(self.axis))

    @property
    def axes(self) -> tuple[int, ...]:
        return (0, 1, 2) if self.axis == "planes" else (int(self.axis),)

    def describe(self) -> str:
        """Its part of a feature identity."""
        return f"slices:axis={self.axis}:pool={self.pool}"


NATIVE = "native-3d"  #: a 3D encoder's part of a feature identity


def volumetric(dataset: Any) -> bool:
    return bool(getattr(dataset, "volumetric", False))


def native(encoder: Any) -> bool:
    """Whether an image encoder takes whole volumes (N, 1, S, S, S) rather than 2D images."""
    return bool(getattr(encoder, "volumetric", False))


def slices(volumes: np.ndarray, axis: int) -> np.ndarray:
    """(n, D, H, W) -> the (n · size along ``axis``, ·, ·) 2D slices, volume by volume, in order."""
    moved = np.moveaxis(np.asarray(volumes), axis + 1, 1)
    return moved.reshape(-1, *moved.shape[2:])


def encode_sliced(volumes: np.ndarray, options: VolumeOptions, encode: Callable[[np.ndarray], np.ndarray],
                  on_volumes: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, D, H, W) uint8 -> (N, F) float32: each volume's slices through ``encode`` ((n, h, w) uint8 -> (n, F)),
    pooled per volume. A few volumes at a time; ``on_volumes(n)`` after each chunk (progress)."""
    n = len(volumes)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    per_volume = sum(volumes.shape[1 + axis] for axis in options.axes)
    chunk = max(1, CHUNK_SLICES // per_volume)
    out = None
    for start in range(0, n, chunk):
        block = np.asarray(volumes[start : start + chunk])
        parts = []
        for axis in options.axes:
            features = encode(slices(block, axis))
            parts.append(features.reshape(len(block), block.shape[1 + axis], -1))
        stacked = np.concatenate(parts, axis=1)
        release_pages(volumes)  # the chunk is copied: unmap its pages (RSS stays flat)
        pooled = stacked.mean(axis=1) if options.pool == "mean" else stacked.max(axis=1)
        if out is None:
            out = np.empty((n, pooled.shape[1]), np.float32)
        out[start : start + len(block)] = pooled
        if on_volumes is not None:
            on_volumes(len(block))
    return out


def preprocess_volumes(volumes: np.ndarray, spec: Any, device: str = "cpu"):
    """uint8 (n, D, H, W) -> float32 (n, 1, S, S, S): ``(x/255 - mean) / std`` with the spec's first channel's
    values, resized trilinearly to ``spec.size`` on every axis."""
    import torch
    import torch.nn.functional as F

    batch = torch.from_numpy(np.array(volumes, dtype=np.float32, copy=True)).unsqueeze(1).to(device)
    if batch.shape[2:] != (spec.size,) * 3:
        batch = F.interpolate(batch, size=(spec.size,) * 3, mode="trilinear", align_corners=False)
    return ((batch / 255.0 - spec.mean[0]) / spec.std[0]).contiguous()


def encode_native(volumes: np.ndarray, encoder: Any, device: str, batch_size: int,
                  on_volumes: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, D, H, W) uint8 -> (N, F) float32 through a 3D encoder, ``batch_size`` volumes at a time (eager)."""
    import torch

    out = np.empty((len(volumes), encoder.embed_dim), np.float32)
    with torch.inference_mode():
        for start in range(0, len(volumes), batch_size):
            block = np.asarray(volumes[start : start + batch_size])
            release_pages(volumes)
            out[start : start + len(block)] = encoder.encode(preprocess_volumes(block, encoder.input_spec, device)
                                                             ).float().cpu().numpy()
            if on_volumes is not None:
                on_volumes(len(block))
    return out

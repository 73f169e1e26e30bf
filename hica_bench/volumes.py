"""3D volumes (MedMNIST 3D: (N, D, H, W) uint8) through the one extraction service.

A dataset says it holds volumes with ``volumetric = True`` (see :class:`hica_bench.interfaces.FewShotDataset`). Its
volumes are encoded one of two ways, and the way is part of the feature identity (cache key, cell identity):

- **By slices, with any 2D encoder** (``--slice-axis``, ``--slice-pool``, ``--slice-step``): each volume is cut into
  2D slices along axis 0, 1 or 2 of (D, H, W) (``planes``: along all three), every ``step``-th slice of each axis kept
  (default 1: all; with step n, slices n//2, n//2 + n, …: the middle one of each group of n, so a volume's centre is
  kept, and n times fewer slices go through the encoder), the slices go through the extraction service's own
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
MAX_STEP = 64  #: --slice-step at most (MedMNIST 3D volumes have 28 or 64 slices per axis)


@dataclass(frozen=True)
class VolumeOptions:
    """How a 2D encoder reads volumes: the slice axis (``0``, ``1``, ``2`` or ``planes``) and the pooling."""

    axis: str = "0"
    pool: str = "mean"
    step: int = 1  #: every step-th slice of each axis (1: all)

    def __post_init__(self) -> None:
        if str(self.axis) not in AXES:
            raise UserError(f"--slice-axis must be 0, 1, 2 or planes (the axes of a (D, H, W) volume), got {self.axis!r}")
        if self.pool not in POOLS:
            raise UserError(f"--slice-pool must be mean or max, got {self.pool!r}")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or not 1 <= self.step <= MAX_STEP:
            raise UserError(f"--slice-step must be a whole number from 1 (every slice) to {MAX_STEP}, got {self.step!r}")
        object.__setattr__(self, "axis", str(self.axis))

    @property
    def axes(self) -> tuple[int, ...]:
        return (0, 1, 2) if self.axis == "planes" else (int(self.axis),)

    def describe(self) -> str:
        """Its part of a feature identity (a step of 1 is left out: features of every slice keep the identity they had
        before there were steps)."""
        return f"slices:axis={self.axis}:pool={self.pool}" + (f":step={self.step}" if self.step > 1 else "")

    def kept(self, length: int) -> slice:
        """Which of an axis's ``length`` slices are encoded: every ``step``-th, from the middle of the first group."""
        return slice(min(self.step // 2, length - 1), None, self.step)


NATIVE = "native-3d"  #: a 3D encoder's part of a feature identity


def volumetric(dataset: Any) -> bool:
    return bool(getattr(dataset, "volumetric", False))


def native(encoder: Any) -> bool:
    """Whether an image encoder takes whole volumes (N, 1, S, S, S) rather than 2D images."""
    return bool(getattr(encoder, "volumetric", False))


def slices(volumes: np.ndarray, axis: int, kept: slice = slice(None)) -> np.ndarray:
    """(n, D, H, W) -> the (n · slices kept along ``axis``, ·, ·) 2D slices, volume by volume, in order."""
    moved = np.moveaxis(np.asarray(volumes), axis + 1, 1)[:, kept]
    return moved.reshape(-1, *moved.shape[2:])


def encode_sliced(volumes: np.ndarray, options: VolumeOptions, encode: Callable[[np.ndarray], np.ndarray],
                  on_volumes: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, D, H, W) uint8 -> (N, F) float32: each volume's slices through ``encode`` ((n, h, w) uint8 -> (n, F)),
    pooled per volume. A few volumes at a time; ``on_volumes(n)`` after each chunk (progress)."""
    n = len(volumes)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    counts = {axis: len(range(volumes.shape[1 + axis])[options.kept(volumes.shape[1 + axis])]) for axis in options.axes}
    per_volume = sum(counts.values())
    chunk = max(1, CHUNK_SLICES // per_volume)
    out = None
    for start in range(0, n, chunk):
        block = np.asarray(volumes[start : start + chunk])
        parts = []
        for axis in options.axes:
            features = encode(slices(block, axis, options.kept(block.shape[1 + axis])))
            parts.append(features.reshape(len(block), counts[axis], -1))
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

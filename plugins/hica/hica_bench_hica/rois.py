"""Region-of-interest extractors for HiCA's local alignment, and ROI pooling of dense features.

Every extractor implements :class:`hica_bench.interfaces.ROIExtractor`:
``extract(images, k, dense=None) -> int64 tensor (N, K, 4)`` of boxes ``(x0, y0, x1, y1)`` in pixels of
``images`` (N, 3, S, S float, the normalised encoder input), half-open (``x1``, ``y1`` exclusive), with
0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S, always exactly K boxes, deterministic. Boxes come back on
``images``' device. :func:`roi_pool` turns boxes into region embeddings from one dense encoder pass.
torch, torchvision and MONAI are imported inside the functions that use them: the module is light to import.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from hica_bench.errors import UserError
from hica_bench.interfaces import Option, PluginSpec

if TYPE_CHECKING:
    import torch


def _check(images: torch.Tensor, k: int) -> int:
    """Validates the extractor inputs and returns the image side S."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be (N, 3, S, S), got {tuple(images.shape)}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(images.shape[-1])


def grid_boxes(k: int, x0: int, y0: int, x1: int, y1: int, grid: int = 0) -> list[tuple[int, int, int, int]]:
    """K boxes on a g x g grid over the rectangle [x0, x1) x [y0, y1) (the :class:`GridROI` rule).

    g = ``grid`` or, when 0, ceil(sqrt(K)). Cell (r, c) spans ``[x0 + c*w//g, x0 + (c+1)*w//g)`` (at
    least one pixel wide), likewise for rows. With K = g² every cell is a box; otherwise the boxes are the
    cells at raster indices round(i * (g² - 1) / (K - 1)), i = 0..K-1: evenly spread over the grid,
    first and last cell included (K = 5: the four corners and the centre; K = 2: top-left, bottom-right).
    """
    g = int(grid) or math.isqrt(k - 1) + 1
    if g * g < k:
        raise UserError(f"a {g}x{g} grid has fewer than k={k} cells")
    w, h = x1 - x0, y1 - y0
    n_cells = g * g
    cells = range(n_cells) if k == n_cells else [(2 * i * (n_cells - 1) + k - 1) // (2 * (k - 1)) for i in range(k)]
    boxes = []
    for cell in cells:
        r, c = divmod(cell, g)
        bx0, by0 = x0 + c * w // g, y0 + r * h // g
        bx1, by1 = max(bx0 + 1, x0 + (c + 1) * w // g), max(by0 + 1, y0 + (r + 1) * h // g)
        boxes.append((bx0, by0, bx1, by1))
    return boxes


class GridROI:
    """K fixed patches, the same for every image: the cells of a g x g grid over the image (see
    :func:`grid_boxes` for the rule when K is not a perfect square). ``grid``: fixed g (must satisfy
    g² >= K); 0 = ceil(sqrt(K)). ``dense`` is ignored."""

    def __init__(self, grid: int = 0):
        if int(grid) < 0:
            raise UserError(f"grid must be >= 0, got {grid}")
        self.grid = int(grid)

    def extract(self, images: torch.Tensor, k: int, dense: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        size = _check(images, k)
        boxes = torch.tensor(grid_boxes(int(k), 0, 0, size, size, self.grid), dtype=torch.int64)
        return boxes.to(images.device).expand(images.shape[0], -1, -1).contiguous()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (N, C, S, S) with standard deviation ``sigma`` pixels (reflect padding)."""
    if sigma <= 0:
        return x
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * min(x.shape[-2:]) - 1)
    from torchvision.transforms.v2.functional import gaussian_blur

    return gaussian_blur(x, [kernel, kernel], [sigma, sigma])


class SaliencyROI:
    """Boxes around the K highest peaks of a saliency map, with non-maximum suppression.

    Saliency: when ``dense`` (N, D, h, w) is given, the L2 norm over channels of ``dense``, bilinearly
    upsampled to S x S; otherwise local contrast of the image, ``blur(mean_channels |x - blur(x)|)`` with
    Gaussian sigma = ``sigma * S`` (the outer blur moves peaks from a region's edges to its centre).
    Peaks are picked greedily: each box is a square of side ``round(box_fraction * S)`` centred on the
    current maximum and clipped to the image; the saliency inside a picked box is suppressed before the
    next pick. Ties go to the first pixel in raster order. When suppression has covered the whole image
    before K picks, the remaining boxes are :func:`grid_boxes` of the whole image.
    """

    def __init__(self, box_fraction: float = 0.35, sigma: float = 0.05):
        if not 0 < box_fraction <= 1:
            raise UserError(f"box_fraction must be in (0, 1], got {box_fraction}")
        if sigma < 0:
            raise UserError(f"sigma must be >= 0, got {sigma}")
        self.box_fraction = float(box_fraction)
        self.sigma = float(sigma)

    def saliency(self, images: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        """(N, S, S) float saliency map (see the class docstring)."""
        import torch.nn.functional as F

        size = images.shape[-1]
        if dense is not None:
            norm = dense.float().norm(dim=1, keepdim=True).to(images.device)
            return F.interpolate(norm, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        x = images.float()
        contrast = (x - _blur(x, self.sigma * size)).abs().mean(dim=1, keepdim=True)
        return _blur(contrast, self.sigma * size)[:, 0]

    def extract(self, images: torch.Tensor, k: int, dense: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        with torch.no_grad():
            return self._peaks(images, k, dense)

    def _peaks(self, images: torch.Tensor, k: int, dense: torch.Tensor | None) -> torch.Tensor:
        import torch

        size, k = _check(images, k), int(k)
        n = images.shape[0]
        sal = self.saliency(images, dense).reshape(n, -1).clone()
        side = max(1, round(self.box_fraction * size))
        coords = torch.arange(size, device=sal.device)
        fallback = torch.tensor(grid_boxes(k, 0, 0, size, size), dtype=torch.int64, device=sal.device)
        boxes = torch.empty(n, k, 4, dtype=torch.int64, device=sal.device)
        for j in range(k):
            peak = sal.argmax(dim=1)
            cy, cx = peak // size, peak % size
            x0, y0 = cx - side // 2, cy - side // 2
            box = torch.stack([x0.clamp(min=0), y0.clamp(min=0), (x0 + side).clamp(max=size),
                               (y0 + side).clamp(max=size)], dim=1)  # (N, 4)
            exhausted = torch.isneginf(sal.gather(1, peak[:, None]))[:, 0]
            boxes[:, j] = torch.where(exhausted[:, None], fallback[j], box)
            lo, hi = box[:, :2, None], box[:, 2:, None]  # (N, 2, 1): x and y bounds
            in_x, in_y = ((coords >= lo) & (coords < hi)).unbind(1)  # (N, S) each
            sal.masked_fill_((in_y[:, :, None] & in_x[:, None, :]).reshape(n, -1), float("-inf"))
        return boxes


class MonaiForegroundROI:
    """Bounding boxes of the K largest foreground components, found with MONAI transforms.

    Per image: the channel mean, rescaled to [0, 1] (``monai.transforms.ScaleIntensity``) and smoothed
    (``monai.transforms.GaussianSmooth``, sigma = ``smooth * S``; 0 = none), is thresholded at Otsu's
    level by ``monai.transforms.ForegroundMask(threshold="otsu")`` (foreground = brighter than the level
    when ``bright``, darker otherwise). Components are peeled off largest first with
    ``monai.transforms.utils.get_largest_connected_component_mask`` (full connectivity) and boxed with
    ``monai.transforms.utils.generate_spatial_bounding_box``; components smaller than ``min_area * S²``
    pixels are ignored. When fewer than K components remain, the missing boxes are :func:`grid_boxes`
    (for the number missing) inside the bounding box of the whole foreground mask, or of the whole image
    when there is no foreground. ``dense`` is ignored. Runs on the CPU (scikit-image underneath).
    """

    def __init__(self, bright: bool = True, min_area: float = 0.005, smooth: float = 0.01):
        if not 0 <= min_area < 1:
            raise UserError(f"min_area must be in [0, 1), got {min_area}")
        if smooth < 0:
            raise UserError(f"smooth must be >= 0, got {smooth}")
        self.bright, self.min_area, self.smooth = bool(bright), float(min_area), float(smooth)

    def foreground(self, image: torch.Tensor) -> np.ndarray:
        """(S, S) bool foreground mask of one (3, S, S) image."""
        from monai.transforms import ForegroundMask, GaussianSmooth, ScaleIntensity

        grey = ScaleIntensity(minv=0.0, maxv=1.0)(image.detach().float().cpu().mean(0, keepdim=True))
        if self.smooth > 0:
            grey = GaussianSmooth(sigma=self.smooth * image.shape[-1])(grey)
        # ForegroundMask keeps values <= the threshold; invert=True (1 - x) makes bright regions foreground.
        mask = ForegroundMask(threshold="otsu", invert=self.bright)(np.asarray(grey, dtype=np.float32))
        return np.asarray(mask[0], dtype=bool)

    def _boxes(self, mask: np.ndarray, k: int) -> list[tuple[int, int, int, int]]:
        from monai.transforms.utils import generate_spatial_bounding_box, get_largest_connected_component_mask

        size = mask.shape[-1]
        boxes, remaining = [], mask.copy()
        while len(boxes) < k and remaining.any():
            component = get_largest_connected_component_mask(remaining, num_components=1)
            if component.sum() < max(1.0, self.min_area * size * size):
                break
            (y0, x0), (y1, x1) = generate_spatial_bounding_box(component[None])
            boxes.append((int(x0), int(y0), int(x1), int(y1)))
            remaining &= ~component
        if len(boxes) < k:
            (y0, x0), (y1, x1) = generate_spatial_bounding_box(mask[None]) if mask.any() else ((0, 0), (size, size))
            boxes += grid_boxes(k - len(boxes), int(x0), int(y0), int(x1), int(y1))
        return boxes

    def extract(self, images: torch.Tensor, k: int, dense: torch.Tensor | None = None) -> torch.Tensor:
        _check(images, k)
        boxes = [self._boxes(self.foreground(image), int(k)) for image in images]
        import torch

        return torch.tensor(boxes, dtype=torch.int64).reshape(-1, int(k), 4).to(images.device)


def roi_pool(dense: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """Average of ``dense`` (N, D, h, w) inside each box -> (N, K, D).

    ``boxes`` (N, K, 4) are (x0, y0, x1, y1) pixel boxes of the S x S image (``image_size`` = S) the dense
    map was computed from; they are mapped to feature cells with ``torchvision.ops.roi_align``
    (spatial_scale = h / S, aligned=True, one output bin with adaptive sampling), so a box covering
    whole cells gets exactly the mean of those cells. Differentiable with respect to ``dense``.
    """
    from torchvision.ops import roi_align

    n, k = boxes.shape[:2]
    if dense.shape[-1] != dense.shape[-2]:
        raise ValueError(f"dense must have a square feature map, got {tuple(dense.shape)}")
    rois = [b.to(device=dense.device, dtype=dense.dtype) for b in boxes.reshape(n, k, 4)]
    pooled = roi_align(dense, rois, output_size=1, spatial_scale=dense.shape[-1] / image_size,
                       sampling_ratio=-1, aligned=True)  # (N*K, D, 1, 1)
    return pooled.reshape(n, k, -1)


SPECS = [
    PluginSpec("roi-extractor", "grid", "K fixed patches on a regular grid", GridROI, {"grid": Option(low=0)}),
    PluginSpec("roi-extractor", "saliency", "Top-K peaks of the encoder's activation map (or image contrast), with NMS",
               SaliencyROI, {"box_fraction": Option(low=0, high=1, low_open=True), "sigma": Option(low=0)}),
    PluginSpec("roi-extractor", "monai", "Bounding boxes of the K largest foreground components (MONAI transforms)",
               MonaiForegroundROI, {"min_area": Option(low=0, high=1), "smooth": Option(low=0)}),
]

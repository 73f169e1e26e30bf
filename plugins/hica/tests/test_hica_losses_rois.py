"""HiCA's losses and ROI extractors (plugins/hica): hand-computed examples, gradients, valid boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("hica_bench_hica")

import torch.nn.functional as F  # noqa: E402

from hica_bench.errors import UserError  # noqa: E402
from hica_bench_hica.losses import CrossMargin, GlobalInfoNCE, LocalInfoNCE  # noqa: E402
from hica_bench_hica.rois import GridROI, MonaiForegroundROI, SaliencyROI, grid_boxes, roi_pool  # noqa: E402


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def nll(pos, *others):
    """-log(e^pos / (e^pos + sum e^others)), by hand."""
    return -math.log(math.exp(pos) / (math.exp(pos) + sum(math.exp(o) for o in others)))


# ----------------------------------------------------------------------------------------- losses


def test_global_infonce_hand_computed():
    # unit vectors: s = [[1, 0], [0.6, 0.8]]; tau = 0.5 -> logits [[2, 0], [1.2, 1.6]]
    image, text, labels = t([[1, 0], [0.6, 0.8]]), t([[1, 0], [0, 1]]), torch.tensor([0, 1])
    image_to_text = (nll(2, 0) + nll(1.6, 1.2)) / 2
    text_to_image = (nll(2, 1.2) + nll(1.6, 0)) / 2  # class 0 over column [2, 1.2], class 1 over [0, 1.6]
    raw = dict(image_embeddings=3 * image, text_embeddings=2 * text, labels=labels)  # normalised inside
    one_way = GlobalInfoNCE(temperature=0.5, symmetric=False)(**raw)
    both = GlobalInfoNCE(temperature=0.5)(**raw)
    assert one_way.item() == pytest.approx(image_to_text, rel=1e-5)
    assert both.item() == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-5)


def test_global_infonce_multi_positive_and_absent_class():
    # tau = 1; class 1 has two images, class 2 none. Logits = cosines:
    # image 0 [1, 0, -1], image 1 [0, 1, 0], image 2 [0.6, 0.8, -0.6]
    image, text = t([[1, 0], [0, 1], [0.6, 0.8]]), t([[1, 0], [0, 1], [-1, 0]])
    labels = torch.tensor([0, 1, 1])
    image_to_text = (nll(1, 0, -1) + nll(1, 0, 0) + nll(0.8, 0.6, -0.6)) / 3
    class0 = nll(1, 0, 0.6)  # column 0 = [1, 0, 0.6], positive image 0
    class1 = (nll(1, 0, 0.8) + nll(0.8, 0, 1)) / 2  # column 1 = [0, 1, 0.8], positives images 1 and 2
    loss = GlobalInfoNCE(temperature=1.0)(image_embeddings=image, text_embeddings=text, labels=labels)
    assert loss.item() == pytest.approx((image_to_text + (class0 + class1) / 2) / 2, rel=1e-5)


def test_global_infonce_one_image_per_class_is_the_clip_loss_and_symmetric():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    labels = torch.arange(4)
    loss = GlobalInfoNCE(temperature=0.1)
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / 0.1
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    forward = loss(image_embeddings=a, text_embeddings=b, labels=labels)
    swapped = loss(image_embeddings=b, text_embeddings=a, labels=labels)
    assert forward.item() == pytest.approx(clip.item(), rel=1e-5)
    assert swapped.item() == pytest.approx(forward.item(), rel=1e-5)
    one_way = GlobalInfoNCE(temperature=0.1, symmetric=False)
    assert one_way(image_embeddings=a, text_embeddings=b, labels=labels).item() != pytest.approx(
        one_way(image_embeddings=b, text_embeddings=a, labels=labels).item(), rel=1e-3)


def test_local_infonce_hand_computed_with_padded_slot():
    # one image of class 0 with two regions; class 0 has two descriptors, class 1 one (+ a padded slot)
    rois = t([[[1, 0], [0, 1]]])
    local = t([[[1, 0], [0.6, 0.8]], [[0, 1], [99, 99]]])
    mask = torch.tensor([[True, True], [True, False]])
    labels = torch.tensor([0])
    region0 = -math.log((math.e ** 1 + math.e ** 0.6) / (math.e ** 1 + math.e ** 0.6 + math.e ** 0))
    region1 = -math.log((math.e ** 0 + math.e ** 0.8) / (math.e ** 0 + math.e ** 0.8 + math.e ** 1))
    loss = LocalInfoNCE(temperature=1.0)
    got = loss(roi_embeddings=5 * rois, local_text_embeddings=local, labels=labels, local_mask=mask)
    assert got.item() == pytest.approx((region0 + region1) / 2, rel=1e-5)
    local[1, 1] = t([-3, 7])  # what sits in a padded slot does not matter ...
    again = loss(roi_embeddings=rois, local_text_embeddings=local, labels=labels, local_mask=mask)
    assert again.item() == pytest.approx(got.item(), rel=1e-6)
    unmasked = loss(roi_embeddings=rois, local_text_embeddings=local, labels=labels, local_mask=None)
    assert unmasked.item() != pytest.approx(got.item(), rel=1e-3)  # ... unless it is not masked
    with pytest.raises(ValueError, match="local descriptor"):
        loss(roi_embeddings=rois, local_text_embeddings=local, labels=torch.tensor([1]),
             local_mask=torch.tensor([[True, True], [False, False]]))


def test_local_infonce_with_one_region_and_one_descriptor_is_global_image_to_text():
    gen = torch.Generator().manual_seed(1)
    image, text = torch.randn(5, 6, generator=gen), torch.randn(3, 6, generator=gen)
    labels = torch.tensor([0, 2, 2, 1, 0])
    local = LocalInfoNCE(temperature=0.2)(roi_embeddings=image[:, None], local_text_embeddings=text[:, None],
                                          labels=labels)
    glob = GlobalInfoNCE(temperature=0.2, symmetric=False)(image_embeddings=image, text_embeddings=text, labels=labels)
    assert local.item() == pytest.approx(glob.item(), rel=1e-5)


def test_cross_margin_hand_computed():
    # s = [[1, 0, -1], [0.8, 0.6, -0.8]]; labels [0, 1]; margin 0.2
    # hinges: image 0: max(0, .2 + 0 - 1) = 0, max(0, .2 - 1 - 1) = 0; image 1: .2 + .8 - .6 = .4, .2 - .8 - .6 -> 0
    image, text, labels = t([[1, 0], [0.8, 0.6]]), t([[1, 0], [0, 1], [-1, 0]]), torch.tensor([0, 1])
    loss = CrossMargin(margin=0.2)(image_embeddings=2 * image, text_embeddings=text, labels=labels)
    assert loss.item() == pytest.approx(0.4 / 4, rel=1e-5)


def test_cross_margin_exactly_zero_when_separated_by_more_than_margin():
    image, text, labels = t([[1, 0], [0.1, 1]]), t([[1, 0], [0, 1]]), torch.tensor([0, 1])
    separated = CrossMargin(margin=0.2)(image_embeddings=image, text_embeddings=text, labels=labels)
    assert separated.item() == 0.0
    # image 0 at 0.8 / 0.6: separated by 0.2 < 0.3 -> positive
    close = CrossMargin(margin=0.3)(image_embeddings=t([[0.8, 0.6], [0, 1]]), text_embeddings=text, labels=labels)
    assert close.item() == pytest.approx((0.3 + 0.6 - 0.8) / 2, rel=1e-5)


def _loss_cases(b, c, gen):
    labels = torch.arange(b) % c
    image, text = torch.randn(b, 4, generator=gen), torch.randn(c, 4, generator=gen)
    rois, local = torch.randn(b, 3, 4, generator=gen), torch.randn(c, 2, 4, generator=gen)
    return [
        (GlobalInfoNCE(), dict(image_embeddings=image, text_embeddings=text, labels=labels)),
        (GlobalInfoNCE(symmetric=False), dict(image_embeddings=image, text_embeddings=text, labels=labels)),
        (LocalInfoNCE(), dict(roi_embeddings=rois, local_text_embeddings=local, labels=labels)),
        (CrossMargin(margin=2.0), dict(image_embeddings=image, text_embeddings=text, labels=labels)),
    ]


@pytest.mark.parametrize("b, c", [(1, 2), (2, 2), (3, 5)])  # (3, 5): two classes have no image
def test_losses_give_finite_nonzero_gradients_to_both_inputs(b, c):
    for loss, tensors in _loss_cases(b, c, torch.Generator().manual_seed(b * 10 + c)):
        inputs = {k: v.requires_grad_() for k, v in tensors.items() if v.is_floating_point()}
        value = loss(**tensors)
        assert value.ndim == 0 and torch.isfinite(value), type(loss).__name__
        value.backward()
        for name, x in inputs.items():
            assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, (type(loss).__name__, name)


def test_loss_options_are_checked():
    with pytest.raises(UserError):
        GlobalInfoNCE(temperature=0)
    with pytest.raises(UserError):
        LocalInfoNCE(temperature=-1)
    with pytest.raises(UserError):
        CrossMargin(margin=-0.1)


# ------------------------------------------------------------------------------------------- ROIs


def assert_valid(boxes, n, k, size):
    assert boxes.dtype == torch.int64 and tuple(boxes.shape) == (n, k, 4)
    x0, y0, x1, y1 = boxes.unbind(-1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= size).all() and (y1 <= size).all()
    assert (x0 < x1).all() and (y0 < y1).all()


def images_like(kind, n, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "grey":
        return torch.randn(n, 1, size, size, generator=gen).expand(-1, 3, -1, -1).contiguous()
    return torch.randn(n, 3, size, size, generator=gen)


def contains(box, x, y):
    x0, y0, x1, y1 = box.tolist()
    return x0 <= x < x1 and y0 <= y < y1


@pytest.mark.parametrize("extractor", [GridROI(), SaliencyROI(), MonaiForegroundROI()], ids=lambda e: type(e).__name__)
def test_extractors_return_k_valid_deterministic_boxes(extractor):
    for size in (28, 64):
        for kind in ("grey", "rgb"):
            images = images_like(kind, 2, size)
            dense = torch.randn(2, 8, size // 4, size // 4, generator=torch.Generator().manual_seed(size))
            for k in (1, 4, 5, 9):
                d = dense if k % 2 else None  # with and without the dense map
                boxes = extractor.extract(images, k, dense=d)
                assert_valid(boxes, 2, k, size)
                assert torch.equal(boxes, extractor.extract(images.clone(), k, dense=d))


def test_grid_roi_boxes():
    image64, image30 = torch.zeros(1, 3, 64, 64), torch.zeros(2, 3, 30, 30)
    four = [[0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64], [32, 32, 64, 64]]
    assert GridROI().extract(image64, 4).tolist() == [four]
    # K = 5 on the 3 x 3 grid: cells 0, 2, 4, 6, 8 (corners and centre)
    five = [[0, 0, 10, 10], [20, 0, 30, 10], [10, 10, 20, 20], [0, 20, 10, 30], [20, 20, 30, 30]]
    assert GridROI().extract(image30, 5).tolist() == [five, five]
    assert GridROI().extract(image30, 1).tolist() == [[[0, 0, 30, 30]]] * 2
    assert GridROI(grid=3).extract(image30, 2).tolist()[0] == [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert grid_boxes(3, 10, 20, 12, 21) == [(10, 20, 11, 21), (10, 20, 11, 21), (11, 20, 12, 21)]  # tiny region
    with pytest.raises(UserError):
        GridROI(grid=2).extract(image30, 5)


def test_saliency_roi_finds_a_bright_blob():
    gen = torch.Generator().manual_seed(3)
    images = 0.05 * torch.randn(1, 3, 64, 64, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    images[:, :, ((xx - 45) ** 2 + (yy - 18) ** 2) <= 16] += 3.0  # blob of radius 4 centred at x=45, y=18
    boxes = SaliencyROI().extract(images, 3)
    assert contains(boxes[0, 0], 45, 18)
    assert len({tuple(b) for b in boxes[0].tolist()}) == 3  # the blob's box is suppressed after the first pick
    x0, y0, x1, y1 = boxes[0, 0].tolist()
    assert x1 - x0 == y1 - y0 == round(0.35 * 64)


def test_saliency_roi_uses_the_dense_map_and_falls_back_to_grid_boxes():
    images = torch.zeros(1, 3, 64, 64)
    dense = torch.zeros(1, 4, 8, 8)
    dense[0, :, 6, 1] = 5.0  # feature cell at rows 48..55, columns 8..15 of the image
    boxes = SaliencyROI(box_fraction=0.25).extract(images, 2, dense=dense)
    assert contains(boxes[0, 0], 12, 52)
    small, peak = torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4)
    peak[0, 0, 2, 2] = 1.0  # a 4 px box centred on pixel (2, 2) covers the image: nothing is left to pick
    whole = SaliencyROI(box_fraction=1.0).extract(small, 3, dense=peak)
    assert whole[0].tolist() == [[0, 0, 4, 4], [0, 2, 2, 4], [2, 2, 4, 4]]  # then grid_boxes(3) cells 2 and 3


def two_squares(background=-1.0, value=2.0):
    images = torch.full((1, 3, 64, 64), background)
    images[..., 8:24, 5:21] = value  # 16 x 16 square: box (5, 8, 21, 24)
    images[..., 40:50, 40:50] = value  # 10 x 10 square: box (40, 40, 50, 50)
    return images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("smooth", [0.0, 0.01])
def test_monai_foreground_roi_finds_two_bright_squares(smooth):
    images = two_squares()
    boxes = MonaiForegroundROI(smooth=smooth).extract(images, 4)
    assert boxes[0, :2].tolist() == [[5, 8, 21, 24], [40, 40, 50, 50]]
    # padding: grid boxes inside the foreground's bounding box (5, 8, 50, 50)
    assert boxes[0, 2:].tolist() == [list(b) for b in grid_boxes(2, 5, 8, 50, 50)]
    dark = MonaiForegroundROI(bright=False, smooth=smooth).extract(-images, 2)
    assert dark[0].tolist() == [[5, 8, 21, 24], [40, 40, 50, 50]]


def test_monai_foreground_roi_on_a_constant_image():
    # Otsu's level of a constant image is its value, so the whole image is one component; padding follows
    boxes = MonaiForegroundROI().extract(torch.zeros(1, 3, 16, 16), 4)
    assert boxes[0].tolist() == [[0, 0, 16, 16]] + [list(b) for b in grid_boxes(3, 0, 0, 16, 16)]


def test_roi_pool_averages_the_cells_inside_each_box():
    dense = torch.zeros(2, 2, 4, 4)
    dense[:, 0] = torch.arange(4.0)[None, :]  # channel 0 = x cell index
    dense[:, 1] = torch.arange(4.0)[:, None]  # channel 1 = y cell index
    dense[1] *= 10
    dense.requires_grad_()
    boxes = torch.tensor([[[0, 0, 8, 16], [4, 8, 16, 12]], [[0, 0, 16, 16], [12, 0, 16, 4]]])
    pooled = roi_pool(dense, boxes, 16)  # image 16 px, 4 px per cell
    expected = [[[0.5, 1.5], [2.0, 2.0]], [[15.0, 15.0], [30.0, 0.0]]]
    np.testing.assert_allclose(pooled.detach().numpy(), expected, atol=1e-5)
    pooled.sum().backward()
    assert dense.grad.abs().sum() > 0

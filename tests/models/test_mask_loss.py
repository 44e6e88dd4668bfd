"""The cropped mask loss against torchvision's ``maskrcnn_loss``; uint8 target resizing."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss, project_masks_on_boxes
from torchvision.models.detection.transform import resize_boxes

from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.config import ModelConfig
from napari_sartorius.models.mask_loss import mask_rcnn_loss, mask_targets
from napari_sartorius.models.transform import resize_masks

H, W = 97, 130


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_case(n_gt: int, n_roi: int, seed: int, clip: bool = True):
    """Random 0/1 uint8 masks ``(n_gt, H, W)``, boxes ``(n_roi, 4)`` (some under 1 px, some
    reaching past the image unless ``clip``) and matched indices."""
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(n_gt, H, W, generator=g) > 0.5).to(torch.uint8)
    xy = torch.rand(n_roi, 2, generator=g) * torch.tensor([W + 20.0, H + 20.0]) - 10
    wh = torch.rand(n_roi, 2, generator=g) * torch.tensor([80.0, 60.0])
    wh[: n_roi // 10] *= 0.01
    boxes = torch.cat([xy, xy + wh], dim=1)
    if clip:
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    idx = torch.randint(0, n_gt, (n_roi,), generator=g)
    return masks, boxes, idx


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("max_pixels", [2**22, 5000, 1])
def test_targets_match_torchvision(clip, max_pixels):
    masks, boxes, idx = random_case(7, 300, seed=1, clip=clip)
    ref = project_masks_on_boxes(masks, boxes, idx, 28)
    got = mask_targets(masks, boxes, idx, 28, max_pixels=max_pixels)
    assert got.shape == ref.shape and got.dtype == torch.float32
    # same samples, coordinates shifted by whole pixels: equal up to float rounding
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert torch.equal(mask_targets(masks.bool(), boxes, idx, 28, max_pixels=max_pixels), got)


def test_loss_and_gradient_match_torchvision():
    m0, b0, i0 = random_case(5, 40, seed=2)
    m1, b1, i1 = random_case(3, 25, seed=3)
    empty = (torch.zeros(0, H, W, dtype=torch.uint8), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    masks, boxes, idxs = [m0, empty[0], m1], [b0, empty[1], b1], [i0, empty[2], i1]
    labels = [torch.tensor([1, 2, 3, 1, 2]), torch.zeros(0, dtype=torch.int64), torch.tensor([3, 3, 1])]
    logits = torch.randn(65, 4, 28, 28, generator=torch.Generator().manual_seed(4), requires_grad=True)

    ref = maskrcnn_loss(logits, boxes, masks, labels, idxs)
    (g_ref,) = torch.autograd.grad(ref, logits)
    got = mask_rcnn_loss(logits, boxes, masks, labels, idxs, max_pixels=3000)
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-9)


def test_no_positive_roi_gives_a_connected_zero():
    logits = torch.randn(0, 4, 28, 28, requires_grad=True)
    empty = torch.zeros(0, 4)
    loss = mask_rcnn_loss(logits, [empty], [torch.zeros(2, H, W, dtype=torch.uint8)], [torch.tensor([1, 2])],
                          [torch.zeros(0, dtype=torch.int64)])
    assert loss.item() == 0.0 and loss.requires_grad


def test_fpn_training_losses_equal_torchvision_roi_heads():
    """The project's RoIHeads training path (cropped mask loss) gives torchvision's losses."""
    size = 96
    cfg = ModelConfig(
        "mask_rcnn_R_50_FPN", min_size_train=(128,), max_size_train=2 * size, rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100, roi_batch_size_per_image=64,
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    masks = torch.zeros(4, size, size, dtype=torch.uint8)
    for k, (y, x) in enumerate([(10, 10), (40, 50), (60, 20), (20, 70)]):
        masks[k, y : y + 18, x : x + 14] = 1
        masks[k, y + 4 : y + 8, x : x + 4] = 0
    boxes = torch.tensor([[10.0, 10, 24, 28], [50, 40, 64, 58], [20, 60, 34, 78], [70, 20, 84, 38]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 2, 3, 1]), "masks": masks}
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1)) * 255
    images, targets = model.transform([image], [target])
    features = model.backbone(images.tensors)
    with torch.no_grad():
        proposals, _ = model.rpn(images, features, targets)

    def losses(forward):
        torch.manual_seed(5)  # the RoI sampler draws at random
        _, out = forward(features, [p.clone() for p in proposals], images.image_sizes, targets)
        return out

    got = losses(model.roi_heads.forward)
    ref = losses(lambda *a: RoIHeads.forward(model.roi_heads, *a))
    assert set(got) == set(ref) == {"loss_classifier", "loss_box_reg", "loss_mask"}
    assert targets[0]["masks"].dtype == torch.uint8 and targets[0]["masks"].shape[-1] == 128  # resized as uint8
    assert ref["loss_mask"] > 0.1  # there were positive RoIs
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_resize_masks_keeps_dtype_and_boxes():
    g = torch.Generator().manual_seed(6)
    masks = torch.zeros(20, 52, 70, dtype=torch.uint8)
    for k in range(20):
        y, x = torch.randint(0, 40, (2,), generator=g).tolist()
        h, w = torch.randint(3, 12, (2,), generator=g).tolist()
        masks[k, y : y + h, x : x + w] = 1
    from napari_sartorius.training.augment import masks_to_boxes

    boxes = masks_to_boxes(masks)
    for size in [(102, 138), (80, 108)]:  # enlarging (x1.97, x1.54), as 520 x 704 -> 1024 / 800
        out = resize_masks(masks, size)
        assert out.dtype == torch.uint8 and out.shape == (20, *size)
        # pixel centres map onto pixel centres: the mask's box is the resized box within half a pixel
        err = masks_to_boxes(out) - resize_boxes(boxes, (52, 70), size)
        assert err.abs().max() <= 0.5 + 1e-4
        assert err.mean().abs() < 0.2  # unbiased (plain "nearest" is +0.5 px)
    assert resize_masks(masks.bool(), (102, 138)).dtype == torch.bool
    assert resize_masks(masks[:0], (102, 138)).shape == (0, 102, 138)

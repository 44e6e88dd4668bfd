"""Augmentations move image, boxes and masks together, are seeded, and drop vanished cells."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from napari_sartorius.instances import Instances
from napari_sartorius.training.augment import (
    AugmentationSettings,
    RandomLighting,
    RandomRelativeCrop,
    RandomSaturation,
    ResizeShortestEdge,
    TrainTransform,
    crop_instances,
    instances_to_masks,
    masks_to_boxes,
    shortest_edge_size,
)

GEOMETRIC_ONLY = AugmentationSettings(
    crop=True, crop_relative_range=(0.6, 0.6), resize=False, hflip=True, vflip=True, rot90=True,
    brightness=0.0, contrast=0.0, min_instance_area=1, min_box_size=1.0,
)


def _coded_sample():
    """Image whose pixel value encodes the cell id (cell k -> 20 k), so geometry can be checked exactly."""
    labels = np.zeros((48, 64), np.int32)
    labels[4:12, 5:30] = 1  # wide
    labels[20:44, 50:57] = 2  # tall
    labels[30:36, 10:16] = 3
    labels[40:42, 0:3] = 4  # tiny, near the border
    image = (labels * 20 + 10).astype(np.uint8)
    inst = Instances.from_label_image(labels, classes={1: 0, 2: 1, 3: 2, 4: 0})
    return image, labels, inst


def test_flip_moves_known_mask_exactly():
    image, labels, inst = _coded_sample()
    t = TrainTransform(replace(AugmentationSettings.none(), hflip=True, min_instance_area=1))
    seen_flipped = seen_plain = False
    for seed in range(12):
        img, tgt = t(image, inst, seed=seed)
        flipped = torch.equal(img[0], torch.from_numpy(image[:, ::-1].copy()).float())
        plain = torch.equal(img[0], torch.from_numpy(image).float())
        assert flipped or plain
        expect = labels[:, ::-1] if flipped else labels
        for k in range(4):
            np.testing.assert_array_equal(tgt["masks"][k].numpy(), (expect == k + 1).astype(np.uint8))
        seen_flipped |= flipped
        seen_plain |= plain
    assert seen_flipped and seen_plain


@pytest.mark.parametrize("seed", range(8))
def test_geometry_keeps_image_masks_and_boxes_together(seed):
    image, labels, inst = _coded_sample()
    img, tgt = TrainTransform(GEOMETRIC_ONLY)(image, inst, seed=seed)
    assert img.dtype == torch.float32 and img.shape[0] == 3
    masks, boxes, cls = tgt["masks"], tgt["boxes"], tgt["labels"]
    assert masks.dtype == torch.uint8 and masks.shape[1:] == img.shape[1:]
    assert len(masks) == len(boxes) == len(cls) >= 1
    orig_class = {1: 1, 2: 2, 3: 3, 4: 1}  # label id -> class + 1
    for m, b, c in zip(masks, boxes, cls):
        values = torch.unique(img[0][m.bool()])
        assert values.numel() == 1  # the mask covers exactly one coded cell
        cell = int((values.item() - 10) // 20)
        assert torch.equal(m.bool(), img[0] == values.item())  # ... and all of it that is in view
        assert orig_class[cell] == int(c)
        assert torch.equal(b, masks_to_boxes(m[None])[0])


def test_same_seed_same_result_and_seeds_differ():
    image, _, inst = _coded_sample()
    t = TrainTransform(AugmentationSettings(rotation_degrees=15, lighting=0.1, saturation=0.2), short_edges=(40, 56), max_size=90)
    a = t(image, inst, seed=3)
    b = t(image, inst, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["masks"], b[1]["masks"])
    outs = [t(image, inst, seed=s)[0] for s in range(6)]
    assert len({(o.shape, float(o.sum())) for o in outs}) > 1
    state = torch.get_rng_state()
    t(image, inst, seed=9)
    assert torch.equal(state, torch.get_rng_state())  # the caller's generator is untouched


def test_crop_drops_cells_out_of_view_and_small_ones():
    image, labels, inst = _coded_sample()
    crop = crop_instances(inst, 0, 0, 24, 40)
    assert crop.image_size == (24, 40)
    np.testing.assert_array_equal(crop.to_label_image() > 0, labels[:24, :40] > 0)
    assert len(crop) == 1
    s = replace(AugmentationSettings.none(), min_instance_area=10)
    _, tgt = TrainTransform(s)(image, inst)
    assert len(tgt["masks"]) == 3  # the 6-pixel cell is dropped


def test_relative_crop_and_resize_sizes():
    x = tv_tensors.Image(torch.zeros(3, 100, 200))
    for seed in range(5):
        torch.manual_seed(seed)
        out = RandomRelativeCrop((0.5, 0.8))(x)
        assert 50 <= out.shape[1] <= 100 and 160 <= out.shape[2] <= 200
    assert shortest_edge_size(100, 200, 50, None) == (50, 100)
    assert shortest_edge_size(100, 200, 80, 120) == (60, 120)
    m = tv_tensors.Mask(torch.zeros(2, 100, 200, dtype=torch.uint8))
    b = tv_tensors.BoundingBoxes(torch.tensor([[10.0, 10, 50, 50]]), format="XYXY", canvas_size=(100, 200))
    img, box, mask = ResizeShortestEdge([50], 1000)(x, b, m)
    assert img.shape[-2:] == mask.shape[-2:] == (50, 100)
    torch.testing.assert_close(box.as_subclass(torch.Tensor), torch.tensor([[5.0, 5, 25, 25]]))
    assert mask.dtype == torch.uint8


def test_saturation_is_noop_on_gray_and_lighting_tints():
    gray = torch.full((3, 8, 8), 100.0)
    img = tv_tensors.Image(gray.clone())
    torch.manual_seed(0)
    assert torch.allclose(RandomSaturation(0.5)(img).as_subclass(torch.Tensor), gray, atol=1e-4)
    torch.manual_seed(0)
    lit = RandomLighting(0.5)(img).as_subclass(torch.Tensor)
    assert not torch.allclose(lit[0], lit[2])
    assert lit.min() >= 0 and lit.max() <= 255


def test_settings_validation_and_round_trip():
    s = AugmentationSettings(short_edges=(64, 96), lighting=0.1)
    assert AugmentationSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError):
        AugmentationSettings(crop_relative_range=(0.0, 1.0))
    with pytest.raises(ValueError):
        AugmentationSettings(brightness=1.5)


def test_instances_to_masks_matches_full_masks():
    _, labels, inst = _coded_sample()
    m = instances_to_masks(inst)
    for k in range(len(inst)):
        np.testing.assert_array_equal(m[k].numpy().astype(bool), inst.full_mask(k))

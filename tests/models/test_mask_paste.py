"""Batched pasting on the device equals the per-detection NumPy pasting (today's CPU results)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sartorius.models.mask_paste import crop_windows, paste_crops, paste_crops_batch
from napari_sartorius.models.predictor import paste_mask_crop

TOL = 1e-6  # float32 matrix products may round differently from NumPy's BLAS


def random_boxes(n: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w - 20.0, h - 20.0]) - 4
    wh = torch.rand(n, 2, generator=gen) * 40 + 0.05
    boxes = torch.cat([xy, xy + wh], dim=1)
    edge = torch.tensor([[-3.0, -2.0, w + 5.0, 12.5],  # wider than the image
                         [w - 0.5, 10.0, w + 0.0, 20.0],  # on the right edge
                         [30.2, 30.2, 30.2, 30.25],  # zero width
                         [0.0, h - 0.1, 3.0, h + 0.0]])  # on the bottom edge
    return torch.cat([boxes, edge]).float()


@pytest.mark.parametrize("max_elements", [2**24, 3000])
@pytest.mark.parametrize("m", [28, 14])
def test_equals_per_detection_numpy_pasting(m, max_elements):
    size = (90, 130)
    boxes = random_boxes(60, size, seed=m)
    masks = torch.rand(len(boxes), 1, m, m, generator=torch.Generator().manual_seed(1))
    crops, origins = paste_crops(masks, boxes, size, max_elements=max_elements)
    assert len(crops) == len(boxes) and origins.shape == (len(boxes), 2) and origins.dtype == np.int64
    for i, (mask, box) in enumerate(zip(masks, boxes)):
        ref, ref_origin = paste_mask_crop(mask[0].numpy(), box.numpy(), size)
        assert tuple(origins[i]) == ref_origin
        assert crops[i].shape == ref.shape and crops[i].dtype == np.float32
        np.testing.assert_allclose(crops[i], ref, rtol=0, atol=TOL)
        assert np.array_equal(crops[i] >= 0.5, ref >= 0.5) or np.abs(ref - 0.5).min() < TOL


@pytest.mark.parametrize("max_elements", [2**24, 3000])
def test_a_batch_equals_its_images_one_by_one(max_elements):
    """Images of different sizes (each window clipped to its own image), one without detections."""
    sizes = [(90, 130), (40, 50), (120, 70)]
    boxes = [random_boxes(25, sizes[0], seed=1), torch.zeros(0, 4), random_boxes(30, sizes[2], seed=2)]
    gen = torch.Generator().manual_seed(3)
    masks = [torch.rand(len(b), 1, 28, 28, generator=gen) for b in boxes]
    got = paste_crops_batch(masks, boxes, sizes, max_elements=max_elements)
    assert len(got) == 3
    for (crops, origins), m, b, size in zip(got, masks, boxes, sizes):
        ref_crops, ref_origins = paste_crops(m, b, size)
        assert len(crops) == len(b) and np.array_equal(origins, ref_origins)
        for a, r in zip(crops, ref_crops):
            assert a.shape == r.shape
            np.testing.assert_allclose(a, r, rtol=0, atol=TOL)
    assert [len(c) for c, _ in paste_crops_batch([masks[1]], [boxes[1]], [sizes[1]])] == [0]
    with pytest.raises(ValueError, match="image sizes"):
        paste_crops_batch(masks, boxes, sizes[:2])


def test_windows_and_empty_input():
    win = crop_windows(torch.tensor([[10.5, 20.0, 30.0, 40.2]]), (100, 100))
    assert win.tolist() == [[19, 9, 42, 31]]
    crops, origins = paste_crops(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (10, 10))
    assert crops == [] and origins.shape == (0, 2)


def test_half_precision_masks_are_pasted_in_float32():
    size = (50, 60)
    boxes = random_boxes(10, size, seed=3)
    masks = torch.rand(len(boxes), 28, 28, generator=torch.Generator().manual_seed(2))
    crops32, _ = paste_crops(masks, boxes, size)
    crops16, _ = paste_crops(masks.half(), boxes, size)
    for a, b in zip(crops32, crops16):
        assert b.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_pasting_equals_cpu_pasting():
    size = (520, 704)
    boxes = random_boxes(500, size, seed=5)
    masks = torch.rand(len(boxes), 1, 28, 28, generator=torch.Generator().manual_seed(4))
    cpu, o_cpu = paste_crops(masks, boxes, size)
    gpu, o_gpu = paste_crops(masks.cuda(), boxes.cuda(), size)
    assert np.array_equal(o_cpu, o_gpu)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_batch_pasting_equals_cpu_batch_pasting():
    sizes = [(520, 704), (300, 400)]
    boxes = [random_boxes(300, sizes[0], seed=6), random_boxes(200, sizes[1], seed=7)]
    gen = torch.Generator().manual_seed(8)
    masks = [torch.rand(len(b), 1, 28, 28, generator=gen) for b in boxes]
    cpu = paste_crops_batch(masks, boxes, sizes)
    gpu = paste_crops_batch([m.cuda() for m in masks], [b.cuda() for b in boxes], sizes)
    for (c_crops, c_orig), (g_crops, g_orig) in zip(cpu, gpu):
        assert np.array_equal(c_orig, g_orig) and len(c_crops) == len(g_crops)
        for a, b in zip(c_crops, g_crops):
            np.testing.assert_allclose(a, b, atol=1e-5)  # GPU matrix products round differently

"""RoIPooler: every box pooled from its detectron2 level, in box order, whatever the mix of levels;
pooling_features converts maps once without changing what is pooled."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from napari_sartorius.models.pooler import RoIPooler, assign_levels, pooling_features

STRIDES = (4, 8, 16, 32)


def _features(batch=2, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {str(i): torch.rand(batch, channels, 128 // s, 160 // s, generator=g) for i, s in enumerate(STRIDES)}


def _boxes(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 60
    wh = torch.rand(n, 2, generator=g) * (hi - lo) + lo
    return torch.cat([xy, xy + wh], dim=1)


def _reference(feats, boxes, size=7):
    """Each box alone through roi_align on its own level."""
    rows = []
    for i, b in enumerate(boxes):
        for box in b:
            level = int(assign_levels(box[None], 2, 5)[0])
            roi = torch.cat([torch.tensor([float(i)]), box])[None]
            rows.append(roi_align(feats[str(level)], roi, size, 1 / STRIDES[level], 0, True))
    return torch.cat(rows) if rows else torch.zeros((0, 3, size, size))


@pytest.mark.parametrize(
    "sizes",
    [
        ((5, 20), (5, 20)),  # every box on the finest level
        ((5, 700), (2, 500)),  # boxes on all four levels, both images
        ((5, 300), None),  # second image without boxes
        (None, None),  # no boxes at all
    ],
)
def test_boxes_pooled_from_their_level_in_box_order(sizes):
    feats = _features()
    boxes = [_boxes(30, *s, seed=k) if s else torch.zeros((0, 4)) for k, s in enumerate(sizes)]
    pooled = RoIPooler(list(feats), 7, STRIDES, sampling_ratio=0, aligned=True)(feats, boxes)
    assert pooled.shape == (sum(len(b) for b in boxes), 3, 7, 7)
    torch.testing.assert_close(pooled, _reference(feats, boxes), rtol=0, atol=0)


def test_levels_used_by_the_mixed_case():
    b = _boxes(30, 5, 700, seed=0)
    assert set(assign_levels(b, 2, 5).tolist()) == {0, 1, 2, 3}


def test_pooling_features_converts_once_and_pools_the_same():
    feats = _features()
    odd = {k: v.half() if k == "0" else v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()}
    odd["2"] = feats["2"].double()
    ready = pooling_features(odd)
    assert ready["0"].dtype == torch.float32 and ready["2"].dtype == torch.float64
    assert all(v.is_contiguous() for v in ready.values())
    assert ready["1"] is not odd["1"] and pooling_features(ready)["1"] is ready["1"]  # ready maps pass through
    pooler = RoIPooler(["0", "1"], 7, STRIDES[:2], sampling_ratio=2)
    boxes = [_boxes(10, 5, 200, seed=3)]
    torch.testing.assert_close(pooler(ready, boxes), pooler(odd, boxes), rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 3])
def test_boxes_split_over_threads_give_the_same_values(threads):
    from napari_sartorius.models.pooler import MIN_BOXES_PER_THREAD, pooled

    feats = _features()
    rois = torch.cat([torch.zeros(4 * MIN_BOXES_PER_THREAD + 5, 1), _boxes(4 * MIN_BOXES_PER_THREAD + 5, 5, 60, seed=4)], 1)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = pooled(feats["0"], rois, 0.25, output_size=(7, 7), sampling_ratio=0, aligned=True)
        grad_feats = feats["0"].clone().requires_grad_()
        trained = pooled(grad_feats, rois, 0.25, output_size=(7, 7), sampling_ratio=0, aligned=True)
    finally:
        torch.set_num_threads(old)
    want = roi_align(feats["0"], rois, (7, 7), 0.25, 0, True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    trained.sum().backward()  # with autograd: one call, gradients flow to the map
    assert grad_feats.grad is not None and float(grad_feats.grad.abs().sum()) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_pooling_equals_cpu_pooling_and_the_chunk_fits_the_device():
    from napari_sartorius.models.mask_branch import GPU_CHUNK, mask_chunk_for

    feats = _features()
    boxes = [_boxes(30, 5, 700, seed=0), _boxes(30, 2, 500, seed=1)]
    pooler = RoIPooler(list(feats), 14, STRIDES, sampling_ratio=0, aligned=True)
    cpu = pooler(feats, boxes)
    gpu = pooler(pooling_features({k: v.cuda().half() for k, v in feats.items()}), [b.cuda() for b in boxes])
    # the maps went through fp16: ~1e-3 relative
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=2e-3)
    assert 256 <= mask_chunk_for(torch.device("cuda"), 256) <= GPU_CHUNK

"""MaskRCNNEngine: the engine contract, mask crops pasted like detectron2, CPU fallback on GPU OOM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_sartorius.instances import Instances
from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.checkpoint import save_checkpoint
from napari_sartorius.models.config import ModelConfig
from napari_sartorius.models.predictor import MaskRCNNEngine, image_to_tensor, paste_mask_crop


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    config = ModelConfig(
        "mask_rcnn_R_50_FPN",
        min_size_test=128,
        max_size_test=256,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        detections_per_img=30,
        score_thresh_test=0.0,
    )
    return MaskRCNNEngine(build_model(config), config, device="cpu", name="tiny")


def _images():
    rng = np.random.default_rng(0)
    gray = (rng.random((96, 140)) * 255).astype(np.uint8)
    rgb = rng.random((120, 80, 3)).astype(np.float32) * 255
    return [gray, rgb]


def test_engine_contract_and_crops(engine):
    assert engine.name == "tiny" and engine.class_names == ("shsy5y", "astro", "cort")
    images = _images()
    results = engine.predict_batch(images)
    assert len(results) == 2
    for inst, img in zip(results, images):
        assert isinstance(inst, Instances) and inst.image_size == img.shape[:2]
        assert 0 < len(inst) <= 30
        assert inst.classes.min() >= 0 and inst.classes.max() < 3
        for i, box in enumerate(inst.boxes):
            crop = inst.masks[i]
            y0, x0 = inst.mask_origins[i]
            # a crop around its box (one pixel margin), never a full-image mask
            assert x0 >= np.floor(box[0]) - 1 and y0 >= np.floor(box[1]) - 1
            assert x0 + crop.shape[1] <= np.ceil(box[2]) + 1 and y0 + crop.shape[0] <= np.ceil(box[3]) + 1
            assert crop.dtype == np.float32 and 0 <= crop.min() and crop.max() <= 1
    assert engine.predict(images[0]).image_size == (96, 140)
    assert engine.predict_batch([]) == []


def test_batch_equals_single_images_of_the_same_size(engine, same_detections):
    # (images of different sizes are zero-padded to a common size in a batch, which changes the
    # features near their borders, as in detectron2)
    gray = _images()[0]
    other = np.ascontiguousarray(gray[::-1])
    batch = engine.predict_batch([gray, other])
    single = engine.predict(other)
    assert len(single) > 0
    # a batched pass differs by float noise: near-tied random-weight scores may change order
    same_detections(batch[1].boxes, batch[1].scores, single.boxes, single.scores,
                    labels_a=batch[1].classes, labels_b=single.classes, box_atol=1e-3, score_atol=1e-5)


def _reference_paste(mask, box, size):
    """detectron2's paste_masks_in_image for one mask, written with grid_sample, over the full image."""
    x0, y0, x1, y1 = box
    h, w = size
    xs = (torch.arange(w, dtype=torch.float64) + 0.5 - x0) / (x1 - x0) * 2 - 1
    ys = (torch.arange(h, dtype=torch.float64) + 0.5 - y0) / (y1 - y0) * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None]
    m = torch.from_numpy(mask).double()[None, None]
    return F.grid_sample(m, grid, align_corners=False)[0, 0].numpy()


def test_paste_mask_crop_matches_detectron2_paste():
    rng = np.random.default_rng(1)
    size = (60, 80)
    for _ in range(100):
        mask = rng.random((28, 28)).astype(np.float32)
        x0, y0 = rng.uniform(0, 75), rng.uniform(0, 55)
        box = (x0, y0, min(x0 + rng.uniform(0.5, 50), 80), min(y0 + rng.uniform(0.5, 50), 60))
        crop, (cy, cx) = paste_mask_crop(mask, box, size)
        full = np.zeros(size)
        full[cy : cy + crop.shape[0], cx : cx + crop.shape[1]] = crop
        np.testing.assert_allclose(full, _reference_paste(mask, box, size), atol=1e-5)


def test_paste_mask_crop_degenerate_and_edge_boxes():
    mask = np.ones((28, 28), np.float32)
    crop, origin = paste_mask_crop(mask, (79.5, 10, 80, 20), (60, 80))
    assert origin[1] + crop.shape[1] <= 80 and crop.shape[1] >= 1
    crop, origin = paste_mask_crop(mask, (80, 59.9, 80, 60), (60, 80))  # zero width at the edge
    assert crop.shape[0] >= 1 and crop.shape[1] >= 1 and origin == (58, 79)
    crop, origin = paste_mask_crop(mask, (10, 10, 20, 20), (60, 80))
    assert origin == (9, 9) and crop.shape == (12, 12)
    assert crop[1:-1, 1:-1].min() == pytest.approx(1.0) and crop[0].max() == 0.0


def test_image_checks():
    assert image_to_tensor(np.zeros((5, 6), np.uint8)).shape == (3, 5, 6)
    assert image_to_tensor(np.zeros((5, 6, 1), np.uint8)).shape == (3, 5, 6)
    rgb = np.zeros((5, 6, 3), np.float32)
    rgb[..., 2] = 7
    assert image_to_tensor(rgb)[2].max() == 7
    for bad in (np.zeros((2, 5, 6)), np.zeros((5, 6, 4)), np.zeros(5), np.zeros((0, 6))):
        with pytest.raises(ValueError, match="image"):
            image_to_tensor(bad)
    with pytest.raises(ValueError, match="NaN"):
        image_to_tensor(np.full((4, 4), np.nan, np.float32))


def test_cuda_out_of_memory_falls_back_to_cpu(engine, monkeypatch):
    calls = []
    real_run = engine._run

    def flaky_run(tensors):
        calls.append(engine.device.type)
        if engine.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(tensors)

    monkeypatch.setattr(engine, "_run", flaky_run)
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    with pytest.warns(RuntimeWarning, match="out of GPU memory.*1 image.*CPU"):
        (inst,) = engine.predict_batch(_images()[:1])
    assert calls == ["cuda", "cpu"] and engine.device.type == "cpu" and len(inst) > 0


def test_other_errors_are_not_swallowed(engine, monkeypatch):
    def broken(tensors):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(engine, "_run", broken)
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        engine.predict_batch(_images()[:1])


def test_from_checkpoint(engine, tmp_path):
    path = tmp_path / "cells-r50.pt"
    save_checkpoint(path, engine.model, engine.config)
    # fast=False: the very same network (the folded one differs by float rounding, test_fast_inference)
    loaded = MaskRCNNEngine.from_checkpoint(path, device="cpu", fast=False)
    assert loaded.name == "cells-r50" and loaded.class_names == engine.class_names
    img = _images()[0]
    a, b = engine.predict(img), loaded.predict(img)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))


def test_set_test_size_changes_the_network_input(engine, monkeypatch):
    seen = []
    monkeypatch.setattr(engine.model.backbone, "forward", lambda x, f=engine.model.backbone.forward: seen.append(x.shape) or f(x))
    old = engine.config.min_size_test
    try:
        engine.set_test_size(64)
        inst = engine.predict(_images()[0])  # 96 x 140 -> 64 x 93, padded to 64 x 96
        assert seen[-1][-2:] == (64, 96) and inst.image_size == (96, 140)
        assert engine.config.min_size_test == 64
    finally:
        engine.set_test_size(old)


def test_cpu_passes_take_cpu_batch_images_with_the_same_results(engine, monkeypatch, same_detections):
    img = np.random.default_rng(5).integers(0, 255, (64, 80), dtype=np.uint8)
    passes = []
    run = engine._run
    monkeypatch.setattr(engine, "_run", lambda tensors: passes.append(len(tensors)) or run(tensors))
    together = engine.predict_batch([img, img[:, ::-1], img])
    assert passes == [1, 1, 1]
    engine.cpu_batch = 2
    passes.clear()
    again = engine.predict_batch([img, img[:, ::-1], img])
    assert passes == [2, 1]
    for a, b in zip(together, again):
        assert len(a) > 0
        same_detections(a.boxes, a.scores, b.boxes, b.scores, labels_a=a.classes, labels_b=b.classes,
                        box_atol=1e-3, score_atol=1e-5)
    engine.cpu_batch = 1


def test_engine_crops_equal_per_detection_numpy_pasting_of_the_model_outputs(engine):
    # the engine pastes on the model's device in one batch (mask_paste); the CPU results are those of
    # pasting each detection's mask with paste_mask_crop, as before
    gray = _images()[0]
    inst = engine.predict(gray)
    with torch.inference_mode():
        out = engine.model([image_to_tensor(gray)])[0]
    assert len(inst) == len(out["boxes"]) > 0
    for i, (mask, box) in enumerate(zip(out["masks"].numpy(), out["boxes"].numpy())):
        ref, origin = paste_mask_crop(mask[0], box, gray.shape)
        assert tuple(inst.mask_origins[i]) == origin
        np.testing.assert_allclose(inst.masks[i], ref, rtol=0, atol=1e-6)


def test_gray_uint8_images_travel_compact_and_give_the_same_result():
    """A uint8 grayscale image goes to the model's device as (H, W) uint8 and becomes the float
    (3, H, W) of image_to_tensor there: the model sees the same values, the engine the same result."""
    from napari_sartorius.models.predictor import _compact_tensor

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 56)).astype(np.uint8)
    t = _compact_tensor(gray)
    assert t.dtype == torch.uint8 and t.shape == (40, 56)
    assert _compact_tensor(gray[:, :, None]).shape == (40, 56)
    for other in (gray.astype(np.float32), np.stack([gray] * 3, -1), gray.astype(np.uint16)):
        assert _compact_tensor(other).shape == (3, 40, 56)  # anything else as image_to_tensor gives it
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, images):
            seen.extend(images)
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                     "masks": torch.zeros(0, 1, 28, 28)} for _ in images]

    engine = MaskRCNNEngine(Spy(), ModelConfig("mask_rcnn_R_50_FPN", min_size_test=0), device="cpu", cpu_batch=2)
    out = engine.predict_batch([gray, gray.astype(np.float32)])
    assert [len(o) for o in out] == [0, 0] and out[0].image_size == (40, 56)
    assert torch.equal(seen[0], image_to_tensor(gray)) and torch.equal(seen[1], image_to_tensor(gray))

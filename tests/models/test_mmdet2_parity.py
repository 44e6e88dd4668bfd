"""Parity with MMDetection 2.x itself (the 3.x counterpart is ``test_mmdet_parity.py``).

Runs only where MMDetection 2.x is importable (``pip install mmdet==2.28.2 mmcv==1.7.2`` -- mmcv without
compiled ops -- in a separate environment; never a dependency); the compiled ops come from torchvision
(:func:`mmdet_parity_helpers.install_torchvision_ops`). MMDetection's detector is built from a bundled
2.x model-zoo config, conditioned as in the 3.x test, run with ``simple_test`` on the normalised, padded
test image (what its test pipeline makes of it: no resizing at the image's own size), and saved as
MMDetection 2.x saves checkpoints (``meta['config']`` text, ``meta['CLASSES']``); the import reads config
and classes from that file alone. Same instances and classes, boxes within 0.05 px, mask IoU >= 0.98.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

mmdet = pytest.importorskip("mmdet", exc_type=ImportError)  # absent or broken install: skip
if not mmdet.__version__.startswith("2."):
    pytest.skip("MMDetection 2.x parity (3.x: test_mmdet_parity.py)", allow_module_level=True)

from mmdet_parity_helpers import (  # noqa: E402
    assert_same_instances,
    class_overrides,
    condition,
    image,
    install_torchvision_ops,
    pick_threshold,
)

install_torchvision_ops()
from mmcv import Config  # noqa: E402
from mmdet.models import build_detector  # noqa: E402

from napari_sartorius.models.mmdet_import import load_mmdet_model  # noqa: E402
from napari_sartorius.models.mmdet_zoo import BUNDLED_MMDET_CONFIGS  # noqa: E402
from napari_sartorius.models.predictor import MaskRCNNEngine  # noqa: E402

CLASSES = ("shsy5y", "astro", "cort")
H, W = 256, 320
pytestmark = pytest.mark.slow  # two full-size models per case

CASES = [
    # (bundled 2.x config, anchor scales, extra overrides, seed)
    ("mask_rcnn/mask_rcnn_r50_fpn_1x_coco.py", [4], {}, 11),
    ("mask_rcnn/mask_rcnn_r50_caffe_fpn_1x_coco.py", [3, 6], {"model.roi_head.bbox_head.reg_class_agnostic": True}, 12),
]


def _normalised(bgr: np.ndarray, cfg) -> tuple[torch.Tensor, list[dict]]:
    """The test pipeline's Normalize and Pad(size_divisor=32) on a BGR uint8 image, and its metas."""
    norm = next(t for t in cfg.data.test.pipeline[1].transforms if t["type"] == "Normalize")
    img = bgr.astype(np.float32)
    if norm["to_rgb"]:
        img = img[..., ::-1]
    img = (img - np.array(norm["mean"], np.float32)) / np.array(norm["std"], np.float32)
    hp, wp = -(-H // 32) * 32, -(-W // 32) * 32
    padded = np.zeros((hp, wp, 3), np.float32)
    padded[:H, :W] = img
    meta = dict(
        img_shape=(H, W, 3), ori_shape=(H, W, 3), pad_shape=(hp, wp, 3), batch_input_shape=(hp, wp),
        scale_factor=np.ones(4, np.float32), flip=False, flip_direction=None,
    )  # fmt: skip
    return torch.from_numpy(padded.transpose(2, 0, 1).copy())[None], [meta]


def _mm_predict(model, bgr: np.ndarray, cfg) -> dict:
    img, metas = _normalised(bgr, cfg)
    with torch.no_grad():
        bbox_results, segm_results = model.simple_test(img, metas, rescale=True)[0]
    boxes = np.concatenate(bbox_results)
    labels = np.concatenate([np.full(len(b), c) for c, b in enumerate(bbox_results)])
    masks = [m for per_class in segm_results for m in per_class]
    return {
        "bboxes": boxes[:, :4],
        "scores": boxes[:, 4],
        "labels": labels,
        "masks": np.stack(masks).astype(bool) if masks else np.zeros((0, H, W), bool),
    }


def mmdet_side(tmp_path, name: str, scales, extra: dict, seed: int):
    torch.manual_seed(seed)
    for key, text in BUNDLED_MMDET_CONFIGS.items():
        if key.startswith("2.x/"):
            p = tmp_path / "configs" / key[4:]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    cfg = Config.fromfile(str(tmp_path / "configs" / name))
    cfg.merge_from_dict(
        {
            "model.rpn_head.anchor_generator.scales": scales,
            **class_overrides(name),
            "model.test_cfg.rpn.nms_pre": 100000,
            "model.test_cfg.rpn.max_per_img": 100000,
            "model.test_cfg.rcnn.max_per_img": 1000,
            "data.test.pipeline.1.img_scale": (W, H),
            **extra,
        }
    )
    rgb = image(seed, H, W)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    mm = build_detector(cfg.model).eval()
    rpn_test = mm.rpn_head.test_cfg
    rpn_test.nms_pre = rpn_test.max_per_img = 500  # conditioning needs no exactness
    condition(mm, lambda: _mm_predict(mm, bgr, cfg), seed)
    rpn_test.nms_pre = rpn_test.max_per_img = 100000
    low = _mm_predict(mm, bgr, cfg)
    thresh = pick_threshold(low["scores"])
    keep = low["scores"] > thresh
    ref = {k: v[keep] for k, v in low.items()}
    cfg.merge_from_dict({"model.test_cfg.rcnn.score_thr": thresh})
    weights = tmp_path / "latest.pth"
    torch.save(
        {
            "meta": {"config": cfg.pretty_text, "CLASSES": CLASSES, "mmdet_version": mmdet.__version__, "epoch": 12},
            "state_dict": {k: v.detach().clone() for k, v in mm.state_dict().items()},
        },
        weights,
    )
    ref["thresh"] = thresh
    return ref, weights, rgb


@pytest.mark.parametrize("name, scales, extra, seed", CASES)
def test_same_instances_as_mmdetection_2x(tmp_path, name, scales, extra, seed):
    torch.set_num_threads(1)
    ref, weights, rgb = mmdet_side(tmp_path, name, scales, extra, seed)
    model, config, report = load_mmdet_model(weights)
    assert not report.warnings, report.warnings
    assert config.class_names == CLASSES and config.provenance["mmdet_version"] == "2.x"
    figures = assert_same_instances(ref, MaskRCNNEngine(model, config).predict(rgb))
    print(name, figures)

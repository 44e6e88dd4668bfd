"""Parity with MMDetection itself: the same weights and image give the same instances.

Runs only where MMDetection 3.x is importable (``pip install mmdet mmengine mmcv-lite`` in a separate
environment; never a dependency). ``mmcv-lite`` has no compiled ops, so :func:`install_torchvision_ops`
(this test's harness, outside the package) supplies the ones a Mask R-CNN runs at inference --
``RoIAlign``, ``nms``, ``batched_nms`` -- from torchvision, and inert placeholders for the others
MMDetection imports but this model never calls.

For each case: build MMDetection's model from a bundled model-zoo config (plus test overrides) with
seeded random weights made well-conditioned (BatchNorm statistics taken from the test image, head
weights scaled so scores, box deltas and mask logits are spread), save a checkpoint as mmengine does
(``state_dict``, ``meta`` with the config text and class names, a ``message_hub``), import it with
:func:`load_mmdet_model` from the checkpoint alone (config from its meta), run both on the same
synthetic colour image and compare: same instances and classes, boxes within 0.05 px, mask IoU >= 0.98.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

mmdet = pytest.importorskip("mmdet", exc_type=ImportError)  # absent or broken install: skip
if not mmdet.__version__.startswith("3."):
    pytest.skip("MMDetection 3.x parity (2.x: test_mmdet2_parity.py)", allow_module_level=True)


from mmdet_parity_helpers import (  # noqa: E402
    assert_same_instances,
    class_overrides,
    condition,
    image,
    install_torchvision_ops,
    pick_threshold,
)

install_torchvision_ops()
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MessageHub  # noqa: E402

from napari_sartorius.models.mmdet_import import load_mmdet_model  # noqa: E402
from napari_sartorius.models.mmdet_zoo import BUNDLED_MMDET_CONFIGS  # noqa: E402
from napari_sartorius.models.predictor import MaskRCNNEngine  # noqa: E402

register_all_modules()
CLASSES = ("shsy5y", "astro", "cort")
H, W = 256, 320
pytestmark = pytest.mark.slow  # two full-size models per case


def _write_zoo(tmp_path) -> None:
    for key, text in BUNDLED_MMDET_CONFIGS.items():
        if key.startswith("3.x/"):
            p = tmp_path / "configs" / key[4:]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)


def _mm_predict(model, bgr: np.ndarray):
    sample = DetDataSample(metainfo=dict(img_shape=(H, W), ori_shape=(H, W), scale_factor=(1.0, 1.0)))
    data = model.data_preprocessor({"inputs": [torch.from_numpy(bgr.transpose(2, 0, 1).copy())], "data_samples": [sample]}, False)
    with torch.no_grad():
        return model.predict(data["inputs"], data["data_samples"], rescale=True)[0].pred_instances


CASES = [
    # (bundled config, anchor scales, extra overrides (dotted keys), seed)
    ("mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py", [4], {}, 1),
    # caffe style (BGR, stride in 1x1) and every tensor conversion: two scales x three ratios in
    # scale-major order (RPN channel permutation), non-unit RPN stds and non-zero means (folded into
    # rpn_reg), R-CNN means (folded into fc_reg), unaligned RoIAlign with 2 samples, class-agnostic
    # boxes and masks.
    (
        "mask_rcnn/mask-rcnn_r50-caffe_fpn_1x_coco.py",
        [3, 6],
        {
            "model.rpn_head.bbox_coder.target_means": [0.02, -0.01, 0.03, 0.01],
            "model.rpn_head.bbox_coder.target_stds": [0.5, 0.5, 0.8, 0.8],
            "model.roi_head.bbox_head.bbox_coder.target_means": [0.01, 0.02, -0.02, 0.01],
            "model.roi_head.bbox_head.reg_class_agnostic": True,
            "model.roi_head.mask_head.class_agnostic": True,
            "model.roi_head.bbox_roi_extractor.roi_layer.sampling_ratio": 2,
            "model.roi_head.bbox_roi_extractor.roi_layer.aligned": False,
            "model.roi_head.mask_roi_extractor.roi_layer.sampling_ratio": 2,
            "model.roi_head.mask_roi_extractor.roi_layer.aligned": False,
        },
        2,
    ),
    # deformable res3-res5 (DCNv2: offsets and mask from conv_offset)
    (
        "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py",
        [4],
        {"model.backbone.dcn": dict(type="DCNv2", deform_groups=1, fallback_on_stride=False), "model.backbone.stage_with_dcn": (False, True, True, True)},
        5,
    ),
    ("mask_rcnn/mask-rcnn_r101_fpn_1x_coco.py", [4], {}, 3),
    ("mask_rcnn/mask-rcnn_x101-32x8d_fpn_1x_coco.py", [4], {}, 4),
]


def mmdet_side(tmp_path, name: str, scales, extra: dict, seed: int):
    """MMDetection's instances on the test image (above a threshold in a score gap) and the path of
    the checkpoint saved from its model; ``(reference dict, checkpoint path, RGB image)``."""
    torch.manual_seed(seed)
    _write_zoo(tmp_path)
    cfg = Config.fromfile(str(tmp_path / "configs" / name))
    cfg.merge_from_dict(
        {
            "model.rpn_head.anchor_generator.scales": scales,
            **class_overrides(name),
            "model.test_cfg.rpn.nms_pre": 100000,
            "model.test_cfg.rpn.max_per_img": 100000,
            "model.test_cfg.rcnn.max_per_img": 1000,
            "test_dataloader.dataset.pipeline.1.scale": (W, H),
            **extra,
        }
    )
    rgb = image(seed, H, W)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    mm = MODELS.build(cfg.model).eval()
    rpn_test = mm.rpn_head.test_cfg
    rpn_test.nms_pre = rpn_test.max_per_img = 500  # conditioning needs no exactness
    condition(mm, lambda: _mm_predict(mm, bgr), seed)
    rpn_test.nms_pre = rpn_test.max_per_img = 100000
    low = _mm_predict(mm, bgr)
    thresh = pick_threshold(low.scores.numpy())
    keep = low.scores > thresh
    ref = {k: getattr(low, k)[keep].numpy() for k in ("bboxes", "scores", "labels", "masks")}
    cfg.merge_from_dict({"model.test_cfg.rcnn.score_thr": thresh})
    hub = MessageHub.get_instance(f"parity-{seed}")
    hub.update_scalar("train/loss", 1.25)
    weights = tmp_path / "epoch_12.pth"
    torch.save(
        {
            "meta": {"cfg": cfg.pretty_text, "dataset_meta": {"classes": CLASSES}, "epoch": 12},
            "state_dict": {k: v.detach().clone() for k, v in mm.state_dict().items()},
            "message_hub": hub.state_dict(),
        },
        weights,
    )
    ref["thresh"] = thresh
    return ref, weights, rgb


def run_pair(tmp_path, name: str, scales, extra: dict, seed: int):
    ref, weights, rgb = mmdet_side(tmp_path, name, scales, extra, seed)
    model, config, report = load_mmdet_model(weights)  # config and classes from the checkpoint
    assert not report.warnings, report.warnings
    assert config.class_names == CLASSES and config.score_thresh_test == ref["thresh"]
    ours = MaskRCNNEngine(model, config).predict(rgb)
    return ref, ours


@pytest.mark.parametrize("name, scales, extra, seed", CASES)
def test_same_instances_as_mmdetection(tmp_path, name, scales, extra, seed):
    torch.set_num_threads(1)
    figures = assert_same_instances(*run_pair(tmp_path, name, scales, extra, seed))
    print(name, figures)

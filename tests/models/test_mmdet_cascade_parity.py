"""Cascade Mask R-CNN parity with MMDetection itself (3.x or 2.x, whichever is importable).

The same harness as ``test_mmdet_parity.py`` (3.x) / ``test_mmdet2_parity.py`` (2.x): MMDetection's own
``CascadeRCNN`` is built from the bundled model-zoo cascade config (three stages with box-coder stds
0.1/0.2, 0.05/0.1, 0.033/0.067, class-agnostic regression, a mask head per stage), given seeded,
conditioned random weights, run on a synthetic colour image and saved as MMDetection saves checkpoints;
the import reads config and classes from that file alone and must give the same instances and classes,
boxes within 0.05 px, scores within 1e-3 and mask IoU >= 0.98. Skips where MMDetection is absent.
"""

from __future__ import annotations

import pytest
import torch

mmdet = pytest.importorskip("mmdet", exc_type=ImportError)  # absent or broken install: skip

from mmdet_parity_helpers import assert_same_instances  # noqa: E402

if mmdet.__version__.startswith("3."):
    from test_mmdet_parity import mmdet_side  # noqa: E402

    CONFIG = "cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py"
else:
    from test_mmdet2_parity import mmdet_side  # noqa: E402

    CONFIG = "cascade_rcnn/cascade_mask_rcnn_r50_fpn_1x_coco.py"

from napari_sartorius.models.mmdet_import import load_mmdet_model  # noqa: E402
from napari_sartorius.models.predictor import MaskRCNNEngine  # noqa: E402

pytestmark = pytest.mark.slow  # two full-size models per case

CASES = [
    # (anchor scales, extra overrides, seed)
    ([4], {}, 21),
    # non-zero means in every stage (folded into each stage's fc_reg), unaligned RoIAlign with 2
    # samples in every stage's extractors, class-agnostic masks in every stage
    (
        [3, 6],
        {
            **{f"model.roi_head.bbox_head.{s}.bbox_coder.target_means": [0.01 * (s + 1), -0.02, 0.01, 0.02 * s] for s in range(3)},
            "model.roi_head.mask_head.class_agnostic": True,
            "model.roi_head.bbox_roi_extractor.roi_layer.sampling_ratio": 2,
            "model.roi_head.bbox_roi_extractor.roi_layer.aligned": False,
            "model.roi_head.mask_roi_extractor.roi_layer.sampling_ratio": 2,
            "model.roi_head.mask_roi_extractor.roi_layer.aligned": False,
        },
        22,
    ),
]


@pytest.mark.parametrize("scales, extra, seed", CASES)
def test_same_cascade_instances_as_mmdetection(tmp_path, scales, extra, seed):
    torch.set_num_threads(1)
    ref, weights, rgb = mmdet_side(tmp_path, CONFIG, scales, extra, seed)
    model, config, report = load_mmdet_model(weights)  # config and classes from the checkpoint
    assert not report.warnings, report.warnings
    assert config.arch == "mmdet_cascade_mask_rcnn_R_50_FPN" and config.score_thresh_test == ref["thresh"]
    assert len(model.roi_heads.mask_head) == 3
    figures = assert_same_instances(ref, MaskRCNNEngine(model, config).predict(rgb))
    print(mmdet.__version__, CONFIG, extra and "conversions", figures)

"""ModelConfig: per-architecture defaults, validation, JSON round trip."""

from __future__ import annotations

import json

import pytest

from napari_sartorius.cell_types import DEFAULT_CLASSES
from napari_sartorius.models.config import ARCH_NAMES, C4_ARCHS, ModelConfig


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_json_round_trip_is_identical(arch):
    cfg = ModelConfig(arch, class_names=("a", "b"), provenance={"source": "test", "epochs": 3})
    text = json.dumps(cfg.to_dict())
    back = ModelConfig.from_dict(json.loads(text))
    assert back == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert isinstance(back.anchor_sizes[0], tuple) and isinstance(back.class_names, tuple)


def test_arch_defaults_fit_cells_and_the_architecture():
    fpn = ModelConfig("mask_rcnn_R_50_FPN")
    assert fpn.class_names == DEFAULT_CLASSES
    assert fpn.anchor_sizes == ((8,), (16,), (32,), (64,), (128,))
    assert fpn.aspect_ratios == (0.25, 0.5, 1.0, 2.0, 4.0)
    assert fpn.detections_per_img >= 1000 and fpn.mask_size == 28
    assert (fpn.box_head_convs, fpn.box_head_fcs, fpn.mask_head_convs) == (0, 2, 4)
    c4 = ModelConfig("mask_rcnn_R_101_C4")
    assert len(c4.anchor_sizes) == 1 and len(c4.anchor_sizes[0]) == 5 and c4.mask_size == 14
    x152 = ModelConfig("cascade_mask_rcnn_X_152_32x8d_FPN")
    assert x152.deform_on_per_stage == (False, True, True, True)
    assert (x152.box_head_convs, x152.box_head_fcs, x152.box_head_norm) == (4, 1, "GN")
    assert (x152.mask_head_convs, x152.mask_head_norm) == (8, "GN")
    assert x152.cascade_iou_thresholds == (0.5, 0.6, 0.7)
    assert x152.cascade_bbox_reg_weights[2] == (30.0, 30.0, 15.0, 15.0)
    assert x152.is_cascade and not x152.is_c4 and set(C4_ARCHS) == {"mask_rcnn_R_50_C4", "mask_rcnn_R_101_C4"}


def test_unknown_arch_lists_the_six():
    with pytest.raises(ValueError) as err:
        ModelConfig("mask_rcnn_R_18_FPN")
    for arch in ARCH_NAMES:
        assert arch in str(err.value)
    with pytest.raises(ValueError, match="arch"):
        ModelConfig.from_dict({"class_names": ["a"]})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"input_format": "RBG"}, "input_format"),
        ({"pixel_mean": (0.485, 0.456, 0.406), "pixel_std": (0.229, 0.224, 0.225)}, "0..255"),
        ({"pixel_std": (1.0, 0.0, 1.0)}, "pixel_std"),
        ({"anchor_sizes": ((8,), (16,))}, "5 level"),
        ({"anchor_sizes": ((8,), (16, 20), (32,), (64,), (128,))}, "same number"),
        ({"class_names": ()}, "class_names"),
        ({"class_names": ("a", "a")}, "duplicates"),
        ({"mask_size": 14}, "mask_size"),
        ({"score_thresh_test": 1.5}, "score_thresh_test"),
        ({"box_head_norm": "LN"}, "box_head_norm"),
        ({"rpn_in_features": ("p2", "p7")}, "rpn_in_features"),
        ({"provenance": {"x": object()}}, "JSON"),
    ],
)
def test_invalid_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig("mask_rcnn_R_50_FPN", **changes)


def test_c4_rejects_deformable_res5_and_unknown_fields():
    with pytest.raises(ValueError, match="res5"):
        ModelConfig("mask_rcnn_R_50_C4", deform_on_per_stage=(False, False, False, True))
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({"arch": "mask_rcnn_R_50_FPN", "bogus": 1})


def test_replace_validates_and_config_is_hashable():
    cfg = ModelConfig("mask_rcnn_R_50_FPN")
    assert cfg.replace(min_size_test=800).min_size_test == 800
    with pytest.raises(ValueError):
        cfg.replace(input_format="XYZ")
    assert hash(cfg) == hash(ModelConfig("mask_rcnn_R_50_FPN"))

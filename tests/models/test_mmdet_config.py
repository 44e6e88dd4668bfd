"""MMDetection configs -> ModelConfig: every conversion rule, and refusals by name."""

from __future__ import annotations

import copy

import pytest

from napari_sartorius.models.mmdet_config import (
    UnsupportedMMDetConfigError,
    load_mmdet_config,
    mmdet_to_model_config,
    mmdet_version_of,
)
from napari_sartorius.models.mmdet_zoo import BUNDLED_MMDET_CONFIGS

K3 = ("a", "b", "c")


def _cfg(name: str = "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py", classes: int = 3) -> dict:
    cfg = load_mmdet_config(name)
    cfg["model"]["roi_head"]["bbox_head"]["num_classes"] = classes
    cfg["model"]["roi_head"]["mask_head"]["num_classes"] = classes
    return cfg


def _convert(cfg, names=K3):
    return mmdet_to_model_config(cfg, names)


@pytest.mark.parametrize(
    "name, arch, fmt, stride_in_1x1",
    [
        ("mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py", "mask_rcnn_R_50_FPN", "RGB", False),
        ("mask_rcnn/mask-rcnn_r101_fpn_1x_coco.py", "mask_rcnn_R_101_FPN", "RGB", False),
        ("mask_rcnn/mask-rcnn_r50-caffe_fpn_1x_coco.py", "mask_rcnn_R_50_FPN", "BGR", True),
        ("mask_rcnn/mask-rcnn_x101-32x8d_fpn_1x_coco.py", "mask_rcnn_X_101_32x8d_FPN", "BGR", False),
        ("mask_rcnn/mask_rcnn_r50_fpn_1x_coco.py", "mask_rcnn_R_50_FPN", "RGB", False),
        ("mask_rcnn/mask_rcnn_r101_fpn_1x_coco.py", "mask_rcnn_R_101_FPN", "RGB", False),
        ("mask_rcnn/mask_rcnn_r50_caffe_fpn_1x_coco.py", "mask_rcnn_R_50_FPN", "BGR", True),
        ("mask_rcnn/mask_rcnn_x101_32x8d_fpn_1x_coco.py", "mask_rcnn_X_101_32x8d_FPN", "BGR", False),
    ],
)
def test_model_zoo_configs_of_both_versions(name, arch, fmt, stride_in_1x1):
    mc, facts = _convert(_cfg(name))
    assert mc.arch == arch and mc.input_format == fmt and mc.stride_in_1x1 is stride_in_1x1
    assert (mc.min_size_test, mc.max_size_test) == (800, 1333)
    assert mc.anchor_sizes == ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,)) and mc.aspect_ratios == (0.5, 1.0, 2.0)
    assert mc.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0)
    assert mc.pooler_aligned is True and mc.pooler_sampling_ratio == 0
    assert (mc.rpn_pre_nms_top_n_test, mc.rpn_post_nms_top_n_test, mc.rpn_nms_thresh) == (1000, 1000, 0.7)
    assert (mc.score_thresh_test, mc.nms_thresh_test, mc.detections_per_img) == (0.05, 0.5, 100)
    assert mc.freeze_at == 2 and mc.box_head_fcs == 2 and mc.mask_head_convs == 4
    assert facts["warnings"] == []
    assert mc.provenance["mmdet_version"] == ("3.x" if "mask-rcnn" in name else "2.x")


def test_normalisation_in_that_channel_order():
    mc, _ = _convert(_cfg("mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"))
    assert mc.pixel_mean == (123.675, 116.28, 103.53) and mc.pixel_std == (58.395, 57.12, 57.375)
    mc, _ = _convert(_cfg("mask_rcnn/mask-rcnn_x101-32x8d_fpn_1x_coco.py"))
    assert mc.pixel_mean == (103.53, 116.28, 123.675) and mc.pixel_std == (57.375, 57.12, 58.395)
    cfg = _cfg("mask_rcnn/mask_rcnn_r50_fpn_1x_coco.py")  # 2.x: Normalize in the pipeline
    cfg["data"]["test"]["pipeline"][1]["transforms"][2]["to_rgb"] = False
    assert _convert(cfg)[0].input_format == "BGR"


def test_test_scale_and_anchor_and_box_coder_rules():
    cfg = _cfg()
    cfg["test_dataloader"]["dataset"]["pipeline"][1]["scale"] = (1024, 704)
    gen = cfg["model"]["rpn_head"]["anchor_generator"]
    gen.update(scales=[2, 4], ratios=[0.25, 1.0, 4.0])
    cfg["model"]["roi_head"]["bbox_head"]["bbox_coder"]["target_stds"] = [0.05, 0.05, 0.1, 0.1]
    cfg["model"]["roi_head"]["bbox_roi_extractor"]["roi_layer"].update(sampling_ratio=2, aligned=False)
    cfg["model"]["roi_head"]["mask_roi_extractor"]["roi_layer"].update(sampling_ratio=2, aligned=False)
    cfg["model"]["test_cfg"]["rcnn"].update(score_thr=0.3, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.4))
    cfg["model"]["backbone"]["frozen_stages"] = -1
    mc, facts = _convert(cfg)
    assert (mc.min_size_test, mc.max_size_test) == (704, 1024)
    assert mc.anchor_sizes[0] == (8.0, 16.0) and mc.anchor_sizes[4] == (128.0, 256.0)
    assert mc.aspect_ratios == (0.25, 1.0, 4.0)
    assert facts["scale_major"] and facts["num_scales"] == 2 and facts["num_ratios"] == 3
    assert mc.bbox_reg_weights == (20.0, 20.0, 10.0, 10.0)
    assert mc.pooler_aligned is False and mc.pooler_sampling_ratio == 2
    assert (mc.score_thresh_test, mc.nms_thresh_test, mc.detections_per_img) == (0.3, 0.4, 1000)
    assert mc.freeze_at == 0


def test_octave_scales_and_2_0_era_keys():
    cfg = _cfg("mask_rcnn/mask_rcnn_r50_fpn_1x_coco.py")
    rpn = cfg["model"]["rpn_head"]
    rpn["anchor_generator"] = dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=2, ratios=[1.0], strides=[4, 8, 16, 32, 64])
    test = cfg["model"].pop("test_cfg")
    test["rpn"] = dict(nms_across_levels=False, nms_pre=2000, nms_post=500, max_num=500, nms_thr=0.6, min_bbox_size=0)
    test["rcnn"]["nms"] = dict(type="nms", iou_thr=0.45)
    cfg["test_cfg"] = test  # 2.0: beside the model
    mc, _ = _convert(cfg)
    assert mc.anchor_sizes[0] == pytest.approx((16.0, 16.0 * 2**0.5))
    assert (mc.rpn_pre_nms_top_n_test, mc.rpn_post_nms_top_n_test, mc.rpn_nms_thresh, mc.nms_thresh_test) == (2000, 500, 0.6, 0.45)


def test_mask_threshold_is_recorded_with_a_warning():
    cfg = _cfg()
    cfg["model"]["test_cfg"]["rcnn"]["mask_thr_binary"] = 0.4
    mc, facts = _convert(cfg)
    assert mc.provenance["mmdet_mask_thr_binary"] == 0.4
    assert any("mask_thr_binary" in w for w in facts["warnings"])


def test_class_count_must_match():
    with pytest.raises(ValueError, match="num_classes = 3 but 2 class"):
        _convert(_cfg(), ("a", "b"))


def _set(cfg, dotted: str, value):
    node = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return cfg


@pytest.mark.parametrize(
    "dotted, value, named",
    [
        ("model.type", "HybridTaskCascade", "HTC"),
        ("model.type", "SOLO", "SOLO"),
        ("model.type", "SOLOv2", "SOLOv2"),
        ("model.type", "Mask2Former", "Mask2Former"),
        ("model.type", "PointRend", "PointRend"),
        ("model.type", "RetinaNet", "model.type"),
        ("model.roi_head.type", "PointRendRoIHead", "PointRend"),
        ("model.roi_head.type", "HybridTaskCascadeRoIHead", "HTC"),
        ("model.backbone.type", "ResNeSt", "model.backbone.type"),
        ("model.backbone.depth", 152, "model.backbone.depth"),
        ("model.backbone.dcn", {"type": "DCNv3"}, "model.backbone.dcn.type"),
        ("model.backbone.dcn", {"type": "DCN", "fallback_on_stride": True}, "fallback_on_stride"),
        ("model.backbone.deep_stem", True, "deep_stem"),
        ("model.neck.add_extra_convs", "on_input", "add_extra_convs"),
        ("model.neck.norm_cfg", {"type": "GN", "num_groups": 32}, "model.neck.norm_cfg"),
        ("model.rpn_head.anchor_generator.center_offset", 0.5, "center_offset"),
        ("model.rpn_head.bbox_coder.type", "LegacyDeltaXYWHBBoxCoder", "+1 pixel"),
        ("model.rpn_head.loss_cls.use_sigmoid", False, "use_sigmoid"),
        ("model.roi_head.bbox_head.loss_cls", {"type": "FocalLoss", "use_sigmoid": True}, "loss_cls"),
        ("model.roi_head.bbox_head.type", "Shared4Conv1FCBBoxHead", "bbox_head.type"),
        ("model.roi_head.mask_head.upsample_cfg", {"type": "bilinear", "scale_factor": 2}, "upsample_cfg"),
        ("model.roi_head.shared_head", {"type": "ResLayer"}, "shared_head"),
        ("model.roi_head.bbox_roi_extractor.finest_scale", 112, "finest_scale"),
        ("model.roi_head.mask_roi_extractor.roi_layer.aligned", False, "the box extractor's aligned=True"),
        ("model.test_cfg.rpn.nms_across_levels", True, "nms_across_levels"),
        ("model.test_cfg.rcnn.nms", {"type": "soft_nms", "iou_threshold": 0.5}, "soft-NMS"),
        ("model.data_preprocessor.pad_size_divisor", 1, "pad_size_divisor"),
        ("test_dataloader.dataset.pipeline.1.keep_ratio", False, "keep_ratio"),
        ("test_dataloader.dataset.pipeline.1", {"type": "Resize", "scale_factor": 2.0, "keep_ratio": True}, "scale_factor"),
    ],
)
def test_unsupported_options_are_refused_by_name(dotted, value, named):
    cfg = _set(_cfg(), dotted, copy.deepcopy(value))
    with pytest.raises(UnsupportedMMDetConfigError) as info:
        _convert(cfg)
    assert named in str(info.value)


@pytest.mark.parametrize("name", ["cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py", "cascade_rcnn/cascade_mask_rcnn_r50_fpn_1x_coco.py"])
def test_cascade_becomes_the_mmdetection_style_cascade(name):
    config, facts = _convert(load_mmdet_config(name), [str(i) for i in range(80)])
    assert config.arch == "mmdet_cascade_mask_rcnn_R_50_FPN" and config.cascade_iou_thresholds == (0.5, 0.6, 0.7)
    assert config.cascade_bbox_reg_weights[1] == (20.0, 20.0, 10.0, 10.0)
    assert facts["stage_bbox_stds"][2] == [0.033, 0.033, 0.067, 0.067] and not facts["warnings"]


@pytest.mark.parametrize(
    "model_type, roi_type, named",
    [
        ("HybridTaskCascade", "HybridTaskCascadeRoIHead", "HTC"),
        ("SCNet", "SCNetRoIHead", "SCNet"),
        ("CascadeRCNN", "HybridTaskCascadeRoIHead", "HTC"),
        ("CascadeRCNN", "SCNetRoIHead", "SCNet"),
        ("CascadeRCNN", "StandardRoIHead", "'CascadeRoIHead' for a CascadeRCNN"),
        ("MaskRCNN", "CascadeRoIHead", "'StandardRoIHead' for a MaskRCNN"),
    ],
)
def test_other_cascades_are_refused_by_name(model_type, roi_type, named):
    cfg = load_mmdet_config("cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py")
    cfg["model"]["type"], cfg["model"]["roi_head"]["type"] = model_type, roi_type
    with pytest.raises(UnsupportedMMDetConfigError) as info:
        _convert(cfg, [str(i) for i in range(80)])
    assert named in str(info.value)


def test_resnext_widths_without_a_project_body_are_refused():
    with pytest.raises(UnsupportedMMDetConfigError, match="ResNeXt-101 32x4d"):
        _convert(_cfg("mask_rcnn/mask-rcnn_x101-32x4d_fpn_1x_coco.py"))


def test_test_time_augmentation_is_refused():
    cfg = _cfg("mask_rcnn/mask_rcnn_r50_fpn_1x_coco.py")
    cfg["data"]["test"]["pipeline"][1]["flip"] = True
    with pytest.raises(UnsupportedMMDetConfigError, match="flip"):
        _convert(cfg)
    cfg["data"]["test"]["pipeline"][1].update(flip=False, img_scale=[(1333, 800), (1333, 600)])
    with pytest.raises(UnsupportedMMDetConfigError, match="img_scale"):
        _convert(cfg)


def test_config_text_as_stored_in_a_checkpoint():
    # mmengine's meta text is one flat file: variables as dict literals, no _base_
    cfg = _cfg()
    text = "\n".join(f"{k} = {v!r}" for k, v in cfg.items())
    again = load_mmdet_config(text=text)
    assert again == cfg and mmdet_version_of(again) == "3.x"


def test_yaml_config_is_pointed_elsewhere(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("MODEL: {}\n")
    with pytest.raises(UnsupportedMMDetConfigError, match="import-detectron2"):
        load_mmdet_config(p)


def test_unknown_name_lists_examples():
    with pytest.raises(FileNotFoundError, match="bundled model-zoo name"):
        load_mmdet_config("no/such_config.py")


def test_every_bundled_file_parses():
    for key, text in BUNDLED_MMDET_CONFIGS.items():
        assert load_mmdet_config(text=text, source=f"<bundled {key}>") is not None


@pytest.mark.parametrize("kind, modulated", [("DCN", False), ("DCNv2", True)])
def test_deformable_stages(kind, modulated):
    cfg = _cfg()
    cfg["model"]["backbone"].update(dcn=dict(type=kind, deform_groups=2, fallback_on_stride=False), stage_with_dcn=(False, True, True, True))
    mc, _ = _convert(cfg)
    assert mc.deform_on_per_stage == (False, True, True, True)
    assert mc.deform_modulated is modulated and mc.deform_num_groups == 2

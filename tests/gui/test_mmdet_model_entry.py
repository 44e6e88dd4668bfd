"""The Segment dock's model list takes an MMDetection checkpoint directly (imported once, cached)."""

from __future__ import annotations

import re

import pytest
import torch

from napari_sartorius._widgets._model_list import ModelEntry

_NAMES = [  # project name -> MMDetection name (the importer's mapping, inverted)
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.", r"neck.lateral_convs.\1.conv."),
    (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.", r"neck.fpn_convs.\1.conv."),
    (r"^rpn\.head\.conv\.0\.0\.", "rpn_head.rpn_conv."),
    (r"^rpn\.head\.cls_logits\.", "rpn_head.rpn_cls."),
    (r"^rpn\.head\.bbox_pred\.", "rpn_head.rpn_reg."),
    (r"^roi_heads\.box_head\.fc6\.", "roi_head.bbox_head.shared_fcs.0."),
    (r"^roi_heads\.box_head\.fc7\.", "roi_head.bbox_head.shared_fcs.1."),
    (r"^roi_heads\.box_predictor\.cls_score\.", "roi_head.bbox_head.fc_cls."),
    (r"^roi_heads\.box_predictor\.bbox_pred\.", "roi_head.bbox_head.fc_reg."),
    (r"^roi_heads\.mask_head\.(\d)\.0\.", r"roi_head.mask_head.convs.\1.conv."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_head.mask_head.upsample."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_head.mask_head.conv_logits."),
]


def test_an_mmdetection_checkpoint_is_imported_once_and_used(tmp_path, monkeypatch):
    from napari_sartorius.models.architectures import build_model
    from napari_sartorius.models.mmdet_config import load_mmdet_config, mmdet_to_model_config

    torch.set_num_threads(1)
    monkeypatch.setenv("NAPARI_SARTORIUS_HOME", str(tmp_path / "cache"))
    cfg = load_mmdet_config("mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py")
    roi = cfg["model"]["roi_head"]
    roi["bbox_head"].update(num_classes=3, fc_out_channels=64)
    roi["mask_head"]["num_classes"] = 3
    config, _ = mmdet_to_model_config(cfg, ("shsy5y", "astro", "cort"))
    state = {}
    for k, v in build_model(config).state_dict().items():
        name = next(re.sub(p, r, k) for p, r in _NAMES if re.match(p, k))
        if name.startswith("roi_head.bbox_head.fc_cls."):
            v = torch.cat([v[1:], v[:1]])  # background last
        elif name.startswith("roi_head.bbox_head.fc_reg."):
            v = v[4:]
        elif name.startswith("roi_head.mask_head.conv_logits."):
            v = v[1:]
        state[name] = v
    text = "\n".join(f"{k} = {v!r}" for k, v in cfg.items())
    weights = tmp_path / "epoch_12.pth"
    torch.save({"meta": {"cfg": text, "dataset_meta": {"classes": ("shsy5y", "astro", "cort")}}, "state_dict": state}, weights)

    engine = ModelEntry("mmdet", path=weights).get_engine("cpu")
    assert engine.config.provenance["source"] == "mmdetection"
    assert tuple(engine.class_names) == ("shsy5y", "astro", "cort")
    cached = list((tmp_path / "cache" / "imported").glob("mmdet-epoch_12-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    ModelEntry("again", path=weights).get_engine("cpu")  # a second entry reuses the import
    assert cached[0].stat().st_mtime_ns == stamp


def test_an_mmdetection_checkpoint_without_its_config_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_SARTORIUS_HOME", str(tmp_path / "cache"))
    weights = tmp_path / "bare.pth"
    torch.save({"state_dict": {"rpn_head.rpn_conv.weight": torch.zeros(1), "roi_head.bbox_head.fc_cls.weight": torch.zeros(1)}}, weights)
    with pytest.raises(ValueError, match="import-mmdet|--config"):
        ModelEntry("bare", path=weights).get_engine("cpu")

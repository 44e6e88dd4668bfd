"""MMDetection configs (2.x and 3.x) as the project's :class:`~.config.ModelConfig`, without MMDetection.

:func:`load_mmdet_config` reads a config file or the config text MMDetection stores in a checkpoint's
``meta`` (parsed as data by :mod:`.mmdet_pyconfig`, ``_base_`` files from disk or from the bundled
model-zoo copies in :mod:`.mmdet_zoo`). :func:`mmdet_to_model_config` checks every option that decides
the network and its test-time behaviour, and either converts it or raises
:class:`UnsupportedMMDetConfigError` naming it:

* input: ``to_rgb`` (2.x ``Normalize``) / ``bgr_to_rgb`` (3.x ``data_preprocessor``) -> ``input_format``
  "RGB" (else "BGR"), ``mean``/``std`` kept in that order and in 0..255 units; ``pad_size_divisor`` 32.
* test size: ``Resize`` ``scale``/``img_scale`` ``(long, short)`` with ``keep_ratio=True`` ->
  ``max_size_test``/``min_size_test`` (mmcv's rescale rule is detectron2's shortest-edge rule).
* backbone ``ResNet`` depth 50/101 or ``ResNeXt`` 101 with ``groups=32, base_width=8`` (the project's
  bodies); ``style='caffe'`` -> stride in the 1x1 conv; ``frozen_stages`` k -> ``freeze_at`` k + 1.
* neck ``FPN`` (P2-P6, max-pooled P6); RPN anchors: ``strides`` 4..64, ``scales`` x stride -> anchor
  sizes, ``ratios`` (height / width) -> aspect ratios, ``center_offset`` 0 only.
* RoIAlign ``aligned`` / ``sampling_ratio`` -> the pooler's; ``finest_scale`` 56 only.
* box coder ``target_stds`` -> ``bbox_reg_weights`` 1 / std (RPN stds and every ``target_means`` are
  folded into the regression layers by :mod:`.mmdet_import`).
* test settings: RPN ``nms_pre`` (per level), ``max_per_img``, ``nms`` IoU; R-CNN ``score_thr``,
  ``nms`` IoU, ``max_per_img``; ``mask_thr_binary`` is recorded in the provenance (the project's mask
  threshold is a post-processing setting) with a warning when it is not 0.5.

Cascade Mask R-CNN (``CascadeRCNN`` / ``CascadeRoIHead``) becomes ``mmdet_cascade_mask_rcnn_{body}_FPN``
(:mod:`.mmdet_cascade`: a mask head per stage, stage logits averaged, as MMDetection; the stage heads are
read by :mod:`.mmdet_cascade_config`).

Unsupported, by name: HTC and SCNet (semantic / context branches, interleaved mask heads), SOLO/SOLOv2, Mask2Former/MaskFormer, PointRend, Mask Scoring R-CNN, other detectors;
ResNeXt widths the project has no body for (32x4d, 64x4d), GN heads, C4 (``shared_head``). Deformable
bottlenecks (``dcn=dict(type='DCN' | 'DCNv2')``, ``stage_with_dcn``) become the project's deformable stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .mmdet_options import (
    UnsupportedMMDetConfigError,
    _anchors,
    _bbox_head,
    _check_backbone,
    _check_neck,
    _coder,
    _expect,
    _mask_head,
    _nms_iou,
    _normalisation,
    _opt,
    _roi_layer,
    _test_cfg,
    _test_scale,
    _unsupported,
)
from .mmdet_cascade_config import cascade_box_mask, cascade_roi_head, cascade_warnings
from .mmdet_pyconfig import load_config_file
from .mmdet_zoo import bundled_lookup

__all__ = [
    "UnsupportedMMDetConfigError",
    "load_mmdet_config",
    "mmdet_version_of",
    "mmdet_architecture",
    "mmdet_to_model_config",
    "RefusedModel",
]


#: Detector types refused by name, with the reason.
RefusedModel = {
    "HybridTaskCascade": "HTC (semantic segmentation branch and interleaved per-stage mask heads)",
    "SCNet": "SCNet (semantic and glbctx branches, interleaved mask heads)",
    "SOLO": "SOLO (anchor-free, grid-cell masks, no boxes)",
    "SOLOv2": "SOLOv2 (anchor-free, dynamic mask kernels, no boxes)",
    "DecoupledSOLO": "Decoupled SOLO (anchor-free, grid-cell masks)",
    "Mask2Former": "Mask2Former (transformer decoder with mask queries)",
    "MaskFormer": "MaskFormer (transformer decoder with mask queries)",
    "PointRend": "PointRend (point-wise mask refinement head)",
    "MaskScoringRCNN": "Mask Scoring R-CNN (a MaskIoU head rescoring masks)",
    "QueryInst": "QueryInst (query-based dynamic heads)",
    "SparseRCNN": "Sparse R-CNN (learned proposals, no RPN)",
    "CondInst": "CondInst (anchor-free, dynamic mask heads)",
    "YOLACT": "YOLACT (prototype masks)",
    "RTMDet": "RTMDet-Ins (anchor-free, dynamic kernels)",
    "BoxInst": "BoxInst (box-supervised CondInst)",
    "FasterRCNN": "Faster R-CNN (boxes only, no mask head)",
}

_ROI_HEADS_REFUSED = {
    "HybridTaskCascadeRoIHead": RefusedModel["HybridTaskCascade"],
    "PointRendRoIHead": RefusedModel["PointRend"],
    "MaskScoringRoIHead": RefusedModel["MaskScoringRCNN"],
    "GridRoIHead": "Grid R-CNN (grid-point box head)",
    "DynamicRoIHead": "Dynamic R-CNN heads",
    "SCNetRoIHead": RefusedModel["SCNet"],
}

#: The RoI head each supported detector type needs.
_ROI_HEAD_OF = {"MaskRCNN": "StandardRoIHead", "CascadeRCNN": "CascadeRoIHead"}


def load_mmdet_config(path: str | Path | None = None, *, text: str | None = None, source: str = "checkpoint meta") -> dict:
    """Read an MMDetection config as a plain dict (bases merged), from a file or from ``text``.

    Args:
        path: a ``.py`` config; its ``_base_`` files are read from beside it, or from the bundled
            model-zoo copies (:mod:`.mmdet_zoo`) when absent, e.g. a bare
            ``"mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"``.
        text: the config's text instead (MMDetection's ``meta['config']`` / mmengine's ``meta['cfg']``).
        source: the name of ``text`` in messages.

    Raises:
        FileNotFoundError: neither a file nor a bundled name.
        ConfigNeedsExecutionError: the config needs executing (never done).
        ValueError: not valid Python, a ``_base_`` cycle, ...
    """
    lookup = bundled_lookup()
    if text is not None:
        return load_config_file(source, text=text, bundled=lookup)
    p = Path(str(path))
    if p.is_file():
        if p.suffix in (".yaml", ".yml", ".json"):
            raise UnsupportedMMDetConfigError(
                f"{p} is not a Python config; MMDetection configs are .py files (a detectron2 config.yaml "
                "goes to `napari-sartorius import-detectron2`)"
            )
        return load_config_file(p, bundled=lookup)
    found = lookup(str(path), ())
    if found is None:
        raise FileNotFoundError(
            f"MMDetection config {path} not found; give the .py config the model was trained with, or a "
            "bundled model-zoo name, e.g. mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py (3.x) or "
            "mask_rcnn/mask_rcnn_r50_fpn_1x_coco.py (2.x)"
        )
    key, body = found
    return load_config_file(f"<bundled {key}>", text=body, bundled=lookup)


def mmdet_version_of(cfg: Mapping) -> str:
    """``"3.x"`` for an mmengine config (``model.data_preprocessor``, ``test_dataloader``), else ``"2.x"``."""
    model = cfg.get("model", {})
    return "3.x" if ("data_preprocessor" in model or "test_dataloader" in cfg or "default_scope" in cfg) else "2.x"


def _model(cfg: Mapping) -> dict:
    model = cfg.get("model")
    if not isinstance(model, Mapping):
        raise UnsupportedMMDetConfigError("the MMDetection config has no `model = dict(...)`; is it a detection config?")
    return dict(model)


def mmdet_architecture(cfg: Mapping) -> str:
    """Which project architecture an MMDetection config describes, or :class:`UnsupportedMMDetConfigError`.

    Returns ``"mask_rcnn_R_50_FPN"``, ``"mask_rcnn_R_101_FPN"`` or ``"mask_rcnn_X_101_32x8d_FPN"``
    (``MaskRCNN``), or the same bodies as ``"mmdet_cascade_mask_rcnn_{body}_FPN"`` (``CascadeRCNN``).
    """
    model = _model(cfg)
    kind = model.get("type")
    if kind in RefusedModel:
        raise UnsupportedMMDetConfigError(f"MMDetection model type {kind!r} is not supported: {RefusedModel[kind]}")
    if kind not in _ROI_HEAD_OF:
        raise _unsupported("model.type", kind, "'MaskRCNN' or 'CascadeRCNN'")
    roi = _opt(model, "roi_head", {})
    roi_type = _opt(roi, "type")
    if roi_type in _ROI_HEADS_REFUSED:
        raise UnsupportedMMDetConfigError(f"MMDetection roi_head type {roi_type!r} is not supported: {_ROI_HEADS_REFUSED[roi_type]}")
    if roi_type != _ROI_HEAD_OF[kind]:
        raise _unsupported("model.roi_head.type", roi_type, f"'{_ROI_HEAD_OF[kind]}' for a {kind}")
    if _opt(roi, "shared_head") is not None:
        raise _unsupported("model.roi_head.shared_head", _opt(roi["shared_head"], "type"), "None (C4 models with a shared res5 head are not imported)")
    bb = _opt(model, "backbone", {})
    bb_type = _opt(bb, "type")
    depth = _opt(bb, "depth")
    if bb_type == "ResNet":
        body = {50: "R_50", 101: "R_101"}.get(depth)
        if body is None:
            raise _unsupported("model.backbone.depth", depth, "50 or 101 for ResNet")
    elif bb_type == "ResNeXt":
        groups, width = _opt(bb, "groups", 1), _opt(bb, "base_width", 4)
        if (depth, groups, width) != (101, 32, 8):
            raise UnsupportedMMDetConfigError(
                f"MMDetection backbone ResNeXt-{depth} {groups}x{width}d is not supported: the project's ResNeXt "
                "FPN body is ResNeXt-101 32x8d (model.backbone depth=101, groups=32, base_width=8)"
            )
        body = "X_101_32x8d"
    else:
        raise _unsupported("model.backbone.type", bb_type, "'ResNet' (depth 50/101) or 'ResNeXt' (101, 32x8d)")
    neck = _opt(model, "neck", {})
    if _opt(neck, "type") != "FPN":
        raise _unsupported("model.neck.type", _opt(neck, "type"), "'FPN'")
    return f"mmdet_cascade_mask_rcnn_{body}_FPN" if kind == "CascadeRCNN" else f"mask_rcnn_{body}_FPN"


def _standard_roi_head(roi: Mapping) -> tuple[bool, int, dict, dict]:
    """``(aligned, sampling_ratio, box head facts, mask head facts)`` of a ``StandardRoIHead``."""
    aligned, ratio = _roi_layer(_opt(roi, "bbox_roi_extractor", {}), "model.roi_head.bbox_roi_extractor", 7)
    if _opt(roi, "mask_roi_extractor") is None:
        raise _unsupported("model.roi_head.mask_roi_extractor", None, "a SingleRoIExtractor (share_roi_extractor is not imported)")
    m_aligned, m_ratio = _roi_layer(roi["mask_roi_extractor"], "model.roi_head.mask_roi_extractor", 14)
    if (m_aligned, m_ratio) != (aligned, ratio):
        raise _unsupported("model.roi_head.mask_roi_extractor.roi_layer", {"aligned": m_aligned, "sampling_ratio": m_ratio}, f"the box extractor's aligned={aligned}, sampling_ratio={ratio}")
    box = _bbox_head(_opt(roi, "bbox_head", {}))
    if _opt(roi, "mask_head") is None:
        raise _unsupported("model.roi_head.mask_head", None, "an FCNMaskHead (a box-only model has no masks)")
    mask = _mask_head(roi["mask_head"])
    k = box["num_classes"]
    if mask["num_classes"] != k:
        raise UnsupportedMMDetConfigError(f"bbox_head.num_classes = {k} but mask_head.num_classes = {mask['num_classes']}; the config is inconsistent")
    return aligned, ratio, box, mask


def mmdet_to_model_config(cfg: Mapping, class_names: Sequence[str], *, provenance: Mapping | None = None):
    """Turn a loaded MMDetection config into the project's ``ModelConfig``.

    Args:
        cfg: from :func:`load_mmdet_config`.
        class_names: the K foreground classes, in MMDetection's class-index order (``num_classes`` of
            the box and mask heads must be K).
        provenance: extra JSON-able facts for ``ModelConfig.provenance``.

    Returns:
        ``(config, facts)``: the ``ModelConfig`` and the conversion facts :mod:`.mmdet_import` needs
        (``rpn_means``/``rpn_stds``/``bbox_means`` to fold into the layers, per cascade stage
        ``stage_bbox_means``/``stage_bbox_stds``, ``scale_major`` anchors with several scales and
        ratios, class-agnostic flags) plus ``warnings``.

    Raises:
        UnsupportedMMDetConfigError: a model or option the project cannot rebuild (named).
        ValueError: ``class_names`` does not match ``num_classes``.
    """
    from .config import ModelConfig

    warnings: list[str] = []
    arch = mmdet_architecture(cfg)
    model = _model(cfg)
    version = mmdet_version_of(cfg)
    body = _check_backbone(model["backbone"])
    _check_neck(model["neck"])
    rpn = dict(model.get("rpn_head") or {})
    if _opt(rpn, "type") != "RPNHead":
        raise _unsupported("model.rpn_head.type", _opt(rpn, "type"), "'RPNHead'")
    _expect(rpn, "in_channels", "model.rpn_head", [256], 256)
    _expect(rpn, "feat_channels", "model.rpn_head", [256], 256)
    _expect(rpn, "num_convs", "model.rpn_head", [1], 1, "1 (one 3x3 conv)")
    if not _opt(_opt(rpn, "loss_cls", {}), "use_sigmoid", True):
        raise _unsupported("model.rpn_head.loss_cls.use_sigmoid", False, "True (one objectness logit per anchor)")
    anchors = _anchors(rpn)
    rpn_means, rpn_stds = _coder(rpn, "model.rpn_head")
    roi = model["roi_head"]
    train = _opt(model, "train_cfg") or (cfg.get("train_cfg") if isinstance(cfg.get("train_cfg"), Mapping) and "rcnn" in cfg["train_cfg"] else {})
    if arch.startswith("mmdet_cascade_"):
        casc = cascade_roi_head(roi, train)
        aligned, ratio, box, mask = casc["aligned"], casc["sampling_ratio"], *cascade_box_mask(casc)
    else:
        casc = None
        aligned, ratio, box, mask = _standard_roi_head(roi)
    k = box["num_classes"]
    class_names = tuple(str(c) for c in class_names)
    if len(class_names) != k:
        raise ValueError(
            f"the MMDetection config has num_classes = {k} but {len(class_names)} class name(s) were given "
            f"({', '.join(class_names)}); pass {k} names in the model's class order"
        )
    test_rpn, test_rcnn = _test_cfg(cfg, model)
    if _opt(test_rpn, "nms_across_levels", False):
        raise _unsupported("model.test_cfg.rpn.nms_across_levels", True, "False (NMS per FPN level)")
    if float(_opt(test_rpn, "min_bbox_size", 0)) > 0:
        raise _unsupported("model.test_cfg.rpn.min_bbox_size", test_rpn["min_bbox_size"], "0")
    post = _opt(test_rpn, "max_per_img", _opt(test_rpn, "max_num", _opt(test_rpn, "nms_post", 1000)))
    mask_thr = float(_opt(test_rcnn, "mask_thr_binary", 0.5))
    if mask_thr != 0.5:
        warnings.append(
            f"model.test_cfg.rcnn.mask_thr_binary is {mask_thr}; the project binarises masks with its "
            "post-processing mask threshold: set that to the same value"
        )
    min_size, max_size = _test_scale(cfg, warnings)
    fmt, mean, std = _normalisation(cfg, model, version)
    rpn_assign = _opt(_opt(train, "rpn", {}), "assigner", {})
    rpn_sample = _opt(_opt(train, "rpn", {}), "sampler", {})
    rcnn_train = _opt(train, "rcnn", {})
    if isinstance(rcnn_train, (list, tuple)):  # a cascade: stage 0's sampling
        rcnn_train = rcnn_train[0] if rcnn_train else {}
    rcnn_assign = _opt(rcnn_train, "assigner", {})
    rcnn_sample = _opt(rcnn_train, "sampler", {})
    proposal = _opt(train, "rpn_proposal", {})
    prov = {
        "source": "mmdetection",
        "mmdet_version": version,
        "mmdet_backbone_style": _opt(model["backbone"], "style", "pytorch"),
        "mmdet_reg_class_agnostic": box["reg_class_agnostic"],
        "mmdet_mask_class_agnostic": mask["class_agnostic_mask"],
        "mmdet_mask_thr_binary": mask_thr,
    }
    if casc is not None:
        prov["mmdet_num_stages"] = casc["num_stages"]
        prov["mmdet_stage_loss_weights"] = casc["stage_loss_weights"]
        warnings += cascade_warnings(casc)
    prov.update(dict(provenance or {}))
    kwargs = dict(
        arch=arch,
        class_names=class_names,
        input_format=fmt,
        pixel_mean=mean,
        pixel_std=std,
        min_size_test=min_size,
        max_size_test=max_size,
        stride_in_1x1=body["stride_in_1x1"],
        freeze_at=body["freeze_at"],
        deform_on_per_stage=body["deform_on_per_stage"],
        deform_modulated=body["deform_modulated"],
        deform_num_groups=body["deform_num_groups"],
        anchor_sizes=anchors["anchor_sizes"],
        aspect_ratios=anchors["aspect_ratios"],
        round_anchors=False,
        rpn_pre_nms_top_n_test=int(_opt(test_rpn, "nms_pre", 1000)),
        rpn_post_nms_top_n_test=int(post),
        rpn_nms_thresh=_nms_iou(test_rpn, "model.test_cfg.rpn"),
        pooler_aligned=aligned,
        pooler_sampling_ratio=ratio,
        box_head_convs=0,
        box_head_fcs=2,
        box_head_norm="",
        box_head_dim=box["box_head_dim"],
        mask_head_convs=mask["mask_head_convs"],
        mask_head_norm="",
        bbox_reg_weights=tuple(1.0 / s for s in box["bbox_stds"]),
        score_thresh_test=float(_opt(test_rcnn, "score_thr", 0.05)),
        nms_thresh_test=_nms_iou(test_rcnn, "model.test_cfg.rcnn"),
        detections_per_img=int(_opt(test_rcnn, "max_per_img", 100)),
        provenance=prov,
    )
    optional = {
        "rpn_fg_iou_thresh": _opt(rpn_assign, "pos_iou_thr"),
        "rpn_bg_iou_thresh": _opt(rpn_assign, "neg_iou_thr"),
        "rpn_batch_size_per_image": _opt(rpn_sample, "num"),
        "rpn_positive_fraction": _opt(rpn_sample, "pos_fraction"),
        "roi_iou_thresh": _opt(rcnn_assign, "pos_iou_thr"),
        "roi_batch_size_per_image": _opt(rcnn_sample, "num"),
        "roi_positive_fraction": _opt(rcnn_sample, "pos_fraction"),
        "rpn_pre_nms_top_n_train": _opt(proposal, "nms_pre"),
        "rpn_post_nms_top_n_train": _opt(proposal, "max_per_img", _opt(proposal, "max_num")),
    }
    kwargs.update({key: v for key, v in optional.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if casc is not None:
        kwargs["cascade_iou_thresholds"] = casc["iou_thresholds"]
        kwargs["cascade_bbox_reg_weights"] = tuple(tuple(1.0 / s for s in stds) for stds in casc["bbox_stds"])
    try:
        config = ModelConfig(**kwargs)
    except ValueError as exc:
        raise UnsupportedMMDetConfigError(f"the MMDetection config cannot be expressed as a project model: {exc}") from exc
    facts = {
        "rpn_means": rpn_means,
        "rpn_stds": rpn_stds,
        "bbox_means": box["bbox_means"],
        "bbox_stds": box["bbox_stds"],
        "scale_major": anchors["scale_major"],
        "num_scales": len(anchors["anchor_sizes"][0]),
        "num_ratios": len(anchors["aspect_ratios"]),
        "reg_class_agnostic": box["reg_class_agnostic"],
        "class_agnostic_mask": mask["class_agnostic_mask"],
        "warnings": warnings,
    }
    if casc is not None:  # per stage, for folding each stage's target_means into its fc_reg
        facts["stage_bbox_means"], facts["stage_bbox_stds"] = casc["bbox_means"], casc["bbox_stds"]
    return config, facts

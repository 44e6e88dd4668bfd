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

Unsupported, by name: Cascade R-CNN and HTC (MMDetection's cascade has one mask head per stage whose
probabilities are averaged, and averages the stages' class logits: the project's cascade is
detectron2's), SOLO/SOLOv2, Mask2Former/MaskFormer, PointRend, Mask Scoring R-CNN, other detectors;
ResNeXt widths the project has no body for (32x4d, 64x4d), DCN, GN heads, C4 (``shared_head``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

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


class UnsupportedMMDetConfigError(ValueError):
    """An MMDetection config uses a model or option the project cannot rebuild (the message names it)."""


#: Detector types refused by name, with the reason.
RefusedModel = {
    "CascadeRCNN": "Cascade (Mask) R-CNN: MMDetection's cascade has a mask head per stage whose "
    "probabilities are averaged and averages the stages' class logits; the project's cascade is detectron2's "
    "(one mask head, averaged probabilities), so the weights would not give MMDetection's results",
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
    "CascadeRoIHead": RefusedModel["CascadeRCNN"],
    "HybridTaskCascadeRoIHead": RefusedModel["HybridTaskCascade"],
    "PointRendRoIHead": RefusedModel["PointRend"],
    "MaskScoringRoIHead": RefusedModel["MaskScoringRCNN"],
    "GridRoIHead": "Grid R-CNN (grid-point box head)",
    "DynamicRoIHead": "Dynamic R-CNN heads",
    "SCNetRoIHead": RefusedModel["SCNet"],
}


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


def _unsupported(option: str, value: Any, supported: str) -> UnsupportedMMDetConfigError:
    return UnsupportedMMDetConfigError(f"MMDetection option {option} = {value!r} is not supported (supported: {supported})")


def _opt(d: Mapping, key: str, default: Any = None) -> Any:
    return d.get(key, default) if isinstance(d, Mapping) else default


def _expect(d: Mapping, key: str, where: str, allowed: Sequence, default: Any, supported: str | None = None) -> Any:
    value = _opt(d, key, default)
    if isinstance(value, tuple):
        value = list(value)
    if value not in allowed:
        raise _unsupported(f"{where}.{key}", value, supported or " or ".join(repr(a) for a in allowed))
    return value


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

    Returns ``"mask_rcnn_R_50_FPN"``, ``"mask_rcnn_R_101_FPN"`` or ``"mask_rcnn_X_101_32x8d_FPN"``.
    """
    model = _model(cfg)
    kind = model.get("type")
    if kind in RefusedModel:
        raise UnsupportedMMDetConfigError(f"MMDetection model type {kind!r} is not supported: {RefusedModel[kind]}")
    if kind != "MaskRCNN":
        raise _unsupported("model.type", kind, "'MaskRCNN'")
    roi = _opt(model, "roi_head", {})
    roi_type = _opt(roi, "type")
    if roi_type in _ROI_HEADS_REFUSED:
        raise UnsupportedMMDetConfigError(f"MMDetection roi_head type {roi_type!r} is not supported: {_ROI_HEADS_REFUSED[roi_type]}")
    if roi_type != "StandardRoIHead":
        raise _unsupported("model.roi_head.type", roi_type, "'StandardRoIHead'")
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
    return f"mask_rcnn_{body}_FPN"


def _check_backbone(bb: Mapping) -> dict:
    w = "model.backbone"
    _expect(bb, "num_stages", w, [4], 4)
    _expect(bb, "out_indices", w, [[0, 1, 2, 3]], [0, 1, 2, 3])
    _expect(bb, "strides", w, [[1, 2, 2, 2]], [1, 2, 2, 2])
    _expect(bb, "dilations", w, [[1, 1, 1, 1]], [1, 1, 1, 1], "(1, 1, 1, 1) (no dilated stages)")
    _expect(bb, "deep_stem", w, [False], False, "False (ResNetV1c/V1d stems are not built)")
    _expect(bb, "avg_down", w, [False], False, "False (ResNetV1d shortcuts are not built)")
    _expect(bb, "stem_channels", w, [None, 64], None)
    _expect(bb, "base_channels", w, [64], 64)
    _expect(bb, "in_channels", w, [3], 3)
    if _opt(bb, "dcn") is not None:
        raise _unsupported(f"{w}.dcn", _opt(bb["dcn"], "type"), "None (MMDetection's DCN layers are not imported)")
    if _opt(bb, "plugins"):
        raise _unsupported(f"{w}.plugins", bb["plugins"], "None (no attention / context plugins)")
    _expect(bb, "with_cp", w, [False, True], False)
    norm = _opt(bb, "norm_cfg", {"type": "BN"})
    if _opt(norm, "type") not in ("BN", "SyncBN", "BN2d"):
        raise _unsupported(f"{w}.norm_cfg.type", _opt(norm, "type"), "'BN' or 'SyncBN' (frozen to their statistics)")
    style = _expect(bb, "style", w, ["pytorch", "caffe"], "pytorch")
    frozen = int(_opt(bb, "frozen_stages", -1))
    return {"stride_in_1x1": style == "caffe", "freeze_at": max(0, min(5, frozen + 1))}


def _check_neck(neck: Mapping) -> None:
    w = "model.neck"
    _expect(neck, "in_channels", w, [[256, 512, 1024, 2048]], None)
    _expect(neck, "out_channels", w, [256], None)
    _expect(neck, "num_outs", w, [5], None, "5 (P2-P6)")
    _expect(neck, "start_level", w, [0], 0)
    _expect(neck, "end_level", w, [-1, 3], -1)
    _expect(neck, "add_extra_convs", w, [False], False, "False (P6 is a max-pool of P5)")
    _expect(neck, "norm_cfg", w, [None], None, "None (no normalisation in the FPN)")
    _expect(neck, "act_cfg", w, [None], None)
    up = _opt(neck, "upsample_cfg", {"mode": "nearest"})
    if _opt(up, "mode", "nearest") != "nearest" or _opt(up, "scale_factor") not in (None, 2):
        raise _unsupported(f"{w}.upsample_cfg", up, "dict(mode='nearest')")


def _coder(cfg: Mapping, where: str) -> tuple[list[float], list[float]]:
    """``(means, stds)`` of a ``DeltaXYWHBBoxCoder`` (2.0-era configs keep them on the head)."""
    coder = _opt(cfg, "bbox_coder", None)
    if coder is None:
        coder = {"type": "DeltaXYWHBBoxCoder", "target_means": _opt(cfg, "target_means", [0.0] * 4), "target_stds": _opt(cfg, "target_stds", [1.0] * 4)}
    t = _opt(coder, "type")
    if t != "DeltaXYWHBBoxCoder":
        extra = " (LegacyDeltaXYWHBBoxCoder is MMDetection 1.x's +1 pixel convention)" if t and "Legacy" in t else ""
        raise _unsupported(f"{where}.bbox_coder.type", t, f"'DeltaXYWHBBoxCoder'{extra}")
    if _opt(coder, "add_ctr_clamp", False):
        raise _unsupported(f"{where}.bbox_coder.add_ctr_clamp", True, "False")
    if not _opt(coder, "clip_border", True):
        raise _unsupported(f"{where}.bbox_coder.clip_border", False, "True (boxes clipped to the image)")
    means = [float(v) for v in _opt(coder, "target_means", [0.0] * 4)]
    stds = [float(v) for v in _opt(coder, "target_stds", [1.0] * 4)]
    if len(means) != 4 or len(stds) != 4 or min(stds) <= 0:
        raise _unsupported(f"{where}.bbox_coder", coder, "4 target_means and 4 positive target_stds")
    return means, stds


def _anchors(rpn: Mapping) -> dict:
    w = "model.rpn_head"
    gen = _opt(rpn, "anchor_generator")
    if gen is None:  # 2.0-era keys on the head itself
        gen = {"type": "AnchorGenerator", "scales": _opt(rpn, "anchor_scales", [8]), "ratios": _opt(rpn, "anchor_ratios", [0.5, 1.0, 2.0]), "strides": _opt(rpn, "anchor_strides", [4, 8, 16, 32, 64])}
    if _opt(gen, "type") != "AnchorGenerator":
        raise _unsupported(f"{w}.anchor_generator.type", _opt(gen, "type"), "'AnchorGenerator'")
    strides = list(_opt(gen, "strides", []))
    if [s if isinstance(s, int) else list(s) for s in strides] not in ([4, 8, 16, 32, 64], [[4, 4], [8, 8], [16, 16], [32, 32], [64, 64]]):
        raise _unsupported(f"{w}.anchor_generator.strides", strides, "[4, 8, 16, 32, 64] (the FPN levels)")
    offset = float(_opt(gen, "center_offset", 0.0))
    if offset != 0.0:
        raise _unsupported(f"{w}.anchor_generator.center_offset", offset, "0.0 (anchors centred on k * stride)")
    if _opt(gen, "centers") is not None:
        raise _unsupported(f"{w}.anchor_generator.centers", gen["centers"], "None")
    base_sizes = _opt(gen, "base_sizes") or [4, 8, 16, 32, 64]
    if len(base_sizes) != 5:
        raise _unsupported(f"{w}.anchor_generator.base_sizes", base_sizes, "one size per level (5)")
    scales = _opt(gen, "scales")
    if scales is None:
        base, per = _opt(gen, "octave_base_scale"), _opt(gen, "scales_per_octave")
        if base is None or per is None:
            raise _unsupported(f"{w}.anchor_generator.scales", None, "scales, or octave_base_scale with scales_per_octave")
        scales = [base * 2 ** (i / per) for i in range(int(per))]
    ratios = [float(r) for r in _opt(gen, "ratios", [])]
    if not ratios or not scales:
        raise _unsupported(f"{w}.anchor_generator.ratios/scales", (ratios, scales), "non-empty lists")
    sizes = tuple(tuple(float(b) * float(s) for s in scales) for b in base_sizes)
    return {"anchor_sizes": sizes, "aspect_ratios": tuple(ratios), "scale_major": bool(_opt(gen, "scale_major", True))}


def _roi_layer(ext: Mapping, where: str, size: int) -> tuple[bool, int]:
    if _opt(ext, "type") != "SingleRoIExtractor":
        raise _unsupported(f"{where}.type", _opt(ext, "type"), "'SingleRoIExtractor'")
    _expect(ext, "featmap_strides", where, [[4, 8, 16, 32]], None)
    _expect(ext, "out_channels", where, [256], None)
    _expect(ext, "finest_scale", where, [56], 56, "56 (level of a box: floor(log2(sqrt(area) / 56)))")
    layer = _opt(ext, "roi_layer", {})
    if _opt(layer, "type") != "RoIAlign":
        raise _unsupported(f"{where}.roi_layer.type", _opt(layer, "type"), "'RoIAlign'")
    out = _opt(layer, "output_size", _opt(layer, "out_size"))
    if out not in (size, (size, size), [size, size]):
        raise _unsupported(f"{where}.roi_layer.output_size", out, str(size))
    _expect(layer, "pool_mode", f"{where}.roi_layer", ["avg"], "avg")
    ratio = int(_opt(layer, "sampling_ratio", _opt(layer, "sample_num", 0)))
    aligned = bool(_opt(layer, "aligned", True))
    return aligned, ratio


def _bbox_head(head: Mapping) -> dict:
    w = "model.roi_head.bbox_head"
    if isinstance(head, (list, tuple)):
        raise _unsupported(w, f"a list of {len(head)} heads", "one head (a list is a cascade)")
    t = _opt(head, "type")
    if t == "ConvFCBBoxHead":
        for key, want in (("num_shared_convs", 0), ("num_shared_fcs", 2), ("num_cls_convs", 0), ("num_cls_fcs", 0), ("num_reg_convs", 0), ("num_reg_fcs", 0)):
            _expect(head, key, w, [want], 0)
    elif t != "Shared2FCBBoxHead":
        raise _unsupported(f"{w}.type", t, "'Shared2FCBBoxHead' (two shared fc layers)")
    _expect(head, "in_channels", w, [256], 256)
    _expect(head, "roi_feat_size", w, [7, [7, 7]], 7)
    _expect(head, "with_avg_pool", w, [False], False)
    _expect(head, "with_cls", w, [True], True)
    _expect(head, "with_reg", w, [True], True)
    loss = _opt(head, "loss_cls", {})
    if _opt(loss, "use_sigmoid", False) or _opt(loss, "type") not in (None, "CrossEntropyLoss"):
        raise _unsupported(f"{w}.loss_cls", loss, "softmax CrossEntropyLoss (a sigmoid or focal classifier scores classes differently)")
    means, stds = _coder(head, w)
    return {
        "box_head_dim": int(_opt(head, "fc_out_channels", 1024)),
        "num_classes": int(_opt(head, "num_classes", 80)),
        "bbox_means": means,
        "bbox_stds": stds,
        "reg_class_agnostic": bool(_opt(head, "reg_class_agnostic", False)),
    }


def _mask_head(head: Mapping) -> dict:
    w = "model.roi_head.mask_head"
    if _opt(head, "type") != "FCNMaskHead":
        raise _unsupported(f"{w}.type", _opt(head, "type"), "'FCNMaskHead'")
    _expect(head, "in_channels", w, [256], 256)
    _expect(head, "conv_out_channels", w, [256], 256)
    _expect(head, "conv_kernel_size", w, [3], 3)
    _expect(head, "roi_feat_size", w, [14], 14)
    _expect(head, "norm_cfg", w, [None], None, "None (no normalisation in the mask head)")
    up = _opt(head, "upsample_cfg", {"type": "deconv", "scale_factor": 2})
    if _opt(up, "type", "deconv") != "deconv" or _opt(up, "scale_factor", 2) != 2:
        raise _unsupported(f"{w}.upsample_cfg", up, "dict(type='deconv', scale_factor=2)")
    loss = _opt(head, "loss_mask", {})
    if _opt(loss, "type", "CrossEntropyLoss") != "CrossEntropyLoss":
        raise _unsupported(f"{w}.loss_mask.type", loss.get("type"), "'CrossEntropyLoss' (sigmoid masks)")
    return {
        "mask_head_convs": int(_opt(head, "num_convs", 4)),
        "num_classes": int(_opt(head, "num_classes", 80)),
        "class_agnostic_mask": bool(_opt(head, "class_agnostic", False)),
    }


def _test_cfg(cfg: Mapping, model: Mapping) -> tuple[dict, dict]:
    test = _opt(model, "test_cfg")
    if test is None and isinstance(cfg.get("test_cfg"), Mapping) and "rcnn" in cfg["test_cfg"]:
        test = cfg["test_cfg"]  # 2.0-era: test settings beside the model
    if not isinstance(test, Mapping) or "rpn" not in test or "rcnn" not in test:
        raise UnsupportedMMDetConfigError("the MMDetection config has no model.test_cfg with rpn and rcnn settings")
    return dict(test["rpn"]), dict(test["rcnn"])


def _nms_iou(d: Mapping, where: str) -> float:
    nms = _opt(d, "nms")
    if nms is None and "nms_thr" in d:
        return float(d["nms_thr"])
    if _opt(nms, "type", "nms") != "nms":
        raise _unsupported(f"{where}.nms.type", nms.get("type"), "'nms' (soft-NMS is not run)")
    iou = _opt(nms, "iou_threshold", _opt(nms, "iou_thr"))
    if iou is None:
        raise _unsupported(f"{where}.nms", nms, "dict(type='nms', iou_threshold=...)")
    return float(iou)


def _find(pipeline, kinds: tuple[str, ...]) -> list[dict]:
    """Every transform of ``kinds`` in a pipeline, looking inside MultiScaleFlipAug / TestTimeAug."""
    out = []
    for t in pipeline or []:
        if not isinstance(t, Mapping):
            continue
        if t.get("type") in kinds:
            out.append(t)
        inner = t.get("transforms")
        if isinstance(inner, (list, tuple)):
            flat = []
            for x in inner:
                flat.extend(x if isinstance(x, (list, tuple)) else [x])
            out.extend(_find(flat, kinds))
    return out


def _test_pipeline(cfg: Mapping) -> tuple[list, str]:
    for path in (("test_dataloader", "dataset", "pipeline"), ("test_dataloader", "dataset", "dataset", "pipeline"), ("data", "test", "pipeline"), ("test_pipeline",)):
        node: Any = cfg
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, (list, tuple)) and node:
            return list(node), ".".join(path)
    return [], ""


def _test_scale(cfg: Mapping, warnings: list[str]) -> tuple[int, int]:
    pipeline, where = _test_pipeline(cfg)
    if not pipeline:
        warnings.append("the config has no test pipeline: MMDetection's default test scale (1333, 800) is used")
        return 800, 1333
    aug = _find(pipeline, ("MultiScaleFlipAug", "TestTimeAug"))
    resizes = _find(pipeline, ("Resize",))
    scale = None
    if aug:
        a = aug[0]
        if a.get("type") == "TestTimeAug":
            raise _unsupported(f"{where} TestTimeAug", "several scales/flips", "one Resize (the project runs its own test-time augmentation)")
        scale = a.get("img_scale", a.get("scale"))
        if a.get("flip"):
            raise _unsupported(f"{where} MultiScaleFlipAug.flip", True, "False (the project runs its own flip test-time augmentation)")
        if isinstance(scale, list) and len(scale) == 1:
            scale = scale[0]
        if isinstance(scale, list) and scale and isinstance(scale[0], (list, tuple)):
            raise _unsupported(f"{where} MultiScaleFlipAug.img_scale", scale, "one (long, short) scale")
    if len(resizes) != 1:
        raise _unsupported(f"{where} Resize", f"{len(resizes)} Resize transforms", "exactly one Resize in the test pipeline")
    r = resizes[0]
    if not r.get("keep_ratio", True if aug else False):
        raise _unsupported(f"{where} Resize.keep_ratio", False, "True (resizing to a fixed width x height distorts cells)")
    if r.get("scale_factor") is not None:
        raise _unsupported(f"{where} Resize.scale_factor", r["scale_factor"], "a scale=(long, short) resize")
    scale = r.get("scale", r.get("img_scale", scale))
    if isinstance(scale, list) and len(scale) == 1 and isinstance(scale[0], (list, tuple)):
        scale = scale[0]
    if isinstance(scale, int):
        scale = (scale, scale)
    if not isinstance(scale, (list, tuple)) or len(scale) != 2:
        raise _unsupported(f"{where} Resize.scale", scale, "one (long, short) pair")
    return int(min(scale)), int(max(scale))


def _normalisation(cfg: Mapping, model: Mapping, version: str) -> tuple[str, tuple, tuple]:
    pre = _opt(model, "data_preprocessor")
    if version == "3.x" or pre is not None:
        pre = pre or {}
        w = "model.data_preprocessor"
        if _opt(pre, "type", "DetDataPreprocessor") != "DetDataPreprocessor":
            raise _unsupported(f"{w}.type", pre.get("type"), "'DetDataPreprocessor'")
        if _opt(pre, "batch_augments"):
            raise _unsupported(f"{w}.batch_augments", pre["batch_augments"], "None")
        _expect(pre, "pad_size_divisor", w, [32], 1, "32 (FPN inputs are padded to a multiple of 32)")
        _expect(pre, "pad_value", w, [0], 0)
        mean, std = _opt(pre, "mean"), _opt(pre, "std")
        if mean is None or std is None:
            raise _unsupported(f"{w}.mean/std", (mean, std), "3 values each, in 0..255 units")
        to_rgb = bool(_opt(pre, "bgr_to_rgb", False) or _opt(pre, "rgb_to_bgr", False))
    else:
        pipeline, where = _test_pipeline(cfg)
        norms = _find(pipeline, ("Normalize",))
        if len(norms) != 1:
            raise _unsupported(f"{where} Normalize", f"{len(norms)} Normalize transforms", "exactly one Normalize in the test pipeline")
        n = norms[0]
        mean, std, to_rgb = n.get("mean"), n.get("std"), bool(n.get("to_rgb", True))
        pads = _find(pipeline, ("Pad",))
        if len(pads) != 1 or pads[0].get("size_divisor") != 32:
            raise _unsupported(f"{where} Pad", pads, "one Pad(size_divisor=32)")
    loads = _find(_test_pipeline(cfg)[0], ("LoadImageFromFile",))
    if loads and loads[0].get("color_type", "color") != "color":
        raise _unsupported("LoadImageFromFile.color_type", loads[0]["color_type"], "'color' (3-channel input)")
    if loads and loads[0].get("channel_order", "bgr") != "bgr":
        to_rgb = not to_rgb  # the image was loaded as RGB: a to_rgb flip makes it BGR
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != 3 or len(std) != 3:
        raise _unsupported("mean/std", (mean, std), "3 values each (3-channel input)")
    return ("RGB" if to_rgb else "BGR"), mean, std


def mmdet_to_model_config(cfg: Mapping, class_names: Sequence[str], *, provenance: Mapping | None = None):
    """Turn a loaded MMDetection config into the project's ``ModelConfig``.

    Args:
        cfg: from :func:`load_mmdet_config`.
        class_names: the K foreground classes, in MMDetection's class-index order (``num_classes`` of
            the box and mask heads must be K).
        provenance: extra JSON-able facts for ``ModelConfig.provenance``.

    Returns:
        ``(config, facts)``: the ``ModelConfig`` and the conversion facts :mod:`.mmdet_import` needs
        (``rpn_means``/``rpn_stds``/``bbox_means`` to fold into the layers, ``scale_major`` anchors
        with several scales and ratios, class-agnostic flags) plus ``warnings``.

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
    train = _opt(model, "train_cfg") or (cfg.get("train_cfg") if isinstance(cfg.get("train_cfg"), Mapping) and "rcnn" in cfg["train_cfg"] else {})
    rpn_assign = _opt(_opt(train, "rpn", {}), "assigner", {})
    rpn_sample = _opt(_opt(train, "rpn", {}), "sampler", {})
    rcnn_assign = _opt(_opt(train, "rcnn", {}), "assigner", {})
    rcnn_sample = _opt(_opt(train, "rcnn", {}), "sampler", {})
    proposal = _opt(train, "rpn_proposal", {})
    prov = {
        "source": "mmdetection",
        "mmdet_version": version,
        "mmdet_backbone_style": _opt(model["backbone"], "style", "pytorch"),
        "mmdet_reg_class_agnostic": box["reg_class_agnostic"],
        "mmdet_mask_class_agnostic": mask["class_agnostic_mask"],
        "mmdet_mask_thr_binary": mask_thr,
    }
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
    return config, facts

"""The option checks and conversions behind :mod:`.mmdet_config`, one function per config section.

Each reads one part of a loaded MMDetection config (plain dicts), raises
:class:`UnsupportedMMDetConfigError` naming the option it cannot rebuild, and returns the values the
project's ``ModelConfig`` takes (see :mod:`.mmdet_config` for the rules).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = ["UnsupportedMMDetConfigError"]


class UnsupportedMMDetConfigError(ValueError):
    """An MMDetection config uses a model or option the project cannot rebuild (the message names it)."""


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
    deform = {"deform_on_per_stage": (False,) * 4, "deform_modulated": False, "deform_num_groups": 1}
    dcn = _opt(bb, "dcn")
    if dcn is not None:
        kind = _opt(dcn, "type")
        if kind not in ("DCN", "DCNv2"):
            raise _unsupported(f"{w}.dcn.type", kind, "'DCN' or 'DCNv2' (deformable 3x3 convs in the bottlenecks)")
        if _opt(dcn, "fallback_on_stride", False):
            raise _unsupported(f"{w}.dcn.fallback_on_stride", True, "False")
        stages = [bool(v) for v in _opt(bb, "stage_with_dcn", (False,) * 4)]
        if len(stages) != 4:
            raise _unsupported(f"{w}.stage_with_dcn", stages, "4 flags")
        deform = {
            "deform_on_per_stage": tuple(stages),
            "deform_modulated": kind == "DCNv2",
            "deform_num_groups": int(_opt(dcn, "deform_groups", _opt(dcn, "deformable_groups", 1))),
        }
    if _opt(bb, "plugins"):
        raise _unsupported(f"{w}.plugins", bb["plugins"], "None (no attention / context plugins)")
    _expect(bb, "with_cp", w, [False, True], False)
    norm = _opt(bb, "norm_cfg", {"type": "BN"})
    if _opt(norm, "type") not in ("BN", "SyncBN", "BN2d"):
        raise _unsupported(f"{w}.norm_cfg.type", _opt(norm, "type"), "'BN' or 'SyncBN' (frozen to their statistics)")
    style = _expect(bb, "style", w, ["pytorch", "caffe"], "pytorch")
    frozen = int(_opt(bb, "frozen_stages", -1))
    return {"stride_in_1x1": style == "caffe", "freeze_at": max(0, min(5, frozen + 1)), **deform}


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


def _bbox_head(head: Mapping, w: str = "model.roi_head.bbox_head") -> dict:
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


def _mask_head(head: Mapping, w: str = "model.roi_head.mask_head") -> dict:
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

"""The RoI head of an MMDetection ``CascadeRCNN`` config (``CascadeRoIHead``), checked and converted.

Read by :func:`.mmdet_config.mmdet_to_model_config` for ``model.type='CascadeRCNN'`` (2.x and 3.x): the
model becomes ``mmdet_cascade_mask_rcnn_{body}_FPN`` (:mod:`.mmdet_cascade`). Per stage:

* ``bbox_head`` (a list of ``num_stages`` heads, or one dict used for every stage): ``Shared2FCBBoxHead``
  with ``reg_class_agnostic=True`` (every MMDetection cascade config; class-specific cascade regression
  is refused by name), the same ``fc_out_channels`` and ``num_classes`` in every stage; the stage's
  ``target_stds`` become its box-coder weights ``1 / std`` (``cascade_bbox_reg_weights``), its
  ``target_means`` are folded into its ``fc_reg`` bias by :mod:`.mmdet_import`;
* ``mask_head`` (a list, or one dict: MMDetection then builds one mask head per stage, all run at test
  time): ``FCNMaskHead``, the same depth and ``num_classes`` in every stage; class-agnostic per stage;
* ``bbox_roi_extractor`` / ``mask_roi_extractor`` (one dict, or a list of equal ones): 7x7 / 14x14
  RoIAlign with the same ``aligned`` / ``sampling_ratio``;
* ``train_cfg.rcnn`` (a list per stage): the assigners' ``pos_iou_thr`` become the stages' IoU
  thresholds (MMDetection's 0.5 / 0.6 / 0.7 when the config has no training settings);
  ``stage_loss_weights`` is recorded (fine-tuning here weights the stages 1, 0.5, 0.25, ...).
"""

from __future__ import annotations

from typing import Any, Mapping

from .mmdet_options import UnsupportedMMDetConfigError, _bbox_head, _mask_head, _opt, _roi_layer, _unsupported

__all__ = ["cascade_roi_head", "cascade_box_mask", "cascade_warnings", "stage_loss_weights", "HEAD"]

HEAD = "model.roi_head"


def stage_loss_weights(num_stages: int) -> tuple[float, ...]:
    """MMDetection's ``stage_loss_weights``: 1, 0.5, 0.25, ... (``0.5 ** k`` for stage k)."""
    return tuple(0.5**k for k in range(num_stages))


def _per_stage(roi: Mapping, key: str, n: int) -> list:
    """``roi[key]`` as a list of ``n`` per-stage entries (one dict is used for every stage)."""
    value = _opt(roi, key)
    if value is None:
        return [None] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise _unsupported(f"{HEAD}.{key}", f"a list of {len(value)}", f"one entry per stage ({n}, num_stages)")
        return list(value)
    return [value] * n


def _extractors(roi: Mapping, n: int) -> tuple[bool, int]:
    """The RoIAlign ``(aligned, sampling_ratio)`` shared by every box and mask extractor."""
    found: set[tuple[bool, int]] = set()
    for key, size in (("bbox_roi_extractor", 7), ("mask_roi_extractor", 14)):
        entries = _per_stage(roi, key, n)
        if entries[0] is None:
            raise _unsupported(f"{HEAD}.{key}", None, "a SingleRoIExtractor (share_roi_extractor is not imported)")
        for k, ext in enumerate(entries):
            found.add(_roi_layer(ext, f"{HEAD}.{key}[{k}]", size))
    if len(found) != 1:
        raise _unsupported(f"{HEAD}.*_roi_extractor.roi_layer", sorted(found), "the same aligned / sampling_ratio in every extractor")
    return found.pop()


def _iou_thresholds(train: Mapping, n: int) -> tuple[float, ...]:
    rcnn = _opt(train, "rcnn")
    default = tuple(round(0.5 + 0.1 * k, 6) for k in range(n))
    if not isinstance(rcnn, (list, tuple)):
        return default
    if len(rcnn) != n:
        raise _unsupported("model.train_cfg.rcnn", f"a list of {len(rcnn)}", f"one entry per stage ({n})")
    out = []
    for k, stage in enumerate(rcnn):
        iou = _opt(_opt(stage, "assigner", {}), "pos_iou_thr")
        out.append(float(iou) if isinstance(iou, (int, float)) and not isinstance(iou, bool) else default[k])
    return tuple(out)


def cascade_roi_head(roi: Mapping, train: Mapping | None) -> dict[str, Any]:
    """Check a ``CascadeRoIHead`` config and return what the project model and the import need.

    Args:
        roi: ``model.roi_head`` of the config (``type='CascadeRoIHead'``).
        train: ``model.train_cfg`` (or 2.0-era ``train_cfg``), possibly empty.

    Returns:
        ``num_stages``, ``iou_thresholds``, ``bbox_means``/``bbox_stds`` (one list of 4 per stage),
        ``box_head_dim``, ``num_classes``, ``mask_head_convs``, ``mask_class_agnostic`` (per stage),
        ``aligned``/``sampling_ratio`` (RoIAlign) and ``stage_loss_weights`` (as in the config).

    Raises:
        UnsupportedMMDetConfigError: an option the project's cascade cannot rebuild (named).
    """
    n = _opt(roi, "num_stages")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise _unsupported(f"{HEAD}.num_stages", n, "a positive number of stages")
    if _opt(roi, "shared_head") is not None:
        raise _unsupported(f"{HEAD}.shared_head", _opt(roi["shared_head"], "type"), "None")
    aligned, ratio = _extractors(roi, n)
    boxes = []
    for k, head in enumerate(_per_stage(roi, "bbox_head", n)):
        where = f"{HEAD}.bbox_head[{k}]"
        if not isinstance(head, Mapping):
            raise _unsupported(where, head, "a Shared2FCBBoxHead dict")
        box = _bbox_head(head, where)
        if not box["reg_class_agnostic"]:
            raise _unsupported(
                f"{where}.reg_class_agnostic", False,
                "True (the project's cascade stages regress one class-agnostic box, as every MMDetection cascade config)",
            )  # fmt: skip
        boxes.append(box)
    for key in ("box_head_dim", "num_classes"):
        values = [b[key] for b in boxes]
        if len(set(values)) != 1:
            name = "fc_out_channels" if key == "box_head_dim" else key
            raise _unsupported(f"{HEAD}.bbox_head[*].{name}", values, "the same value in every stage")
    mask_cfgs = _per_stage(roi, "mask_head", n)
    if mask_cfgs[0] is None:
        raise _unsupported(f"{HEAD}.mask_head", None, "an FCNMaskHead (a box-only cascade has no masks)")
    masks = [_mask_head(m, f"{HEAD}.mask_head[{k}]") for k, m in enumerate(mask_cfgs)]
    for key, name in (("mask_head_convs", "num_convs"), ("num_classes", "num_classes")):
        values = [m[key] for m in masks]
        if len(set(values)) != 1:
            raise _unsupported(f"{HEAD}.mask_head[*].{name}", values, "the same value in every stage")
    if masks[0]["num_classes"] != boxes[0]["num_classes"]:
        raise UnsupportedMMDetConfigError(
            f"bbox_head num_classes = {boxes[0]['num_classes']} but mask_head num_classes = "
            f"{masks[0]['num_classes']}; the config is inconsistent"
        )
    weights = _opt(roi, "stage_loss_weights", [1.0] * n)
    return {
        "num_stages": n,
        "iou_thresholds": _iou_thresholds(train or {}, n),
        "bbox_means": [b["bbox_means"] for b in boxes],
        "bbox_stds": [b["bbox_stds"] for b in boxes],
        "box_head_dim": boxes[0]["box_head_dim"],
        "num_classes": boxes[0]["num_classes"],
        "mask_head_convs": masks[0]["mask_head_convs"],
        "mask_class_agnostic": [m["class_agnostic_mask"] for m in masks],
        "aligned": aligned,
        "sampling_ratio": ratio,
        "stage_loss_weights": [float(w) for w in weights] if isinstance(weights, (list, tuple)) else weights,
    }


def cascade_box_mask(casc: Mapping) -> tuple[dict, dict]:
    """The box and mask head facts of a :func:`cascade_roi_head` result in the form the Mask R-CNN path
    of :mod:`.mmdet_config` uses (stage 0's coder; every stage's is in ``casc``)."""
    box = {
        "box_head_dim": casc["box_head_dim"],
        "num_classes": casc["num_classes"],
        "bbox_means": casc["bbox_means"][0],
        "bbox_stds": casc["bbox_stds"][0],
        "reg_class_agnostic": True,
    }
    mask = {
        "mask_head_convs": casc["mask_head_convs"],
        "num_classes": casc["num_classes"],
        "class_agnostic_mask": list(casc["mask_class_agnostic"]),
    }
    return box, mask


def cascade_warnings(casc: Mapping) -> list[str]:
    """Warnings for what the import keeps but fine-tuning here does differently."""
    ours = stage_loss_weights(casc["num_stages"])
    theirs = casc["stage_loss_weights"]
    if isinstance(theirs, (list, tuple)) and [round(float(w), 6) for w in theirs] == [round(w, 6) for w in ours]:
        return []
    return [
        f"model.roi_head.stage_loss_weights is {theirs}; fine-tuning here weights the stages "
        f"{', '.join(f'{w:g}' for w in ours)} (inference is unaffected)"
    ]

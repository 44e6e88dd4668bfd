"""Settings of one Mask R-CNN model: everything needed to rebuild it and run it.

A checkpoint carries a :class:`ModelConfig` as JSON (``to_dict``/``from_dict``), so a file alone is
enough to rebuild the network that goes with its weights.

Input convention (one for every architecture and every checkpoint source):
    the model takes a list of float tensors ``(3, H, W)`` in **RGB order, 0..255 units** (uint8 values
    as floats). Inside, it reorders the channels to ``input_format`` ("BGR" for detectron2-trained
    weights, "RGB" for torchvision ones) and normalises ``(x - pixel_mean) / pixel_std``, where
    ``pixel_mean``/``pixel_std`` are given per channel **in the ``input_format`` order, in 0..255
    units**. detectron2's defaults are BGR, mean (103.53, 116.28, 123.675), std (1, 1, 1);
    torchvision's ImageNet normalisation is RGB, mean 255 * (0.485, 0.456, 0.406) =
    (123.675, 116.28, 103.53), std 255 * (0.229, 0.224, 0.225) = (58.395, 57.12, 57.375).

Fields left as ``None`` take the architecture's default in ``__post_init__`` (see
:func:`arch_defaults`), so a config read back from a file always holds concrete values.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..cell_types import DEFAULT_CLASSES

__all__ = [
    "ARCH_NAMES",
    "FPN_ARCHS",
    "C4_ARCHS",
    "ModelConfig",
    "arch_defaults",
    "check_arch",
    "TORCHVISION_MEAN_RGB",
    "TORCHVISION_STD_RGB",
    "DETECTRON2_MEAN_BGR",
]

# The registry (:mod:`.registry`) is the one list of architectures; re-exported here.
from .registry import ARCH_NAMES, C4_ARCHS, FPN_ARCHS, arch_info, check_arch  # noqa: E402

TORCHVISION_MEAN_RGB = (123.675, 116.28, 103.53)
TORCHVISION_STD_RGB = (58.395, 57.12, 57.375)
DETECTRON2_MEAN_BGR = (103.53, 116.28, 123.675)

_FPN_ANCHORS = ((8,), (16,), (32,), (64,), (128,))
_C4_ANCHORS = ((8, 16, 32, 64, 128),)
FPN_LEVELS = ("p2", "p3", "p4", "p5", "p6")
NORMS = ("", "GN", "BN")

# LIVECell's anchor-based models (sartorius-research/LIVECell model/anchor_based/*.yaml): the RPN runs
# on p2 twice (as two levels, anchor sizes 4 and 9) and on p3-p6; grey images normalised by 128 / 11.578.
LIVECELL_RPN_IN_FEATURES = ("p2", "p2", "p3", "p4", "p5", "p6")
LIVECELL_ANCHORS = ((4,), (9,), (17,), (31,), (64,), (127,))
LIVECELL_PIXEL_MEAN = (128.0, 128.0, 128.0)
LIVECELL_PIXEL_STD = (11.578, 11.578, 11.578)


def arch_defaults(arch: str) -> dict[str, Any]:
    """The values ``None`` fields of :class:`ModelConfig` take for ``arch``.

    FPN models follow detectron2's Base-RCNN-FPN (2-fc box head, 4-conv mask head, 28x28 masks); the
    C4 models detectron2's Res5ROIHeads (res5 head shared by box and mask branch, 14x14 masks);
    ``cascade_mask_rcnn_X_152_32x8d_FPN`` follows detectron2's
    ``Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml``: deformable convolution in res3-res5,
    a box head of 4 convs + 1 fc with GroupNorm, an 8-conv GroupNorm mask head, class-agnostic boxes.
    The ResNeSt cascades follow detectron2-ResNeSt's ``mask_cascade_rcnn_ResNeSt_*`` configs (BatchNorm
    in FPN and heads, 4-conv-1-fc box head); ``cascade_mask_rcnn_ResNeSt_200_FPN`` follows LIVECell's
    anchor-based configs: modulated deformable convs (2 groups) in res3-res5, an 8-conv mask head, the
    RPN on ``p2, p2, p3, p4, p5, p6`` with anchor sizes 4, 9, 17, 31, 64, 127, pixel mean 128 and std
    11.578, up to 3000 detections.
    """
    info = arch_info(arch)
    c4 = info.is_c4
    x152 = arch == "cascade_mask_rcnn_X_152_32x8d_FPN"
    resnest = info.is_resnest
    livecell = arch == "cascade_mask_rcnn_ResNeSt_200_FPN"
    head_norm = "GN" if x152 else ("BN" if resnest else "")
    return {
        "pixel_mean": LIVECELL_PIXEL_MEAN if livecell else TORCHVISION_MEAN_RGB,
        "pixel_std": LIVECELL_PIXEL_STD if livecell else TORCHVISION_STD_RGB,
        "rpn_in_features": ("res4",) if c4 else (LIVECELL_RPN_IN_FEATURES if livecell else FPN_LEVELS),
        "anchor_sizes": _C4_ANCHORS if c4 else (LIVECELL_ANCHORS if livecell else _FPN_ANCHORS),
        "deform_on_per_stage": (False, True, True, True) if (x152 or livecell) else (False, False, False, False),
        "deform_modulated": livecell,
        "deform_num_groups": 2 if livecell else 1,
        "fpn_norm": "BN" if resnest else "",
        "box_head_convs": 4 if (x152 or resnest) else 0,
        "box_head_fcs": 1 if (x152 or resnest) else (0 if c4 else 2),
        "box_head_norm": head_norm,
        "mask_head_convs": 8 if (x152 or livecell) else (0 if c4 else 4),
        "mask_head_norm": head_norm,
        "mask_size": 14 if c4 else 28,
        # C4 runs the whole res5 stage per proposal: keep the count near detectron2's (1000).
        "rpn_pre_nms_top_n_test": 6000,
        "rpn_post_nms_top_n_test": 2000 if c4 else 3000,
        "detections_per_img": 3000 if livecell else 1000,
    }


def _tuple(value, conv=float) -> tuple:
    return tuple(conv(v) for v in value)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, classes, input normalisation and test-time settings of one model.

    Attributes:
        arch: one of :data:`ARCH_NAMES`.
        class_names: the foreground classes, in the order of the network's class outputs 1..K
            (output 0 is background).
        input_format: channel order the first convolution expects, "RGB" or "BGR".
        pixel_mean, pixel_std: per channel, in ``input_format`` order, in 0..255 units.
        min_size_test: shorter image side at test time in pixels (0: no resizing).
        max_size_test: cap on the longer side at test time.
        min_size_train: shorter sides to pick from (uniformly) at each training image.
        max_size_train: cap on the longer side in training.
        stride_in_1x1: put the stride-2 of each stage's first bottleneck in its 1x1 conv (detectron2's
            MSRA R-50/R-101 weights) instead of the 3x3 conv (torchvision, ResNeXt).
        freeze_at: freeze the stem (1) and the stages up to res``freeze_at`` (2 = stem + res2).
        deform_on_per_stage: deformable 3x3 convs in res2..res5.
        deform_modulated, deform_num_groups: DCNv2 modulation (mask) and offset groups.
        fpn_norm: "", "GN" (GroupNorm, 32 groups) or "BN" (BatchNorm; SyncBN under torchrun) in the
            FPN convolutions.
        rpn_in_features: the feature maps the RPN runs on, one anchor level each: ``("res4",)`` for
            C4; FPN levels ``"p2"``..``"p6"`` otherwise, a level may repeat (LIVECell: p2 twice).
        anchor_sizes: one tuple of sizes (pixels, at the network's input scale) per RPN feature map.
        aspect_ratios: anchor height / width, the same at every level.
        round_anchors: torchvision anchor convention (corners rounded to integers, strides inferred as
            padded input size // feature size) instead of detectron2's (exact corners, fixed strides).
        rpn_*: RPN proposal counts (pre-NMS counts are per feature level) and thresholds.
        roi_batch_size_per_image, roi_positive_fraction: RoI sampling in training.
        pooler_aligned, pooler_sampling_ratio: RoIAlign half-pixel alignment (detectron2's ROIAlignV2:
            True; torchvision: False) and samples per bin (0 = adaptive).
        box_head_convs/fcs/norm, mask_head_convs/norm: head shapes (FPN models; C4 uses res5).
        mask_size: side of the predicted mask (28 FPN, 14 C4); derived from the architecture.
        bbox_reg_weights: box-delta weights of the (non-cascade) box head.
        cascade_iou_thresholds, cascade_bbox_reg_weights: per cascade stage.
        score_thresh_test, nms_thresh_test, detections_per_img: box-head inference.
        provenance: free JSON-able facts about where the weights come from (training, import).
    """

    arch: str
    class_names: tuple[str, ...] = DEFAULT_CLASSES
    input_format: str = "RGB"
    pixel_mean: tuple[float, float, float] | None = None
    pixel_std: tuple[float, float, float] | None = None
    min_size_test: int = 1024
    max_size_test: int = 2000
    min_size_train: tuple[int, ...] = (640, 704, 768, 832, 896, 960, 1024)
    max_size_train: int = 2000
    # backbone
    stride_in_1x1: bool = False
    freeze_at: int = 2
    deform_on_per_stage: tuple[bool, bool, bool, bool] | None = None
    deform_modulated: bool | None = None
    deform_num_groups: int | None = None
    fpn_norm: str | None = None
    # anchors and RPN
    rpn_in_features: tuple[str, ...] | None = None
    anchor_sizes: tuple[tuple[float, ...], ...] | None = None
    aspect_ratios: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    round_anchors: bool = False
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int | None = None
    rpn_post_nms_top_n_test: int | None = None
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    # RoI heads
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    roi_iou_thresh: float = 0.5
    pooler_aligned: bool = True
    pooler_sampling_ratio: int = 0
    box_head_convs: int | None = None
    box_head_fcs: int | None = None
    box_head_norm: str | None = None
    box_head_dim: int = 1024
    mask_head_convs: int | None = None
    mask_head_norm: str | None = None
    mask_size: int | None = None
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    cascade_iou_thresholds: tuple[float, ...] = (0.5, 0.6, 0.7)
    cascade_bbox_reg_weights: tuple[tuple[float, float, float, float], ...] = (
        (10.0, 10.0, 5.0, 5.0),
        (20.0, 20.0, 10.0, 10.0),
        (30.0, 30.0, 15.0, 15.0),
    )
    # inference
    score_thresh_test: float = 0.05
    nms_thresh_test: float = 0.5
    detections_per_img: int | None = None
    provenance: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        check_arch(self.arch)
        defaults = arch_defaults(self.arch)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        set_ = lambda n, v: object.__setattr__(self, n, v)  # noqa: E731
        # normalise containers (lists from JSON -> tuples) and types
        set_("class_names", tuple(str(c) for c in self.class_names))
        set_("pixel_mean", _tuple(self.pixel_mean))
        set_("pixel_std", _tuple(self.pixel_std))
        set_("min_size_train", _tuple(self.min_size_train, int))
        set_("deform_on_per_stage", _tuple(self.deform_on_per_stage, bool))
        set_("deform_modulated", bool(self.deform_modulated))
        set_("deform_num_groups", int(self.deform_num_groups))
        set_("rpn_in_features", tuple(str(f) for f in self.rpn_in_features))
        set_("detections_per_img", int(self.detections_per_img))
        set_("anchor_sizes", tuple(_tuple(level) for level in self.anchor_sizes))
        set_("aspect_ratios", _tuple(self.aspect_ratios))
        set_("bbox_reg_weights", _tuple(self.bbox_reg_weights))
        set_("cascade_iou_thresholds", _tuple(self.cascade_iou_thresholds))
        set_("cascade_bbox_reg_weights", tuple(_tuple(w) for w in self.cascade_bbox_reg_weights))
        set_("provenance", dict(self.provenance))
        self._validate()

    # -- derived ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Foreground classes K (the network has K + 1 class outputs, background first)."""
        return len(self.class_names)

    @property
    def is_c4(self) -> bool:
        return arch_info(self.arch).is_c4

    @property
    def is_cascade(self) -> bool:
        return arch_info(self.arch).is_cascade

    @property
    def rpn_strides(self) -> tuple[int, ...]:
        """Stride (input pixels) of each RPN feature map: 16 for res4, ``2 ** k`` for ``p<k>``."""
        return tuple(16 if f == "res4" else 2 ** int(f[1:]) for f in self.rpn_in_features)

    def replace(self, **changes) -> ModelConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    # -- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        def bad(msg: str):
            raise ValueError(f"ModelConfig({self.arch}): {msg}")

        if not self.class_names:
            bad("class_names is empty: give at least one class")
        if len(set(self.class_names)) != len(self.class_names):
            bad(f"class_names has duplicates: {self.class_names}")
        if self.input_format not in ("RGB", "BGR"):
            bad(f"input_format must be 'RGB' or 'BGR', got {self.input_format!r}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            bad("pixel_mean and pixel_std need 3 values (one per channel)")
        if any(not math.isfinite(s) or s <= 0 for s in self.pixel_std):
            bad(f"pixel_std must be positive, got {self.pixel_std}")
        if max(self.pixel_std) < 5 and max(abs(m) for m in self.pixel_mean) < 2:
            bad("pixel_mean/pixel_std look like 0..1 units; give them in 0..255 units")
        if self.min_size_test < 0 or self.max_size_test <= 0:
            bad("min_size_test must be >= 0 and max_size_test > 0")
        if not self.min_size_train or min(self.min_size_train) <= 0 or self.max_size_train <= 0:
            bad("min_size_train needs positive sizes and max_size_train must be > 0")
        if len(self.deform_on_per_stage) != 4:
            bad("deform_on_per_stage needs 4 flags (res2..res5)")
        if self.is_c4 and self.deform_on_per_stage[3]:
            bad("deformable convolution in res5 is not supported for C4 models (res5 is the RoI head)")
        if not 0 <= self.freeze_at <= 5:
            bad(f"freeze_at must be in 0..5, got {self.freeze_at}")
        for name in ("fpn_norm", "box_head_norm", "mask_head_norm"):
            if getattr(self, name) not in NORMS:
                bad(f"{name} must be '', 'GN' or 'BN', got {getattr(self, name)!r}")
        if self.is_c4 and self.rpn_in_features != ("res4",):
            bad(f"rpn_in_features of a C4 model is ('res4',), got {self.rpn_in_features}")
        if not self.is_c4 and (not self.rpn_in_features or any(f not in FPN_LEVELS for f in self.rpn_in_features)):
            bad(f"rpn_in_features must name FPN levels among {', '.join(FPN_LEVELS)}, got {self.rpn_in_features}")
        levels = len(self.rpn_in_features)
        if len(self.anchor_sizes) != levels:
            kind = "C4 (res4)" if self.is_c4 else f"the RPN features {', '.join(self.rpn_in_features)}"
            bad(f"anchor_sizes needs {levels} level(s) for {kind}, got {len(self.anchor_sizes)}")
        if len({len(s) for s in self.anchor_sizes}) != 1:
            bad("every anchor level needs the same number of sizes (the RPN head is shared)")
        if any(s <= 0 for level in self.anchor_sizes for s in level) or any(a <= 0 for a in self.aspect_ratios):
            bad("anchor sizes and aspect ratios must be positive")
        if not self.aspect_ratios:
            bad("aspect_ratios is empty")
        expected_mask = 14 if self.is_c4 else 28
        if self.mask_size != expected_mask:
            bad(f"mask_size is {expected_mask} for this architecture, got {self.mask_size}")
        if self.is_c4 and (self.box_head_convs or self.box_head_fcs or self.mask_head_convs):
            bad("C4 models have no box/mask head convs or fcs (res5 is the head): leave them 0")
        if not self.is_c4 and self.box_head_convs == 0 and self.box_head_fcs == 0:
            bad("an FPN box head needs at least one conv or fc layer")
        ints = (
            "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_test", "rpn_batch_size_per_image", "roi_batch_size_per_image",
            "detections_per_img", "box_head_dim", "deform_num_groups",
        )  # fmt: skip
        for name in ints:
            if int(getattr(self, name)) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.pooler_sampling_ratio < 0:
            bad("pooler_sampling_ratio must be >= 0 (0 = adaptive)")
        for name in ("score_thresh_test", "nms_thresh_test", "rpn_nms_thresh", "roi_iou_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if len(self.cascade_iou_thresholds) != len(self.cascade_bbox_reg_weights) or not self.cascade_iou_thresholds:
            bad("cascade_iou_thresholds and cascade_bbox_reg_weights need one entry per stage")
        if any(len(w) != 4 for w in self.cascade_bbox_reg_weights) or len(self.bbox_reg_weights) != 4:
            bad("box regression weights need 4 values (wx, wy, ww, wh)")
        try:
            json.dumps(self.provenance)
        except (TypeError, ValueError) as exc:
            bad(f"provenance must be JSON-serialisable ({exc})")

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (tuples become lists) that :meth:`from_dict` turns back into this config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Rebuild from :meth:`to_dict` output. Unknown keys or an unknown ``arch`` raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a model config must be a mapping, got {type(data).__name__}")
        if "arch" not in data:
            raise ValueError(f"a model config needs 'arch' (one of {', '.join(ARCH_NAMES)})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config is not valid JSON ({exc})") from exc
        return cls.from_dict(data)


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value

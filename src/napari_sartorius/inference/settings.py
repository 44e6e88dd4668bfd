"""Segmentation settings and their choices, torch-free: the Segment dock and the command line build
and validate a :class:`SegmentSettings` directly (no kwargs dict mirrored by hand), and the inference
modules take their lists of choices from here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["TTA_MODES", "FUSION_METHODS", "SegmentSettings"]

#: Test-time augmentation modes (:mod:`.tta`): none, the 4 flips, flips and 90-degree rotations (8),
#: or multiscale (:data:`.tta.DEFAULT_SCALES`).
TTA_MODES: tuple[str, ...] = ("none", "flips", "flips+rot90", "multiscale")
#: How the candidates of all models and TTA variants are fused (:mod:`.ensemble`).
FUSION_METHODS: tuple[str, ...] = ("nms", "soft_nms", "nmw", "wbf", "mask_nms")


@dataclass(frozen=True)
class SegmentSettings:
    """How an image is segmented by an ensemble (the options of :func:`.segment.segment_image`).

    Attributes:
        tta: one of :data:`TTA_MODES`.
        ensemble: one of :data:`FUSION_METHODS`.
        iou_thr: the fusion's IoU threshold, in (0, 1].

    Raises:
        ValueError: a value outside its choices or range (the message names the allowed values).
    """

    tta: str = "none"
    ensemble: str = "wbf"
    iou_thr: float = 0.5

    def __post_init__(self) -> None:
        if self.tta not in TTA_MODES:
            raise ValueError(f"test-time augmentation {self.tta!r}: use one of {', '.join(TTA_MODES)}")
        if self.ensemble not in FUSION_METHODS:
            raise ValueError(f"ensemble method {self.ensemble!r}: use one of {', '.join(FUSION_METHODS)}")
        iou = float(self.iou_thr)
        if not 0.0 < iou <= 1.0:
            raise ValueError(f"fusion IoU {self.iou_thr}: give a value in (0, 1]")
        object.__setattr__(self, "iou_thr", iou)

    def as_kwargs(self) -> dict:
        """The keyword arguments of :func:`.segment.segment_image` / ``segment_stack``."""
        return asdict(self)

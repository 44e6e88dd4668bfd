"""Inference: test-time augmentation, ensembling, devices, tiling and the segmentation generator."""

from .tta import DEFAULT_SCALES, TTA_MODES, TTATransform, run_tta, tta_transforms

__all__ = ["DEFAULT_SCALES", "TTA_MODES", "TTATransform", "run_tta", "tta_transforms"]

"""Inference: test-time augmentation, ensembling, devices, tiling and the segmentation generator.

- :mod:`.tta`: TTA variants and their exact inverses, :func:`run_tta`.
- :mod:`.ensemble`: :func:`fuse_instances` (wbf, nmw, nms, soft_nms, mask_nms) with mask averaging.
- :mod:`napari_sartorius.device` (re-exported): :func:`resolve_device`, :func:`autocast_context`, :func:`run_with_oom_fallback`
  (torch is imported when they are called).
- :mod:`.tiling`: overlapping tiles for large images and the merge of their instances.
- :mod:`.segment`: the job generator :func:`segment_image` / :func:`segment_stack`, and
  :func:`run_to_completion` for scripts.
"""

from ..device import DEVICE_CHOICES, autocast_context, resolve_device, run_with_oom_fallback
from .ensemble import CONF_TYPES, METHODS, fuse_instances
from .segment import (
    SegmentationCancelled,
    SegmentProgress,
    count_steps,
    run_to_completion,
    segment_image,
    segment_stack,
)
from .tiling import merge_tiles, predict_tiled, tile_windows
from .tta import DEFAULT_SCALES, TTA_MODES, TTATransform, run_tta, tta_transforms

__all__ = [
    "CONF_TYPES",
    "DEFAULT_SCALES",
    "DEVICE_CHOICES",
    "METHODS",
    "TTA_MODES",
    "SegmentProgress",
    "SegmentationCancelled",
    "TTATransform",
    "autocast_context",
    "count_steps",
    "fuse_instances",
    "merge_tiles",
    "predict_tiled",
    "resolve_device",
    "run_tta",
    "run_to_completion",
    "run_with_oom_fallback",
    "segment_image",
    "segment_stack",
    "tile_windows",
    "tta_transforms",
]

"""Test-time mask branch in chunks of detections, to bound memory.

A Mask R-CNN keeps up to ``detections_per_img`` (1000) boxes per image, and TTA sends 4-8 variants
as one batch: 4,000 boxes through torchvision's mask branch at once hold a 4000 x 256 x 28 x 28 float
tensor (3.2 GB) after the deconvolution. Pooling, head and predictor act on each box independently
(GroupNorm and frozen BatchNorm normalise per box), so running them on chunks of boxes gives the same
probabilities with memory bounded by the chunk.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

#: Boxes per mask-branch pass at test time: 256 boxes hold ~200 MB at the 28 x 28 deconvolution.
DEFAULT_CHUNK = 256


def chunked_mask_probabilities(
    roi_pool: nn.Module,
    head: nn.Module,
    predictor: nn.Module,
    features: dict[str, Tensor],
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    image_shapes: list[tuple[int, int]],
    chunk: int = DEFAULT_CHUNK,
    mask_size: int = 28,
) -> list[Tensor]:
    """Mask probabilities of each detection for its predicted class.

    Args:
        roi_pool, head, predictor: the mask branch (pooler taking ``(features, boxes, image_shapes)``).
        features: the backbone's feature maps for the whole batch.
        boxes: per image, float ``(N_i, 4)`` detections in the resized input's coordinates.
        labels: per image, int64 ``(N_i,)`` predicted classes (1..K, 0 = background).
        chunk: boxes per pass.
        mask_size: M, the side of the predictor's masks (for images without detections).

    Returns:
        Per image, float ``(N_i, 1, M, M)`` sigmoid probabilities (M = the predictor's output size),
        as torchvision's ``maskrcnn_inference`` gives.
    """
    n_images = len(boxes)
    out: list[Tensor] = []
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        parts = []
        for start in range(0, len(b), chunk):
            part = b[start : start + chunk]
            per_image = [part if j == i else part.new_zeros((0, 4)) for j in range(n_images)]
            logits = predictor(head(roi_pool(features, per_image, image_shapes)))
            cls = lab[start : start + chunk]
            parts.append(logits[torch.arange(len(part), device=logits.device), cls].sigmoid()[:, None])
        out.append(torch.cat(parts) if parts else b.new_zeros((0, 1, mask_size, mask_size)))
    return out

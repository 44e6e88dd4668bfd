"""Test-time mask branch in chunks of detections, to bound memory.

A Mask R-CNN keeps up to ``detections_per_img`` (1000) boxes per image, and TTA sends 4-8 variants
as one batch: 4,000 boxes through torchvision's mask branch at once hold a 4000 x 256 x 28 x 28 float
tensor (3.2 GB) after the deconvolution. Pooling, head and predictor act on each box independently
(GroupNorm and frozen BatchNorm normalise per box), so running them on chunks of boxes gives the same
probabilities with memory bounded by the chunk. Chunks run over the detections of the whole batch (an
image with few boxes shares a pass with the next), so a batch of B images takes ``ceil(sum N_i / chunk)``
passes, not B or more.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

#: Boxes per mask-branch pass on the CPU: 256 boxes hold ~200 MB at the 28 x 28 deconvolution.
DEFAULT_CHUNK = 256
#: Most boxes per pass on a CUDA device: fewer, larger passes keep it busy (a 4-image batch of 4,000
#: detections: 4 passes instead of 16).
GPU_CHUNK = 1024
#: Free device memory asked per box of a pass: ~0.8 MB at the 28 x 28 deconvolution in fp32 (0.4 MB in
#: fp16) plus the head's 14 x 14 activations, times ~4 so a pass takes at most ~1/4 of what is free.
GPU_BYTES_PER_BOX = 4 * 2**20


def mask_chunk_for(device: torch.device, chunk: int) -> int:
    """Boxes per mask-branch pass on ``device`` for a head whose ``mask_chunk`` is ``chunk``.

    ``chunk`` on the CPU and MPS; on CUDA, as many as a quarter of the free memory holds
    (:data:`GPU_BYTES_PER_BOX` each), between ``chunk`` and :data:`GPU_CHUNK`: a laptop GPU with little
    free memory keeps the CPU's chunk rather than running out of memory and falling back to the CPU.
    """
    if device.type != "cuda":
        return chunk
    free, _total = torch.cuda.mem_get_info(device)
    return max(chunk, min(GPU_CHUNK, int(free) // GPU_BYTES_PER_BOX))


def probabilities_in_chunks(
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    chunk: int,
    probabilities: Callable[[list[Tensor], Tensor], Tensor],
    mask_size: int = 28,
) -> list[Tensor]:
    """Run ``probabilities(per_image_boxes, classes) -> (n, 1, M, M)`` on chunks of the whole batch's
    detections (``per_image_boxes``: one ``(n_i, 4)`` tensor per image, possibly empty, ``sum n_i = n``;
    ``classes``: their int64 ``(n,)`` labels in the same order) and split the results back per image: a
    list of ``(N_i, 1, M, M)``. A chunk holds at most ``chunk`` detections on the CPU, and what
    :func:`mask_chunk_for` allows on the boxes' device elsewhere."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    sizes = [len(b) for b in boxes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    if total == 0:
        return [b.new_zeros((0, 1, mask_size, mask_size)) for b in boxes]
    chunk = mask_chunk_for(boxes[0].device, chunk)
    all_labels = torch.cat(list(labels))
    parts = []
    for start in range(0, total, chunk):
        end = min(start + chunk, total)
        # each image's boxes that fall in [start, end) of the batch's detections, in batch order
        per_image = [b[min(max(start - o, 0), n) : min(max(end - o, 0), n)] for b, o, n in zip(boxes, offsets, sizes)]
        parts.append(probabilities(per_image, all_labels[start:end]))
    return list(torch.cat(parts).split(sizes))


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
        chunk: boxes per pass on the CPU, counted over the whole batch (on CUDA: :func:`mask_chunk_for`).
        mask_size: M, the side of the predictor's masks (for images without detections).

    Returns:
        Per image, float ``(N_i, 1, M, M)`` sigmoid probabilities (M = the predictor's output size),
        as torchvision's ``maskrcnn_inference`` gives.
    """

    def probabilities(per_image: list[Tensor], cls: Tensor) -> Tensor:
        logits = predictor(head(roi_pool(features, per_image, image_shapes)))
        return logits[torch.arange(len(cls), device=logits.device), cls].sigmoid()[:, None]

    return probabilities_in_chunks(boxes, labels, chunk, probabilities, mask_size)

"""Multi-level RoIAlign with detectron2's half-pixel alignment.

torchvision's ``MultiScaleRoIAlign`` always calls ``roi_align(..., aligned=False)``; detectron2 models are
trained with ``ROIAlignV2`` (``aligned=True``: a box edge at pixel coordinate x samples at x - 0.5 of
the feature grid's pixel centres). :class:`RoIPooler` takes the flag, fixed feature-map strides instead
of inferring them from the first batch, and detectron2's level assignment
``floor(4 + log2(sqrt(area) / 224 + 1e-8))`` clamped to the available levels.

One pooling call waits for the device once (the number of boxes per level; torchvision's
``MultiScaleRoIAlign`` waits once per level) and writes each level's boxes into place without
zero-filling the output first. torchvision's CPU RoIAlign runs on one thread whatever
``torch.get_num_threads()`` says; at inference the boxes are split over that many threads (each box's
output depends on that box alone: the same values), so pooling scales with the cores as the
convolutions do. RoIAlign reads float32 contiguous maps: fp16 maps under autocast or channels-last maps
are converted on every call, so a head that pools several times converts them once up front with
:func:`pooling_features`.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

__all__ = ["RoIPooler", "assign_levels", "pooling_features", "pooled"]


#: Fewest boxes per thread worth a thread of their own (below, one roi_align call).
MIN_BOXES_PER_THREAD = 32

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _threads(n: int) -> ThreadPoolExecutor:
    """A pool of at least ``n`` threads, kept for the next calls."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="roi_align"), n
        return _pool


def _forget_pool() -> None:  # a forked child has the executor object but not its threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def pooled(fmap: Tensor, rois: Tensor, spatial_scale: float, **kw) -> Tensor:
    """``roi_align(fmap, rois, spatial_scale=..., **kw)``; on the CPU outside autograd, with the boxes
    split over ``torch.get_num_threads()`` threads (at least :data:`MIN_BOXES_PER_THREAD` each)."""
    parts = min(torch.get_num_threads(), rois.shape[0] // MIN_BOXES_PER_THREAD)
    recording = torch.is_grad_enabled() and (fmap.requires_grad or rois.requires_grad)
    if parts < 2 or fmap.device.type != "cpu" or recording:
        return roi_align(fmap, rois, spatial_scale=spatial_scale, **kw)
    inference = torch.is_inference_mode_enabled()

    def run(chunk: Tensor) -> Tensor:
        with torch.inference_mode(inference), torch.no_grad():  # both are per thread: follow the caller
            return roi_align(fmap, chunk, spatial_scale=spatial_scale, **kw)

    return torch.cat(list(_threads(parts).map(run, rois.chunk(parts))))


def pooling_features(features: dict[str, Tensor]) -> dict[str, Tensor]:
    """``features`` as RoIAlign reads them: float32 (float64 kept) and contiguous ``(B, C, H, W)``.

    For heads that pool the same maps several times (box head, mask chunks, cascade stages): converting
    once here makes the pooler's own conversions no-ops. Maps already in that form are passed through.
    """
    out = {}
    for name, fmap in features.items():
        if fmap.dtype != torch.float64:
            fmap = fmap.float()
        out[name] = fmap.contiguous()
    return out


def assign_levels(
    boxes: Tensor, min_level: int, max_level: int, canonical_box_size: float = 224.0, canonical_level: int = 4
) -> Tensor:
    """Pyramid level index (0 = ``min_level``) of each box ``(R, 4)`` xyxy, as int64 ``(R,)``."""
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + 1e-8))
    return (levels.clamp(min=min_level, max=max_level) - min_level).to(torch.int64)


class RoIPooler(nn.Module):
    """RoIAlign over one or several feature maps of known strides.

    Args:
        featmap_names: keys of the feature dict to pool from, finest first (e.g. ``["0", "1", "2", "3"]``).
        output_size: side of the pooled square (7 for boxes, 14 for masks).
        strides: stride of each of those maps in input pixels (e.g. ``(4, 8, 16, 32)``; C4: ``(16,)``).
        sampling_ratio: RoIAlign samples per bin side (0 = adaptive, ``ceil(roi_size / output_size)``).
        aligned: half-pixel alignment (detectron2's ROIAlignV2) or not (torchvision's default).

    ``forward(features, boxes, image_shapes=None)`` takes ``features`` ``{name: (B, C, H, W)}`` and
    ``boxes`` a list of B float tensors ``(R_i, 4)`` xyxy in input pixels; returns
    ``(sum R_i, C, output_size, output_size)`` in box order. ``image_shapes`` is accepted (and unused) so
    that it can stand in for torchvision's ``MultiScaleRoIAlign`` inside ``RoIHeads``.
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int,
        strides: Sequence[int],
        *,
        sampling_ratio: int = 0,
        aligned: bool = True,
    ) -> None:
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError("RoIPooler needs one stride per feature map")
        self.featmap_names = list(featmap_names)
        self.output_size = (int(output_size), int(output_size))
        self.scales = [1.0 / float(s) for s in strides]
        levels = [math.log2(s) for s in strides]
        if any(abs(lv - round(lv)) > 1e-6 for lv in levels):
            raise ValueError(f"feature strides must be powers of 2, got {tuple(strides)}")
        self.min_level, self.max_level = int(round(levels[0])), int(round(levels[-1]))
        if self.max_level - self.min_level + 1 != len(strides):
            raise ValueError(f"feature strides must be consecutive powers of 2, got {tuple(strides)}")
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes=None) -> Tensor:
        maps = [features[name] for name in self.featmap_names]
        # Boxes stay in float32 under fp16 autocast (fp16 has 0.5 px steps above 1024 px); the maps
        # follow (roi_align's autocast rule computes in float32 anyway).
        dtype = torch.float64 if maps[0].dtype == torch.float64 else torch.float32
        maps = [m.to(dtype) for m in maps]
        rois = _to_rois(boxes, maps[0])
        kw = dict(output_size=self.output_size, sampling_ratio=self.sampling_ratio, aligned=self.aligned)
        if len(maps) == 1:
            return pooled(maps[0], rois, self.scales[0], **kw)
        if rois.shape[0] == 0:
            return maps[0].new_zeros((0, maps[0].shape[1]) + self.output_size)
        levels = assign_levels(rois[:, 1:], self.min_level, self.max_level)
        counts = torch.bincount(levels, minlength=len(maps)).tolist()  # the call's one wait for the device
        if max(counts) == rois.shape[0]:  # every box on one level (small cells: the finest)
            level = counts.index(rois.shape[0])
            return pooled(maps[level], rois, self.scales[level], **kw)
        order = torch.argsort(levels, stable=True)
        out = maps[0].new_empty((rois.shape[0], maps[0].shape[1]) + self.output_size)
        start = 0
        for level, (fmap, scale, n) in enumerate(zip(maps, self.scales, counts)):
            if n:
                idx = order[start : start + n]
                out.index_copy_(0, idx, pooled(fmap, rois[idx], scale, **kw))
            start += n
        return out

    def extra_repr(self) -> str:
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"scales={self.scales}, sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


def _to_rois(boxes: list[Tensor], like: Tensor) -> Tensor:
    """``(R, 5)`` rows ``(batch index, x0, y0, x1, y1)`` in ``like``'s dtype and device."""
    parts = [
        torch.cat([torch.full((len(b), 1), i, dtype=like.dtype, device=like.device), b.to(like.dtype)], dim=1)
        for i, b in enumerate(boxes)
    ]
    if not parts:
        return like.new_zeros((0, 5))
    return torch.cat(parts, dim=0)

"""Anchors at fixed feature strides, in detectron2's order, optionally rounded like torchvision.

torchvision's ``AnchorGenerator`` orders the anchors of a location aspect-ratio-major, rounds their
corners to integers and infers strides as ``padded_size // grid_size``; detectron2 orders them size-major,
does not round and uses the configured strides. The order decides which RPN output channel belongs to
which anchor, so weights trained with several sizes per level (C4) only work with the generator they
were trained with. :class:`CellAnchorGenerator` always uses detectron2's order; with
``round_anchors=True`` it follows torchvision's conventions otherwise (integer corners, strides inferred
from the padded input), for checkpoints made by torchvision, where each level has one size, so the
order question does not arise.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

__all__ = ["CellAnchorGenerator", "cell_anchors"]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], *, round_anchors: bool = False) -> Tensor:
    """Anchors of one location centred at 0: float32 ``(len(sizes) * len(aspect_ratios), 4)`` xyxy.

    Row ``i * len(aspect_ratios) + j`` has area ``sizes[i] ** 2`` and height / width ``aspect_ratios[j]``.
    """
    rows = []
    for size in sizes:
        for ratio in aspect_ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            rows.append((-w / 2.0, -h / 2.0, w / 2.0, h / 2.0))
    out = torch.tensor(rows, dtype=torch.float32)
    return out.round() if round_anchors else out


class CellAnchorGenerator(AnchorGenerator):
    """Anchors for each feature map of an :class:`ImageList`.

    Args:
        sizes: one tuple of anchor sizes (input pixels) per feature map.
        aspect_ratios: height / width ratios, the same for every map.
        strides: stride of each feature map in input pixels (FPN ``(4, 8, 16, 32, 64)``, C4 ``(16,)``).
        round_anchors: torchvision's convention (torchvision-trained weights): corners rounded to
            integers and strides ``padded_size // grid_size`` instead of ``strides``.

    ``forward(image_list, feature_maps)`` returns one float tensor ``(sum_l H_l * W_l * A, 4)`` per image,
    ordered by level, then row, column, anchor: the order of torchvision's RPN head outputs.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[float],
        strides: Sequence[int],
        *,
        round_anchors: bool = False,
    ) -> None:
        if len(sizes) != len(strides):
            raise ValueError(f"{len(sizes)} anchor size levels for {len(strides)} feature maps")
        self.round_anchors = bool(round_anchors)
        self.strides = tuple(int(s) for s in strides)
        ratios = tuple(float(a) for a in aspect_ratios)
        super().__init__(sizes=tuple(tuple(float(s) for s in lv) for lv in sizes), aspect_ratios=(ratios,) * len(sizes))

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")) -> Tensor:
        anchors = cell_anchors(scales, aspect_ratios, round_anchors=getattr(self, "round_anchors", False))
        return anchors.to(dtype=dtype)  # moved to the feature device in forward()

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} anchor levels")
        device = feature_maps[0].device
        padded_h, padded_w = image_list.tensors.shape[-2:]
        grids = []
        for fmap, stride, base in zip(feature_maps, self.strides, self.cell_anchors):
            h, w = fmap.shape[-2:]
            stride_y = stride_x = stride
            if self.round_anchors:  # torchvision infers strides (P6 of an 800 px input: 800 // 13 = 61)
                stride_y, stride_x = int(padded_h) // int(h), int(padded_w) // int(w)
            base = base.to(device=device, dtype=torch.float32)
            xs = torch.arange(w, device=device, dtype=torch.float32) * stride_x
            ys = torch.arange(h, device=device, dtype=torch.float32) * stride_y
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack((sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)), dim=1)
            grids.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
        anchors = torch.cat(grids)
        return [anchors for _ in range(len(image_list.image_sizes))]

"""Input normalisation, resizing and output mapping for the project's Mask R-CNN models.

:class:`CellTransform` replaces torchvision's ``GeneralizedRCNNTransform`` behaviour in three ways:

* input: images are float ``(3, H, W)`` **RGB in 0..255 units**; they are reordered to the config's
  ``input_format`` and normalised with its ``pixel_mean``/``pixel_std`` (0..255 units), which lets
  detectron2 (BGR, std 1) and torchvision (RGB, ImageNet std) weights run with their own statistics;
* resizing follows detectron2's ``ResizeShortestEdge``: ``scale = min_size / min(H, W)``, capped so that
  ``max(H, W) * scale <= max_size``, new side ``int(side * scale + 0.5)``, bilinear (half-pixel
  centres; antialiased when shrinking, like the PIL resize detectron2 uses); ``min_size_test = 0`` keeps
  the input size; training masks are resized nearest-neighbour in their own dtype
  (:func:`resize_masks`: uint8 stays uint8);
* output (eval): boxes are mapped back to input-image pixels and clipped, and ``masks`` stay the raw
  ``(N, 1, M, M)`` mask probabilities of the mask head. torchvision would paste every mask into a full
  ``(N, 1, H, W)`` float array (1.2 GB for 800 cells of a 520 x 704 image); the predictor pastes each
  mask into a crop at its box instead.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

__all__ = ["CellTransform", "resize_masks", "resized_shape"]


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Output ``(height, width)`` of detectron2's shortest-edge resize (``min_size = 0``: unchanged)."""
    if min_size <= 0:
        return int(height), int(width)
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of full-image instance masks, in their own dtype.

    Args:
        masks: ``(N, H, W)`` uint8 (or bool, or float) 0/1 masks.
        size: the output ``(h, w)``.

    Returns:
        ``(N, h, w)`` masks of the input dtype. Pixel centres map onto pixel centres ("nearest-exact",
        as the half-pixel bilinear image resize and PIL's NEAREST), so the tight box of a resized mask
        is its resized box to within half a pixel when enlarging; torch's plain "nearest" shifts it by
        +0.5 px on average. No float copy: 300 masks at 1024 x 1386 are 0.4 GB as uint8, 1.7 GB as float.
    """
    if masks.dtype == torch.bool:
        return resize_masks(masks.view(torch.uint8), size).view(torch.bool)
    return F.interpolate(masks[:, None], size=tuple(size), mode="nearest-exact")[:, 0]


class CellTransform(GeneralizedRCNNTransform):
    """Normalise, resize and batch images (and training targets); map detections back.

    Args:
        min_size_train: shorter sides to choose from per training image.
        max_size_train: cap of the longer side in training.
        min_size_test, max_size_test: the same at test time (``min_size_test = 0``: no resizing).
        pixel_mean, pixel_std: per channel in ``input_format`` order, 0..255 units.
        input_format: "RGB" or "BGR": the channel order the network expects.
        size_divisible: batched images are zero-padded (after normalisation) to a multiple of this.
    """

    def __init__(
        self,
        *,
        min_size_train: Sequence[int],
        max_size_train: int,
        min_size_test: int,
        max_size_test: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        size_divisible: int = 32,
    ) -> None:
        super().__init__(
            min_size=tuple(int(s) for s in min_size_train),
            max_size=int(max_size_train),
            image_mean=[float(v) for v in pixel_mean],
            image_std=[float(v) for v in pixel_std],
            size_divisible=size_divisible,
        )
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        self.input_format = input_format
        self.min_size_test = int(min_size_test)
        self.max_size_test = int(max_size_test)

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"images must be float tensors in 0..255 units, got dtype {image.dtype}")
        if image.shape[0] != 3:
            raise ValueError(f"images must have 3 channels (RGB), got shape {tuple(image.shape)}")
        if self.input_format == "BGR":
            image = image.flip(0)
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def resize(
        self, image: Tensor, target: Optional[dict[str, Tensor]] = None
    ) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
        h, w = int(image.shape[-2]), int(image.shape[-1])
        if self.training:
            size, max_size = self.torch_choice(list(self.min_size)), self.max_size
        else:
            size, max_size = self.min_size_test, self.max_size_test
        nh, nw = resized_shape(h, w, size, max_size)
        if (nh, nw) != (h, w):
            # antialias when shrinking, as PIL's bilinear resize that detectron2 applies to uint8 images
            shrink = nh < h or nw < w
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=shrink)[0]
        if target is None:
            return image, target
        target = dict(target)
        target["boxes"] = resize_boxes(target["boxes"], (h, w), (nh, nw))
        if "masks" in target and (nh, nw) != (h, w):
            target["masks"] = resize_masks(target["masks"], (nh, nw))
        return image, target

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            boxes = resize_boxes(pred["boxes"], im_s, o_im_s)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, o_im_s[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, o_im_s[0])
            pred["boxes"] = boxes
        return result

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(input={self.input_format} 0..255, mean={self.image_mean}, "
            f"std={self.image_std}, test=({self.min_size_test}, {self.max_size_test}), "
            f"train=({self.min_size}, {self.max_size}))"
        )

"""Training augmentations on an image, its boxes and its masks together (``torchvision.transforms.v2``).

The set follows what detectron2-based solutions of the Sartorius competition used: a random relative
crop, a multi-scale ``ResizeShortestEdge``, horizontal and vertical flips, rotations (multiples of 90
degrees and/or small angles), and photometric jitter (brightness, contrast, saturation, AlexNet-style
PCA "lighting" noise). Every one is switched and sized by :class:`AugmentationSettings`.

Images are phase-contrast grayscale replicated to 3 channels, values 0..255 (float32 after the
pipeline). Geometric transforms move :class:`~torchvision.tv_tensors.Mask` and
:class:`~torchvision.tv_tensors.BoundingBoxes` with the image; at the end the boxes are recomputed
from the masks (exact after rotations) and instances that vanished or shrank below
``min_instance_area`` pixels / ``min_box_size`` pixels a side are dropped with
:class:`~torchvision.transforms.v2.SanitizeBoundingBoxes`.

Random numbers come from torch's global generator (as in every v2 transform); :class:`TrainTransform`
forks it and seeds it per sample, so a sample's augmentation depends on its seed only.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from ..instances import Instances
from .settings import AugmentationSettings

__all__ = [
    "AugmentationSettings",
    "RandomRelativeCrop",
    "ResizeShortestEdge",
    "RandomRotation90",
    "RandomSmallRotation",
    "RandomBrightness",
    "RandomContrast",
    "RandomSaturation",
    "RandomLighting",
    "TrainTransform",
    "sample_crop_window",
    "crop_instances",
    "masks_to_boxes",
]


# -- geometric transforms ----------------------------------------------------------------------


def sample_crop_window(height: int, width: int, relative_range: tuple[float, float]) -> tuple[int, int, int, int]:
    """A random crop ``(top, left, h, w)`` with ``h = H * U(rh, 1)``, ``w = W * U(rw, 1)`` (global torch RNG)."""
    rh, rw = relative_range
    u = torch.rand(4).tolist()
    ch = max(1, min(height, int(height * (rh + (1 - rh) * u[0]) + 0.5)))
    cw = max(1, min(width, int(width * (rw + (1 - rw) * u[1]) + 0.5)))
    top = int(u[2] * (height - ch + 1))
    left = int(u[3] * (width - cw + 1))
    return min(top, height - ch), min(left, width - cw), ch, cw


class RandomRelativeCrop(v2.Transform):
    """Crop a random window whose sides are random fractions of the input's (see :func:`sample_crop_window`)."""

    def __init__(self, relative_range: tuple[float, float] = (0.7, 0.7)) -> None:
        super().__init__()
        self.relative_range = tuple(relative_range)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        top, left, ch, cw = sample_crop_window(h, w, self.relative_range)
        return dict(top=top, left=left, height=ch, width=cw)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def shortest_edge_size(height: int, width: int, short_edge: int, max_size: int | None) -> tuple[int, int]:
    """Output ``(h, w)`` when scaling the short edge to ``short_edge`` with the long edge at most ``max_size``."""
    scale = short_edge / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


class ResizeShortestEdge(v2.Transform):
    """Resize so that the short edge is a random choice of ``short_edges`` and the long edge <= ``max_size``.

    Masks are resized with nearest-neighbour interpolation (v2's rule for :class:`tv_tensors.Mask`).
    """

    def __init__(self, short_edges: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        self.short_edges = tuple(int(s) for s in short_edges)
        if not self.short_edges:
            raise ValueError("ResizeShortestEdge needs at least one short-edge length")
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        s = self.short_edges[int(torch.randint(len(self.short_edges), ()).item())]
        return dict(size=list(shortest_edge_size(h, w, s, self.max_size)))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class RandomRotation90(v2.Transform):
    """Rotate by ``k * 90`` degrees, ``k`` uniform in {0, 1, 2, 3} (exact, no interpolation)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return dict(k=int(torch.randint(4, ()).item()))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        k = params["k"]
        if k == 0:
            return inpt
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            return self._call_kernel(F.rotate, inpt, angle=90.0 * k, expand=True)
        if isinstance(inpt, torch.Tensor):
            # rot90 counter-clockwise over (H, W); equals F.rotate(angle=90k, expand=True) exactly
            out = torch.rot90(inpt.as_subclass(torch.Tensor), k, dims=(-2, -1))
            return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out
        return inpt


class RandomSmallRotation(v2.Transform):
    """Rotate by an angle uniform in ``[-degrees, degrees]`` about the centre, keeping the size.

    The image is interpolated bilinearly and its uncovered corners filled with its mean; masks use
    nearest neighbour and are filled with 0. Boxes should be recomputed from the masks afterwards.
    """

    def __init__(self, degrees: float) -> None:
        super().__init__()
        self.degrees = float(degrees)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        angle = (torch.rand(()).item() * 2 - 1) * self.degrees
        fill = 0.0
        for x in flat_inputs:
            if isinstance(x, tv_tensors.Image):
                fill = float(x.float().mean())
                break
        return dict(angle=angle, fill=fill)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Image):
            return F.rotate(inpt, params["angle"], interpolation=v2.InterpolationMode.BILINEAR,
                            fill=[params["fill"]] * inpt.shape[-3])
        if isinstance(inpt, (tv_tensors.Mask, tv_tensors.BoundingBoxes)):
            return F.rotate(inpt, params["angle"], interpolation=v2.InterpolationMode.NEAREST)
        return inpt


# -- photometric transforms (on float images 0..255, 3 channels) --------------------------------


class _Photometric(v2.Transform):
    """Base of the blend-style photometric jitters: only :class:`tv_tensors.Image` is changed."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        x = inpt.as_subclass(torch.Tensor)
        out = self._apply(x.float(), params).clamp_(0.0, 255.0)
        if not x.is_floating_point():
            out = out.round_().to(x.dtype)
        return tv_tensors.wrap(out, like=inpt)

    def _apply(self, x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _uniform_weight(strength: float) -> float:
    return 1.0 + (torch.rand(()).item() * 2 - 1) * strength


class RandomBrightness(_Photometric):
    """``x * U(1 - strength, 1 + strength)``, clipped to 0..255 (detectron2's ``RandomBrightness``)."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = float(strength)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return dict(w=_uniform_weight(self.strength))

    def _apply(self, x, params):
        return x * params["w"]


class RandomContrast(_Photometric):
    """``mean + (x - mean) * U(1 - strength, 1 + strength)`` with the image's mean over all pixels."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = float(strength)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return dict(w=_uniform_weight(self.strength))

    def _apply(self, x, params):
        m = x.mean()
        return m + (x - m) * params["w"]


_LUMA = torch.tensor([0.299, 0.587, 0.114])


class RandomSaturation(_Photometric):
    """Blend each pixel with its luma by ``U(1 - s, 1 + s)``; a no-op on gray replicated to 3 channels."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = float(strength)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return dict(w=_uniform_weight(self.strength))

    def _apply(self, x, params):
        if x.shape[-3] != 3:
            return x
        gray = (x * _LUMA.to(x).view(3, 1, 1)).sum(dim=-3, keepdim=True)
        return gray + (x - gray) * params["w"]


class RandomLighting(_Photometric):
    """AlexNet's PCA lighting noise: add ``255 * V @ (alpha * lambda)`` per channel, ``alpha ~ N(0, scale)``.

    ``V``/``lambda`` are the ImageNet RGB eigenvectors/eigenvalues that AlexNet and detectron2's
    ``T.RandomLighting`` use. Needs 3 channels (a 1-channel image is returned unchanged).
    """

    EIGEN_VECS = torch.tensor(
        [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
    )
    EIGEN_VALS = torch.tensor([0.2175, 0.0188, 0.0045])

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        alpha = torch.randn(3) * self.scale
        return dict(offset=255.0 * (self.EIGEN_VECS @ (alpha * self.EIGEN_VALS)))

    def _apply(self, x, params):
        if x.shape[-3] != 3:
            return x
        return x + params["offset"].to(x).view(3, 1, 1)


# -- instance helpers --------------------------------------------------------------------------


def crop_instances(instances: Instances, top: int, left: int, height: int, width: int) -> Instances:
    """Instances restricted to the window ``[top, top+height) x [left, left+width)``, in its coordinates.

    Works on the mask crops (cheap: no full-image masks); instances with no pixel left are dropped.
    """
    keep, crops, origins, boxes = [], [], [], []
    for i in range(len(instances)):
        y0, x0 = (int(v) for v in instances.mask_origins[i])
        m = instances.masks[i]
        ya, yb = max(y0, top), min(y0 + m.shape[0], top + height)
        xa, xb = max(x0, left), min(x0 + m.shape[1], left + width)
        if ya >= yb or xa >= xb:
            continue
        sub = m[ya - y0 : yb - y0, xa - x0 : xb - x0]
        if not np.any(sub >= 0.5):
            continue
        keep.append(i)
        crops.append(sub)
        origins.append((ya - top, xa - left))
        boxes.append((xa - left, ya - top, xb - left, yb - top))
    idx = np.asarray(keep, np.int64)
    return Instances(
        image_size=(height, width),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        scores=instances.scores[idx],
        classes=instances.classes[idx],
        masks=crops,
        mask_origins=np.asarray(origins, np.int64).reshape(-1, 2),
    )


def instances_to_masks(instances: Instances, threshold: float = 0.5) -> torch.Tensor:
    """uint8 ``(N, H, W)`` full-image 0/1 masks of ``instances`` (build them as late as possible)."""
    h, w = instances.image_size
    out = torch.zeros((len(instances), h, w), dtype=torch.uint8)
    for i in range(len(instances)):
        rows, cols = instances.crop_slices(i)
        out[i, rows, cols] = torch.from_numpy(np.ascontiguousarray(instances.masks[i] >= threshold))
    return out


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """float32 ``(N, 4)`` tight xyxy boxes (exclusive right/bottom edges) of ``(N, H, W)`` masks; 0s if empty."""
    n = masks.shape[0]
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    masks = masks.bool()
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
    h, w = rows.shape[1], cols.shape[1]
    ar_h = torch.arange(h)
    ar_w = torch.arange(w)
    big = torch.iinfo(torch.int64).max
    y0 = torch.where(rows, ar_h, big).min(dim=1).values
    y1 = torch.where(rows, ar_h, -1).max(dim=1).values + 1
    x0 = torch.where(cols, ar_w, big).min(dim=1).values
    x1 = torch.where(cols, ar_w, -1).max(dim=1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[~rows.any(dim=1)] = 0.0
    return boxes


# -- the pipeline ------------------------------------------------------------------------------


class TrainTransform:
    """The whole training-time augmentation of one sample.

    Order: random crop (done on the mask crops, before any full-image mask exists, to save memory),
    full-image masks built, flips, rotations, (resize), photometric jitter, boxes recomputed from the
    masks, small/vanished instances dropped.

    Resizing: the project's models resize every training image themselves (detectron2's
    ``ResizeShortestEdge`` rule, a short edge drawn per image from the model's ``min_size_train``), and
    the trainer sets those sizes from ``settings.resize/short_edges/max_size``; so by default this
    pipeline does **not** resize. Pass ``short_edges`` to resize here instead (for a model that does not
    resize its inputs): :class:`ResizeShortestEdge` then runs after the other geometric transforms,
    and masks are resized as uint8 (nearest neighbour).

    Args:
        settings: the augmentations to run.
        short_edges, max_size: resize in the pipeline to a short edge drawn from ``short_edges``
            (long edge at most ``max_size``); None: no resize here.
    """

    def __init__(
        self,
        settings: AugmentationSettings | None = None,
        *,
        short_edges: Sequence[int] | None = None,
        max_size: int | None = None,
    ) -> None:
        self.settings = settings or AugmentationSettings()
        s = self.settings
        edges = short_edges
        msize = max_size
        geo: list[v2.Transform] = []
        if s.hflip:
            geo.append(v2.RandomHorizontalFlip(0.5))
        if s.vflip:
            geo.append(v2.RandomVerticalFlip(0.5))
        if s.rot90:
            geo.append(RandomRotation90())
        if s.rotation_degrees > 0:
            geo.append(RandomSmallRotation(s.rotation_degrees))
        self.resize_enabled = bool(edges)
        if self.resize_enabled:
            geo.append(ResizeShortestEdge(tuple(edges), msize))
        photo: list[v2.Transform] = []
        if s.brightness > 0:
            photo.append(RandomBrightness(s.brightness))
        if s.contrast > 0:
            photo.append(RandomContrast(s.contrast))
        if s.saturation > 0:
            photo.append(RandomSaturation(s.saturation))
        if s.lighting > 0:
            photo.append(RandomLighting(s.lighting))
        self.geometric = v2.Compose(geo) if geo else None
        self.photometric = v2.Compose(photo) if photo else None
        self.sanitize = v2.SanitizeBoundingBoxes(min_size=max(s.min_box_size, 1e-3), min_area=1.0)

    def __call__(
        self, image: np.ndarray, instances: Instances, *, seed: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Augment one sample.

        Args:
            image: uint8 (or float 0..255) ``(H, W)`` grayscale or ``(H, W, 3)`` RGB.
            instances: its annotations (``classes`` 0-based; masks thresholded at 0.5).
            seed: seeds torch's generator (forked, so the caller's state is untouched) for this sample.

        Returns:
            ``image`` float32 ``(3, H', W')`` in 0..255 and ``target`` with ``boxes`` float32 ``(N, 4)``
            xyxy, ``labels`` int64 ``(N,)`` = class index + 1, ``masks`` uint8 ``(N, H', W')``.
        """
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(int(seed) % (2**63))
            return self._run(image, instances)

    def _run(self, image: np.ndarray, instances: Instances):
        img = to_chw_tensor(image)
        h, w = img.shape[-2:]
        if instances.image_size != (h, w):
            raise ValueError(f"annotations of size {instances.image_size} for an image of size {(h, w)}")
        s = self.settings
        if s.crop and (s.crop_relative_range[0] < 1 or s.crop_relative_range[1] < 1):
            top, left, ch, cw = sample_crop_window(h, w, s.crop_relative_range)
            img = img[:, top : top + ch, left : left + cw]
            instances = crop_instances(instances, top, left, ch, cw)
        masks = tv_tensors.Mask(instances_to_masks(instances))
        boxes = tv_tensors.BoundingBoxes(
            torch.from_numpy(instances.boxes.copy()), format="XYXY", canvas_size=tuple(img.shape[-2:])
        )
        labels = torch.from_numpy(instances.classes.copy()) + 1
        image_tv = tv_tensors.Image(img)
        if self.geometric is not None:
            image_tv, boxes, masks = self.geometric(image_tv, boxes, masks)
        image_tv = tv_tensors.wrap(image_tv.as_subclass(torch.Tensor).float(), like=image_tv)
        if self.photometric is not None:
            image_tv = self.photometric(image_tv)
        keep = masks.as_subclass(torch.Tensor).flatten(1).sum(dim=1) >= s.min_instance_area
        masks = tv_tensors.wrap(masks[keep], like=masks)
        labels = labels[keep]
        boxes = tv_tensors.BoundingBoxes(
            masks_to_boxes(masks.as_subclass(torch.Tensor)), format="XYXY", canvas_size=tuple(masks.shape[-2:])
        )
        target = {"boxes": boxes, "labels": labels, "masks": masks}
        target = self.sanitize(target)
        out = {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float(),
            "labels": target["labels"].long(),
            "masks": target["masks"].as_subclass(torch.Tensor).to(torch.uint8),
        }
        return image_tv.as_subclass(torch.Tensor).contiguous(), out


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W)`` or ``(H, W, 3)`` array -> ``(3, H, W)`` tensor of the same dtype (gray replicated)."""
    a = np.asarray(image)
    if not a.flags.writeable:  # e.g. memory-mapped or cached read-only pixels: torch wants its own copy
        a = a.copy()
    if a.ndim == 2:
        t = torch.from_numpy(np.ascontiguousarray(a))[None].expand(3, -1, -1)
    elif a.ndim == 3 and a.shape[-1] == 3:
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
    elif a.ndim == 3 and a.shape[-1] == 1:
        t = torch.from_numpy(np.ascontiguousarray(a[..., 0]))[None].expand(3, -1, -1)
    else:
        raise ValueError(f"an image must be (H, W) grayscale or (H, W, 3) RGB, got shape {a.shape}")
    return t.contiguous()


"""Test-time augmentation (TTA): transformed copies of an image and the exact inverse of each.

Modes (``TTA_MODES``):

- ``"none"``: the image as it is (1 variant).
- ``"flips"``: identity, horizontal flip, vertical flip, both flips (4 variants).
- ``"flips+rot90"``: the 8 symmetries of the square (dihedral group D4): rotations by 0, 90, 180,
  270 degrees, each with and without a horizontal flip. Flips and 90-degree rotations map the pixel
  grid onto itself, so their inverses are exact for boxes, crops and crop origins.
- ``"multiscale"``: the image resized by each factor of ``DEFAULT_SCALES`` (0.8, 1.0, 1.25), without
  flips: three sizes already triple the cost, and flips can be added by a second model or by
  ``"flips"``. Boxes are mapped back by the inverse factor; crops are resampled bilinearly onto the
  integer window the crop's extent maps to (pixel-centre aligned, so a crop is not shifted by the
  rounding of the window). An engine that resizes every input to a fixed test size itself (a
  Mask R-CNN: ``engine.config.min_size_test > 0`` and ``engine.set_test_size``) would undo an
  image-level resize, so for such an engine the scale is applied to its test size instead (1024 px
  at scale 1.25 becomes 1280 px), as detectron2's multi-scale TTA does; only flips and rotations
  then touch the image.

A variant is ``TTATransform(scale, flip, k)``: forward = resize by ``scale``, then mirror left-right
when ``flip``, then rotate by ``k`` quarter turns counter-clockwise (``np.rot90``). Its inverse on
:class:`Instances` applies the opposite steps in reverse order.

:func:`run_tta` sends the variants of one image to ``engine.predict_batch`` as one batch per distinct
variant shape (a 90-degree rotation of a non-square image has another shape; each scale has its own)
and returns the predictions mapped back onto the original image, one :class:`Instances` per variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..instances import Instances
from .engine import ResizingEngine, engine_name

__all__ = [
    "TTA_MODES",
    "DEFAULT_SCALES",
    "TTATransform",
    "TTABatch",
    "tta_transforms",
    "tta_batches",
    "apply_transform",
    "invert_instances",
    "run_tta",
    "check_image",
]

from .settings import TTA_MODES  # noqa: E402 - the one list (torch-free)
DEFAULT_SCALES: tuple[float, ...] = (0.8, 1.0, 1.25)


@dataclass(frozen=True)
class TTATransform:
    """One TTA variant: resize by ``scale``, then mirror left-right if ``flip``, then ``k`` x rot90.

    ``k`` counts quarter turns counter-clockwise as :func:`numpy.rot90` does (0..3).
    """

    scale: float = 1.0
    flip: bool = False
    k: int = 0

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"TTA scale must be a positive number, got {self.scale}")
        object.__setattr__(self, "k", int(self.k) % 4)

    @property
    def name(self) -> str:
        """Short label, e.g. ``identity``, ``hflip``, ``vflip``, ``hvflip``, ``hflip+rot90``, ``x0.8``."""
        geometric = {
            (False, 0): "",
            (True, 0): "hflip",
            (True, 2): "vflip",
            (False, 2): "hvflip",
        }.get((self.flip, self.k), ("hflip+" if self.flip else "") + f"rot{90 * self.k}")
        parts = ([f"x{self.scale:g}"] if self.scale != 1.0 else []) + ([geometric] if geometric else [])
        return "+".join(parts) if parts else "identity"

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(height, width)`` of the transformed image."""
        h, w = _scaled_size(image_size, self.scale)
        return (w, h) if self.k % 2 else (h, w)


def _scaled_size(image_size: tuple[int, int], scale: float) -> tuple[int, int]:
    h, w = image_size
    if scale == 1.0:
        return int(h), int(w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def tta_transforms(mode: str = "none", scales: Sequence[float] | None = None) -> list[TTATransform]:
    """The variants of a TTA mode (see the module docstring); ``scales`` only for ``"multiscale"``."""
    if mode == "none":
        return [TTATransform()]
    if mode == "flips":
        # identity, h, v (= rot180 of the h-flip), hv (= rot180)
        return [TTATransform(), TTATransform(flip=True), TTATransform(flip=True, k=2), TTATransform(k=2)]
    if mode == "flips+rot90":
        return [TTATransform(flip=f, k=k) for k in range(4) for f in (False, True)]
    if mode == "multiscale":
        scales = DEFAULT_SCALES if scales is None else tuple(float(s) for s in scales)
        if not scales:
            raise ValueError("multiscale TTA needs at least one scale")
        return [TTATransform(scale=s) for s in scales]
    raise ValueError(f"unknown TTA mode {mode!r}: use one of {', '.join(TTA_MODES)}")


def check_image(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as an array if it is (H, W) grayscale or (H, W, 3) RGB; else ValueError."""
    image = np.asarray(image)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3):
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"the image is empty (shape {image.shape})")
        return image
    raise ValueError(
        f"expected one image of shape (height, width) or (height, width, 3), got shape {image.shape}; "
        "split stacks into planes (segment_stack does this) and drop alpha channels first"
    )


# -- forward ---------------------------------------------------------------------------------------
def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to ``size`` (H, W); float32 in the input's value range."""
    from skimage.transform import resize

    downscale = size[0] < image.shape[0] or size[1] < image.shape[1]
    out = resize(
        image.astype(np.float32),
        size + image.shape[2:],
        order=1,
        preserve_range=True,
        anti_aliasing=downscale,
        mode="edge",
    )
    return out.astype(np.float32)


def apply_transform(image: np.ndarray, t: TTATransform) -> np.ndarray:
    """The transformed image (a contiguous copy; float32 when resized, else the input dtype)."""
    out = image
    if t.scale != 1.0:
        out = _resize_image(out, _scaled_size(image.shape[:2], t.scale))
    if t.flip:
        out = out[:, ::-1]
    if t.k:
        out = np.rot90(out, t.k, axes=(0, 1))
    return np.ascontiguousarray(out)


# -- inverse on Instances --------------------------------------------------------------------------
def _fliplr_geometry(boxes, origins, shapes, image_size):
    """Boxes and crop origins after mirroring left-right in an image of ``image_size``; ``shapes``
    int64 ``(N, 2)`` crop ``(h, w)``. Returns ``(boxes, origins, shapes, image_size)``."""
    w_img = image_size[1]
    b = boxes
    boxes = np.stack([w_img - b[:, 2], b[:, 1], w_img - b[:, 0], b[:, 3]], axis=1)
    out = origins.copy()
    if len(out):
        out[:, 1] = w_img - origins[:, 1] - shapes[:, 1]
    return boxes, out, shapes, image_size


def _rot90_geometry(boxes, origins, shapes, image_size):
    """One quarter turn counter-clockwise, pixel (r, c) -> (W - 1 - c, r), of boxes and crop origins;
    crop shapes swap. Returns ``(boxes, origins, shapes, image_size)``."""
    h_img, w_img = image_size
    b = boxes
    boxes = np.stack([b[:, 1], w_img - b[:, 2], b[:, 3], w_img - b[:, 0]], axis=1)
    out = np.zeros_like(origins)
    if len(out):
        out[:, 0] = w_img - origins[:, 1] - shapes[:, 1]
        out[:, 1] = origins[:, 0]
    return boxes, out, shapes[:, ::-1], (w_img, h_img)


#: The crop of ``r`` quarter turns counter-clockwise (``np.rot90(m, r)``), then mirrored left-right
#: when ``flip``, as one strided view (a single copy is made from it).
_CROP_VIEWS = {
    (0, False): lambda m: m,
    (1, False): lambda m: m.T[::-1],
    (2, False): lambda m: m[::-1, ::-1],
    (3, False): lambda m: m[::-1].T,
    (0, True): lambda m: m[:, ::-1],
    (1, True): lambda m: m.T[::-1, ::-1],
    (2, True): lambda m: m[::-1],
    (3, True): lambda m: m[::-1].T[:, ::-1],
}


def _undo_geometry(inst: Instances, k: int, flip: bool) -> Instances:
    """``inst`` after ``(4 - k) % 4`` quarter turns counter-clockwise, then a left-right mirror when
    ``flip`` (the inverse of a variant's mirror-then-rotate), in one pass over the crops."""
    turns = (4 - k) % 4
    boxes, origins, size = inst.boxes, inst.mask_origins, inst.image_size
    shapes = np.array([m.shape for m in inst.masks], np.int64).reshape(-1, 2)
    for _ in range(turns):
        boxes, origins, shapes, size = _rot90_geometry(boxes, origins, shapes, size)
    if flip:
        boxes, origins, shapes, size = _fliplr_geometry(boxes, origins, shapes, size)
    view = _CROP_VIEWS[(turns, bool(flip))]
    return Instances(
        image_size=size,
        boxes=boxes,
        scores=inst.scores.copy(),
        classes=inst.classes.copy(),
        masks=[np.ascontiguousarray(view(m)) for m in inst.masks],
        mask_origins=origins,
    )


def _fliplr(inst: Instances) -> Instances:
    """Mirror left-right (pixel column c -> W - 1 - c)."""
    return _undo_geometry(inst, 0, True)


def _rot90_once(inst: Instances) -> Instances:
    """Rotate by one quarter turn counter-clockwise: pixel (r, c) -> (W - 1 - c, r)."""
    return _undo_geometry(inst, 3, False)


def _interp_matrix(n_out: int, out_start: int, factor: float, in_start: int, n_in: int) -> np.ndarray:
    """Bilinear weights ``(n_out, n_in)`` sampling a crop of ``n_in`` pixels starting at ``in_start``
    (source frame) at the centres of ``n_out`` pixels starting at ``out_start`` (target frame), where
    target coordinate = source coordinate x ``factor``. Samples past the crop take its edge value."""
    centres = (np.arange(n_out) + out_start + 0.5) / factor - 0.5 - in_start
    centres = np.clip(centres, 0.0, n_in - 1)
    i0 = np.floor(centres).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    t = (centres - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - t)
    np.add.at(m, (rows, i1), t)
    return m


def _rescale(inst: Instances, image_size: tuple[int, int]) -> Instances:
    """Map instances of a resized image back onto an image of ``image_size`` (H, W)."""
    h_img, w_img = image_size
    fy = h_img / inst.image_size[0]  # target pixels per source pixel
    fx = w_img / inst.image_size[1]
    boxes = inst.boxes * np.array([fx, fy, fx, fy], np.float32)
    boxes = np.clip(boxes, 0, np.array([w_img, h_img, w_img, h_img], np.float32))
    masks, origins = [], []
    eps = 1e-6
    for m, (y0, x0) in zip(inst.masks, inst.mask_origins):
        h, w = m.shape
        ty0 = min(max(int(math.floor(y0 * fy + eps)), 0), h_img - 1)
        tx0 = min(max(int(math.floor(x0 * fx + eps)), 0), w_img - 1)
        ty1 = max(min(int(math.ceil((y0 + h) * fy - eps)), h_img), ty0 + 1)
        tx1 = max(min(int(math.ceil((x0 + w) * fx - eps)), w_img), tx0 + 1)
        ry = _interp_matrix(ty1 - ty0, ty0, fy, int(y0), h)
        rx = _interp_matrix(tx1 - tx0, tx0, fx, int(x0), w)
        masks.append(np.clip(ry @ m @ rx.T, 0.0, 1.0).astype(np.float32))
        origins.append((ty0, tx0))
    return Instances(
        image_size=(h_img, w_img),
        boxes=boxes,
        scores=inst.scores.copy(),
        classes=inst.classes.copy(),
        masks=masks,
        mask_origins=np.asarray(origins, np.int64).reshape(-1, 2),
    )


def invert_instances(inst: Instances, t: TTATransform, image_size: tuple[int, int]) -> Instances:
    """Map predictions on the transformed image back onto the original image of ``image_size``.

    Raises ValueError when ``inst.image_size`` is not the transformed image's size.
    """
    image_size = (int(image_size[0]), int(image_size[1]))
    expected = t.output_size(image_size)
    if tuple(inst.image_size) != expected:
        raise ValueError(
            f"predictions for TTA variant {t.name} have image size {inst.image_size}, expected {expected}"
        )
    out = _undo_geometry(inst, t.k, t.flip) if (t.k or t.flip) else inst
    if t.scale != 1.0:
        out = _rescale(out, image_size)
    return out


# -- batching --------------------------------------------------------------------------------------
@dataclass
class TTABatch:
    """Variants of one image that share a shape: ``images[i]`` is ``apply_transform(image, transforms[i])``;
    ``indices[i]`` is the variant's position in :func:`tta_transforms`."""

    transforms: list[TTATransform]
    images: list[np.ndarray]
    indices: list[int]


def tta_batches(image: np.ndarray, mode: str = "none", scales: Sequence[float] | None = None) -> list[TTABatch]:
    """The variants of ``image`` grouped by transformed shape, in order of first appearance."""
    return _batches(check_image(image), list(enumerate(tta_transforms(mode, scales))))


def _batches(image: np.ndarray, indexed: Sequence[tuple[int, TTATransform]]) -> list[TTABatch]:
    groups: dict[tuple[int, int], TTABatch] = {}
    for i, t in indexed:
        size = t.output_size(image.shape[:2])
        batch = groups.setdefault(size, TTABatch([], [], []))
        batch.transforms.append(t)
        batch.images.append(apply_transform(image, t))
        batch.indices.append(i)
    return list(groups.values())


def predict_checked(engine, images: Sequence[np.ndarray]) -> list[Instances]:
    """``engine.predict_batch(images)``, checking that it returns one Instances per image, sized right."""
    preds = list(engine.predict_batch(list(images)))
    name = engine_name(engine)
    if len(preds) != len(images):
        raise ValueError(f"engine {name!r} returned {len(preds)} results for {len(images)} images")
    for p, im in zip(preds, images):
        if not isinstance(p, Instances):
            raise ValueError(f"engine {name!r} returned {type(p).__name__}, expected Instances")
        if tuple(p.image_size) != tuple(im.shape[:2]):
            raise ValueError(
                f"engine {name!r} returned instances for image size {p.image_size}, "
                f"expected {tuple(im.shape[:2])}"
            )
    return preds


def invert_batch(batch: TTABatch, preds: Sequence[Instances], image_size: tuple[int, int]) -> list[Instances]:
    """Inverse-map one batch's predictions onto the original image."""
    return [invert_instances(p, t, image_size) for p, t in zip(preds, batch.transforms)]


def run_tta(engine, image: np.ndarray, mode: str = "none", scales: Sequence[float] | None = None) -> list[Instances]:
    """Predict every TTA variant of ``image`` and map each back onto the original image.

    Args:
        engine: an object with ``predict_batch(images) -> list[Instances]`` (the engine contract).
        image: (H, W) grayscale or (H, W, 3) RGB, uint8 or float in 0..255.
        mode: one of ``TTA_MODES``.
        scales: resize factors for ``"multiscale"`` (default ``DEFAULT_SCALES``).

    Returns:
        One :class:`Instances` per variant, in the order of :func:`tta_transforms`, all with
        ``image_size == image.shape[:2]``. Variants of equal shape go through one ``predict_batch`` call.
    """
    image = check_image(image)
    transforms = tta_transforms(mode, scales)
    results: list[Instances | None] = [None] * len(transforms)
    if not _resizes_itself(engine) or all(t.scale == 1.0 for t in transforms):
        _predict_into(results, engine, image, list(enumerate(transforms)))
        return results  # type: ignore[return-value]
    config = engine.config
    base_min, base_max = int(config.min_size_test), int(config.max_size_test)
    by_scale: dict[float, list[tuple[int, TTATransform]]] = {}
    for i, t in enumerate(transforms):
        by_scale.setdefault(t.scale, []).append((i, TTATransform(scale=1.0, flip=t.flip, k=t.k)))
    try:
        for scale, indexed in by_scale.items():
            engine.set_test_size(max(1, round(base_min * scale)), max(1, round(base_max * scale)))
            _predict_into(results, engine, image, indexed)
    finally:
        engine.set_test_size(base_min, base_max)
    return results  # type: ignore[return-value]


def _resizes_itself(engine) -> bool:
    """True for an engine that resizes its inputs to a test size it lets us change."""
    if not isinstance(engine, ResizingEngine) or not callable(engine.set_test_size):
        return False
    return int(getattr(engine.config, "min_size_test", 0) or 0) > 0


def _predict_into(results: list, engine, image: np.ndarray, indexed: Sequence[tuple[int, TTATransform]]) -> None:
    for batch in _batches(image, indexed):
        preds = predict_checked(engine, batch.images)
        for i, inst in zip(batch.indices, invert_batch(batch, preds, image.shape[:2])):
            results[i] = inst

"""The one container for instance predictions and annotations.

Masks are never stored as one full-image array per instance: an SH-SY5Y image has up to ~800 cells
and an ensemble sees thousands of candidates (800 x 520 x 704 float32 is 1.2 GB). Each instance keeps
a *crop*: a float32 array of mask probabilities (or 0/1 for annotations) covering an integer window
of the image, whose top-left corner is ``mask_origins[i] = (y0, x0)``. Pasting a crop into the image
is a slice assignment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Instances"]


def _as_index(item, n: int) -> np.ndarray:
    """Turn an int, slice, boolean mask or integer array into an integer index array."""
    if isinstance(item, (int, np.integer)):
        i = int(item)
        if not -n <= i < n:
            raise IndexError(f"instance index {i} out of range for {n} instances")
        return np.array([i % n], dtype=np.int64)
    if isinstance(item, slice):
        return np.arange(n, dtype=np.int64)[item]
    idx = np.asarray(item)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean selector of shape {idx.shape} for {n} instances")
        return np.flatnonzero(idx)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(idx.dtype, np.integer):
        raise IndexError(f"cannot select instances with an array of dtype {idx.dtype}")
    idx = idx.astype(np.int64).ravel()
    if idx.size and (idx.max() >= n or idx.min() < -n):
        raise IndexError(f"instance index out of range for {n} instances")
    return idx % max(n, 1)


@dataclass
class Instances:
    """Instances of one image.

    Attributes:
        image_size: ``(height, width)`` of the image in pixels.
        boxes: float32 ``(N, 4)`` boxes ``x0, y0, x1, y1`` in pixels (x1, y1 exclusive edges).
        scores: float32 ``(N,)`` confidences in [0, 1] (1 for annotations).
        classes: int64 ``(N,)`` 0-based class indices into the caller's class names.
        masks: N float32 arrays ``(h_i, w_i)``; values are mask probabilities in [0, 1].
        mask_origins: int64 ``(N, 2)`` ``(y0, x0)`` of each crop's top-left pixel in the image.
            Every crop lies inside the image.
        columns: optional per-instance values, name -> ``(N,)`` array, carried by selection and
            :meth:`cat` (e.g. fusion's ``uncertainty`` in [0, 1], a review's boolean ``reviewed``).
            Empty by default; no column is required by any consumer.
    """

    image_size: tuple[int, int]
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    masks: list = field(default_factory=list)
    mask_origins: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    columns: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        n = len(self.masks)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        self.mask_origins = np.asarray(self.mask_origins, dtype=np.int64).reshape(-1, 2)
        self.masks = [np.asarray(m, dtype=np.float32) for m in self.masks]
        for name in ("boxes", "scores", "classes", "mask_origins"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Instances: {name} has {len(getattr(self, name))} rows, masks has {n}")
        self.columns = {str(k): np.asarray(v).reshape(-1) for k, v in (self.columns or {}).items()}
        for name, col in self.columns.items():
            if len(col) != n:
                raise ValueError(f"Instances: column {name!r} has {len(col)} rows, masks has {n}")
        h, w = self.image_size
        if n:  # every crop 2-D and inside the image (checked at once: fusion builds Instances of 12,000)
            shapes = [m.shape for m in self.masks]
            flat = [len(s) != 2 for s in shapes]
            sh = np.array([(0, 0) if f else s for f, s in zip(flat, shapes)], np.int64)
            o = self.mask_origins
            bad = np.array(flat) | (o[:, 0] < 0) | (o[:, 1] < 0) | (o[:, 0] + sh[:, 0] > h) | (o[:, 1] + sh[:, 1] > w)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"Instances: mask crop of shape {self.masks[i].shape} at {(int(o[i, 0]), int(o[i, 1]))} "
                    f"does not fit an image of size {self.image_size}"
                )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> Instances:
        return cls(image_size=image_size)

    @classmethod
    def from_full_masks(
        cls,
        masks: Iterable[np.ndarray] | np.ndarray,
        image_size: tuple[int, int] | None = None,
        scores: Sequence[float] | None = None,
        classes: Sequence[int] | None = None,
        boxes: np.ndarray | None = None,
    ) -> Instances:
        """Build from full-image masks (bool or float ``(H, W)`` each), cropping each to its extent.

        Empty masks are kept as a 1x1 zero crop so that indices still line up with the input.
        ``boxes`` default to the tight box of each mask (pixels where the mask is > 0).
        """
        masks = list(masks)
        if image_size is None:
            if not masks:
                raise ValueError("image_size is needed when there are no masks")
            image_size = masks[0].shape[:2]
        crops, origins, tight = [], [], []
        for m in masks:
            m = np.asarray(m)
            if m.shape != tuple(image_size):
                raise ValueError(f"mask of shape {m.shape} for an image of size {tuple(image_size)}")
            ys, xs = _extent(m > 0)
            if ys is None:
                crops.append(np.zeros((1, 1), np.float32))
                origins.append((0, 0))
                tight.append((0, 0, 0, 0))
                continue
            crops.append(m[ys[0] : ys[1], xs[0] : xs[1]].astype(np.float32))
            origins.append((ys[0], xs[0]))
            tight.append((xs[0], ys[0], xs[1], ys[1]))
        n = len(crops)
        return cls(
            image_size=image_size,
            boxes=np.asarray(tight, np.float32).reshape(-1, 4) if boxes is None else boxes,
            scores=np.ones(n, np.float32) if scores is None else scores,
            classes=np.zeros(n, np.int64) if classes is None else classes,
            masks=crops,
            mask_origins=np.asarray(origins, np.int64).reshape(-1, 2),
        )

    @classmethod
    def from_label_image(
        cls,
        labels: np.ndarray,
        classes: dict[int, int] | int | None = None,
        scores: dict[int, float] | None = None,
    ) -> Instances:
        """Build from a label image ``(H, W)`` (0 = background), one instance per label id.

        Instances come in increasing label order; ``classes`` maps label id -> class index
        (or one class index for all), ``scores`` label id -> score (default 1).
        """
        from scipy import ndimage

        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"a label image must be 2-D (height, width), got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            if labels.size and not np.all(np.mod(labels, 1) == 0):
                raise ValueError("a label image must hold integer ids")
            labels = labels.astype(np.int64)
        ids = np.unique(labels)
        ids = ids[ids > 0]
        crops, origins, boxes = [], [], []
        slices = ndimage.find_objects(labels.astype(np.int64)) if ids.size else []
        for lab in ids:
            sl = slices[int(lab) - 1]
            crop = (labels[sl] == lab).astype(np.float32)
            crops.append(crop)
            origins.append((sl[0].start, sl[1].start))
            boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
        n = len(crops)
        if isinstance(classes, dict):
            cls_arr = np.array([classes.get(int(i), 0) for i in ids], np.int64)
        else:
            cls_arr = np.full(n, 0 if classes is None else int(classes), np.int64)
        sc = np.array([1.0 if scores is None else scores.get(int(i), 1.0) for i in ids], np.float32)
        return cls(
            image_size=labels.shape,
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            scores=sc,
            classes=cls_arr,
            masks=crops,
            mask_origins=np.asarray(origins, np.int64).reshape(-1, 2),
        )

    @staticmethod
    def cat(parts: Sequence[Instances]) -> Instances:
        """Concatenate instances of the same image (columns that every part has are kept)."""
        if not parts:
            raise ValueError("cannot concatenate an empty list of Instances")
        size = parts[0].image_size
        if any(p.image_size != size for p in parts):
            raise ValueError("cannot concatenate Instances of different image sizes")
        return Instances(
            image_size=size,
            boxes=np.concatenate([p.boxes for p in parts]),
            scores=np.concatenate([p.scores for p in parts]),
            classes=np.concatenate([p.classes for p in parts]),
            masks=[m for p in parts for m in p.masks],
            mask_origins=np.concatenate([p.mask_origins for p in parts]),
            columns={
                k: np.concatenate([p.columns[k] for p in parts])
                for k in parts[0].columns
                if all(k in p.columns for p in parts)
            },
        )

    # -- selection ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, item) -> Instances:
        idx = _as_index(item, len(self))
        return Instances(
            image_size=self.image_size,
            boxes=self.boxes[idx],
            scores=self.scores[idx],
            classes=self.classes[idx],
            masks=[self.masks[i] for i in idx],
            mask_origins=self.mask_origins[idx],
            columns={k: v[idx] for k, v in self.columns.items()},
        )

    @property
    def uncertainty(self) -> np.ndarray | None:
        """float32 ``(N,)`` per-cell uncertainty in [0, 1] from fusion, or None when undefined."""
        u = self.columns.get("uncertainty")
        return None if u is None else u.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"Instances(n={len(self)}, image_size={self.image_size})"

    # -- masks --------------------------------------------------------------------------------
    def crop_slices(self, i: int) -> tuple[slice, slice]:
        """The ``(rows, cols)`` slices of the image that instance ``i``'s crop covers."""
        y0, x0 = (int(v) for v in self.mask_origins[i])
        h, w = self.masks[i].shape
        return slice(y0, y0 + h), slice(x0, x0 + w)

    def full_mask(self, i: int, threshold: float = 0.5) -> np.ndarray:
        """Instance ``i`` as a full-image boolean mask ``(H, W)``: probability >= threshold."""
        out = np.zeros(self.image_size, dtype=bool)
        out[self.crop_slices(i)] = self.masks[i] >= threshold
        return out

    def binary_crop(self, i: int, threshold: float = 0.5) -> np.ndarray:
        return self.masks[i] >= threshold

    def areas(self, threshold: float = 0.5) -> np.ndarray:
        """int64 ``(N,)`` pixel count of each mask at ``threshold``."""
        return np.array([int(np.count_nonzero(m >= threshold)) for m in self.masks], np.int64)

    def mask_boxes(self, threshold: float = 0.5) -> np.ndarray:
        """float32 ``(N, 4)`` tight xyxy boxes of the thresholded masks (zeros for empty masks)."""
        out = np.zeros((len(self), 4), np.float32)
        for i, m in enumerate(self.masks):
            ys, xs = _extent(m >= threshold)
            if ys is not None:
                y0, x0 = self.mask_origins[i]
                out[i] = (x0 + xs[0], y0 + ys[0], x0 + xs[1], y0 + ys[1])
        return out

    def to_label_image(self, threshold: float = 0.5, dtype=None) -> np.ndarray:
        """Paint instances into a label image ``(H, W)``; instance ``i`` gets id ``i + 1``.

        Later instances overwrite earlier ones where they overlap, so order by ascending score
        (or resolve overlaps first with post-processing) when that matters.
        """
        if dtype is None:
            dtype = np.uint16 if len(self) < 65535 else np.uint32
        out = np.zeros(self.image_size, dtype=dtype)
        for i in range(len(self)):
            sl = self.crop_slices(i)
            out[sl][self.masks[i] >= threshold] = i + 1
        return out


def _extent(mask: np.ndarray):
    """Row and column half-open extents ``(y0, y1), (x0, x1)`` of a boolean mask, or ``(None, None)``."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None, None
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)

"""Fake engines and helpers for the inference tests (the engine contract, without a model)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_sartorius.instances import Instances


class BlobEngine:
    """Segments bright blobs by thresholding: exactly equivariant under flips and 90-degree turns.

    Each connected component of ``gray > threshold`` is one instance; its crop holds ``gray / 255``
    inside the blob (so crops are not binary) with a one-pixel zero margin where the image allows;
    the score is the blob's mean intensity / 255; the class is 1 for blobs of at least ``big_area``
    pixels, else 0. Records the size of every batch it is given.
    """

    class_names = ("small", "big")

    def __init__(self, threshold: float = 127.0, big_area: int = 300, name: str = "blobs"):
        self.threshold = threshold
        self.big_area = big_area
        self.name = name
        self.batch_sizes: list[int] = []
        self.shapes: list[tuple[int, int]] = []

    def predict_one(self, image: np.ndarray) -> Instances:
        gray = np.asarray(image, np.float32)
        if gray.ndim == 3:
            gray = gray.mean(axis=2)
        labels, n = ndimage.label(gray > self.threshold)
        h, w = gray.shape
        boxes, scores, classes, masks, origins = [], [], [], [], []
        for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
            y0, y1 = max(sl[0].start - 1, 0), min(sl[0].stop + 1, h)
            x0, x1 = max(sl[1].start - 1, 0), min(sl[1].stop + 1, w)
            inside = labels[y0:y1, x0:x1] == lab
            crop = np.where(inside, gray[y0:y1, x0:x1] / 255.0, 0.0).astype(np.float32)
            boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
            scores.append(float(gray[labels == lab].mean() / 255.0))
            classes.append(int(inside.sum() >= self.big_area))
            masks.append(crop)
            origins.append((y0, x0))
        return Instances(
            image_size=(h, w),
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            scores=scores,
            classes=classes,
            masks=masks,
            mask_origins=np.asarray(origins, np.int64).reshape(-1, 2),
        )

    def predict_batch(self, images):
        self.batch_sizes.append(len(images))
        self.shapes.extend(tuple(im.shape[:2]) for im in images)
        return [self.predict_one(im) for im in images]


def blob_image(shape=(96, 128), n=12, radius=(4, 9), seed=0, margin=0) -> np.ndarray:
    """uint8 image with ``n`` non-touching bright discs of varying intensity on a dark background."""
    rng = np.random.default_rng(seed)
    h, w = shape
    img = np.full(shape, 20, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    taken = np.zeros(shape, bool)
    placed = 0
    for _ in range(n * 50):
        if placed == n:
            break
        r = rng.integers(radius[0], radius[1] + 1)
        cy = rng.integers(margin + r, h - margin - r)
        cx = rng.integers(margin + r, w - margin - r)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        halo = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 3) ** 2
        if (taken & halo).any():
            continue
        taken |= disc
        img[disc] = rng.integers(150, 255)
        placed += 1
    return img


def canonical(inst: Instances):
    """Instances as a sorted list of comparable tuples (box, score, class, origin, crop bytes)."""
    rows = []
    for i in range(len(inst)):
        rows.append(
            (
                tuple(np.round(inst.boxes[i], 4).tolist()),
                round(float(inst.scores[i]), 6),
                int(inst.classes[i]),
                tuple(int(v) for v in inst.mask_origins[i]),
                inst.masks[i].shape,
                inst.masks[i].tobytes(),
            )
        )
    return sorted(rows)


def assert_same_instances(a: Instances, b: Instances) -> None:
    assert a.image_size == b.image_size
    assert len(a) == len(b)
    assert canonical(a) == canonical(b)


@pytest.fixture
def engine():
    return BlobEngine()


@pytest.fixture
def fakes():
    """The helpers as one namespace (conftest modules are not importable by name)."""

    class _F:
        BlobEngine = BlobEngine
        blob_image = staticmethod(blob_image)
        canonical = staticmethod(canonical)
        assert_same_instances = staticmethod(assert_same_instances)

    return _F

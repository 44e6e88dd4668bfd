"""Helpers the format modules share: class-name resolution, building Instances from crops, and
checking annotation sizes against image files."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..cell_types import DEFAULT_CLASSES
from ..instances import Instances


def known_classes(
    class_names: Sequence[str] | None, extra_class_names: Iterable[str] | None = None
) -> tuple[str, ...]:
    """``class_names`` (default: shsy5y, astro, cort) followed by any new ``extra_class_names``."""
    names = list(DEFAULT_CLASSES if class_names is None else class_names)
    for n in extra_class_names or ():
        if n not in names:
            names.append(str(n))
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")
    return tuple(names)


def class_index(name: str, classes: Sequence[str], where: str) -> int:
    try:
        return classes.index(name)
    except ValueError:
        raise ValueError(
            f"{where}: unknown cell type {name!r}; known: {', '.join(classes)} "
            "(pass class_names / extra_class_names to accept other types)"
        ) from None


def majority(names: Iterable[str | None]) -> str | None:
    c = Counter(n for n in names if n)
    return c.most_common(1)[0][0] if c else None


def instances_from_crops(
    image_size: tuple[int, int],
    crops: Sequence[np.ndarray],
    origins: Sequence[tuple[int, int]],
    classes: Sequence[int],
    scores: Sequence[float] | None = None,
    boxes: np.ndarray | None = None,
) -> Instances:
    """Instances from boolean crops; boxes default to each crop's extent (zeros for an empty crop)."""
    n = len(crops)
    if boxes is None:
        boxes = np.zeros((n, 4), np.float32)
        for k, (c, (y0, x0)) in enumerate(zip(crops, origins)):
            if c.any():
                boxes[k] = (x0, y0, x0 + c.shape[1], y0 + c.shape[0])
    return Instances(
        image_size=image_size,
        boxes=boxes,
        scores=np.ones(n, np.float32) if scores is None else np.asarray(scores, np.float32),
        classes=np.asarray(classes, np.int64).reshape(-1),
        masks=[np.asarray(c, np.float32) for c in crops],
        mask_origins=np.asarray(origins, np.int64).reshape(-1, 2),
    )


def check_size_against_image(
    name: str, size: tuple[int, int], images_dir: str | os.PathLike | Sequence | None, source: object
) -> Path | None:
    """Raise ValueError when an image for ``name`` exists in ``images_dir`` with another size.

    Returns the image path found (or None). ``size`` is ``(height, width)``.
    """
    from .images import find_image, image_size

    if images_dir is None:
        return None
    path = find_image(name, images_dir)
    if path is None:
        return None
    actual = image_size(path)
    if tuple(actual) != tuple(size):
        raise ValueError(
            f"{source}: image {name!r} is annotated as height x width = {size[0]} x {size[1]}, "
            f"but {path} is {actual[0]} x {actual[1]}"
        )
    return path

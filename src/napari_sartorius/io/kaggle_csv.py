"""The Kaggle CSV of the Sartorius competition.

Training file (``train.csv``): one row per cell, columns ``id,annotation,width,height,cell_type``
(the competition file has more columns — ``plate_time``, ``sample_date``, ... — which are ignored).
``annotation`` is a Kaggle RLE (1-indexed starts over the row-major flattened ``(height, width)``
mask, see :mod:`.rle`). A submission file has only ``id,predicted``; its image sizes then come from
an ``image_size`` argument or from the image files in ``images_dir``.

A row with an empty annotation is an image without cells (kept in the set, with no instances).
Scores are not part of the format: reading gives score 1, writing drops scores. Masks are
binarised at the writer's threshold. Overlapping cells survive (each row is its own mask).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..annotations import AnnotationSet, ImageAnnotations
from ._common import (
    check_size_against_image,
    class_index,
    instances_from_crops,
    known_classes,
    majority,
)
from .atomic import atomic_write
from .rle import instance_to_rle, rle_decode_crop

__all__ = ["read_kaggle_csv", "write_kaggle_csv", "TRAIN_COLUMNS", "SUBMISSION_COLUMNS"]

TRAIN_COLUMNS = ("id", "annotation", "width", "height", "cell_type")
SUBMISSION_COLUMNS = ("id", "predicted")


def _int_field(value: str, what: str, where: str) -> int:
    try:
        v = int(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} {value!r} is not an integer") from None
    if v <= 0 or v != float(value):
        raise ValueError(f"{where}: {what} {value!r} must be a positive integer")
    return v


def read_kaggle_csv(
    path: str | os.PathLike,
    images_dir: str | os.PathLike | Sequence | None = None,
    class_names: Sequence[str] | None = None,
    extra_class_names: Iterable[str] | None = None,
    image_size: tuple[int, int] | None = None,
    cell_type: str | None = None,
) -> AnnotationSet:
    """Read a Kaggle CSV (training or submission style) into an AnnotationSet.

    Args:
        path: the CSV file.
        images_dir: folder(s) holding the images; when given, each image found there (by id, see
            :func:`.images.find_image`) must have the CSV's width/height, and images supply the size
            when the CSV has no width/height columns.
        class_names: the known cell types, in class-index order (default shsy5y, astro, cort).
        extra_class_names: more accepted cell types, appended after ``class_names``.
        image_size: ``(height, width)`` for every image when the CSV has no width/height columns.
        cell_type: the cell type of images whose rows give none (e.g. a submission file).

    Returns:
        One ImageAnnotations per id, in order of first appearance; ``image_id`` is the ``id``,
        ``cell_type`` the majority of its rows' cell types (or ``cell_type``); each cell's class is
        its row's cell type (class 0 when unknown). Masks are 0/1 crops, scores 1.

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing columns, bad numbers, an RLE that is malformed or runs past the image,
            unknown cell types (the message lists the known ones), an image size that is unknown or
            disagrees with the image file. Messages name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Kaggle CSV not found: {path}")
    classes = known_classes(class_names, extra_class_names)
    if cell_type is not None:
        class_index(cell_type, classes, f"{path}")

    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path} is empty (expected a header {','.join(TRAIN_COLUMNS)})") from None
        cols = {name.strip().lower(): k for k, name in enumerate(header)}
        if "id" not in cols:
            raise ValueError(
                f"{path}: no 'id' column (found {', '.join(header)}); expected "
                f"{','.join(TRAIN_COLUMNS)} or {','.join(SUBMISSION_COLUMNS)}"
            )
        ann_col = cols.get("annotation", cols.get("predicted"))
        if ann_col is None:
            raise ValueError(
                f"{path}: no 'annotation' (or 'predicted') column (found {', '.join(header)})"
            )
        w_col, h_col, t_col = cols.get("width"), cols.get("height"), cols.get("cell_type")
        if (w_col is None) != (h_col is None):
            raise ValueError(f"{path}: has only one of the 'width' and 'height' columns")

        order: list[str] = []
        rows: dict[str, list[tuple[int, str, str | None]]] = {}
        sizes: dict[str, tuple[int, int]] = {}
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not v.strip() for v in row):
                continue
            where = f"{path}, line {lineno}"
            if len(row) < len(header):
                row = row + [""] * (len(header) - len(row))
            image_id = row[cols["id"]].strip()
            if not image_id:
                raise ValueError(f"{where}: empty id")
            if image_id not in rows:
                order.append(image_id)
                rows[image_id] = []
            if w_col is not None:
                size = (
                    _int_field(row[h_col], "height", where),
                    _int_field(row[w_col], "width", where),
                )
                if sizes.setdefault(image_id, size) != size:
                    raise ValueError(
                        f"{where}: image {image_id!r} has height x width {size[0]} x {size[1]}, "
                        f"but an earlier row says {sizes[image_id][0]} x {sizes[image_id][1]}"
                    )
            ctype = row[t_col].strip() if t_col is not None else ""
            rows[image_id].append((lineno, row[ann_col].strip(), ctype or None))

    if not order:
        raise ValueError(f"{path} holds no rows (an empty annotation set)")

    images: list[ImageAnnotations] = []
    for image_id in order:
        size = sizes.get(image_id)
        if size is None:
            size = _size_from_elsewhere(image_id, image_size, images_dir, path)
        else:
            check_size_against_image(image_id, size, images_dir, path)
        crops, origins, cls = [], [], []
        for lineno, rle, ctype in rows[image_id]:
            where = f"{path}, line {lineno} (id {image_id})"
            ctype = ctype or cell_type
            k = class_index(ctype, classes, where) if ctype else 0
            if not rle:
                continue
            try:
                crop, origin = rle_decode_crop(rle, size)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            crops.append(crop)
            origins.append(origin)
            cls.append(k)
        inst = instances_from_crops(size, crops, origins, cls)
        ctype = majority(c for _, _, c in rows[image_id]) or cell_type
        images.append(ImageAnnotations(image_id=image_id, instances=inst, cell_type=ctype))
    return AnnotationSet(images=images, class_names=classes)


def _size_from_elsewhere(image_id, image_size, images_dir, path) -> tuple[int, int]:
    from .images import find_image
    from .images import image_size as file_image_size

    if image_size is not None:
        size = (int(image_size[0]), int(image_size[1]))
        check_size_against_image(image_id, size, images_dir, path)
        return size
    found = find_image(image_id, images_dir) if images_dir is not None else None
    if found is not None:
        return file_image_size(found)
    where = f" in {images_dir}" if images_dir is not None else ""
    raise ValueError(
        f"{path}: the size of image {image_id!r} is unknown: the CSV has no width/height columns and "
        f"no image file was found{where}; pass images_dir (the folder of the images) or image_size=(height, width)"
    )


def write_kaggle_csv(
    aset: AnnotationSet,
    path: str | os.PathLike,
    threshold: float = 0.5,
    submission: bool = False,
) -> int:
    """Write an AnnotationSet as a Kaggle CSV, atomically.

    Training style (default): ``id,annotation,width,height,cell_type``, one row per cell; the
    cell type is the cell's class name (the image's ``cell_type`` for an image without cells).
    ``submission=True``: ``id,predicted``. Masks are thresholded at ``threshold``; an image without
    cells gets one row with an empty annotation; cells whose mask is empty are skipped.

    Returns the number of cell rows written.

    Raises:
        ValueError: the set has no images.
    """
    if len(aset) == 0:
        raise ValueError(f"nothing to write to {path}: the annotation set has no images")
    n_rows = 0
    with atomic_write(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(SUBMISSION_COLUMNS if submission else TRAIN_COLUMNS)
        for im in aset:
            inst = im.instances
            h, w = inst.image_size
            wrote = False
            for i in range(len(inst)):
                rle = instance_to_rle(inst, i, threshold)
                if not rle:
                    continue
                if submission:
                    writer.writerow([im.image_id, rle])
                else:
                    k = int(inst.classes[i])
                    name = aset.class_names[k] if 0 <= k < len(aset.class_names) else ""
                    writer.writerow([im.image_id, rle, w, h, name or im.cell_type or ""])
                wrote = True
                n_rows += 1
            if not wrote:
                writer.writerow([im.image_id, ""] if submission else [im.image_id, "", w, h, im.cell_type or ""])
    return n_rows

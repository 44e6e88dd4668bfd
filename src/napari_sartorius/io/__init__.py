"""Reading and writing the formats cell-segmentation people exchange.

* :func:`load_annotations` detects the format of a path and reads it into an
  :class:`~napari_sartorius.annotations.AnnotationSet`;
* :func:`save_annotations` writes one as COCO JSON, COCO results, Kaggle CSV or label images.

The format modules: :mod:`.images` (microscopy images as uint8 gray), :mod:`.rle` (Kaggle and COCO
run-length encodings), :mod:`.kaggle_csv`, :mod:`.coco`, :mod:`.label_images`, and
:mod:`.atomic` (every writer replaces its file atomically: never a half-written file).

Errors: a missing path raises ``FileNotFoundError``; any bad content raises ``ValueError`` whose
message names the file and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from ..annotations import AnnotationSet
from .atomic import atomic_path, atomic_write
from .coco import (
    annotation_set_to_coco,
    annotation_set_to_results,
    coco_to_annotation_set,
    read_coco,
    read_coco_results,
    read_json,
    results_to_annotation_set,
    write_coco,
    write_coco_results,
)
from .images import ImageReadError, find_image, read_image, read_stack
from .kaggle_csv import read_kaggle_csv, write_kaggle_csv
from .label_images import (
    LABEL_EXTENSIONS,
    read_label_image,
    read_label_images,
    write_label_image,
    write_label_images,
)

__all__ = [
    "FORMATS",
    "detect_format",
    "load_annotations",
    "save_annotations",
    "atomic_write",
    "atomic_path",
    "read_image",
    "read_stack",
    "find_image",
    "ImageReadError",
    "annotation_set_to_coco",
    "annotation_set_to_results",
    "coco_to_annotation_set",
    "results_to_annotation_set",
    "read_coco",
    "read_coco_results",
    "write_coco",
    "write_coco_results",
    "read_kaggle_csv",
    "write_kaggle_csv",
    "read_label_image",
    "read_label_images",
    "write_label_image",
    "write_label_images",
]

#: Values of ``save_annotations(fmt=...)``.
FORMATS: tuple[str, ...] = ("coco", "results", "csv", "labels")


def detect_format(path: str | os.PathLike) -> str:
    """The format of an existing path: ``"coco"`` (instance JSON), ``"results"`` (a JSON list),
    ``"csv"``, ``"labels"`` (a folder of label images) or ``"label_image"`` (one label image file).

    Raises FileNotFoundError / ValueError (unknown extension, JSON of another shape).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"annotations not found: {path}")
    if path.is_dir():
        return "labels"
    ext = path.suffix.lower()
    if ext == ".json":
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            head = fh.read(4096).lstrip()
        if head.startswith("["):
            return "results"
        if head.startswith("{"):
            return "coco"
        raise ValueError(f"{path} is neither a COCO instance file ({{...}}) nor a COCO results list ([...])")
    if ext == ".csv":
        return "csv"
    if ext in LABEL_EXTENSIONS:
        return "label_image"
    raise ValueError(
        f"cannot tell the format of {path}: expected a .json (COCO), a .csv (Kaggle), a label image "
        f"({', '.join(LABEL_EXTENSIONS)}) or a folder of label images"
    )


def load_annotations(
    path: str | os.PathLike,
    images_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    class_names: Sequence[str] | None = None,
    *,
    extra_class_names: Iterable[str] | None = None,
    companion: str | os.PathLike | dict | None = None,
    cell_type: str | None = None,
) -> AnnotationSet:
    """Read annotations or predictions from any supported format (detected by :func:`detect_format`).

    Args:
        path: a COCO instance ``.json``, a COCO results ``.json`` (list), a Kaggle ``.csv``, a folder
            of label images, or one label image.
        images_dir: the images' folder, or several folders (searched in order). When given, an
            annotated size that disagrees with the image file is an error, and a submission CSV
            without width/height takes its sizes from it.
        class_names: the known class names in index order (default shsy5y, astro, cort; a COCO file
            with other categories brings its own).
        extra_class_names: more accepted class names (e.g. new cell types in a CSV).
        companion: for a results list, the COCO instance file (path or dict) naming its images.
        cell_type: for label images and CSVs without a cell_type column, the cell type of every image.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unreadable or malformed content, an empty annotation set, sizes that disagree
            with the images, an RLE past the image, unknown cell types.
    """
    path = Path(path)
    fmt = detect_format(path)
    if images_dir is not None:
        many = not isinstance(images_dir, (str, os.PathLike))
        folders = [Path(d) for d in images_dir] if many else [Path(images_dir)]
        for d in folders:
            if not d.is_dir():
                raise FileNotFoundError(f"images folder not found: {d}")
        images_dir = folders if many else folders[0]
    if fmt == "coco":
        aset = read_coco(path, class_names, extra_class_names, images_dir, companion)
    elif fmt == "results":
        aset = read_coco_results(path, companion, class_names, extra_class_names, images_dir)
    elif fmt == "csv":
        aset = read_kaggle_csv(
            path, images_dir, class_names, extra_class_names, cell_type=cell_type
        )
    else:
        aset = read_label_images(path, class_names, cell_type, extra_class_names)
        if images_dir is not None:
            from ._common import check_size_against_image

            for im in aset:
                check_size_against_image(im.image_id, im.instances.image_size, images_dir, path)
    if len(aset) == 0:
        hint = (
            " (a COCO results list without detections names no images: pass companion=, the "
            "instance file of its images)"
            if fmt == "results"
            else ""
        )
        raise ValueError(f"{path} holds no images: an empty annotation set{hint}")
    return aset


def save_annotations(
    aset: AnnotationSet,
    path: str | os.PathLike,
    fmt: str | None = None,
    *,
    threshold: float = 0.5,
    image_ids: dict[str, int] | None = None,
    label_ext: str = ".tif",
) -> Path:
    """Write an AnnotationSet; each file is replaced atomically.

    Args:
        aset: what to write (must hold at least one image).
        path: the file (``coco``, ``results``, ``csv``) or folder (``labels``; created if needed,
            one ``<image_id>_labels<label_ext>`` per image).
        fmt: one of :data:`FORMATS`; default from the path: ``.csv`` -> csv, ``.json`` -> coco,
            anything else -> labels.
        threshold: mask probability at or above which a pixel is written.
        image_ids: for coco/results, image key -> COCO image id (default 1, 2, ... in set order).
        label_ext: ``.tif`` (default) or ``.png`` for label images.

    Overlaps: coco, results and csv keep each instance's mask; label images keep the higher-score
    instance where two overlap (a warning is logged with the pixel count).

    Returns the path written.

    Raises:
        ValueError: unknown format, an empty set, or a format-specific problem.
    """
    path = Path(path)
    if fmt is None:
        ext = path.suffix.lower()
        fmt = {".csv": "csv", ".json": "coco"}.get(ext, "labels")
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r}: use one of {', '.join(FORMATS)}")
    if len(aset) == 0:
        raise ValueError(f"nothing to write to {path}: the annotation set has no images")
    if fmt == "coco":
        write_coco(aset, path, threshold=threshold, image_ids=image_ids)
    elif fmt == "results":
        write_coco_results(aset, path, image_ids=image_ids, threshold=threshold)
    elif fmt == "csv":
        write_kaggle_csv(aset, path, threshold=threshold)
    else:
        write_label_images(aset, path, ext=label_ext, threshold=threshold)
    return path

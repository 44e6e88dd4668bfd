"""napari writer: a Labels layer (plus, optionally, its Image layer) to COCO JSON, written atomically.

Also the conversion the "Segment cells" dock's Export button uses (:func:`labels_to_annotations`).

The COCO ``file_name`` of each image is the bare name of the image layer's source file when the layer
came from a file (``layer.source.path`` or ``metadata["path"]``), wherever the JSON goes: one rule for
File > Save Layers and the Segment dock's Export (the reader finds it beside the JSON or in an
``images/`` folder beside it); otherwise the image is written as ``<image id>.png`` beside the JSON
(atomically) so that the pair opens again with this plugin's reader.
A 3-D labels stack becomes one COCO image per plane (``<image id>_z000``, ...).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["write_coco", "write_layers", "labels_to_annotations", "image_id_for", "coco_file_name"]

_LABEL_SUFFIXES = (" labels", " ground truth", "_labels")


def image_id_for(name: str) -> str:
    """A file-name-safe image id from a layer name: ``"cort sample labels [1]"`` -> ``"cort_sample"``."""
    name = re.sub(r"\s*\[\d+\]$", "", str(name)).strip()
    for suf in _LABEL_SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
    name = Path(name).stem if Path(name).suffix.lower() in (".png", ".tif", ".tiff", ".jpg", ".jpeg") else name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")
    return name or "image"


def _feature_classes(features) -> dict[int, str]:
    """label id -> class name from a napari features table (dict or DataFrame); empty if absent."""
    if features is None:
        return {}
    try:
        cols = set(features.keys())
    except AttributeError:
        return {}
    if "class" not in cols:
        return {}
    key = "label" if "label" in cols else ("index" if "index" in cols else None)
    if key is None:
        return {}
    labs = np.asarray(features[key])
    names = np.asarray(features["class"], dtype=object)
    return {int(lab): str(c) for lab, c in zip(labs, names) if c is not None and str(c) not in ("", "nan", "None")}


def _feature_review(features) -> tuple[dict[int, float], dict[int, bool]]:
    """label id -> uncertainty (finite values only) and label id -> reviewed, from a features table."""
    if features is None:
        return {}, {}
    try:
        cols = set(features.keys())
    except AttributeError:
        return {}, {}
    key = "label" if "label" in cols else ("index" if "index" in cols else None)
    if key is None:
        return {}, {}
    labs = [int(v) for v in np.asarray(features[key])]
    unc, rev = {}, {}
    if "uncertainty" in cols:
        for lab, v in zip(labs, np.asarray(features["uncertainty"], np.float64)):
            if np.isfinite(v):
                unc[lab] = float(v)
    if "reviewed" in cols:
        rev = {lab: bool(v) for lab, v in zip(labs, np.asarray(features["reviewed"]))}
    return unc, rev


def _review_columns(ids: np.ndarray, unc: dict, rev: dict) -> dict:
    """Instance columns of one plane's label ids: ``uncertainty`` when every cell has one (cells
    painted by hand have none: then it is left out, never NaN), ``reviewed`` when the table has it."""
    cols = {}
    if ids.size and unc and all(int(i) in unc for i in ids):
        cols["uncertainty"] = np.array([unc[int(i)] for i in ids], np.float32)
    if rev:
        cols["reviewed"] = np.array([rev.get(int(i), False) for i in ids], bool)
    return cols


def labels_to_annotations(
    labels: np.ndarray,
    *,
    image_id: str,
    features=None,
    class_names: Sequence[str] | None = None,
    cell_type: str | None = None,
    file_name: str | None = None,
):
    """Turn a label image (or stack) into an :class:`~napari_sartorius.annotations.AnnotationSet`.

    Args:
        labels: integer ``(H, W)`` label image (0 = background) or ``(..., H, W)`` stack, one COCO image
            per plane (ids ``<image_id>_z000``...; file names then get the same suffix).
        image_id: the image's key (COCO ``file_name`` stem unless ``file_name`` is given).
        features: the layer's features table; its ``class`` column (per ``label``) names each cell's class,
            its ``uncertainty`` and ``reviewed`` columns (review panel) go to ``Instances.columns``.
        class_names: the category names, in order; default ``DEFAULT_CLASSES``. Class names found in
            ``features`` that are not in it are appended.
        cell_type: class for cells without a features row (cells the user painted); default the
            majority class of the table, else the first class name.
        file_name: the COCO ``file_name`` (2-D labels only); default ``<image_id>.png``.

    Returns:
        An ``AnnotationSet`` with score-1, 0/1-mask instances; each image's ``cell_type`` is the
        majority class of its cells.
    """
    from .annotations import AnnotationSet, ImageAnnotations
    from .cell_types import DEFAULT_CLASSES
    from .instances import Instances

    labels = np.asarray(labels)
    if labels.ndim < 2:
        raise ValueError(f"labels must be an (H, W) image or a stack of them, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must hold integer ids, got dtype {labels.dtype}")
    names = list(class_names) if class_names else list(DEFAULT_CLASSES)
    per_label = _feature_classes(features)
    unc, rev = _feature_review(features)
    for c in per_label.values():
        if c not in names:
            names.append(c)
    if cell_type is not None and cell_type not in names:
        names.append(cell_type)
    fallback = cell_type
    if fallback is None and per_label:
        fallback = Counter(per_label.values()).most_common(1)[0][0]
    if fallback is None:
        fallback = names[0]

    planes = labels.reshape((-1,) + labels.shape[-2:])
    stacked = labels.ndim > 2
    images = []
    for z, plane in enumerate(planes):
        ids = np.unique(plane)
        ids = ids[ids > 0]
        cls = {int(i): names.index(per_label.get(int(i), fallback)) for i in ids}
        inst = Instances.from_label_image(plane, classes=cls)
        inst.columns = _review_columns(ids, unc, rev)
        pid = f"{image_id}_z{z:03d}" if stacked else image_id
        if stacked:
            fn = f"{pid}{Path(file_name).suffix}" if file_name else f"{pid}.png"
        else:
            fn = file_name or f"{pid}.png"
        counts = Counter(names[c] for c in cls.values())
        ctype = counts.most_common(1)[0][0] if counts else fallback
        images.append(ImageAnnotations(image_id=pid, instances=inst, cell_type=ctype, file_name=fn))
    return AnnotationSet(images=images, class_names=tuple(names))


def _source_path(meta: dict) -> Path | None:
    md = meta.get("metadata") or {}
    p = md.get("path") if isinstance(md, dict) else None
    if p is None:
        src = meta.get("source")
        p = getattr(src, "path", None)
    return Path(p) if p else None


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    from .io.atomic import atomic_path
    from .io.images import to_uint8_gray

    arr = np.asarray(image)
    if not (arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)))):
        arr = to_uint8_gray(arr, "image layer")
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def coco_file_name(image_path: str | os.PathLike) -> str:
    """The ``file_name`` to record for an image file: its bare name (never a path: a COCO file moves
    with its images, and the reader looks beside it and in an ``images/`` folder beside it)."""
    return Path(image_path).name


def write_layers(
    path: str | os.PathLike,
    labels: np.ndarray,
    labels_meta: dict,
    image: np.ndarray | None = None,
    image_meta: dict | None = None,
    fmt: str | None = None,
) -> list[str]:
    """Write a Labels layer (with its image layer, optionally) as COCO JSON or Kaggle CSV.

    Args:
        path: the destination; ``fmt`` ``"coco"`` or ``"csv"`` (default from the suffix).
        labels: integer ``(H, W)`` labels or a stack of them.
        labels_meta: the layer's ``name``, ``features`` (its ``class`` column) and ``metadata``
            (``class_names``, ``cell_type`` for cells without a features row).
        image: the image layer's data, ``(H, W)``, ``(H, W, 3|4)`` or a stack matching ``labels``.
        image_meta: its ``name``, ``rgb`` and ``metadata["path"]`` / ``source`` (the image file).

    The image id is the image file's stem, else the image layer's name, else the labels layer's name
    without " labels". An image without a file is written as ``<image id>.png`` beside ``path``.

    Returns:
        The files written, annotation file first.

    Raises:
        ValueError: unknown format; labels and image of different sizes.
    """
    from .io import save_annotations

    out = Path(path)
    if fmt is None:
        fmt = {".json": "coco", ".csv": "csv"}.get(out.suffix.lower())
    if fmt not in ("coco", "csv"):
        raise ValueError(f"cannot write labels to {out.name}: use a .json (COCO) or .csv (Kaggle CSV) file")
    labels = np.asarray(labels)
    lmd = labels_meta.get("metadata") or {}
    file_name = None
    image_arr = None
    if image is not None:
        image_meta = image_meta or {}
        image_arr = np.asarray(image)
        rgb = image_meta.get("rgb")
        if rgb is None:
            rgb = image_arr.ndim == labels.ndim + 1 and image_arr.shape[-1] in (3, 4)
        spatial = image_arr.shape[:-1] if rgb else image_arr.shape
        if tuple(spatial) != labels.shape:
            raise ValueError(
                f"labels {labels_meta.get('name')!r} of shape {labels.shape} do not match image "
                f"{image_meta.get('name')!r} of shape {image_arr.shape}"
            )
        image_id = image_id_for(image_meta.get("name", "image"))
        src = _source_path(image_meta)
        if src is not None and labels.ndim == 2 and src.is_file():
            image_id = src.stem
            file_name = coco_file_name(src)
            image_arr = None  # the file exists; nothing to write
    else:
        image_id = image_id_for(labels_meta.get("name", "labels"))
    aset = labels_to_annotations(
        labels,
        image_id=image_id,
        features=labels_meta.get("features"),
        class_names=lmd.get("class_names"),
        cell_type=lmd.get("cell_type"),
        file_name=file_name,
    )
    written: list[str] = []
    if image_arr is not None:
        tail = image_arr.shape[labels.ndim - 2 :]
        planes = image_arr.reshape((-1,) + tail) if labels.ndim > 2 else [image_arr]
        for plane, ann in zip(planes, aset.images):
            target = out.parent / ann.file_name
            _write_png(target, plane)
            written.append(os.fspath(target))
    save_annotations(aset, out, fmt)
    return [os.fspath(out)] + written


def write_coco(path: str, layer_data: list[tuple[Any, dict, str]]) -> list[str]:
    """napari multi-layer writer: one Labels layer (+ one optional Image layer) -> COCO JSON.

    Args:
        path: the ``.json`` destination (the suffix is added when missing).
        layer_data: napari's ``(data, meta, layer_type)`` tuples: exactly one ``"labels"``, at most one
            ``"image"``. The labels' ``features`` ``class`` column gives each cell's category;
            ``metadata["cell_type"]`` the class of cells without one.

    Returns:
        The paths written (the JSON, plus the image PNGs written beside it when the image had no file).

    Raises:
        ValueError: not exactly one labels layer, or labels and image of different sizes.
    """
    labels = [(d, m) for d, m, t in layer_data if t == "labels"]
    images = [(d, m) for d, m, t in layer_data if t == "image"]
    if len(labels) != 1 or len(images) > 1:
        raise ValueError(
            "the COCO JSON writer saves one Labels layer, optionally with one Image layer: "
            f"got {len(labels)} labels and {len(images)} image layers selected"
        )
    out = Path(path)
    if out.suffix.lower() != ".json":
        out = out.with_suffix(".json")
    ldata, lmeta = labels[0]
    idata, imeta = images[0] if images else (None, None)
    return write_layers(out, ldata, lmeta, idata, imeta, fmt="coco")

"""napari reader: COCO JSON and Kaggle CSV annotations -> image layers + Labels layers.

For every image of the file the reader looks for the image file beside the annotation file and in an
``images/`` folder beside it (:func:`napari_sartorius.io.images.default_image_dirs`); found images open
as Image layers named by the image id, each followed by its Labels layer ``"<image id> labels"`` with a
features table (label, class, score, area; uncertainty and reviewed when the file has them). Images that are not found still give their Labels layer
(the annotation file knows each image's size), and a warning says where the reader looked.

A Labels layer cannot hold overlapping cells, and the competition's annotations do overlap. Overlaps
are resolved with the project's cleaning rules (:func:`napari_sartorius.cleaning.clean_annotations`
with ``resolve_overlaps=True``) and a notification says how many pixels changed owner. Only the layers
change: the file on disk is not touched.

More than :data:`MAX_SEPARATE_IMAGES` images of one size open as one stack (one plane per image, in
file order; ``metadata["image_ids"]`` lists them) instead of hundreds of layers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["get_reader", "read_annotations", "MAX_SEPARATE_IMAGES"]

MAX_SEPARATE_IMAGES = 12
_SNIFF_BYTES = 1 << 20

LayerData = tuple[Any, dict, str]


def _looks_like_coco(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError:
        return False
    return head.lstrip().startswith(b"{") and (b'"annotations"' in head or b'"images"' in head)


def _looks_like_kaggle_csv(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            header = fh.readline()
    except OSError:
        return False
    cols = [c.strip().strip('"').lower() for c in header.split(",")]
    return "id" in cols and "annotation" in cols


def get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """npe2 reader hook: :func:`read_annotations` for a COCO ``.json`` or Kaggle ``.csv`` file, else None.

    Only the file's first bytes are looked at, so other JSON and CSV files go to other readers.
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if not p.is_file():
        return None
    suffix = p.suffix.lower()
    if suffix == ".json" and _looks_like_coco(p):
        return read_annotations
    if suffix == ".csv" and _looks_like_kaggle_csv(p):
        return read_annotations
    return None


def _notify(kind: str, message: str) -> None:
    # napari is present whenever napari calls the reader; scripts calling read_annotations without it
    # get the message as a Python warning.
    try:
        from napari.utils import notifications
    except ImportError:  # pragma: no cover - napari is a dependency
        import warnings

        warnings.warn(message, stacklevel=3)
        return
    getattr(notifications, f"show_{kind}")(message)


def _resolve_overlaps(aset):
    """Give each contested pixel one owner with the cleaning rules (to the smaller cell), changing
    nothing else (no hole filling, every fragment kept).

    Returns ``(new set, pixels resolved, images changed, instances left without a pixel)``.
    """
    from .annotations import AnnotationSet, ImageAnnotations
    from .cleaning import clean_annotations

    images, moved, touched, dropped = [], 0, 0, 0
    for im in aset.images:
        inst = im.instances
        if _has_overlap(inst):
            inst, rep = clean_annotations(inst, fill_holes=False, min_fragment=0, resolve_overlaps=True, min_area=1)
            moved += rep.overlap_pixels_resolved
            dropped += rep.small_dropped
            touched += 1
        images.append(ImageAnnotations(im.image_id, inst, cell_type=im.cell_type, file_name=im.file_name))
    return AnnotationSet(images=images, class_names=aset.class_names, category_ids=aset.category_ids), moved, touched, dropped


def _has_overlap(inst) -> bool:
    if len(inst) < 2:
        return False
    cover = np.zeros(inst.image_size, np.uint16)
    for i in range(len(inst)):
        cover[inst.crop_slices(i)] += inst.masks[i] >= 0.5
    return bool(cover.max() > 1)


def _features(ann, class_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    inst = ann.instances
    n = len(inst)
    feats = {
        "index": np.arange(1, n + 1, dtype=np.int64),
        "label": np.arange(1, n + 1, dtype=np.int64),
        "class": np.array([class_names[int(c)] for c in inst.classes], dtype=object),
        "score": inst.scores.astype(np.float32),
        "area": inst.areas(),
    }
    # review columns of predictions and reviewed layers (uncertainty only when every cell has one)
    u = inst.columns.get("uncertainty")
    if u is not None and len(u) == n and np.all(np.isfinite(u)):
        feats["uncertainty"] = u.astype(np.float32)
    if "reviewed" in inst.columns and len(inst.columns["reviewed"]) == n:
        feats["reviewed"] = inst.columns["reviewed"].astype(bool)
    return feats


def read_annotations(path: str | os.PathLike) -> list[LayerData]:
    """Read a COCO JSON or Kaggle CSV file into napari layer data.

    Returns:
        For each image (in file order): ``(image uint8 (H, W), meta, "image")`` when its file is found,
        then ``(labels uint16/uint32 (H, W), meta, "labels")``. Labels metadata holds ``cell_type``,
        ``class_names``, ``image_id`` and the annotation file's ``source``.

    Raises:
        ValueError: the file cannot be parsed or holds no image (message from the format reader).
    """
    from .io import load_annotations
    from .io.images import default_image_dirs, find_image, read_image

    path = Path(path)
    aset = load_annotations(path)
    if len(aset) == 0:
        raise ValueError(f"{path} holds no annotated image")
    if any(_has_overlap(im.instances) for im in aset):
        aset, moved, touched, dropped = _resolve_overlaps(aset)
        lost = f"; {dropped} cell(s) lay wholly under others and are not shown" if dropped else ""
        _notify(
            "warning",
            f"{path.name}: overlapping cells cannot be shown in a Labels layer; resolved the overlaps with "
            f"the cleaning rules (each contested pixel goes to the smaller cell): {moved} pixel(s) in "
            f"{touched} image(s) now belong to one cell{lost}. The file itself is unchanged.",
        )
    class_names = tuple(aset.class_names)
    dirs = default_image_dirs(path)
    found: dict[str, Path | None] = {}
    for ann in aset:
        p = find_image(ann.file_name, dirs) if ann.file_name else None
        found[ann.image_id] = p or find_image(ann.image_id, dirs)
    missing = [i for i, p in found.items() if p is None]
    if missing:
        where = " or ".join(str(d) for d in dirs) or str(path.parent)
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        _notify(
            "warning",
            f"{path.name}: no image file found for {shown} (looked in {where}); showing the labels only. "
            f"Put the images next to {path.name} or in an 'images' folder beside it to see them.",
        )
    shapes = {ann.instances.image_size for ann in aset}
    if len(aset) > MAX_SEPARATE_IMAGES and len(shapes) == 1:
        return _as_stack(path, aset, found, class_names, read_image)
    layers: list[LayerData] = []
    for ann in aset:
        labels = ann.instances.to_label_image()
        p = found[ann.image_id]
        if p is not None:
            image = read_image(p)
            if image.shape != labels.shape:
                raise ValueError(
                    f"image {p} is {image.shape[0]} x {image.shape[1]} but {path.name} says "
                    f"{labels.shape[0]} x {labels.shape[1]} for image {ann.image_id!r}"
                )
            layers.append((image, {"name": ann.image_id, "metadata": {"path": str(p)}}, "image"))
        meta = {
            "name": f"{ann.image_id} labels",
            "features": _features(ann, class_names),
            "metadata": {
                "cell_type": ann.cell_type,
                "class_names": list(class_names),
                "image_id": ann.image_id,
                "source": str(path),
            },
        }
        layers.append((labels, meta, "labels"))
    return layers


def _as_stack(path: Path, aset, found, class_names, read_image) -> list[LayerData]:
    ids = [ann.image_id for ann in aset]
    h, w = aset.images[0].instances.image_size
    total = sum(len(ann.instances) for ann in aset)
    dtype = np.uint16 if total < 65535 else np.uint32
    labels = np.zeros((len(ids), h, w), dtype)
    per_image = [_features(ann, class_names) for ann in aset]
    shared = [k for k in ("uncertainty", "reviewed") if all(k in f for f in per_image)]
    feats = {k: [] for k in ("label", "class", "score", "area", "plane", *shared)}
    offset = 0
    for z, ann in enumerate(aset):
        plane = ann.instances.to_label_image(dtype=np.uint32)
        n = len(ann.instances)
        labels[z] = np.where(plane > 0, plane + offset, 0)
        f = per_image[z]
        for k in shared:
            feats[k].append(f[k])
        feats["label"].append(f["label"] + offset)
        feats["class"].append(f["class"])
        feats["score"].append(f["score"])
        feats["area"].append(f["area"])
        feats["plane"].append(np.full(n, z, np.int64))
        offset += n
    features = {k: np.concatenate(v) if v else np.zeros(0) for k, v in feats.items()}
    features["index"] = features["label"]
    layers: list[LayerData] = []
    if all(found[i] is not None for i in ids):
        stack = np.stack([read_image(found[i]) for i in ids])
        if stack.shape[1:] != (h, w):
            raise ValueError(f"the images of {path.name} are {stack.shape[1:]} but the file says {(h, w)}")
        layers.append((stack, {"name": path.stem, "metadata": {"image_ids": ids}}, "image"))
    meta = {
        "name": f"{path.stem} labels",
        "features": features,
        "metadata": {
            "image_ids": ids,
            "cell_types": [ann.cell_type for ann in aset],
            "class_names": list(class_names),
            "source": str(path),
        },
    }
    layers.append((labels, meta, "labels"))
    return layers

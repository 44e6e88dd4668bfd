"""COCO instance JSON and COCO results JSON.

Why over 500 lines: both COCO flavours (instances and results), read and written, share the RLE /
polygon and category handling kept here.

**Instance file** (``{"images", "annotations", "categories"}``): reading accepts RLE segmentations
with compressed (string) or uncompressed (list) counts, polygons, and the stringified-dict RLE some
Kaggle conversions wrote (``"{'size': [...], 'counts': '...'}"``, parsed with ``ast.literal_eval``,
which evaluates literals only). The image key is ``AnnotationSet.key_for(file_name)`` (the file
stem), or ``str(id)`` when an image has no ``file_name``. Class names come from ``categories``: when
all names are Sartorius types the set uses shsy5y, astro, cort (class indices 0, 1, 2); otherwise
the names in the file's order. ``category_ids`` remembers each name's id so writing back keeps them.
Writing gives RLE segmentations (pycocotools, column-major), ``area`` (pixels), ``bbox``
``[x, y, w, h]`` of the mask, ``iscrowd`` 0, a ``score`` where scores are not all 1, and images with
``id``, ``file_name``, ``height``, ``width`` (plus ``cell_type`` when known, ignored by other tools).
Predictions and reviewed layers also carry, per annotation or result, ``uncertainty`` (in [0, 1], from
fusion; left out where undefined) and ``reviewed`` (bool, from the review panel); other tools ignore
the extra keys, and reading keeps them as ``Instances.columns``.
Each instance keeps its own mask, so overlapping annotations survive a round trip unchanged.

**Results file** (a list of ``{"image_id", "category_id", "segmentation", "score", "bbox"}``, what
``pycocotools.COCO.loadRes`` takes): it names images only by integer id. Reading needs

* the image sizes: from each RLE's ``size`` (polygons need a companion or ``image_sizes``), and
* the image names: a companion instance file (``companion=``, its ``images`` give id -> file_name
  and sizes, its ``categories`` the class names), or ``image_names={id: name}``, or the
  ``file_name`` key this writer adds to each result (extra keys are ignored by pycocotools);
  failing all three the key is ``str(image_id)``.

With a companion, its images without any result are kept as images without cells.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..annotations import AnnotationSet, ImageAnnotations
from ..cell_types import DEFAULT_CATEGORY_IDS, DEFAULT_CLASSES
from ._common import check_size_against_image, instances_from_crops, known_classes, majority
from .atomic import atomic_write
from .rle import segmentation_to_crop
from .rle_batch import coco_rles_batch

__all__ = [
    "annotation_set_to_coco",
    "annotation_set_to_results",
    "coco_to_annotation_set",
    "results_to_annotation_set",
    "category_ids_for",
    "read_json",
    "read_coco",
    "read_coco_results",
    "write_coco",
    "write_coco_results",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike) -> Any:
    """Load a JSON file with errors that name it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: tolerate a byte-order mark
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 text file: {e}") from None


def _write_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, separators=(",", ":"))


def category_ids_for(
    class_names: Sequence[str], preferred: Mapping[str, int] | None = None
) -> dict[str, int]:
    """COCO category id of each class name.

    ``preferred`` ids first (e.g. the ids a source file used), then 1/2/3 for shsy5y/astro/cort,
    then the next free id after the largest one used, in class order.
    """
    out: dict[str, int] = {}
    used: set[int] = set()
    for name in class_names:
        if preferred and name in preferred and int(preferred[name]) not in used:
            out[name] = int(preferred[name])
            used.add(out[name])
    for name in class_names:
        if name not in out and name in DEFAULT_CATEGORY_IDS and DEFAULT_CATEGORY_IDS[name] not in used:
            out[name] = DEFAULT_CATEGORY_IDS[name]
            used.add(out[name])
    for name in class_names:
        if name not in out:
            out[name] = max(used, default=0) + 1
            used.add(out[name])
    return out


def _resolve_categories(
    categories: list | None,
    class_names: Sequence[str] | None,
    extra_class_names: Iterable[str] | None,
    source: object,
) -> tuple[tuple[str, ...], dict[int, int], dict[str, int]]:
    """(class names, category id -> class index, class name -> category id)."""
    if categories:
        cat_name: dict[int, str] = {}
        for c in categories:
            try:
                cid, name = int(c["id"]), str(c["name"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{source}: a category needs an integer 'id' and a 'name', got {c!r}") from None
            if cid in cat_name:
                raise ValueError(f"{source}: category id {cid} appears twice")
            cat_name[cid] = name
        names_in_file = list(dict.fromkeys(cat_name.values()))
        if class_names is not None:
            classes = known_classes(class_names, extra_class_names)
            unknown = [n for n in names_in_file if n not in classes]
            if unknown:
                raise ValueError(
                    f"{source}: unknown categories {', '.join(map(repr, unknown))}; known: "
                    f"{', '.join(classes)} (pass class_names / extra_class_names to accept them)"
                )
        elif set(names_in_file) <= set(DEFAULT_CLASSES):
            classes = known_classes(None, extra_class_names)
        else:
            classes = known_classes(names_in_file, extra_class_names)
        id_to_class = {cid: classes.index(name) for cid, name in cat_name.items()}
        name_to_id = {name: cid for cid, name in cat_name.items()}
    else:
        classes = known_classes(class_names, extra_class_names)
        name_to_id = category_ids_for(classes)
        id_to_class = {cid: classes.index(name) for name, cid in name_to_id.items()}
    return classes, id_to_class, name_to_id


def _parse_segmentation(seg: Any, where: str) -> Any:
    if isinstance(seg, str):
        text = seg.strip()
        if text.startswith(("{", "[")):
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                pass
        raise ValueError(f"{where}: cannot parse the segmentation string {seg[:60]!r}")
    return seg


def _decode_annotation(ann: Mapping, size: tuple[int, int] | None, where: str):
    """-> (crop bool, origin, (h, w)) for one COCO annotation or result."""
    if "segmentation" not in ann:
        raise ValueError(f"{where}: no 'segmentation'")
    seg = _parse_segmentation(ann["segmentation"], where)
    if size is None:
        if isinstance(seg, dict) and "size" in seg:
            size = (int(seg["size"][0]), int(seg["size"][1]))
        else:
            raise ValueError(
                f"{where}: the image size is unknown (a polygon segmentation without an image "
                "entry); give a companion instance file or image_sizes"
            )
    try:
        crop, origin = segmentation_to_crop(seg, size[0], size[1])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return crop, origin, size


def _bbox_xyxy(ann: Mapping, crop: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    bb = ann.get("bbox")
    if isinstance(bb, (list, tuple)) and len(bb) == 4:
        try:
            x, y, w, h = (float(v) for v in bb)
            return np.array([x, y, x + w, y + h], np.float32)
        except (TypeError, ValueError):
            pass
    if not crop.any():
        return np.zeros(4, np.float32)
    y0, x0 = origin
    return np.array([x0, y0, x0 + crop.shape[1], y0 + crop.shape[0]], np.float32)


def _image_key(file_name: str | None, image_id: Any) -> str:
    return AnnotationSet.key_for(file_name) if file_name else str(image_id)


# ----------------------------------------------------------------------------------------------
# instance files
# ----------------------------------------------------------------------------------------------
def coco_to_annotation_set(
    d: Mapping,
    class_names: Sequence[str] | None = None,
    extra_class_names: Iterable[str] | None = None,
    images_dir: str | os.PathLike | Sequence | None = None,
    source: object = "COCO JSON",
) -> AnnotationSet:
    """Convert a COCO instance dict into an AnnotationSet (see the module docstring).

    Args:
        d: the parsed JSON: ``images`` (``id``, ``file_name``, ``height``, ``width``),
            ``annotations`` (``image_id``, ``category_id``, ``segmentation``, optional ``score``,
            ``bbox``), ``categories`` (``id``, ``name``).
        class_names: the class names to index into (every category name must be one of them);
            default: from ``categories`` as the module docstring says.
        extra_class_names: more names appended to the classes.
        images_dir: when given, an image file found there must have the annotated size.
        source: how to name the input in error messages (e.g. its path).

    Returns:
        One ImageAnnotations per COCO image (in file order) with 0/1 crops, scores from ``score``
        (default 1), boxes from ``bbox`` (default the mask's box), ``cell_type`` the image's
        ``cell_type`` field or the majority class of its annotations.

    Raises:
        ValueError: malformed structure, duplicate image keys, unknown image or category ids, RLE
            sizes that disagree with the image, undecodable segmentations, sizes that disagree with
            the image files.
    """
    if not isinstance(d, Mapping) or not isinstance(d.get("images"), list):
        raise ValueError(f"{source}: not a COCO instance file (no 'images' list)")
    annotations = d.get("annotations") or []
    if not isinstance(annotations, list):
        raise ValueError(f"{source}: 'annotations' must be a list")
    classes, id_to_class, name_to_id = _resolve_categories(
        d.get("categories"), class_names, extra_class_names, source
    )

    by_image: dict[Any, list[Mapping]] = {}
    for ann in annotations:
        if not isinstance(ann, Mapping) or "image_id" not in ann:
            raise ValueError(f"{source}: an annotation without 'image_id': {str(ann)[:80]}")
        by_image.setdefault(ann["image_id"], []).append(ann)

    images: list[ImageAnnotations] = []
    seen_keys: dict[str, Any] = {}
    known_ids = set()
    for img in d["images"]:
        if not isinstance(img, Mapping) or "id" not in img:
            raise ValueError(f"{source}: an image entry without 'id': {str(img)[:80]}")
        iid = img["id"]
        known_ids.add(iid)
        file_name = img.get("file_name")
        key = _image_key(file_name, iid)
        if key in seen_keys:
            raise ValueError(
                f"{source}: images {seen_keys[key]!r} and {iid!r} share the key {key!r} (file stem)"
            )
        seen_keys[key] = iid
        anns = by_image.get(iid, [])
        size = _image_size_of(img, anns, source)
        check_size_against_image(file_name or key, size, images_dir, source)
        crops, origins, cls, scores, boxes = [], [], [], [], []
        for ann in anns:
            where = f"{source}: annotation {ann.get('id', '?')} of image {file_name or iid}"
            cid = ann.get("category_id")
            if cid is None and len(classes) == 1:
                k = 0
            else:
                try:
                    k = id_to_class[int(cid)]
                except (KeyError, TypeError, ValueError):
                    raise ValueError(
                        f"{where}: unknown category_id {cid!r}; categories: "
                        + ", ".join(f"{i}={classes[c]}" for i, c in id_to_class.items())
                    ) from None
            crop, origin, _ = _decode_annotation(ann, size, where)
            crops.append(crop)
            origins.append(origin)
            cls.append(k)
            scores.append(float(ann.get("score", 1.0)))
            boxes.append(_bbox_xyxy(ann, crop, origin))
        inst = instances_from_crops(
            size, crops, origins, cls, scores, np.asarray(boxes, np.float32).reshape(-1, 4)
        )
        inst.columns = _review_columns(anns)
        cell_type = img.get("cell_type") if img.get("cell_type") in classes else None
        cell_type = cell_type or majority(classes[c] for c in cls)
        images.append(
            ImageAnnotations(image_id=key, instances=inst, cell_type=cell_type, file_name=file_name)
        )
    orphans = [i for i in by_image if i not in known_ids]
    if orphans:
        raise ValueError(
            f"{source}: annotations refer to image ids missing from 'images': {orphans[:5]}"
        )
    return AnnotationSet(images=images, class_names=classes, category_ids=name_to_id)


def _image_size_of(img: Mapping, anns: list, source: object) -> tuple[int, int]:
    h, w = img.get("height"), img.get("width")
    if h is not None and w is not None:
        try:
            h, w = int(h), int(w)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: image {img.get('id')!r} has a non-integer height/width") from None
        if h <= 0 or w <= 0:
            raise ValueError(f"{source}: image {img.get('id')!r} has height x width {h} x {w}")
        return h, w
    for ann in anns:  # fall back on an RLE's size
        seg = _parse_segmentation(ann.get("segmentation"), str(source)) if ann.get("segmentation") else None
        if isinstance(seg, dict) and "size" in seg:
            return int(seg["size"][0]), int(seg["size"][1])
    raise ValueError(f"{source}: image {img.get('id')!r} has no height/width")


def _ordered_category_ids(aset: AnnotationSet, category_ids: Mapping[str, int] | None) -> dict[str, int]:
    preferred = dict(aset.category_ids or {})
    preferred.update(category_ids or {})
    return category_ids_for(aset.class_names, preferred)


def _instance_records(
    im: ImageAnnotations,
    class_names: Sequence[str],
    cat_ids: Mapping[str, int],
    threshold: float,
) -> Iterable[dict]:
    inst = im.instances
    if len(inst) == 0:
        return
    # runs, areas, boxes and RLEs of all the image's crops in one pass (io.rle_batch; identical output)
    crops = [m >= threshold for m in inst.masks]
    rles, runs = coco_rles_batch(crops, inst.mask_origins, inst.image_size)
    areas = runs.areas.tolist()
    boxes = runs.boxes.tolist()
    classes = inst.classes.tolist()
    scores = inst.scores.tolist()
    for i in range(len(inst)):
        area = areas[i]
        if area == 0:
            continue
        bx0, by0, bx1, by1 = boxes[i]
        bbox = [float(bx0), float(by0), float(bx1 - bx0 + 1), float(by1 - by0 + 1)]
        k = classes[i]
        if not 0 <= k < len(class_names):
            raise ValueError(
                f"image {im.image_id!r}: instance {i} has class index {k}, but the set has "
                f"{len(class_names)} class names"
            )
        rec = {
            "category_id": int(cat_ids[class_names[k]]),
            "segmentation": rles[i],
            "area": area,
            "bbox": bbox,
            "score": scores[i],
        }
        rec.update(_review_fields(inst, i))
        yield rec


def _review_fields(inst, i: int) -> dict:
    """The per-instance ``uncertainty`` (when defined) and ``reviewed`` keys of a record."""
    out = {}
    u = inst.columns.get("uncertainty")
    if u is not None and np.isfinite(u[i]):
        out["uncertainty"] = round(float(u[i]), 6)
    r = inst.columns.get("reviewed")
    if r is not None:
        out["reviewed"] = bool(r[i])
    return out


def _review_columns(anns: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Instance columns from the records' ``uncertainty`` and ``reviewed`` keys: ``uncertainty``
    when every record has a number (a cell drawn by hand has none: then the column is left out rather
    than holding gaps), ``reviewed`` when any record has it (missing: False)."""
    cols: dict[str, np.ndarray] = {}
    if anns and all(isinstance(a.get("uncertainty"), (int, float)) and not isinstance(a.get("uncertainty"), bool)
                    for a in anns):
        cols["uncertainty"] = np.array([float(a["uncertainty"]) for a in anns], np.float32)
    if any("reviewed" in a for a in anns):
        cols["reviewed"] = np.array([bool(a.get("reviewed", False)) for a in anns], bool)
    return cols


def annotation_set_to_coco(
    aset: AnnotationSet,
    threshold: float = 0.5,
    include_scores: bool | None = None,
    image_ids: Mapping[str, int] | None = None,
    category_ids: Mapping[str, int] | None = None,
) -> dict:
    """An AnnotationSet as a COCO instance dict (JSON-serialisable).

    Args:
        aset: the annotations or predictions. ``images[].file_name`` is each image's ``file_name``
            (the traceable image name for a prediction), else its ``image_id``.
        threshold: mask probability at or above which a pixel belongs to the instance.
        include_scores: write ``score`` on each annotation; default: when any score is not 1.
        image_ids: image key -> COCO image id; default 1, 2, ... in the set's order.
        category_ids: class name -> category id overrides; default the set's ``category_ids``,
            then shsy5y/astro/cort = 1/2/3, then the next free ids.

    Instances whose mask is empty at ``threshold`` are left out. Annotation ids are 1, 2, ...
    """
    if image_ids is None:
        image_ids = {im.image_id: k + 1 for k, im in enumerate(aset)}
    cat_ids = _ordered_category_ids(aset, category_ids)
    if include_scores is None:
        include_scores = any(bool(np.any(im.instances.scores != 1)) for im in aset)
    images, annotations = [], []
    for im in aset:
        iid = _lookup_id(image_ids, im.image_id)
        entry = {
            "id": iid,
            "file_name": im.file_name or im.image_id,
            "height": int(im.height),
            "width": int(im.width),
        }
        if im.cell_type:
            entry["cell_type"] = im.cell_type
        images.append(entry)
        for rec in _instance_records(im, aset.class_names, cat_ids, threshold):
            score = rec.pop("score")
            rec.update(id=len(annotations) + 1, image_id=iid, iscrowd=0)
            if include_scores:
                rec["score"] = score
            annotations.append(rec)
    categories = [
        {"id": cid, "name": name, "supercategory": "cell"} for name, cid in cat_ids.items()
    ]
    return {
        "info": {"description": "napari-sartorius annotations"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _lookup_id(image_ids: Mapping[str, int], key: str) -> int:
    try:
        return int(image_ids[key])
    except KeyError:
        raise ValueError(f"no COCO image id for image {key!r} in image_ids") from None


def annotation_set_to_results(
    aset: AnnotationSet,
    image_ids: Mapping[str, int],
    threshold: float = 0.5,
    category_ids: Mapping[str, int] | None = None,
    with_file_name: bool = True,
) -> list[dict]:
    """An AnnotationSet (predictions) as a COCO results list, for ``COCO.loadRes``.

    Args:
        aset: the predictions.
        image_ids: image key (``ImageAnnotations.image_id``) -> the ground truth's COCO image id.
        threshold: mask probability at or above which a pixel belongs to the instance.
        category_ids: class name -> category id (use the ground truth's); default as in
            :func:`annotation_set_to_coco`.
        with_file_name: add each image's ``file_name`` (or key) to its results, which keeps a
            results file traceable to its images (pycocotools ignores the extra key).

    Returns:
        ``[{"image_id", "category_id", "segmentation" (compressed RLE), "score", "bbox" [x, y, w, h],
        "area"(, "file_name")}, ...]``; instances whose mask is empty are left out.
    """
    cat_ids = _ordered_category_ids(aset, category_ids)
    out = []
    for im in aset:
        iid = _lookup_id(image_ids, im.image_id)
        for rec in _instance_records(im, aset.class_names, cat_ids, threshold):
            rec["image_id"] = iid
            if with_file_name:
                rec["file_name"] = im.file_name or im.image_id
            out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------
# results files
# ----------------------------------------------------------------------------------------------
def results_to_annotation_set(
    results: Sequence[Mapping],
    companion: Mapping | None = None,
    image_names: Mapping[int, str] | None = None,
    image_sizes: Mapping[int, tuple[int, int]] | None = None,
    class_names: Sequence[str] | None = None,
    extra_class_names: Iterable[str] | None = None,
    source: object = "COCO results",
) -> AnnotationSet:
    """Convert a COCO results list into an AnnotationSet of predictions.

    Args:
        results: ``[{"image_id", "category_id", "segmentation", "score", ...}, ...]``.
        companion: a COCO instance dict (e.g. the ground truth) whose ``images`` give each id's
            file name and size, and whose ``categories`` give the class names. Its images without
            results are kept as empty images.
        image_names: image id -> file name (overrides the companion's and the ``file_name`` keys).
        image_sizes: image id -> ``(height, width)``.
        class_names, extra_class_names: as in :func:`coco_to_annotation_set`.

    Image keys are ``key_for(name)`` (see the module docstring), scores from ``score`` and boxes
    from ``bbox`` (default the mask's box); each image's ``cell_type`` is its majority class.
    """
    if not isinstance(results, (list, tuple)):
        raise ValueError(f"{source}: a COCO results file must be a JSON list")
    names: dict[Any, str] = {}
    sizes: dict[Any, tuple[int, int]] = {}
    order: list[Any] = []
    categories = None
    if companion is not None:
        if not isinstance(companion, Mapping) or not isinstance(companion.get("images"), list):
            raise ValueError(f"{source}: the companion is not a COCO instance file (no 'images' list)")
        categories = companion.get("categories")
        for img in companion["images"]:
            iid = img.get("id")
            order.append(iid)
            if img.get("file_name"):
                names[iid] = img["file_name"]
            if img.get("height") is not None and img.get("width") is not None:
                sizes[iid] = (int(img["height"]), int(img["width"]))
    for r in results:
        if not isinstance(r, Mapping) or "image_id" not in r:
            raise ValueError(f"{source}: a result without 'image_id': {str(r)[:80]}")
        if r["image_id"] not in names and r.get("file_name"):
            names[r["image_id"]] = str(r["file_name"])
    names.update(image_names or {})
    sizes.update({k: (int(v[0]), int(v[1])) for k, v in (image_sizes or {}).items()})
    classes, id_to_class, name_to_id = _resolve_categories(
        categories, class_names, extra_class_names, source
    )

    per_image: dict[Any, dict[str, list]] = {}
    for n, r in enumerate(results):
        iid = r["image_id"]
        if iid not in per_image:
            per_image[iid] = {"crops": [], "origins": [], "cls": [], "scores": [], "boxes": [], "records": []}
            if iid not in order:
                order.append(iid)
        where = f"{source}: result {n} (image_id {iid})"
        crop, origin, size = _decode_annotation(r, sizes.get(iid), where)
        if sizes.setdefault(iid, size) != size:
            raise ValueError(
                f"{where}: mask size {list(size)} disagrees with the image size {list(sizes[iid])}"
            )
        cid = r.get("category_id")
        try:
            k = id_to_class[int(cid)]
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{where}: unknown category_id {cid!r}; categories: "
                + ", ".join(f"{i}={classes[c]}" for i, c in id_to_class.items())
            ) from None
        p = per_image[iid]
        p["crops"].append(crop)
        p["origins"].append(origin)
        p["cls"].append(k)
        p["scores"].append(float(r.get("score", 1.0)))
        p["boxes"].append(_bbox_xyxy(r, crop, origin))
        p["records"].append(r)

    images = []
    seen: dict[str, Any] = {}
    for iid in order:
        name = names.get(iid)
        key = _image_key(name, iid)
        if key in seen:
            raise ValueError(f"{source}: image ids {seen[key]!r} and {iid!r} share the key {key!r}")
        seen[key] = iid
        if iid not in sizes:
            raise ValueError(f"{source}: the size of image {iid!r} is unknown")
        p = per_image.get(iid, {"crops": [], "origins": [], "cls": [], "scores": [], "boxes": []})
        inst = instances_from_crops(
            sizes[iid], p["crops"], p["origins"], p["cls"], p["scores"],
            np.asarray(p["boxes"], np.float32).reshape(-1, 4),
        )
        inst.columns = _review_columns(p.get("records", []))
        images.append(
            ImageAnnotations(
                image_id=key,
                instances=inst,
                cell_type=majority(classes[c] for c in p["cls"]),
                file_name=name,
            )
        )
    return AnnotationSet(images=images, class_names=classes, category_ids=name_to_id)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def read_coco(
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    extra_class_names: Iterable[str] | None = None,
    images_dir: str | os.PathLike | Sequence | None = None,
    companion: str | os.PathLike | Mapping | None = None,
) -> AnnotationSet:
    """Read a COCO instance file, or a results list (with ``companion``, see the module docstring)."""
    d = read_json(path)
    if isinstance(d, list):
        return read_coco_results(path, companion, class_names, extra_class_names, images_dir, data=d)
    return coco_to_annotation_set(d, class_names, extra_class_names, images_dir, source=Path(path))


def read_coco_results(
    path: str | os.PathLike,
    companion: str | os.PathLike | Mapping | None = None,
    class_names: Sequence[str] | None = None,
    extra_class_names: Iterable[str] | None = None,
    images_dir: str | os.PathLike | Sequence | None = None,
    data: list | None = None,
) -> AnnotationSet:
    """Read a COCO results file; ``companion`` is an instance file (path or dict) naming its images."""
    results = read_json(path) if data is None else data
    if companion is not None and not isinstance(companion, Mapping):
        companion = read_json(companion)
    aset = results_to_annotation_set(
        results, companion, class_names=class_names, extra_class_names=extra_class_names,
        source=Path(path),
    )
    if images_dir is not None:
        for im in aset:
            check_size_against_image(im.file_name or im.image_id, im.instances.image_size, images_dir, path)
    return aset


def write_coco(aset: AnnotationSet, path: str | os.PathLike, **kwargs) -> dict:
    """Write :func:`annotation_set_to_coco` (``kwargs`` passed on) to ``path`` atomically; returns the dict."""
    if len(aset) == 0:
        raise ValueError(f"nothing to write to {path}: the annotation set has no images")
    d = annotation_set_to_coco(aset, **kwargs)
    _write_json(d, path)
    return d


def write_coco_results(
    aset: AnnotationSet,
    path: str | os.PathLike,
    image_ids: Mapping[str, int] | None = None,
    **kwargs,
) -> list[dict]:
    """Write :func:`annotation_set_to_results` to ``path`` atomically; returns the list.

    ``image_ids`` default to 1, 2, ... in the set's order, the ids :func:`annotation_set_to_coco`
    gives the same set, so a companion instance file written from it matches.
    """
    if len(aset) == 0:
        raise ValueError(f"nothing to write to {path}: the annotation set has no images")
    if image_ids is None:
        image_ids = {im.image_id: k + 1 for k, im in enumerate(aset)}
    res = annotation_set_to_results(aset, image_ids, **kwargs)
    _write_json(res, path)
    return res

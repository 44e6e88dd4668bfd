"""Label images: one integer image ``(H, W)`` per image, 0 = background, one id per cell.

* Reading: TIFF (tifffile, PIL as fallback) or PNG (PIL). Any non-negative integer ids, with gaps
  (``{3, 17, 40000}`` is fine); instances come in increasing id order. Floats holding whole
  numbers are accepted; negative ids, fractions and colour images are refused.
* Writing: ``uint16``, or ``uint32`` when an id exceeds 65535. PNG holds at most 16 bits, so a
  PNG with larger ids is refused (write a ``.tif``). TIFFs are zlib-compressed (Python's zlib, no
  ``imagecodecs`` needed).
* A label image holds no overlaps: converting instances that overlap paints them in order of
  increasing score, so where two overlap **the higher score wins, and at equal scores the later
  instance wins**; the number of overwritten pixels is returned (and logged).
* This writer stores each label's class name and score (and the image's cell type) as JSON in the
  TIFF ``ImageDescription`` / a PNG ``tEXt`` chunk under the key ``napari_sartorius``; the reader
  uses them when present, so classes and scores survive a round trip. Other tools ignore them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..annotations import AnnotationSet, ImageAnnotations
from ..instances import Instances
from ._common import class_index, instances_from_crops, known_classes
from .atomic import atomic_path
from .images import ImageReadError, read_raw

__all__ = [
    "LABEL_EXTENSIONS",
    "META_KEY",
    "read_label_image",
    "read_label_metadata",
    "write_label_image",
    "labels_to_instances",
    "instances_to_label_image",
    "read_label_file",
    "read_label_images",
    "write_label_images",
    "list_label_files",
]

log = logging.getLogger(__name__)

LABEL_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".png")
META_KEY = "napari_sartorius"
_UINT16_MAX = np.iinfo(np.uint16).max
_UINT32_MAX = np.iinfo(np.uint32).max


# ----------------------------------------------------------------------------------------------
# arrays
# ----------------------------------------------------------------------------------------------
def _check_labels(arr: np.ndarray, source: object) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim > 2:
        if arr.shape[-1] in (3, 4) and arr.ndim == 3:
            raise ValueError(
                f"{source} is a colour image of shape {arr.shape}; a label image has one channel "
                "of integer ids"
            )
        arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"{source}: a label image must be 2-D (height, width), got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint16)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or (
            arr.size and not np.all(np.isfinite(arr) & (np.mod(arr, 1) == 0))
        ):
            raise ValueError(f"{source}: a label image must hold whole-number ids, got {arr.dtype} values")
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{source}: a label image cannot hold negative ids (found {arr.min()})")
    return arr


def labels_to_instances(
    labels: np.ndarray,
    classes: Mapping[int, int] | int | None = None,
    scores: Mapping[int, float] | None = None,
    default_class: int = 0,
) -> tuple[Instances, np.ndarray]:
    """Instances of a label image ``(H, W)``, one per id > 0, in increasing id order.

    Works for any ids (gaps and huge ids included: ids are compacted before ``find_objects``).
    ``classes``: id -> class index (ids not in it get ``default_class``), or one index for all;
    ``scores``: id -> score (default 1). Returns ``(instances, ids)`` with ``ids`` int64 ``(N,)`` the label id of each instance.
    """
    from scipy import ndimage

    labels = _check_labels(labels, "label image")
    top = int(labels.max()) if labels.size else 0
    if top <= max(4 * labels.size, 1 << 16):
        # a lookup table from id to 1..N: linear time (np.unique would sort all pixels)
        present = np.bincount(labels.ravel().astype(np.intp, copy=False), minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, np.int32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
        compact = lut[labels]
    else:  # huge, sparse ids (e.g. hashes): compact by sorting
        ids, inverse = np.unique(labels, return_inverse=True)
        compact = inverse.reshape(labels.shape).astype(np.int32)
        if ids[0] == 0:
            ids = ids[1:]
        else:
            compact += 1  # no background: shift so that compact ids start at 1
    slices = ndimage.find_objects(compact, max_label=ids.size) if ids.size else []
    crops, origins = [], []
    for k, sl in enumerate(slices):
        crops.append(compact[sl] == k + 1)
        origins.append((sl[0].start, sl[1].start))
    if isinstance(classes, Mapping):
        cls = [int(classes.get(int(i), default_class)) for i in ids]
    else:
        cls = [default_class if classes is None else int(classes)] * ids.size
    sc = [float(scores.get(int(i), 1.0)) if scores else 1.0 for i in ids]
    inst = instances_from_crops(labels.shape, crops, origins, cls, sc)
    return inst, ids.astype(np.int64)


def instances_to_label_image(
    instances: Instances, threshold: float = 0.5, dtype=None
) -> tuple[np.ndarray, int]:
    """Paint instances into a label image; instance ``i`` gets id ``i + 1``.

    Overlaps: the higher-score instance wins; at equal scores the later instance wins (instances
    are painted in order of increasing ``(score, index)``). An instance covered completely by
    others leaves its id absent.

    Returns:
        ``(labels, n_overwritten)``: labels ``(H, W)`` of ``dtype`` (default uint16, uint32 for
        more than 65535 instances); n_overwritten is the number of pixel writes that replaced
        another instance's id (0 when nothing overlaps).
    """
    n = len(instances)
    if dtype is None:
        dtype = np.uint16 if n <= _UINT16_MAX else np.uint32
    out = np.zeros(instances.image_size, dtype=dtype)
    order = np.lexsort((np.arange(n), instances.scores))
    overwritten = 0
    for i in order:
        sl = instances.crop_slices(int(i))
        m = instances.masks[i] >= threshold
        region = out[sl]
        overwritten += int(np.count_nonzero(region[m]))
        region[m] = i + 1
    if overwritten:
        log.debug("label image: %d overlapping pixels went to the higher-score instance", overwritten)
    return out, overwritten


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Read a label image file as an integer array ``(H, W)`` (its stored dtype; floats -> int64).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not decodable, not 2-D, colour, negative or fractional ids.
    """
    return _check_labels(read_raw(path), Path(path))


def read_label_metadata(path: str | os.PathLike) -> dict | None:
    """The JSON this module's writer stored in a label file, or None when the file holds none (no
    description / PNG text, other JSON, or a file that is no readable TIFF/PNG: the pixel reader
    reports those).

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label image not found: {path}")
    text = None
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                text = tif.pages[0].description
        else:
            from PIL import Image

            with Image.open(path) as im:
                text = im.info.get(META_KEY)
    except (OSError, ValueError, IndexError, SyntaxError):
        # not decodable as TIFF/PNG (PIL: UnidentifiedImageError is an OSError, a broken PNG chunk a
        # SyntaxError; tifffile: TiffFileError is a ValueError; a TIFF without pages: IndexError)
        return None
    if not text:
        return None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    if isinstance(meta, dict) and isinstance(meta.get(META_KEY), dict):
        return meta[META_KEY]
    return None


def write_label_image(
    labels: np.ndarray, path: str | os.PathLike, metadata: Mapping | None = None
) -> Path:
    """Write a label image ``(H, W)`` as TIFF or PNG, atomically (see the module docstring).

    ``metadata`` (JSON-serialisable) is stored under :data:`META_KEY`.

    Raises:
        ValueError: not a label array, ids above 4294967295, ids above 65535 for a PNG, or an
            unsupported extension.
    """
    path = Path(path)
    labels = _check_labels(labels, "labels to write")
    ext = path.suffix.lower()
    if ext not in LABEL_EXTENSIONS:
        raise ValueError(f"cannot write a label image to {path}: use one of {', '.join(LABEL_EXTENSIONS)}")
    top = int(labels.max()) if labels.size else 0
    if top > _UINT32_MAX:
        raise ValueError(f"label id {top} does not fit 32 bits")
    dtype = np.uint16 if top <= _UINT16_MAX else np.uint32
    if ext == ".png" and dtype == np.uint32:
        raise ValueError(
            f"cannot write {path}: PNG holds at most 16-bit ids (65535), but the largest id is {top}; "
            "save as .tif instead"
        )
    data = np.ascontiguousarray(labels.astype(dtype))
    text = json.dumps({META_KEY: dict(metadata)}) if metadata else None
    with atomic_path(path) as tmp:
        if ext == ".png":
            from PIL import Image, PngImagePlugin

            info = PngImagePlugin.PngInfo()
            if text:
                info.add_text(META_KEY, text)
            with open(tmp, "wb") as fh:
                Image.fromarray(data).save(fh, format="PNG", pnginfo=info)
        else:
            import tifffile

            tifffile.imwrite(
                tmp, data, compression="zlib", description=text, metadata=None,
            )
    return path


def _instance_metadata(im: ImageAnnotations, class_names: Sequence[str], present: Iterable[int]) -> dict:
    inst = im.instances
    labels, cls, scores = [], [], []
    for i in present:
        k = int(inst.classes[i])
        labels.append(int(i) + 1)
        cls.append(class_names[k] if 0 <= k < len(class_names) else None)
        scores.append(float(inst.scores[i]))
    return {
        "image_id": im.image_id,
        "file_name": im.file_name,
        "cell_type": im.cell_type,
        "class_names": list(class_names),
        "labels": labels,
        "classes": cls,
        "scores": scores,
    }


def list_label_files(folder: str | os.PathLike) -> list[Path]:
    """The label images of a folder: its ``*_labels.{tif,tiff,png}`` files if it has any, else every
    ``.tif``/``.tiff``/``.png`` file. Sorted by name; hidden files are skipped."""
    folder = Path(folder)
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in LABEL_EXTENSIONS and not p.name.startswith(".")
    )
    tagged = [p for p in files if p.stem.endswith("_labels")]
    return tagged or files


def read_label_file(
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    cell_type: str | None = None,
    extra_class_names: Iterable[str] | None = None,
) -> tuple[ImageAnnotations, tuple[str, ...]]:
    """One label image file as ImageAnnotations keyed by ``AnnotationSet.key_for(path)``.

    Classes and scores come from the stored metadata when present; otherwise every cell gets
    ``cell_type``'s class (class 0 when None) and score 1. Returns ``(image, class_names used)``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label image not found: {path}")
    labels = read_label_image(path)
    meta = read_label_metadata(path)
    if class_names is None and meta and isinstance(meta.get("class_names"), list):
        meta_names = [str(n) for n in meta["class_names"]]
        from ..cell_types import DEFAULT_CLASSES

        class_names = None if set(meta_names) <= set(DEFAULT_CLASSES) else meta_names
    classes = known_classes(class_names, extra_class_names)
    where = str(path)
    ctype = cell_type
    if ctype is None and meta and meta.get("cell_type") in classes:
        ctype = meta["cell_type"]
    default_k = class_index(ctype, classes, where) if ctype else 0
    cls_map: dict[int, int] = {}
    score_map: dict[int, float] = {}
    if meta and isinstance(meta.get("labels"), list) and cell_type is None:
        for lab, name, score in zip(meta["labels"], meta.get("classes", []), meta.get("scores", [])):
            if name is not None:
                cls_map[int(lab)] = class_index(str(name), classes, where)
            if score is not None:
                score_map[int(lab)] = float(score)
    inst, _ = labels_to_instances(labels, cls_map, score_map, default_class=default_k)
    file_name = meta.get("file_name") if meta else None
    return ImageAnnotations(AnnotationSet.key_for(path), inst, ctype, file_name), classes


def read_label_images(
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    cell_type: str | None = None,
    extra_class_names: Iterable[str] | None = None,
) -> AnnotationSet:
    """A folder of label images (or one label image file) as an AnnotationSet.

    Files are chosen by :func:`list_label_files`; keys are ``AnnotationSet.key_for(file)`` (stem
    without ``_labels``). ``cell_type`` sets every image's cell type and class (overriding stored
    metadata).

    Raises:
        FileNotFoundError: no such folder/file.
        ValueError: no label images in the folder, two files with one key, unreadable files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label image folder or file not found: {path}")
    files = list_label_files(path) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no label images (.tif, .tiff, .png) in {path}")
    images: list[ImageAnnotations] = []
    seen: dict[str, Path] = {}
    set_classes: tuple[str, ...] | None = None
    for f in files:
        key = AnnotationSet.key_for(f)
        if key in seen:
            raise ValueError(f"{seen[key]} and {f} are label images of the same image {key!r}")
        seen[key] = f
        try:
            im, classes = read_label_file(f, class_names, cell_type, extra_class_names)
        except ImageReadError as e:
            raise ValueError(f"cannot read label image {f}: {e}") from None
        if set_classes is None:
            set_classes = classes
        elif classes != set_classes:
            raise ValueError(
                f"{f} uses class names {list(classes)}, other files {list(set_classes)}; "
                "pass class_names to read them together"
            )
        images.append(im)
    return AnnotationSet(images=images, class_names=set_classes)


def write_label_images(
    aset: AnnotationSet,
    folder: str | os.PathLike,
    ext: str = ".tif",
    suffix: str = "_labels",
    threshold: float = 0.5,
) -> dict[str, int]:
    """Write each image of ``aset`` as ``folder/<image_id><suffix><ext>`` (folder created if needed).

    Overlaps are resolved as in :func:`instances_to_label_image` (higher score wins). Returns
    image key -> number of overwritten pixels; a warning is logged for each image with overlaps.

    Raises:
        ValueError: the set has no images, or ``ext`` is not a label image extension.
    """
    if len(aset) == 0:
        raise ValueError(f"nothing to write to {folder}: the annotation set has no images")
    if not ext.startswith("."):
        ext = "." + ext
    if ext.lower() not in LABEL_EXTENSIONS:
        raise ValueError(f"label images are written as {', '.join(LABEL_EXTENSIONS)}, not {ext}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; label images need a folder")
    folder.mkdir(parents=True, exist_ok=True)
    report: dict[str, int] = {}
    for im in aset:
        labels, overwritten = instances_to_label_image(im.instances, threshold)
        present = np.flatnonzero(np.bincount(labels.ravel().astype(np.intp), minlength=len(im.instances) + 1)[1:])
        meta = _instance_metadata(im, aset.class_names, present.tolist())
        write_label_image(labels, folder / f"{im.image_id}{suffix}{ext}", meta)
        report[im.image_id] = overwritten
    n_images = sum(1 for v in report.values() if v)
    if n_images:
        log.warning(
            "label images: %d pixels in %d of %d images had overlapping instances; the higher-score "
            "instance kept them", sum(report.values()), n_images, len(report),
        )
    return report

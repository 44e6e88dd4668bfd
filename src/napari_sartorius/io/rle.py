"""Run-length encodings of instance masks.

Two encodings that must never be mixed:

* **Kaggle RLE** (the competition's ``train.csv``): space-separated ``start length`` pairs; starts are
  1-indexed positions in the ``(height, width)`` mask flattened **row-major** (C order). The
  competition page says column-major; the data is row-major (checked against the shared
  ``train.csv`` / ``coco.json`` pair in the tests).
* **COCO RLE** (pycocotools): a dict ``{"size": [h, w], "counts": ...}`` over the mask flattened
  **column-major** (Fortran order); ``counts`` alternate background / foreground run lengths,
  starting with background, either as a list of ints (uncompressed) or pycocotools' compressed
  string.

Encoders take an :class:`~napari_sartorius.instances.Instances` crop (``instance_to_rle``,
``instance_to_coco_rle``): runs are computed from the crop and its origin, so no full-image mask
is ever allocated. Decoders allocate one mask at a time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "rle_encode",
    "rle_decode",
    "rle_decode_crop",
    "parse_rle",
    "instance_to_rle",
    "mask_to_coco_rle",
    "coco_rle_to_mask",
    "coco_rle_runs",
    "coco_rle_to_crop",
    "segmentation_to_crop",
    "instance_to_coco_rle",
    "polygons_to_mask",
    "segmentation_to_mask",
    "mask_crop",
]


# ----------------------------------------------------------------------------------------------
# runs from a crop
# ----------------------------------------------------------------------------------------------
def _crop_runs(
    crop: np.ndarray, origin: Sequence[int], image_size: Sequence[int], order: str
) -> tuple[np.ndarray, np.ndarray]:
    """0-based starts and exclusive ends of the foreground runs of a boolean crop placed at
    ``origin = (y0, x0)`` in an image of ``image_size = (H, W)``, flattened in ``order`` ("C" row-major
    or "F" column-major). Runs that touch across a line break are merged. int64 arrays (R,), sorted.
    """
    crop = np.asarray(crop, dtype=bool)
    h_img, w_img = int(image_size[0]), int(image_size[1])
    y0, x0 = int(origin[0]), int(origin[1])
    if order == "F":
        crop = crop.T
        line0, pos0, line_len = x0, y0, h_img  # lines are image columns
    else:
        line0, pos0, line_len = y0, x0, w_img  # lines are image rows
    if crop.size == 0 or not crop.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    padded = np.zeros((crop.shape[0], crop.shape[1] + 2), np.int8)
    padded[:, 1:-1] = crop
    d = np.diff(padded, axis=1)
    s_line, s_pos = np.nonzero(d == 1)  # row-major order of np.nonzero keeps runs sorted
    e_line, e_pos = np.nonzero(d == -1)
    starts = (line0 + s_line.astype(np.int64)) * line_len + pos0 + s_pos
    ends = (line0 + e_line.astype(np.int64)) * line_len + pos0 + e_pos
    if starts.size > 1:
        # a run ending at the end of one line and one starting at the next line's beginning join
        join = starts[1:] == ends[:-1]
        if join.any():
            keep_start = np.concatenate([[True], ~join])
            keep_end = np.concatenate([~join, [True]])
            starts, ends = starts[keep_start], ends[keep_end]
    return starts, ends


def _mask_runs(mask: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray]:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (height, width), got shape {mask.shape}")
    return _crop_runs(mask > 0 if mask.dtype != bool else mask, (0, 0), mask.shape, order)


def _runs_to_kaggle(starts: np.ndarray, ends: np.ndarray) -> str:
    if starts.size == 0:
        return ""
    pairs = np.empty(2 * starts.size, np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))


# ----------------------------------------------------------------------------------------------
# Kaggle RLE
# ----------------------------------------------------------------------------------------------
def rle_encode(mask: np.ndarray) -> str:
    """Kaggle RLE of a 2-D mask ``(H, W)`` (bool, or numbers where > 0 is foreground).

    Returns ``""`` for an empty mask.
    """
    return _runs_to_kaggle(*_mask_runs(mask, "C"))


def instance_to_rle(instances, i: int, threshold: float = 0.5) -> str:
    """Kaggle RLE of instance ``i`` of an ``Instances`` (its crop at probability >= ``threshold``)."""
    crop = instances.masks[i] >= threshold
    return _runs_to_kaggle(*_crop_runs(crop, instances.mask_origins[i], instances.image_size, "C"))


def parse_rle(rle: str | Sequence[int], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate a Kaggle RLE for a mask of ``shape = (H, W)``.

    Returns 0-based starts and exclusive ends (int64, sorted). Runs that touch are allowed.

    Raises:
        ValueError: with the reason — a token that is not an integer, an odd number of values,
            a start below 1, a non-positive length, a run past the image's ``H * W`` pixels, or runs
            that overlap or are not sorted by start.
    """
    h, w = int(shape[0]), int(shape[1])
    n_pix = h * w
    if isinstance(rle, str):
        tokens = rle.split()
        try:
            values = np.array([int(t) for t in tokens], dtype=np.int64)
        except ValueError:
            bad = next(t for t in tokens if not t.lstrip("+-").isdigit())
            raise ValueError(f"RLE holds a value that is not an integer: {bad!r}") from None
    elif rle is None:
        values = np.zeros(0, np.int64)
    else:
        values = np.asarray(rle, dtype=np.int64).ravel()
    if values.size % 2:
        raise ValueError(f"RLE has an odd number of values ({values.size}); it must be start/length pairs")
    starts = values[0::2] - 1
    lengths = values[1::2]
    if starts.size == 0:
        return starts, starts.copy()
    if (starts < 0).any():
        k = int(np.argmax(starts < 0))
        raise ValueError(f"RLE run {k + 1} starts at {starts[k] + 1}; starts are 1-indexed (>= 1)")
    if (lengths <= 0).any():
        k = int(np.argmax(lengths <= 0))
        raise ValueError(f"RLE run {k + 1} has a non-positive length {lengths[k]}")
    ends = starts + lengths
    if (ends > n_pix).any():
        k = int(np.argmax(ends > n_pix))
        raise ValueError(
            f"RLE run {k + 1} (start {starts[k] + 1}, length {lengths[k]}) runs past the image: "
            f"{h} x {w} = {n_pix} pixels (check width/height)"
        )
    if starts.size > 1:
        bad = starts[1:] < ends[:-1]
        if bad.any():
            k = int(np.argmax(bad)) + 1
            what = "is not sorted after" if starts[k] < starts[k - 1] else "overlaps"
            raise ValueError(
                f"RLE run {k + 1} (start {starts[k] + 1}) {what} run {k} "
                f"(start {starts[k - 1] + 1}, length {lengths[k - 1]})"
            )
    return starts, ends


def _fill_runs(n: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    # starts are distinct and ends are distinct (runs are validated), so plain indexing is exact
    marks = np.zeros(n + 1, np.int8)
    marks[starts] += 1
    marks[ends] -= 1
    return np.cumsum(marks[:-1]) > 0


def rle_decode(rle: str | Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Decode a Kaggle RLE into a boolean mask of ``shape = (H, W)``; ``""`` gives an empty mask.

    Raises ValueError (see :func:`parse_rle`) for malformed runs.
    """
    h, w = int(shape[0]), int(shape[1])
    starts, ends = parse_rle(rle, (h, w))
    return _fill_runs(h * w, starts, ends).reshape(h, w)


def _runs_to_crop(
    starts: np.ndarray, ends: np.ndarray, shape: Sequence[int], order: str
) -> tuple[np.ndarray, tuple[int, int]]:
    """Tight boolean crop ``(bool (h, w), (y0, x0))`` of validated, sorted runs over the ``(H, W)``
    image flattened in ``order``. Only the strip of lines the runs cover is allocated."""
    h, w = int(shape[0]), int(shape[1])
    if starts.size == 0:
        return np.zeros((1, 1), bool), (0, 0)
    line_len = w if order == "C" else h
    l0 = int(starts[0] // line_len)
    l1 = int((ends[-1] - 1) // line_len) + 1
    offset = l0 * line_len
    strip = _fill_runs((l1 - l0) * line_len, starts - offset, ends - offset).reshape(l1 - l0, line_len)
    pos = np.flatnonzero(strip.any(axis=0))
    p0, p1 = int(pos[0]), int(pos[-1]) + 1
    if order == "C":
        return strip[:, p0:p1], (l0, p0)
    return strip[:, p0:p1].T.copy(), (p0, l0)


def rle_decode_crop(rle: str | Sequence[int], shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a Kaggle RLE straight into its tight crop: ``(bool (h, w), (y0, x0))``.

    Only a strip of the rows the runs cover is allocated, not the whole image. An empty RLE gives a
    ``(1, 1)`` False crop at ``(0, 0)`` (the convention of ``Instances.from_full_masks``).
    """
    starts, ends = parse_rle(rle, shape)
    return _runs_to_crop(starts, ends, shape, "C")


def mask_crop(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Tight crop of a full boolean mask: ``(bool (h, w), (y0, x0))``; empty gives ``(1, 1)`` at (0, 0)."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros((1, 1), bool), (0, 0)
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return mask[y0:y1, x0:x1].copy(), (y0, x0)


# ----------------------------------------------------------------------------------------------
# COCO RLE (pycocotools, column-major)
# ----------------------------------------------------------------------------------------------
def _runs_to_coco_counts(starts: np.ndarray, ends: np.ndarray, n_pix: int) -> list[int]:
    if starts.size == 0:
        return [n_pix]
    bounds = np.empty(2 * starts.size + 2, np.int64)
    bounds[0] = 0
    bounds[1:-1:2] = starts
    bounds[2:-1:2] = ends
    bounds[-1] = n_pix
    counts = np.diff(bounds)
    if counts[-1] == 0:
        counts = counts[:-1]
    return counts.tolist()


def _compress(counts: list[int], h: int, w: int) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def mask_to_coco_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE ``{"size": [h, w], "counts": str}`` of a 2-D mask (> 0 is foreground)."""
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (height, width), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray((mask > 0).astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def instance_to_coco_rle(instances, i: int, threshold: float = 0.5) -> dict:
    """Compressed COCO RLE of instance ``i`` of an ``Instances``, built from its crop only."""
    h, w = instances.image_size
    crop = instances.masks[i] >= threshold
    starts, ends = _crop_runs(crop, instances.mask_origins[i], (h, w), "F")
    return _compress(_runs_to_coco_counts(starts, ends, h * w), h, w)


def _counts_from_string(text: str | bytes) -> list[int]:
    """Uncompress pycocotools' counts string (its ``rleFrString``): each count is a little-endian
    sequence of 5-bit groups stored as ``chr(48 + group | 0x20 if more follow)``, sign-extended
    from the last group's bit 4; from the fourth count on, each is stored as the difference to the
    count two places before it."""
    if isinstance(text, bytes):
        text = text.decode("ascii")
    counts: list[int] = []
    p, n = 0, len(text)
    try:
        while p < n:
            x = k = 0
            more = True
            while more:
                c = ord(text[p]) - 48
                if not 0 <= c < 64:
                    raise ValueError(f"character {text[p]!r} at {p}")
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p += 1
                k += 1
                if not more and c & 0x10:
                    x |= -1 << (5 * k)
            if len(counts) > 2:
                x += counts[-2]
            counts.append(x)
    except IndexError:
        raise ValueError("compressed COCO RLE counts end in the middle of a number") from None
    except ValueError as e:
        raise ValueError(f"compressed COCO RLE counts hold an invalid {e}") from None
    return counts


def coco_rle_runs(
    rle: dict, shape: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Foreground runs of a COCO RLE: 0-based starts, exclusive ends over the column-major
    flattened mask (int64, sorted), and its ``(h, w)``. Accepts compressed (``str``/``bytes``) and
    uncompressed (list) counts.

    Raises:
        ValueError: no ``size``/``counts``, a size that disagrees with ``shape``, negative counts,
            or counts that do not add up to ``h * w`` (the RLE runs past / short of the image).
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("a COCO RLE must be a dict with 'size' and 'counts'")
    try:
        h, w = (int(v) for v in rle["size"])
    except (TypeError, ValueError):
        raise ValueError(f"COCO RLE size {rle['size']!r} is not [height, width]") from None
    if shape is not None and (h, w) != (int(shape[0]), int(shape[1])):
        raise ValueError(f"RLE size {[h, w]} disagrees with the image size {list(shape)} (height, width)")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = _counts_from_string(counts)
    try:
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError("COCO RLE counts must be a string or a list of integers") from None
    if (counts < 0).any():
        raise ValueError("COCO RLE holds a negative count")
    total = int(counts.sum())
    if total != h * w:
        raise ValueError(
            f"COCO RLE counts add up to {total} pixels, but the size {h} x {w} has {h * w} "
            f"(the RLE runs {'past' if total > h * w else 'short of'} the image)"
        )
    bounds = np.concatenate([[0], np.cumsum(counts)])
    starts, ends = bounds[1:-1:2], bounds[2::2]
    keep = ends > starts  # zero-length foreground runs (e.g. a leading 0 count is background)
    return starts[keep], ends[keep], (h, w)


def coco_rle_to_crop(rle: dict, shape: Sequence[int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a COCO RLE straight into its tight crop ``(bool (h, w), (y0, x0))`` without the full
    mask; an empty mask gives a ``(1, 1)`` False crop at ``(0, 0)``. Errors as :func:`coco_rle_runs`."""
    starts, ends, size = coco_rle_runs(rle, shape)
    return _runs_to_crop(starts, ends, size, "F")


def coco_rle_to_mask(rle: dict, shape: Sequence[int] | None = None) -> np.ndarray:
    """Decode a COCO RLE (compressed ``str``/``bytes`` counts, or an uncompressed list) to ``bool (h, w)``.

    ``shape``, when given, must equal the RLE's ``size``. Errors as :func:`coco_rle_runs`.
    """
    starts, ends, (h, w) = coco_rle_runs(rle, shape)
    return _fill_runs(h * w, starts, ends).reshape(w, h).T.copy()


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (each a flat ``[x0, y0, x1, y1, ...]`` list, pixels) to ``bool (H, W)``.

    Uses pycocotools ``frPyObjects`` + ``merge`` (the union of the polygons).
    """
    return coco_rle_to_mask(_polygons_rle(polygons, height, width), (height, width))


def _polygons_rle(polygons, height: int, width: int) -> dict:
    from pycocotools import mask as mask_utils

    polys = [list(map(float, p)) for p in polygons]
    for p in polys:
        if len(p) < 6 or len(p) % 2:
            raise ValueError(f"a COCO polygon needs an even number (>= 6) of coordinates, got {len(p)}")
    if not polys:
        return {"size": [int(height), int(width)], "counts": [int(height) * int(width)]}
    return mask_utils.merge(mask_utils.frPyObjects(polys, int(height), int(width)))


def segmentation_to_crop(segmentation, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Any COCO ``segmentation`` (RLE dict or polygons) as a tight crop ``(bool (h, w), (y0, x0))``."""
    if isinstance(segmentation, dict):
        return coco_rle_to_crop(segmentation, (height, width))
    if isinstance(segmentation, (list, tuple)):
        if segmentation and not isinstance(segmentation[0], (list, tuple)):
            segmentation = [segmentation]
        return coco_rle_to_crop(_polygons_rle(segmentation, height, width), (height, width))
    raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """Any COCO ``segmentation`` (RLE dict or polygon list) as ``bool (H, W)``."""
    if isinstance(segmentation, dict):
        return coco_rle_to_mask(segmentation, (height, width))
    if isinstance(segmentation, (list, tuple)):
        if segmentation and not isinstance(segmentation[0], (list, tuple)):
            segmentation = [segmentation]  # a single flat polygon
        return polygons_to_mask(segmentation, height, width)
    raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")

"""Large images in overlapping tiles, and the merge of the tiles' instances.

An image larger than ``max_tile`` pixels along an axis is cut into tiles of ``max_tile`` pixels that
overlap by at least ``overlap`` pixels (choose it at least one cell diameter; the default 128 px is
several SH-SY5Y or cortical cells and most astrocyte bodies). Each tile's instances are shifted into
image coordinates, then merged:

- The overlap between two neighbouring tiles is split at its middle: each tile *owns* a core region,
  and the cores partition the image. An instance belongs to the tile that owns its box centre.
- An instance is *cut* when its box comes within ``border_margin`` pixels of an inner tile border
  (an edge of the tile that is not an edge of the image): the network saw only part of that cell.
- Kept: instances that are whole and owned. A cell no wider than ``overlap / 2 - border_margin``
  around its centre is whole in its owner tile, so with overlap >= cell diameter every cell comes
  out exactly once, as in the untiled image. When two tiles' predictions of one cell put its centre
  on either side of the core border, both are whole and owned: the lower-scored one goes when its box
  IoU with the other exceeds ``dedup_iou``.
- Rescued: whole instances of a tile that does not own them (their owner saw them cut, or not at
  all), unless a kept instance of the same class has box IoU > ``dedup_iou`` with them (the same cell
  seen whole twice) or a higher-scored rescued one does.
- Only instances of *different* tiles are compared: overlapping raw candidates of one tile are the
  engine's output (post-processing resolves them later) and are never removed here.
- Last resort, for cells larger than the overlap (cut in every tile): the owner's cut copy, unless
  a kept or rescued instance of the same class covers more than half of its box
  (intersection / smaller box area > 0.5). Such a cell may come out truncated; raise ``overlap``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..instances import Instances
from .ensemble import box_iou_pairs

__all__ = ["Tile", "tile_windows", "needs_tiling", "shift_instances", "merge_tiles", "predict_tiled"]

DEFAULT_MAX_TILE = 1024
DEFAULT_OVERLAP = 128


@dataclass(frozen=True)
class Tile:
    """One tile: the window ``[y0, y1) x [x0, x1)`` of the image (pixels) and its owned core
    ``[cy0, cy1) x [cx0, cx1)`` (float pixel coordinates; the cores of all tiles partition the image)."""

    y0: int
    x0: int
    y1: int
    x1: int
    cy0: float
    cx0: float
    cy1: float
    cx1: float

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def _axis(length: int, max_tile: int, overlap: int):
    """Tile starts along one axis (integers) and the core boundaries between consecutive tiles."""
    if length <= max_tile:
        return [0], length, [0.0, float(length)]
    n = -(-(length - overlap) // (max_tile - overlap))  # ceil
    n = max(n, 2)
    starts = [(i * (length - max_tile)) // (n - 1) for i in range(n)]
    bounds = [0.0] + [(starts[i + 1] + starts[i] + max_tile) / 2.0 for i in range(n - 1)] + [float(length)]
    return starts, max_tile, bounds


def tile_windows(image_size: tuple[int, int], max_tile: int = DEFAULT_MAX_TILE, overlap: int = DEFAULT_OVERLAP) -> list[Tile]:
    """The tiles covering an image of ``image_size`` (H, W), row by row.

    Tiles are ``max_tile`` pixels along an axis longer than that (else the whole axis); neighbours
    overlap by at least ``overlap`` pixels. One tile when the image fits.
    """
    max_tile, overlap = int(max_tile), int(overlap)
    if overlap < 0 or max_tile <= overlap:
        raise ValueError(f"tiles need max_tile > overlap >= 0, got max_tile={max_tile}, overlap={overlap}")
    h, w = (int(v) for v in image_size)
    ys, th, yb = _axis(h, max_tile, overlap)
    xs, tw, xb = _axis(w, max_tile, overlap)
    return [
        Tile(y0, x0, y0 + th, x0 + tw, yb[i], xb[j], yb[i + 1], xb[j + 1])
        for i, y0 in enumerate(ys)
        for j, x0 in enumerate(xs)
    ]


def needs_tiling(image_size: tuple[int, int], max_tile: int | None) -> bool:
    return max_tile is not None and max(image_size[0], image_size[1]) > max_tile


def shift_instances(inst: Instances, dy: int, dx: int, image_size: tuple[int, int]) -> Instances:
    """Instances of a tile moved into the frame of the whole image (``image_size``), by ``(dy, dx)``."""
    return Instances(
        image_size=image_size,
        boxes=inst.boxes + np.array([dx, dy, dx, dy], np.float32),
        scores=inst.scores,
        classes=inst.classes,
        masks=inst.masks,
        mask_origins=inst.mask_origins + np.array([dy, dx], np.int64),
    )


def _greedy(candidates: np.ndarray, kept: np.ndarray, indptr, nbrs, conflict: np.ndarray, scores) -> None:
    """Visit ``candidates`` by decreasing score; keep one unless a kept neighbour conflicts with it.

    Candidates without any conflicting neighbour are kept without a visit."""
    has_conflict = np.zeros(len(kept), bool)
    has_conflict[np.repeat(np.arange(len(kept)), np.diff(indptr))[conflict]] = True
    kept[candidates[~has_conflict[candidates]]] = True
    candidates = candidates[has_conflict[candidates]]
    for c in candidates[np.argsort(-scores[candidates], kind="stable")].tolist():
        lo, hi = indptr[c], indptr[c + 1]
        if not np.any(kept[nbrs[lo:hi]] & conflict[lo:hi]):
            kept[c] = True


def merge_tiles(
    per_tile: Sequence[Instances],
    tiles: Sequence[Tile],
    image_size: tuple[int, int],
    border_margin: float = 2.0,
    dedup_iou: float = 0.5,
) -> Instances:
    """Merge the instances of each tile (already in image coordinates, see :func:`shift_instances`)
    into one Instances of the image, following the rules in the module docstring."""
    if len(per_tile) != len(tiles):
        raise ValueError(f"{len(per_tile)} tile results for {len(tiles)} tiles")
    image_size = (int(image_size[0]), int(image_size[1]))
    if len(tiles) == 1:
        return per_tile[0]
    h, w = image_size
    whole, owned = [], []
    for inst, t in zip(per_tile, tiles):
        if inst.image_size != image_size:
            raise ValueError(f"tile instances have image size {inst.image_size}, expected {image_size}")
        b = inst.boxes
        cut = np.zeros(len(inst), bool)
        if t.x0 > 0:
            cut |= b[:, 0] < t.x0 + border_margin
        if t.y0 > 0:
            cut |= b[:, 1] < t.y0 + border_margin
        if t.x1 < w:
            cut |= b[:, 2] > t.x1 - border_margin
        if t.y1 < h:
            cut |= b[:, 3] > t.y1 - border_margin
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        own = (cx >= t.cx0) & (cy >= t.cy0) & ((cx < t.cx1) | (t.cx1 >= w)) & ((cy < t.cy1) | (t.cy1 >= h))
        whole.append(~cut)
        owned.append(own)
    allin = Instances.cat(list(per_tile))
    tile_of = np.repeat(np.arange(len(tiles)), [len(p) for p in per_tile])
    whole_all, owned_all = np.concatenate(whole), np.concatenate(owned)
    # cut instances of a tile that does not own them are never needed
    useful = np.flatnonzero(whole_all | owned_all)
    inst = allin[useful]
    whole_all, owned_all, tile_of = whole_all[useful], owned_all[useful], tile_of[useful]
    n = len(inst)
    if n == 0:
        return Instances.empty(image_size)

    # conflicts only between instances of different tiles and the same class: overlapping raw
    # candidates of one tile are the engine's output and stay as they are
    boxes = inst.boxes.astype(np.float64)
    i, j, iou = box_iou_pairs(boxes, 0.0)
    cross = (inst.classes[i] == inst.classes[j]) & (tile_of[i] != tile_of[j])
    i, j, iou = i[cross], j[cross], iou[cross]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inter = iou * (area[i] + area[j]) / (1.0 + iou)
    ios = inter / np.maximum(np.minimum(area[i], area[j]), 1e-9)
    rows = np.concatenate([i, j])
    order = np.argsort(rows, kind="stable")
    nbrs = np.concatenate([j, i])[order]
    iou2 = np.concatenate([iou, iou])[order]
    ios2 = np.concatenate([ios, ios])[order]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])

    kept = np.zeros(n, bool)
    scores = inst.scores
    same_cell = iou2 > dedup_iou
    # whole and owned; the same cell whole and owned by two tiles (its centre moved across the
    # core border between the tiles' predictions) is kept once
    _greedy(np.flatnonzero(whole_all & owned_all), kept, indptr, nbrs, same_cell, scores)
    _greedy(np.flatnonzero(whole_all & ~owned_all), kept, indptr, nbrs, same_cell, scores)
    _greedy(np.flatnonzero(~whole_all & owned_all), kept, indptr, nbrs, ios2 > 0.5, scores)
    return inst[np.flatnonzero(kept)]


def predict_tiled(
    predict: Callable[[np.ndarray], Instances],
    image: np.ndarray,
    max_tile: int = DEFAULT_MAX_TILE,
    overlap: int = DEFAULT_OVERLAP,
    border_margin: float = 2.0,
    dedup_iou: float = 0.5,
) -> Instances:
    """Run ``predict(tile_image) -> Instances`` (in the tile's pixel frame) on every tile and merge.

    For one image without TTA; :func:`~napari_sartorius.inference.segment.segment_image` uses the same
    pieces with TTA, several engines and progress.
    """
    image = np.asarray(image)
    size = image.shape[:2]
    tiles = tile_windows(size, max_tile, overlap)
    parts = [shift_instances(predict(image[t.slices]), t.y0, t.x0, size) for t in tiles]
    return merge_tiles(parts, tiles, size, border_margin, dedup_iou)

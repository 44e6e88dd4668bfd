"""Clean training annotations: fill holes, drop stray fragments, resolve overlaps, drop tiny instances.

The Sartorius training masks are noisy: astrocyte masks come hollow or broken into pieces, and labels of
neighbouring cells overlap. Training on them teaches the model those defects. Each image is cleaned in
this order, everything on the per-instance crops plus one full-image owner map:

1. **Fill holes** in each mask (background enclosed by the mask; 8-connected foreground).
2. **Drop stray fragments**: the largest 8-connected component always stays; every other component
   smaller than ``min_fragment`` pixels goes (large pieces of a broken mask are real parts of the cell
   and stay).
3. **Resolve overlaps**: a pixel claimed by several instances goes to the **smallest** of them (by
   area after steps 1-2; ties: the later instance). Why the smallest: a contested pixel is a larger
   share of a small cell, so giving it away costs the small cell more IoU; a cell lying inside a larger
   (or hole-filled) one stays whole; and it needs no geometry, unlike the nearest-centroid rule, whose
   centroid can fall outside a concave astrocyte. An instance split by losing pixels goes through
   step 2 again.
4. **Drop instances** smaller than ``min_area`` pixels (instances with no pixel at all always go).

:class:`CleanReport` counts each change exactly; reports of several images add up.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

from .annotations import AnnotationSet, ImageAnnotations
from .instances import Instances
from .postprocess import _fill_holes

__all__ = ["CleanReport", "clean_annotations", "clean_annotation_set"]

_EIGHT = np.ones((3, 3), bool)

#: Default smallest fragment (pixels) kept beside an instance's largest component: a 5x5 patch, a third
#: of the smallest cell the post-processing keeps (75 px), far above a stray brush stroke.
DEFAULT_MIN_FRAGMENT = 25
#: Default smallest instance (pixels) kept: only degenerate remnants go; real cells are > 30 px.
DEFAULT_MIN_AREA = 10


@dataclass
class CleanReport:
    """What cleaning changed (counts; reports add with ``+``).

    Attributes:
        n_images: images cleaned.
        n_instances_in, n_instances_out: instances before and after.
        holes_filled: instances that had holes filled.
        hole_pixels_filled: pixels added by hole filling.
        fragments_dropped: connected pieces removed (before and after overlap resolution).
        fragment_pixels_dropped: pixels in those pieces.
        overlap_pixels_resolved: image pixels that were claimed by two or more instances and now
            belong to one (0 when ``resolve_overlaps`` is off).
        overlap_pixels_left: contested pixels left as they are (``resolve_overlaps`` off).
        small_dropped: instances dropped because fewer than ``min_area`` pixels were left.
    """

    n_images: int = 0
    n_instances_in: int = 0
    n_instances_out: int = 0
    holes_filled: int = 0
    hole_pixels_filled: int = 0
    fragments_dropped: int = 0
    fragment_pixels_dropped: int = 0
    overlap_pixels_resolved: int = 0
    overlap_pixels_left: int = 0
    small_dropped: int = 0

    def __add__(self, other: CleanReport) -> CleanReport:
        if not isinstance(other, CleanReport):
            return NotImplemented
        return CleanReport(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}

    @property
    def changed(self) -> bool:
        """True when cleaning changed any pixel or dropped any instance."""
        return bool(
            self.hole_pixels_filled
            or self.fragments_dropped
            or self.overlap_pixels_resolved
            or self.small_dropped
            or self.n_instances_out != self.n_instances_in
        )

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"cleaned {self.n_images} image(s): {self.n_instances_in} instances in, "
            f"{self.n_instances_out} out",
            f"  holes filled: {self.hole_pixels_filled} px in {self.holes_filled} instance(s)",
            f"  stray fragments dropped: {self.fragments_dropped} ({self.fragment_pixels_dropped} px)",
            f"  overlapping pixels resolved (to the smaller instance): {self.overlap_pixels_resolved}",
        ]
        if self.overlap_pixels_left:
            lines.append(f"  overlapping pixels left as they are: {self.overlap_pixels_left}")
        lines.append(f"  instances dropped as too small: {self.small_dropped}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _drop_fragments(m: np.ndarray, min_fragment: int) -> tuple[np.ndarray, int, int]:
    """Keep the largest component and every other one of >= ``min_fragment`` px.

    Returns ``(mask, fragments dropped, pixels dropped)``."""
    lab, n = ndimage.label(m, structure=_EIGHT)
    if n <= 1:
        return m, 0, 0
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = sizes >= min_fragment
    keep[int(np.argmax(sizes))] = True
    keep[0] = False
    dropped = ~keep[1:]
    if not dropped.any():
        return m, 0, 0
    return keep[lab], int(dropped.sum()), int(sizes[1:][dropped].sum())


def clean_annotations(
    annotations: Instances | ImageAnnotations,
    *,
    fill_holes: bool = True,
    min_fragment: int = DEFAULT_MIN_FRAGMENT,
    resolve_overlaps: bool = True,
    min_area: int = DEFAULT_MIN_AREA,
    mask_threshold: float = 0.5,
) -> tuple[Instances, CleanReport]:
    """Clean the instances of one image (see the module notes for the steps).

    Args:
        annotations: Instances (or an ImageAnnotations, whose instances are used) with mask crops;
            a pixel belongs to a mask where the crop is >= ``mask_threshold``.
        fill_holes: fill holes inside each mask.
        min_fragment: pieces other than an instance's largest one that have fewer pixels are dropped
            (0 keeps every piece; a very large value keeps only the largest).
        resolve_overlaps: give each contested pixel to the smallest instance claiming it.
        min_area: instances left with fewer pixels are dropped (at least 1: empty ones always go).
        mask_threshold: probability threshold of the input crops, in (0, 1].

    Returns:
        ``(instances, report)``: surviving instances in input order with tight 0/1 float32 crops and
        tight boxes, scores and classes unchanged; and the :class:`CleanReport`.
    """
    inst = annotations.instances if isinstance(annotations, ImageAnnotations) else annotations
    if not isinstance(inst, Instances):
        raise TypeError(f"clean_annotations needs Instances or ImageAnnotations, got {type(annotations).__name__}")
    if min_fragment < 0:
        raise ValueError(f"min_fragment must be >= 0 pixels, got {min_fragment}")
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0 pixels, got {min_area}")
    if not 0.0 < mask_threshold <= 1.0:
        raise ValueError(f"mask_threshold must lie in (0, 1], got {mask_threshold}")
    min_area = max(int(min_area), 1)
    rep = CleanReport(n_images=1, n_instances_in=len(inst))
    n = len(inst)
    crops: list[np.ndarray] = []
    for i in range(n):
        m = inst.masks[i] >= mask_threshold
        if fill_holes and m.any():
            filled = _fill_holes(m)
            added = int(np.count_nonzero(filled)) - int(np.count_nonzero(m))
            if added:
                rep.holes_filled += 1
                rep.hole_pixels_filled += added
            m = filled
        m, k, px = _drop_fragments(m, min_fragment)
        rep.fragments_dropped += k
        rep.fragment_pixels_dropped += px
        crops.append(m)
    origins = inst.mask_origins
    areas = np.array([int(np.count_nonzero(m)) for m in crops], np.int64)

    def window(i):
        y0, x0 = int(origins[i, 0]), int(origins[i, 1])
        return slice(y0, y0 + crops[i].shape[0]), slice(x0, x0 + crops[i].shape[1])

    if n:
        cover = np.zeros(inst.image_size, np.uint16)
        for i in range(n):
            cover[window(i)] += crops[i]
        contested = int(np.count_nonzero(cover > 1))
        if resolve_overlaps and contested:
            rep.overlap_pixels_resolved = contested
            owner = np.zeros(inst.image_size, np.int32)
            # largest first, so smaller instances overwrite (win) contested pixels; equal areas: later wins
            for i in np.argsort(-areas, kind="stable"):
                owner[window(i)][crops[i]] = i + 1
            for i in range(n):
                if not areas[i]:
                    continue
                mine = crops[i] & (owner[window(i)] == i + 1)
                if np.count_nonzero(mine) != areas[i]:
                    mine, k, px = _drop_fragments(mine, min_fragment)
                    rep.fragments_dropped += k
                    rep.fragment_pixels_dropped += px
                    crops[i] = mine
                    areas[i] = int(np.count_nonzero(mine))
        elif contested:
            rep.overlap_pixels_left = contested

    keep = areas >= min_area
    rep.small_dropped = int(np.count_nonzero(~keep))
    out_masks, out_origins, out_boxes = [], [], []
    for i in np.flatnonzero(keep):
        m = crops[i]
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(m.any(axis=0))
        y0 = int(origins[i, 0]) + int(rows[0])
        x0 = int(origins[i, 1]) + int(cols[0])
        out_masks.append(m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32))
        out_origins.append((y0, x0))
        out_boxes.append((x0, y0, x0 + int(cols[-1] - cols[0]) + 1, y0 + int(rows[-1] - rows[0]) + 1))
    idx = np.flatnonzero(keep)
    cleaned = Instances(
        image_size=inst.image_size,
        boxes=np.asarray(out_boxes, np.float32).reshape(-1, 4),
        scores=inst.scores[idx],
        classes=inst.classes[idx],
        masks=out_masks,
        mask_origins=np.asarray(out_origins, np.int64).reshape(-1, 2),
        columns={k: v[idx] for k, v in inst.columns.items()},  # uncertainty, reviewed, ... follow their cells
    )
    rep.n_instances_out = len(cleaned)
    return cleaned, rep


def clean_annotation_set(aset: AnnotationSet, **kwargs) -> tuple[AnnotationSet, CleanReport]:
    """Clean every image of ``aset`` (keyword arguments as :func:`clean_annotations`).

    Returns a new AnnotationSet (same class names, category ids, image ids, cell types, file names)
    and the summed :class:`CleanReport`.
    """
    total = CleanReport()
    images = []
    for im in aset.images:
        cleaned, rep = clean_annotations(im.instances, **kwargs)
        total = total + rep
        images.append(ImageAnnotations(im.image_id, cleaned, cell_type=im.cell_type, file_name=im.file_name))
    return AnnotationSet(images=images, class_names=aset.class_names, category_ids=aset.category_ids), total

"""Per-cell uncertainty of a fused prediction, from how much its sources agree.

A *source* is one model run on one TTA variant (tiles of one source are merged before fusion, so a
cell that the tiles of a source saw differently counts as that source's one answer). Fusion
(:func:`napari_sartorius.inference.ensemble.fuse_instances`) groups the candidates of all sources
into clusters; for each fused cell this module compares the fused mask (binarised at the mask
threshold, 0.5) with the masks of its cluster's members:

``found``       weighted fraction of the sources that found the cell: a source found it when one of its
                members matches the fused mask at mask IoU >= 0.5 (:data:`MATCH_IOU`); the fraction
                is ``sum of those sources' weights / sum of all sources' weights``, in [0, 1].
``mask_iou``    mean, over the sources that found it, of the mask IoU of their best-matching member with
                the fused mask, in [0, 1] (0 when no source matches).
``score_spread`` standard deviation of those best-matching members' scores (0 with fewer than two),
                in [0, 0.5] for scores in [0, 1].

The combined **uncertainty** in [0, 1] is one minus a weighted mean of the three agreements::

    uncertainty = 1 - (a * found + b * mask_iou + c * (1 - 2 * score_spread)) / (a + b + c)

with ``(a, b, c) = UNCERTAINTY_WEIGHTS``, tuned on synthetic images only
(``benchmarks/bench_review.py --tune``). 0 means every source found the same mask with the same
score; 1 means no source's mask matches the fused one. It is *undefined* with fewer than two sources
(one model without TTA): there is nothing to disagree, and the column is then left out, never NaN.

The review queue does not rank cells by this value alone: on real images it ranked wrong cells worse
than the plain score. It ranks them by :func:`napari_sartorius.inference.review_rank.review_priority`,
an estimated probability that the cell is wrong from its score, this uncertainty and its area.

The module also holds what the review queue and the folder run need: :func:`image_summary` (cell
count, mean and 90th-percentile uncertainty of one image), :func:`write_summary_csv` (``summary.csv``)
and :func:`order_by_uncertainty` (which image/labels pairs to correct first).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .crop_table import CropTable, binarised, count_intersections

__all__ = [
    "MATCH_IOU",
    "UNCERTAINTY_WEIGHTS",
    "UNCERTAINTY_COLUMNS",
    "combine",
    "ClusterAgreement",
    "ImageSummary",
    "image_summary",
    "summarize_predictions",
    "summary_from_features",
    "write_summary_csv",
    "read_summary_csv",
    "order_by_uncertainty",
]

#: Mask IoU at or above which a source's member counts as having found the fused cell.
MATCH_IOU = 0.5
#: Weights ``(found, mask_iou, score agreement)`` of the combined value (see the module docstring).
#: Tuned on synthetic images only (seeds 100-101 of each style, weight-free engine with 5-scale TTA,
#: AUROC for "prediction is wrong" 0.782 against 0.773 for equal weights): ``bench_review.py --tune``.
UNCERTAINTY_WEIGHTS: tuple[float, float, float] = (1.0, 1.0, 0.5)
#: The per-instance columns fusion adds to ``Instances.columns`` (all float32 ``(N,)``).
UNCERTAINTY_COLUMNS = ("uncertainty", "found", "mask_iou", "score_spread")


def combine(found, mask_iou, score_spread, weights: Sequence[float] = UNCERTAINTY_WEIGHTS) -> np.ndarray:
    """The combined uncertainty (float32, in [0, 1]) of arrays of the three agreements."""
    a, b, c = (float(v) for v in weights)
    if min(a, b, c) < 0 or a + b + c <= 0:
        raise ValueError(f"uncertainty weights must be >= 0 with a positive sum, got {tuple(weights)}")
    found = np.asarray(found, np.float64)
    agree = a * found + b * np.asarray(mask_iou, np.float64) + c * (1.0 - 2.0 * np.asarray(score_spread, np.float64))
    return np.clip(1.0 - agree / (a + b + c), 0.0, 1.0).astype(np.float32)


class ClusterAgreement:
    """Collects fused cells (one :meth:`add` each), then computes their three agreements at once.

    All candidates are binarised in one pass over one flat table of their crops
    (:class:`~.crop_table.CropTable`); :meth:`columns` counts the pixels every member shares with its
    fused cell for all (cell, member) pairs at once (:func:`~.crop_table.count_intersections`), and the
    IoUs, the best member per (cell, source) and the per-cell statistics are vectorised (fusion time
    matters: ``benchmarks/bench_review.py --cost`` and ``benchmarks/bench_postforward.py`` measure it).

    Args:
        masks, origins: every candidate's mask crop (float probabilities) and its ``(y0, x0)``.
        src: int ``(M,)`` source index of every candidate; scores: ``(M,)`` raw scores.
        source_weights: ``(S,)`` positive weight of each source.
        mask_threshold: probability at which masks are binarised.
        table: the candidates' :class:`~.crop_table.CropTable` when the caller has built it already.
    """

    def __init__(self, masks, origins, src, scores, source_weights, mask_threshold: float = 0.5,
                 table: CropTable | None = None):
        self.masks, self.origins = masks, origins
        self.src = np.asarray(src, np.int64)
        self.scores = np.asarray(scores, np.float64)
        self.w = np.asarray(source_weights, np.float64)
        self.thr = np.float32(mask_threshold)
        self._table = table
        self._bits: np.ndarray | None = None
        self._areas: np.ndarray | None = None
        # in order of addition: ("cell", crop, origin, members) or ("counted", n, members, counts, ...)
        self._parts: list[tuple] = []
        self._n = 0

    @property
    def table(self) -> CropTable:
        """Every candidate's crop in one flat table (built on first use)."""
        if self._table is None:
            self._table = CropTable.from_crops(self.masks, np.asarray(self.origins, np.int64).reshape(-1, 2))
        return self._table

    @property
    def areas(self) -> np.ndarray:
        """int64 ``(M,)`` pixels of every candidate's crop at ``>=`` the mask threshold."""
        if self._areas is None:  # every candidate binarised in one pass
            self._bits, self._areas = binarised(self.table, self.thr)
        return self._areas

    def add(self, crop: np.ndarray, origin, members: Sequence[int]) -> None:
        """One fused cell: its mask ``crop`` at ``(y0, x0)`` ``origin`` and its members' candidate indices
        (the pixel work is done for all cells at once by :meth:`columns`)."""
        self._parts.append(("cell", crop, origin, members))
        self._n += 1

    def add_counted(self, members, counts, member_area, inter, fused_area) -> None:
        """Fused cells whose pixel counts the caller has already made (fusion's mask averaging,
        :func:`~.crop_table.average_groups`, counts them on the way).

        Args:
            members: int ``(R,)`` the cells' members' candidate indices, cell after cell.
            counts: int ``(n,)`` members of each of the ``n`` cells.
            member_area, inter: int ``(R,)`` each member's pixels at the mask threshold, and those of
                them also in its cell's fused mask at the threshold.
            fused_area: int ``(n,)`` each fused mask's pixels at the threshold.
        """
        counts = np.asarray(counts, np.int64)
        self._parts.append(("counted", len(counts), np.asarray(members, np.int64), counts,
                            np.asarray(member_area, np.int64), np.asarray(inter, np.int64),
                            np.asarray(fused_area, np.int64)))
        self._n += len(counts)

    def _pairs(self):
        """(cell, member, intersection, member area, fused area) int64 arrays, one row per
        (cell, member) pair, ordered by cell then member as added."""
        cells, members, inters, m_areas, f_areas = [], [], [], [], []
        pending: list[tuple] = []
        offset = 0
        for part in self._parts:
            if part[0] == "cell":
                pending.append((offset,) + part[1:])
                offset += 1
                continue
            _, n, mem, cnt, ma, it, fa = part
            cells.append(offset + np.repeat(np.arange(n, dtype=np.int64), cnt))
            members.append(mem)
            inters.append(it)
            m_areas.append(ma)
            f_areas.append(np.repeat(fa, cnt))
            offset += n
        if pending:
            for a, part in zip((cells, members, inters, m_areas, f_areas), self._count(pending)):
                a.append(part)
        if not cells:
            return tuple(np.zeros(0, np.int64) for _ in range(5))
        cell, member, inter, m_area, f_area = (np.concatenate(a) for a in (cells, members, inters, m_areas, f_areas))
        order = np.argsort(cell, kind="stable")
        return cell[order], member[order], inter[order], m_area[order], f_area[order]

    def _count(self, pending):
        """The pixel counts of cells added one by one: ``pending`` holds (cell, crop, origin, members)."""
        n = len(pending)
        counts = np.fromiter((len(p[3]) for p in pending), np.int64, n)
        cell_ids = np.fromiter((p[0] for p in pending), np.int64, n)
        cell = np.repeat(cell_ids, counts)
        member = np.concatenate([np.asarray(p[3], np.int64).reshape(-1) for p in pending])
        areas, masks = self.areas, self.masks
        # a cell whose mask is its one member's crop (a singleton cluster) needs no pixel work
        same = np.fromiter((len(p[3]) == 1 and p[1] is masks[p[3][0]] for p in pending), bool, n)
        fused_area = np.zeros(n, np.int64)
        inter = np.zeros(len(cell), np.int64)
        local = np.repeat(np.arange(n), counts)
        pair_same = same[local]
        fused_area[same] = areas[member[pair_same]]
        inter[pair_same] = areas[member[pair_same]]
        todo = np.flatnonzero(~same)
        if len(todo):
            fused = CropTable.from_crops([pending[k][1] for k in todo.tolist()],
                                         np.asarray([pending[k][2] for k in todo.tolist()], np.int64))
            fbits = fused.flat >= self.thr
            fstarts, fsizes = fused.starts.tolist(), fused.sizes.tolist()
            fused_area[todo] = np.fromiter(
                (np.count_nonzero(fbits[s : s + k]) for s, k in zip(fstarts, fsizes)), np.int64, len(todo)
            )
            slot = np.full(n, -1, np.int64)
            slot[todo] = np.arange(len(todo))
            rows = np.flatnonzero(~pair_same)
            windows = np.stack([fused.oy, fused.ox, fused.hs, fused.ws], axis=1)
            inter[rows] = count_intersections(
                self._bits, self.table, member[rows], fbits, fused.starts, windows, slot[local[rows]]
            )
        return cell, member, inter, areas[member], fused_area[local]

    def columns(self, order: np.ndarray | None = None, weights=UNCERTAINTY_WEIGHTS) -> dict[str, np.ndarray]:
        """The columns ``uncertainty``, ``found``, ``mask_iou``, ``score_spread`` (float32, in ``order``)."""
        n = self._n
        cell, member, inter, member_area, fused_area = self._pairs()
        inter = inter.astype(np.float64)
        union = member_area.astype(np.float64) + fused_area.astype(np.float64) - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        src = self.src[member]
        # the best member of each (cell, source): sort by cell, source, decreasing IoU
        order_p = np.lexsort((-iou, src, cell))
        cell, src, iou, member = cell[order_p], src[order_p], iou[order_p], member[order_p]
        first = np.ones(len(cell), bool)
        first[1:] = (cell[1:] != cell[:-1]) | (src[1:] != src[:-1])
        hit = first & (iou >= MATCH_IOU)
        c, s, v, sc = cell[hit], src[hit], iou[hit], self.scores[member[hit]]
        count = np.bincount(c, minlength=n).astype(np.float64)
        found = np.bincount(c, weights=self.w[s], minlength=n) / float(self.w.sum())
        safe = np.maximum(count, 1.0)
        mean_iou = np.bincount(c, weights=v, minlength=n) / safe
        m1 = np.bincount(c, weights=sc, minlength=n) / safe
        m2 = np.bincount(c, weights=sc * sc, minlength=n) / safe
        spread = np.where(count > 1, np.sqrt(np.maximum(m2 - m1 * m1, 0.0)), 0.0)
        found, mean_iou, spread = (np.clip(a, 0.0, 1.0).astype(np.float32) for a in (found, mean_iou, spread))
        if order is not None:
            found, mean_iou, spread = found[order], mean_iou[order], spread[order]
        return {
            "uncertainty": combine(found, mean_iou, spread, weights),
            "found": found,
            "mask_iou": mean_iou,
            "score_spread": spread,
        }


# -- images -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSummary:
    """One row of ``summary.csv``: ``count`` cells; ``mean`` and ``p90`` of their uncertainty
    (None when the uncertainty is undefined for the image: one model without TTA); ``expected_wrong``,
    the sum over the cells of the review priority (:func:`.review_rank.review_priority`, P(wrong)):
    the number of wrong cells to expect in the image, None when the uncertainty, the scores or the
    areas are missing. Calibrated like the priority (weight-free engine, synthetic images): a ranking
    of images more than a count to trust."""

    image: str
    count: int
    mean: float | None
    p90: float | None
    expected_wrong: float | None = None


def image_summary(image: str, uncertainty: np.ndarray | None, count: int | None = None,
                  scores: np.ndarray | None = None, areas: np.ndarray | None = None) -> ImageSummary:
    """Summarise one image's cells: ``uncertainty`` float ``(N,)`` or None when undefined; with the
    cells' ``scores`` ``(N,)`` in [0, 1] and ``areas`` ``(N,)`` in pixels also their expected number
    of wrong cells (:class:`ImageSummary`)."""
    if uncertainty is None:
        return ImageSummary(str(image), int(count or 0), None, None)
    u = np.asarray(uncertainty, np.float64).reshape(-1)
    n = int(count if count is not None else u.size)
    expected = None
    if scores is not None and areas is not None and u.size:
        s, a = np.asarray(scores, np.float64).reshape(-1), np.asarray(areas, np.float64).reshape(-1)
        ok = np.isfinite(u) & np.isfinite(s) & np.isfinite(a) & (a > 0)
        if s.size == u.size == a.size and ok.all():
            from .review_rank import review_priority

            expected = float(review_priority(s, u, a).sum())
    u = u[np.isfinite(u)]
    if not u.size:
        return ImageSummary(str(image), n, None, None)
    return ImageSummary(str(image), n, float(u.mean()), float(np.percentile(u, 90)), expected)


def summarize_predictions(images: Iterable) -> list[ImageSummary]:
    """One :class:`ImageSummary` per image of per-image results: an
    :class:`~napari_sartorius.annotations.AnnotationSet` (or any iterable of its ``ImageAnnotations``,
    named by ``file_name`` else ``image_id``) or of ``(name, Instances)`` pairs."""
    out = []
    for item in images:
        if isinstance(item, tuple):
            name, inst = item
        else:
            name, inst = (item.file_name or item.image_id), item.instances
        out.append(image_summary(name, inst.uncertainty, count=len(inst)))
    return out


def summary_from_features(name: str, features) -> ImageSummary:
    """The :class:`ImageSummary` of a Labels layer from its features table (dict or DataFrame): its
    ``uncertainty`` column when there is one (rows without a value are skipped), else undefined.
    For the Fine-tune dock, which holds image/labels layer pairs rather than files."""
    try:
        cols = set(features.keys()) if features is not None else set()
    except AttributeError:
        cols = set()
    n = len(np.asarray(features["label"])) if "label" in cols else 0
    if "uncertainty" not in cols:
        return ImageSummary(str(name), n, None, None)
    scores = np.asarray(features["score"], np.float64) if "score" in cols else None
    areas = np.asarray(features["area"], np.float64) if "area" in cols else None
    return image_summary(name, np.asarray(features["uncertainty"], np.float64), count=n, scores=scores, areas=areas)


SUMMARY_HEADER = ("image", "cells", "mean_uncertainty", "p90_uncertainty")
SUMMARY_OPTIONAL = ("expected_wrong",)  # written always; absent from summary.csv files of older versions


def write_summary_csv(rows: Iterable[ImageSummary], path: str | os.PathLike) -> None:
    """Write ``summary.csv`` (atomically): one row per image; undefined values are empty cells."""
    from ..io.atomic import atomic_write

    def fmt(v):
        return "" if v is None else f"{v:.4f}"

    with atomic_write(path, newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SUMMARY_HEADER + SUMMARY_OPTIONAL)
        for r in rows:
            w.writerow((r.image, r.count, fmt(r.mean), fmt(r.p90), fmt(r.expected_wrong)))


def read_summary_csv(path: str | os.PathLike) -> list[ImageSummary]:
    """Read a ``summary.csv`` written by :func:`write_summary_csv`."""
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or any(h not in reader.fieldnames for h in SUMMARY_HEADER):
            raise ValueError(f"{path}: not a summary.csv (columns {', '.join(SUMMARY_HEADER)} expected)")
        for row in reader:
            def num(v):
                return float(v) if v not in (None, "") else None

            out.append(ImageSummary(row["image"], int(row["cells"]), num(row["mean_uncertainty"]),
                                    num(row["p90_uncertainty"]), num(row.get("expected_wrong"))))
    return out


def order_by_uncertainty(items: Sequence, key_of=lambda x: x, summaries: Sequence[ImageSummary] | dict = ()) -> list:
    """``items`` (e.g. the Fine-tune dock's image/labels pairs) ordered most uncertain first.

    Each item's image name (``key_of(item)``) is looked up among ``summaries`` (a list of
    :class:`ImageSummary` or a dict name -> ImageSummary); ordering is by the expected number of
    wrong cells when every item with a defined uncertainty has one (it also counts score and size, and
    ranks images where the sources agree everywhere), else by ``p90`` then ``mean``, descending; items
    without a defined uncertainty keep their relative order at the end.
    """
    table = summaries if isinstance(summaries, dict) else {s.image: s for s in summaries}
    defined = [table.get(key_of(item)) for item in items]
    defined = [s for s in defined if s is not None and s.p90 is not None]
    by_expected = bool(defined) and all(s.expected_wrong is not None for s in defined)

    def rank(pair):
        pos, item = pair
        s = table.get(key_of(item))
        if s is None or s.p90 is None:
            return (1, 0.0, 0.0, 0.0, pos)
        return (0, -s.expected_wrong if by_expected else 0.0, -s.p90, -(s.mean or 0.0), pos)

    return [item for _, item in sorted(enumerate(items), key=rank)]

"""The Sartorius competition metric, per image, per cell type and overall, with COCO mask AP beside it
(:mod:`napari_sartorius.coco_eval`).

Competition score of one image (the Kaggle metric): for each IoU threshold ``t`` in
0.50, 0.55, ..., 0.95 a prediction matches a ground-truth object when their IoU is **strictly greater**
than ``t``, one-to-one; ``score(t) = TP / (TP + FP + FN)``; the image score is the mean over the ten
thresholds. The final score is the mean over images.

Conventions (documented choices):

- Both sides empty: the image scores **1.0** (nothing to find, nothing falsely found). One side empty:
  **0.0**.
- Predicted masks must not overlap. Predictions given as :class:`~napari_sartorius.instances.Instances`
  are first painted into a label image at ``mask_threshold``, **the higher score winning** contested
  pixels (an instance completely covered by higher-scored ones disappears and counts as nothing).
  Predictions given as a label image cannot overlap.
- Ground truth given as Instances may overlap (the Sartorius training masks do): IoUs are then exact
  per instance. Ground-truth instances with no pixel at ``mask_threshold`` are ignored.

IoUs come from a sparse contingency table of the two label images (``np.bincount`` over paired label
ids), so an image of ~800 x ~800 instances costs a few milliseconds, not a dense 800 x 800 x H x W
comparison.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from .annotations import AnnotationSet, ImageAnnotations
from .coco_eval import COCO_MAX_DETS, coco_mask_ap  # noqa: F401 - re-exported: COCO AP lives in coco_eval
from .instances import Instances

__all__ = [
    "IOU_THRESHOLDS",
    "MatchCounts",
    "EvaluationResult",
    "competition_score",
    "match_counts",
    "sparse_ious",
    "evaluate",
    "coco_mask_ap",
]

#: The competition's IoU thresholds 0.50, 0.55, ..., 0.95.
IOU_THRESHOLDS: np.ndarray = np.round(np.arange(0.5, 0.951, 0.05), 2)


LabelsOrInstances = Union[np.ndarray, Instances]

# Above this many cells in the dense (n_gt+1) x (n_pred+1) table, count only the overlapping pixel
# pairs (np.unique) instead of a dense bincount.
_DENSE_TABLE_LIMIT = 4_000_000


# -- label images ------------------------------------------------------------------------------------
def _consecutive(labels: np.ndarray, what: str) -> tuple[np.ndarray, int]:
    """Relabel a label image to ids 1..n (0 stays background). Returns ``(int64 (H, W), n)``."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{what}: a label image must be 2-D (height, width), got shape {labels.shape}")
    if labels.dtype == bool:
        labels = labels.astype(np.int64)
    elif not np.issubdtype(labels.dtype, np.integer):
        if labels.size and not np.all(np.mod(labels, 1) == 0):
            raise ValueError(f"{what}: a label image must hold integer ids, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{what}: label ids must be >= 0 (0 = background)")
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top == 0:
        return np.zeros(labels.shape, np.int64), 0
    if top <= 4 * flat.size + 1024:
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present).astype(np.int64)
        lut[0] = 0
        return lut[labels], int(lut[-1])
    ids, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int64)
    if ids[0] != 0:
        inverse += 1
    return inverse, int(ids.size - (ids[0] == 0))


def _paint_by_score(instances: Instances, mask_threshold: float) -> tuple[np.ndarray, int]:
    """Paint predictions into one label image, higher scores winning contested pixels."""
    out = np.zeros(instances.image_size, np.int64)
    order = np.argsort(instances.scores, kind="stable")  # ascending: later (higher) overwrites
    for rank, i in enumerate(order, start=1):
        out[instances.crop_slices(int(i))][instances.masks[i] >= mask_threshold] = rank
    return _consecutive(out, "predictions")


def _layers(instances: Instances, mask_threshold: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Split possibly overlapping instances into non-overlapping label images ("layers").

    Instance ``j`` (counting only non-empty ones) gets id ``j + 1`` in exactly one layer; the first
    layer where none of its pixels is taken. Returns the layers (int64 ``(H, W)`` each) and the
    int64 ``(n,)`` pixel areas.
    """
    layers: list[np.ndarray] = []
    areas: list[int] = []
    for i in range(len(instances)):
        m = instances.masks[i] >= mask_threshold
        a = int(np.count_nonzero(m))
        if a == 0:
            continue
        areas.append(a)
        sl = instances.crop_slices(i)
        for layer in layers:
            window = layer[sl]
            if not window[m].any():
                window[m] = len(areas)
                break
        else:
            layer = np.zeros(instances.image_size, np.int64)
            layer[sl][m] = len(areas)
            layers.append(layer)
    if not layers:
        layers = [np.zeros(instances.image_size, np.int64)]
    return layers, np.asarray(areas, np.int64)


def _side(x: LabelsOrInstances, *, role: str, mask_threshold: float):
    """Normalise one side to ``(layers, areas, n)`` with ids 1..n shared across layers."""
    if isinstance(x, Instances):
        if role == "predictions":
            lab, n = _paint_by_score(x, mask_threshold)
            return [lab], np.bincount(lab.ravel(), minlength=n + 1)[1:], n
        layers, areas = _layers(x, mask_threshold)
        return layers, areas, int(areas.size)
    lab, n = _consecutive(x, role)
    return [lab], np.bincount(lab.ravel(), minlength=n + 1)[1:], n


def _contingency(g: np.ndarray, p: np.ndarray, n_g: int, n_p: int):
    """Overlap counts of two label images: ``(g_idx, p_idx, count)`` with 0-based indices, count > 0."""
    g = g.ravel()
    p = p.ravel()
    if (n_g + 1) * (n_p + 1) <= _DENSE_TABLE_LIMIT:
        table = np.bincount(g * (n_p + 1) + p, minlength=(n_g + 1) * (n_p + 1)).reshape(n_g + 1, n_p + 1)
        table = table[1:, 1:]
        gi, pi = np.nonzero(table)
        return gi, pi, table[gi, pi]
    both = (g > 0) & (p > 0)
    codes, counts = np.unique(g[both] * (n_p + 1) + p[both], return_counts=True)
    return codes // (n_p + 1) - 1, codes % (n_p + 1) - 1, counts


def _size(x: LabelsOrInstances) -> tuple[int, ...]:
    return tuple(x.image_size) if isinstance(x, Instances) else tuple(np.shape(x))


def sparse_ious(pred: LabelsOrInstances, gt: LabelsOrInstances, *, mask_threshold: float = 0.5):
    """IoUs of every overlapping (prediction, ground truth) pair.

    Args:
        pred, gt: label images ``(H, W)`` of integer ids (0 = background; ids need not be consecutive)
            or :class:`Instances` (see the module notes on overlaps).
        mask_threshold: probability at or above which an Instances crop pixel belongs to the mask.

    Returns:
        ``(pred_idx, gt_idx, iou, n_pred, n_gt)``: int64 and float64 arrays of the pairs with IoU > 0,
        indices 0-based in the order of increasing label id (label images) or of the non-empty
        instances (Instances; predictions in increasing score order), and the two instance counts.
    """
    if _size(pred) != _size(gt):
        raise ValueError(
            f"prediction and ground truth differ in image size (height, width): {_size(pred)} vs {_size(gt)}"
        )
    p_layers, p_area, n_p = _side(pred, role="predictions", mask_threshold=mask_threshold)
    g_layers, g_area, n_g = _side(gt, role="ground truth", mask_threshold=mask_threshold)
    p_lab = p_layers[0]
    parts = [_contingency(g, p_lab, n_g, n_p) for g in g_layers]
    gi = np.concatenate([q[0] for q in parts]).astype(np.int64)
    pi = np.concatenate([q[1] for q in parts]).astype(np.int64)
    inter = np.concatenate([q[2] for q in parts]).astype(np.float64)
    iou = inter / (g_area[gi] + p_area[pi] - inter) if gi.size else np.zeros(0)
    return pi, gi, iou, n_p, n_g


@dataclass
class MatchCounts:
    """Per-threshold matching counts of one image.

    Attributes:
        thresholds: float64 ``(10,)`` IoU thresholds.
        tp, fp, fn: int64 ``(10,)`` counts at each threshold.
        n_pred, n_gt: instance counts of the two sides.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    n_pred: int
    n_gt: int

    @property
    def per_threshold(self) -> np.ndarray:
        """float64 ``(10,)`` ``TP / (TP + FP + FN)`` at each threshold (1.0 where both sides are empty)."""
        denom = self.tp + self.fp + self.fn
        return np.where(denom > 0, self.tp / np.maximum(denom, 1), 1.0)

    @property
    def score(self) -> float:
        """The image's competition score: the mean of :attr:`per_threshold`."""
        return float(np.mean(self.per_threshold))


def match_counts(
    pred: LabelsOrInstances,
    gt: LabelsOrInstances,
    *,
    thresholds: np.ndarray = IOU_THRESHOLDS,
    mask_threshold: float = 0.5,
) -> MatchCounts:
    """TP/FP/FN of one image at each IoU threshold (match when IoU > t, one-to-one).

    Matching is greedy from the highest IoU down over pairs whose IoU exceeds the lowest threshold.
    For thresholds >= 0.5 a match is unique anyway (two masks that do not overlap each other cannot
    both cover more than half of a third), so greedy equals optimal there; below 0.5 it is the usual
    greedy approximation.
    """
    thresholds = np.asarray(thresholds, np.float64)
    pi, gi, iou, n_p, n_g = sparse_ious(pred, gt, mask_threshold=mask_threshold)
    keep = iou > thresholds.min() if thresholds.size else np.zeros(iou.shape, bool)
    pi, gi, iou = pi[keep], gi[keep], iou[keep]
    order = np.argsort(-iou, kind="stable")
    used_p = np.zeros(n_p, bool)
    used_g = np.zeros(n_g, bool)
    matched = []
    for k in order:
        a, b = pi[k], gi[k]
        if not used_p[a] and not used_g[b]:
            used_p[a] = used_g[b] = True
            matched.append(iou[k])
    matched = np.asarray(matched, np.float64)
    tp = np.array([int(np.count_nonzero(matched > t)) for t in thresholds], np.int64)
    return MatchCounts(thresholds, tp, n_p - tp, n_g - tp, int(n_p), int(n_g))


def competition_score(
    pred: LabelsOrInstances, gt: LabelsOrInstances, *, mask_threshold: float = 0.5
) -> float:
    """The Sartorius competition score of one image, in [0, 1].

    Args:
        pred: predictions as a label image ``(H, W)`` (integer ids, 0 = background) or Instances
            (painted into a label image first, higher score winning overlaps).
        gt: ground truth as a label image or Instances (overlaps allowed, IoUs exact).
        mask_threshold: probability at or above which an Instances crop pixel is in the mask.

    Returns:
        The mean over IoU thresholds 0.50..0.95 of TP / (TP + FP + FN); 1.0 when both are empty,
        0.0 when exactly one is.

    Raises:
        ValueError: the two sides differ in image size, or a label image is not 2-D integer.
    """
    return match_counts(pred, gt, mask_threshold=mask_threshold).score


# -- whole annotation sets ------------------------------------------------------------------------------
@dataclass
class EvaluationResult:
    """Scores of a prediction set against ground truth.

    Attributes:
        score: mean competition score over the ground-truth images (missing predictions count 0).
        per_class: cell type -> mean score over that type's images (the gt image's ``cell_type``,
            else its majority class; images with neither are left out of ``per_class``).
        per_image: image id -> competition score.
        coco_ap: ``{"AP", "AP50", "AP75"}`` COCO mask AP (0..1, at maxDets 3000, all areas,
            class-agnostic unless asked otherwise); NaN where undefined; empty when COCO was skipped.
        n_images: number of ground-truth images scored.
        missing: ids of ground-truth images without predictions (scored 0).
        extra: ids of predicted images that have no ground truth (ignored).
        image_types: image id -> the cell type it was counted under (None: unknown).
    """

    score: float
    per_class: dict[str, float]
    per_image: dict[str, float]
    coco_ap: dict[str, float]
    n_images: int
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    image_types: dict[str, str | None] = field(default_factory=dict)

    @property
    def notes(self) -> list[str]:
        """One line per thing the scores alone do not say (images without predictions, predictions
        without ground truth); empty when there is nothing to say."""
        notes = []
        if self.missing:
            shown = ", ".join(self.missing[:5]) + (" ..." if len(self.missing) > 5 else "")
            notes.append(f"{len(self.missing)} image(s) without predictions (scored 0): {shown}")
        if self.extra:
            shown = ", ".join(self.extra[:5]) + (" ..." if len(self.extra) > 5 else "")
            notes.append(f"{len(self.extra)} predicted image(s) without ground truth ignored: {shown}")
        return notes

    def to_dict(self, details: bool = False) -> dict:
        """JSON-ready dict with keys ``score``, ``per_class``, ``coco_ap``, ``n_images``, ``notes``
        (the CLI's ``--json`` contract; ``notes`` is a list of lines, see :attr:`notes`); NaN becomes
        None. ``details`` adds ``per_image``, ``missing``, ``extra``."""

        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        out = {
            "score": clean(float(self.score)),
            "per_class": {k: clean(float(v)) for k, v in self.per_class.items()},
            "coco_ap": {k: clean(float(v)) for k, v in self.coco_ap.items()},
            "n_images": int(self.n_images),
            "notes": self.notes,
        }
        if details:
            out["per_image"] = {k: clean(float(v)) for k, v in self.per_image.items()}
            out["missing"] = list(self.missing)
            out["extra"] = list(self.extra)
        return out

    def format(self) -> str:
        """A plain-text table of the scores."""
        lines = [f"{'':<22}{'score':>8}{'images':>8}"]
        lines.append(f"{'competition score':<22}{self.score:>8.4f}{self.n_images:>8d}")
        counts = Counter(t for t in self.image_types.values() if t is not None)
        for name, s in self.per_class.items():
            lines.append(f"{'  ' + name:<22}{s:>8.4f}{counts.get(name, 0):>8d}")
        for key in ("AP", "AP50", "AP75"):
            if key in self.coco_ap:
                v = self.coco_ap[key]
                lines.append(f"{'COCO mask ' + key:<22}{'n/a' if math.isnan(v) else f'{v:.4f}':>8}")
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _image_type(im: ImageAnnotations, class_names: tuple[str, ...]) -> str | None:
    """The gt image's cell type: its ``cell_type``, else the majority class of its instances."""
    if im.cell_type:
        return im.cell_type
    classes = im.instances.classes
    if classes.size == 0:
        return None
    counts = np.bincount(classes, minlength=len(class_names))
    k = int(np.argmax(counts))  # ties: the first class in class_names order
    return class_names[k] if k < len(class_names) else str(k)


def evaluate(
    pred: AnnotationSet,
    gt: AnnotationSet,
    *,
    coco: bool = True,
    coco_use_cats: bool = False,
    mask_threshold: float = 0.5,
) -> EvaluationResult:
    """Score predictions against ground truth, images matched by ``image_id``.

    Args:
        pred: predictions (Instances with scores and mask probabilities; overlaps resolved by score).
        gt: ground truth (overlapping instances allowed).
        coco: also compute COCO mask AP (:func:`coco_mask_ap`: faster-coco-eval, else pycocotools,
            whose pure-Python matching loop takes seconds on a dense image).
        coco_use_cats: match COCO detections only within a category. Off by default: the competition
            metric ignores classes, and an engine's class guess would otherwise change the AP.
        mask_threshold: probability at or above which a predicted crop pixel is in the mask.

    Raises:
        ValueError: either set has no images, or an image's size differs between the two sets
            (the message names the image).
    """
    if len(gt) == 0:
        raise ValueError("the ground-truth annotation set has no images: nothing to evaluate against")
    if len(pred) == 0:
        raise ValueError("the prediction set has no images: check the predictions path/format")
    preds = pred.by_id()
    gt_ids = [im.image_id for im in gt.images]
    per_image: dict[str, float] = {}
    image_types: dict[str, str | None] = {}
    missing: list[str] = []
    for im in gt.images:
        image_types[im.image_id] = _image_type(im, tuple(gt.class_names))
        p = preds.get(im.image_id)
        if p is None:
            missing.append(im.image_id)
            per_image[im.image_id] = 0.0
            continue
        if p.instances.image_size != im.instances.image_size:
            raise ValueError(
                f"image {im.image_id!r}: predictions are for an image of size "
                f"{p.instances.image_size[0]}x{p.instances.image_size[1]} (height x width), "
                f"the ground truth for {im.instances.image_size[0]}x{im.instances.image_size[1]}"
            )
        per_image[im.image_id] = competition_score(p.instances, im.instances, mask_threshold=mask_threshold)
    gt_set = set(gt_ids)
    extra = [i for i in preds if i not in gt_set]
    groups: dict[str, list[float]] = {}
    for image_id, s in per_image.items():
        t = image_types[image_id]
        if t is not None:
            groups.setdefault(t, []).append(s)
    order = list(gt.class_names) + sorted(set(groups) - set(gt.class_names))
    per_class = {t: float(np.mean(groups[t])) for t in order if t in groups}
    coco_ap = coco_mask_ap(pred, gt, use_cats=coco_use_cats, mask_threshold=mask_threshold) if coco else {}
    return EvaluationResult(
        score=float(np.mean(list(per_image.values()))),
        per_class=per_class,
        per_image=per_image,
        coco_ap=coco_ap,
        n_images=len(per_image),
        missing=missing,
        extra=extra,
        image_types=image_types,
    )

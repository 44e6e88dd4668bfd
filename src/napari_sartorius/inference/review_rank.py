"""Which cells to review first: an estimated probability that a predicted cell is wrong.

The review queue ranks cells by :func:`review_priority`, not by the ensemble's disagreement alone.
On the annotated real cort images the disagreement (``uncertainty``, :mod:`.uncertainty`) ranked
wrong cells worse than the plain score (AUROC 0.64 against 0.74, ``benchmarks/bench_review.py``),
because it says nothing about cells that every source finds the same wrong way (debris, a fragment of a
cell, two cells as one). The priority combines three things each cell has wherever it comes from (the
dock's result, a COCO file read back, a ``--raw`` prediction):

``score``        the fused score, in [0, 1];
``uncertainty``  the sources' disagreement, in [0, 1] (:mod:`.uncertainty`);
``area``         the cell's area in pixels, relative to the *median area of the cells of its image*
                 (or of its plane in a stack): fragments and merged cells are what a person fixes most,
                 and the median makes it independent of the cell type and the magnification.

as a logistic model, the estimated probability (unitless, in [0, 1]) that the cell is wrong, i.e. that
no true cell matches it at IoU >= 0.5::

    z = log(clip(score) / (1 - clip(score)))         # score clipped to [0.001, 0.999]
    r = log(max(area, 1) / reference_area)          # reference_area: median area of the image's cells
    priority = sigmoid(b0 + b_score * z + b_unc * uncertainty + b_area * r + b_area2 * r ** 2)

with ``(b0, b_score, b_unc, b_area, b_area2) = PRIORITY_COEFFICIENTS``. The coefficients were fitted
(:func:`fit_priority`, ``python benchmarks/bench_review.py --tune``) on synthetic images only
(seeds 100-102 of each style and cort seeds 103-114), segmented by the weight-free engine under three
source configurations (5-scale TTA; flips; three engines of diameters 0.85, 1, 1.15 x typical), so the
weights do not belong to one TTA mode. The real images never took part: their figures in the README
are held out. Signs: a lower score, more disagreement, and a cell much smaller (or much larger) than
its image's median are each more likely wrong. The value ranks well; its absolute level is calibrated
only for that engine on synthetic images, so the panel flags a share of the cells by default (top
:data:`DEFAULT_TOP_PERCENT` %, at least :data:`MIN_FLAGGED`) and offers an absolute threshold beside it.

With the uncertainty undefined (one model without TTA) there is no priority either: the panel says so.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "PRIORITY_COEFFICIENTS",
    "PRIORITY_FEATURES",
    "DEFAULT_TOP_PERCENT",
    "MIN_FLAGGED",
    "priority_inputs",
    "review_priority",
    "priority_of_table",
    "flag_top",
    "flag_at",
    "fit_priority",
]

#: Names of the model's inputs, in the order of :data:`PRIORITY_COEFFICIENTS` after the intercept.
PRIORITY_FEATURES = ("logit_score", "uncertainty", "log_area", "log_area_sq")
#: ``(intercept, logit score, uncertainty, log relative area, its square)``; see the module docstring.
#: Fitted by ``benchmarks/bench_review.py --tune`` on 1,880 cells (608 wrong) of 63 synthetic image runs.
PRIORITY_COEFFICIENTS: tuple[float, float, float, float, float] = (-1.41, -0.93, 2.36, -2.97, 2.63)
#: The panel flags this share of an image's cells by default (percent, rounded up) ...
DEFAULT_TOP_PERCENT = 20.0
#: ... and at least this many (or all of them when fewer).
MIN_FLAGGED = 5

_EPS = 1e-3


def _medians_by_group(area: np.ndarray, group: np.ndarray | None) -> np.ndarray:
    """Per cell, the median area of the cells sharing its group (its plane); one median without groups."""
    ref = np.empty_like(area)
    if group is None:
        ref[:] = np.median(area) if area.size else 1.0
        return ref
    for g in np.unique(group):
        sel = group == g
        ref[sel] = np.median(area[sel])
    return ref


def priority_inputs(score, uncertainty, area, group=None) -> np.ndarray:
    """The model's inputs, float64 ``(N, 4)`` in the order of :data:`PRIORITY_FEATURES`.

    Args:
        score, uncertainty: ``(N,)`` in [0, 1] (non-finite uncertainty counts as 0: no evidence).
        area: ``(N,)`` cell areas in pixels.
        group: optional ``(N,)`` plane (or image) of each cell; areas are relative to its group's median.
    """
    s = np.clip(np.asarray(score, np.float64).reshape(-1), _EPS, 1.0 - _EPS)
    u = np.asarray(uncertainty, np.float64).reshape(-1)
    u = np.where(np.isfinite(u), np.clip(u, 0.0, 1.0), 0.0)
    a = np.maximum(np.asarray(area, np.float64).reshape(-1), 1.0)
    if not (s.size == u.size == a.size):
        raise ValueError(f"review priority: score, uncertainty and area differ in length ({s.size}, {u.size}, {a.size})")
    g = None if group is None else np.asarray(group).reshape(-1)
    if g is not None and g.size != a.size:
        raise ValueError(f"review priority: {g.size} groups for {a.size} cells")
    r = np.log(a / _medians_by_group(a, g))
    return np.stack([np.log(s / (1.0 - s)), u, r, r * r], axis=1)


def review_priority(score, uncertainty, area, group=None, coefficients: Sequence[float] = PRIORITY_COEFFICIENTS) -> np.ndarray:
    """Estimated probability that each cell is wrong (float64 ``(N,)`` in [0, 1]); the module docstring
    gives the formula. Arguments as :func:`priority_inputs`."""
    b = np.asarray(coefficients, np.float64)
    if b.shape != (1 + len(PRIORITY_FEATURES),):
        raise ValueError(f"review priority: {1 + len(PRIORITY_FEATURES)} coefficients expected, got {b.size}")
    x = priority_inputs(score, uncertainty, area, group)
    z = b[0] + x @ b[1:]
    return 1.0 / (1.0 + np.exp(-z))


def priority_of_table(table: Mapping, area=None) -> np.ndarray | None:
    """:func:`review_priority` of a features table (dict of columns or DataFrame), or None when it has
    no ``uncertainty`` column (undefined: one model without TTA, labels made by hand or by others).

    A missing ``score`` counts as 0.5 (no evidence); ``area`` (``(N,)`` px) overrides the table's
    ``area`` column (e.g. counted on the layer's pixels); with neither, every cell has the median area.
    A ``plane`` column makes areas relative to each plane's median.
    """
    cols = set(table.keys())
    if "uncertainty" not in cols:
        return None
    u = np.asarray(table["uncertainty"], np.float64).reshape(-1)
    n = u.size
    s = np.asarray(table["score"], np.float64).reshape(-1) if "score" in cols else np.full(n, 0.5)
    if area is None:
        area = np.asarray(table["area"], np.float64) if "area" in cols else np.ones(n)
    group = np.asarray(table["plane"]) if "plane" in cols else None
    return review_priority(s, u, area, group)


def flag_top(priority, percent: float = DEFAULT_TOP_PERCENT, minimum: int = MIN_FLAGGED) -> np.ndarray:
    """bool ``(N,)``: the ``ceil(percent % of N)`` cells of highest priority, at least ``minimum`` (or all
    ``N`` when fewer). Ties at the boundary go to the earlier cell (the lower row), so the set never
    depends on a sort's tie order."""
    p = np.asarray(priority, np.float64).reshape(-1)
    if not 0.0 <= float(percent) <= 100.0:
        raise ValueError(f"flag top: percent must be in 0..100, got {percent}")
    n = p.size
    k = min(n, max(int(math.ceil(n * float(percent) / 100.0 - 1e-9)), int(minimum)))
    out = np.zeros(n, bool)
    if k:
        order = np.lexsort((np.arange(n), -np.where(np.isfinite(p), p, -np.inf)))
        out[order[:k]] = True
    return out


def flag_at(priority, threshold: float) -> np.ndarray:
    """bool ``(N,)``: cells whose priority is at least ``threshold`` (non-finite never)."""
    p = np.asarray(priority, np.float64).reshape(-1)
    return np.isfinite(p) & (p >= float(threshold))


def fit_priority(x: np.ndarray, wrong: np.ndarray, l2: float = 1e-2, iterations: int = 50) -> tuple[float, ...]:
    """Logistic regression (Newton's method, L2 penalty ``l2`` on the slopes) of ``wrong`` on ``x``.

    Args:
        x: float ``(N, F)`` inputs (:func:`priority_inputs` gives them).
        wrong: bool ``(N,)``: the cell is wrong (no true cell at IoU >= 0.5).

    Returns:
        ``(intercept, slope_1, ..., slope_F)`` as floats, rounded to 2 decimals (the stored precision).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(wrong, np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.size or y.size == 0:
        raise ValueError(f"fit priority: x must be (N, F) with N = {y.size} labels, got {x.shape}")
    if y.min() == y.max():
        raise ValueError("fit priority: need both right and wrong cells to fit")
    xb = np.c_[np.ones(len(x)), x]
    pen = l2 * np.diag(np.r_[0.0, np.ones(x.shape[1])])
    b = np.zeros(xb.shape[1])
    for _ in range(int(iterations)):
        p = 1.0 / (1.0 + np.exp(-(xb @ b)))
        grad = xb.T @ (p - y) + pen @ b
        hess = (xb * (p * (1.0 - p))[:, None]).T @ xb + pen
        step = np.linalg.solve(hess, grad)
        b -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return tuple(round(float(v), 2) for v in b)

"""Fusion of instance predictions from several sources (models x TTA variants) into one set.

:func:`fuse_instances` takes a list of :class:`Instances` of the same image, one per *source* (one
model run on one TTA variant, already mapped back to the image), with one weight per source, and
returns one :class:`Instances`. Methods (``METHODS``):

``"wbf"``       weighted boxes fusion (Solovyev et al. 2021), ``ensemble_boxes.weighted_boxes_fusion``;
``"nmw"``       non-maximum weighted, ``ensemble_boxes.non_maximum_weighted``;
``"nms"``       greedy non-maximum suppression, ``ensemble_boxes.nms``;
``"soft_nms"``  Soft-NMS (Bodla et al. 2017; gaussian or linear decay), ``ensemble_boxes.soft_nms``;
``"mask_nms"``  greedy NMS on the IoU of the binarised masks, computed on the crops.

The four box methods follow the algorithms of the ``ensemble-boxes`` package (version 1.0.9; the tests
compare boxes and scores with the package on random inputs), re-implemented here because the package
returns fused boxes but not which inputs went into each, and the masks of those members must be
averaged; its per-box Python loops are also too slow for 12 x 800 candidates. Matching rules are the
package's: per class; inputs visited in decreasing ``score x weight``; a box joins a cluster when its
IoU with the cluster's (current, for WBF) box is strictly greater than ``iou_thr``; boxes with
``score < skip_box_thr`` or zero area are dropped first. IoU is computed in pixels, which equals the
package's IoU on boxes normalised by the image size (IoU is invariant to scaling each axis); boxes
are clipped to the image as the package clips to [0, 1]. Ties in score are visited in input order
(the package's order for ties is that of an unstable sort). Deviations, on purpose:

- NMS and Soft-NMS scale scores by ``weight / max(weights)`` instead of the package's
  ``weight / sum(weights)``, so that with equal weights the fused scores stay on the model's score
  scale and the per-cell-type score thresholds still apply. The kept set is unchanged by this
  constant factor (except Soft-NMS's ``soft_nms_thr`` cut-off, which then acts on larger numbers).
- Soft-NMS returns the decayed scores (the point of Soft-NMS); the package returns the original ones.

Members and masks. Each fused instance has *members*: for WBF and NMW the inputs of its cluster, for
NMS and mask NMS the kept input plus the inputs it suppressed, for Soft-NMS the kept input alone
(Soft-NMS suppresses nothing outright). With ``average_masks=True`` the fused mask is the weighted
mean of the members' crops pasted into the union of their windows, member weight
``score x source weight``; where a member's crop does not reach, it counts as 0. The mean is over the
members only, not over all sources: a cell that only some sources (models or TTA variants) found keeps
its full mask probability, and the lack of support shows in the fused *score* instead (WBF's
``conf_type`` scaling: with ``"avg"`` a cluster's mean score is multiplied by
``min(n_sources, n_members) / sum(weights)`` with raw weights, i.e. by the fraction of sources that found
it when weights are 1). Every TTA variant is one source and carries its model's weight, so a model run
with 4 variants has up to 4 members per cell, and a model's total say is ``weight x n_variants``; when
all models use the same TTA mode this is proportional to the model weights.

Uncertainty. With two sources or more, every fused instance gets the per-cell agreement columns of
:mod:`napari_sartorius.inference.uncertainty` in ``Instances.columns`` (``uncertainty`` in [0, 1],
``found``, ``mask_iou``, ``score_spread``), computed from its members' masks against the fused mask.
For Soft-NMS, whose clusters have one member, the members for this purpose are the inputs whose box
IoU with the kept one is above ``iou_thr``, kept or not (:func:`~.fusion_methods.support_of_kept`).

Layout: :func:`fuse_instances` checks the arguments, flattens the sources into one candidate table
(:class:`_Candidates`) and dispatches to one function per method (``_fuse_<method>``, table
``_FUSERS``); each clusters one class's candidates with a routine of
:mod:`~napari_sartorius.inference.fusion_methods`; :func:`_assemble` averages the member masks, adds
the uncertainty and orders the result.

Cost: candidate pairs come from one sort-and-sweep over x per class (no all-pairs matrix); NMS, NMW and
Soft-NMS then work on those sparse pairs; WBF's clustering is inherently sequential (the cluster boxes
move as members join): a loop over the inputs, compiled by numba (:mod:`.fusion_kernels`, Python where
numba is missing), that compares each only with the clusters of the grid buckets its box touches
(:func:`~.fusion_methods.cluster_wbf`). The members' masks of all clusters
are averaged at once (:func:`~.crop_table.average_groups`: one ``np.repeat`` maps every member pixel
onto its cluster's window, ``np.add.at`` sums them in the order and float32 arithmetic of a per-cluster
loop, so the masks are those of such a loop bit for bit), and the uncertainty's pixel counts are made on
the way. 12,000 candidates (3 models x 4 flips x 1000 detections) fuse in ~40 ms of one CPU core
(``benchmarks/bench_postforward.py``; ~90 ms with the clustering loop in Python).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..instances import Instances
from .fusion_methods import (
    cluster_mask_nms,
    cluster_nms,
    cluster_nmw,
    cluster_soft_nms,
    cluster_wbf,
    support_of_kept,
)
from .crop_table import CropTable, average_groups, binarised
from .pairs import box_iou_pairs, mask_iou
from .uncertainty import ClusterAgreement

__all__ = ["METHODS", "CONF_TYPES", "fuse_instances", "box_iou_pairs", "mask_iou"]

from .settings import FUSION_METHODS as METHODS  # noqa: E402 - the one list (torch-free)
CONF_TYPES: tuple[str, ...] = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


@dataclass
class _Candidates:
    """All sources' candidates of one image, flattened (M candidates, S sources).

    ``boxes`` float64 (M, 4) xyxy clipped to the image; ``scores`` float64 (M,); ``src`` int (M,)
    source index; ``wt`` float64 (M,) source weight of each candidate; ``key`` (M,) visiting key
    (``score x weight``, weights scaled by their maximum for the NMS-type methods); ``rows`` the
    candidates kept for fusion (score >= skip_box_thr, non-empty box); ``shapes`` int64 (M, 2) crop shapes.
    """

    size: tuple[int, int]
    masks: list
    origins: list
    origins_arr: np.ndarray
    classes: np.ndarray
    src: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    wt: np.ndarray
    key: np.ndarray
    rows: np.ndarray
    source_weights: np.ndarray
    shapes: np.ndarray


def _flatten(sources: Sequence[Instances], w_src: np.ndarray, method: str, skip_box_thr: float) -> _Candidates:
    # flat views of all candidates (not Instances.cat: that would re-validate every crop)
    size = sources[0].image_size
    all_masks = [m for s in sources for m in s.masks]
    all_origins = np.concatenate([s.mask_origins for s in sources]).reshape(-1, 2)
    all_classes = np.concatenate([s.classes for s in sources])
    src = np.repeat(np.arange(len(sources)), [len(s) for s in sources])
    h, w = size
    boxes = np.concatenate([s.boxes for s in sources]).astype(np.float64).reshape(-1, 4)
    boxes = np.stack(
        [
            np.minimum(boxes[:, 0], boxes[:, 2]),
            np.minimum(boxes[:, 1], boxes[:, 3]),
            np.maximum(boxes[:, 0], boxes[:, 2]),
            np.maximum(boxes[:, 1], boxes[:, 3]),
        ],
        axis=1,
    )
    boxes = np.clip(boxes, 0.0, np.array([w, h, w, h], np.float64))
    scores = np.concatenate([s.scores for s in sources]).astype(np.float64)
    valid = (scores >= skip_box_thr) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    wt = w_src[src]
    key = scores * (wt if method == "wbf" else wt / w_src.max())
    return _Candidates(
        size, all_masks, [tuple(o) for o in all_origins.tolist()], all_origins, all_classes, src,
        boxes, scores, wt, key, np.flatnonzero(valid), w_src,
        np.array([m.shape for m in all_masks], np.int64).reshape(-1, 2),
    )


# -- one function per method: (candidates, rows of one class in visiting order, options) ->
#    (assign, fused boxes, fused scores, representatives, support); support is ``assign`` itself, or
#    for Soft-NMS (cluster, position) pairs of the inputs that count for the uncertainty -------------
def _fuse_wbf(c: _Candidates, r: np.ndarray, o: dict):
    assign, fb, fs, reps = cluster_wbf(
        c.boxes[r], c.key[r], c.wt[r], c.src[r], o["iou_thr"], o["conf_type"], c.source_weights, o["allows_overflow"]
    )
    return assign, fb, fs, reps, assign


def _fuse_nmw(c: _Candidates, r: np.ndarray, o: dict):
    assign, fb, fs, reps = cluster_nmw(c.boxes[r], c.key[r], o["iou_thr"])
    return assign, fb, fs, reps, assign


def _fuse_nms(c: _Candidates, r: np.ndarray, o: dict):
    assign, fb, fs, reps = cluster_nms(c.boxes[r], c.key[r], o["iou_thr"])
    return assign, fb, fs, reps, assign


def _fuse_soft_nms(c: _Candidates, r: np.ndarray, o: dict):
    b = c.boxes[r]
    assign, fb, fs, reps = cluster_soft_nms(
        b, c.key[r], o["iou_thr"], o["sigma"], o["soft_nms_thr"], o["soft_nms_method"] == "linear"
    )
    support = support_of_kept(b, assign, o["iou_thr"]) if o["uncertainty"] else assign
    return assign, fb, fs, reps, support


def _fuse_mask_nms(c: _Candidates, r: np.ndarray, o: dict):
    table, bits, areas, windows = o["_mask_nms_crops"]
    assign, reps = cluster_mask_nms(r, table, bits, areas, windows[r], c.key[r], o["iou_thr"])
    return assign, c.boxes[r][reps], c.key[r][reps], reps, assign


def _mask_nms_crops(table: CropTable, mask_threshold: float):
    """The candidates' crops (``table``) binarised at ``mask_threshold``: ``(table, bits, areas, windows)``
    with bool pixels and int64 ``(M,)`` pixels set per crop (:func:`~.crop_table.binarised`), and float64
    ``(M, 4)`` crop windows as xyxy boxes."""
    bits, areas = binarised(table, mask_threshold)
    windows = np.stack([table.ox, table.oy, table.ox + table.ws, table.oy + table.hs], 1).astype(np.float64)
    return table, bits, areas, windows


_FUSERS: dict[str, Callable] = {
    "wbf": _fuse_wbf,
    "nmw": _fuse_nmw,
    "nms": _fuse_nms,
    "soft_nms": _fuse_soft_nms,
    "mask_nms": _fuse_mask_nms,
}


# -- masks -----------------------------------------------------------------------------------------
def _average_clusters(c: _Candidates, member_rows: np.ndarray, member_w: np.ndarray, bounds: np.ndarray,
                      threshold: float | None):
    """Each cluster's mask: the weighted mean of its members' crops over the union of their windows
    (a member counts as 0 where its crop does not reach), clipped to [0, 1]; a cluster of one member
    keeps that member's crop itself. Returns ``(crops, origins, means)``: lists, one per cluster, and
    the :class:`~.crop_table.GroupMeans` (with ``threshold``: the pixel counts of the uncertainty, in
    which a one-member cluster's mask is its member's crop).

    ``member_rows`` index the candidates, grouped by cluster (cluster ``k`` is
    ``member_rows[bounds[k] : bounds[k + 1]]``); ``member_w`` their weights (``score x source weight``).
    All clusters are averaged at once (:func:`~.crop_table.average_groups`, float64 sums; equal to the
    per-cluster float32 loop it replaces within 1e-6)."""
    counts = np.diff(bounds)
    first = member_rows[bounds[:-1]].tolist()
    crops = [c.masks[m] for m in first]
    origins = [c.origins[m] for m in first]
    means = average_groups(c.masks, c.origins_arr, member_rows, bounds, member_w, threshold, shapes=c.shapes)
    multi = np.flatnonzero(counts > 1)
    for k, (s, (y0, x0, h, w)) in zip(multi.tolist(), zip(means.starts[multi].tolist(), means.windows[multi].tolist())):
        crops[k] = means.flat[s : s + h * w].reshape(h, w)
        origins[k] = (y0, x0)
    if threshold is not None:  # a one-member cluster's mask is its member's crop, not a rescaled copy
        single = np.flatnonzero(counts == 1)
        means.group_area[single] = means.member_area[bounds[single]]
        means.inter[bounds[single]] = means.member_area[bounds[single]]
    return crops, origins, means


def _groups(assign: np.ndarray, n_clusters: int):
    """Visiting positions of each cluster's members, grouped: (positions, bounds list)."""
    ok = assign >= 0
    pos = np.flatnonzero(ok)
    pos = pos[np.argsort(assign[pos], kind="stable")]
    bounds = np.searchsorted(assign[pos], np.arange(n_clusters + 1))
    return pos, bounds.tolist()


def _assemble(c: _Candidates, cls, r, result, average_masks: bool, agreement: ClusterAgreement | None, out: dict):
    """Masks (and uncertainty) of one class's clusters, appended to ``out``."""
    assign, fb, fs, reps, support = result
    pos, bounds = _groups(assign, len(reps))
    top_rows = r[reps].tolist()
    if agreement is not None and support is not assign:
        cl, ps = support
        o = np.argsort(cl, kind="stable")
        support_rows = r[ps[o]].tolist()
        sbounds = np.searchsorted(cl[o], np.arange(len(reps) + 1)).tolist()
    else:
        support_rows, sbounds = r[pos].tolist(), bounds
    counted = agreement is not None and average_masks and support is assign
    if average_masks and len(reps):
        rows = r[pos]
        crops, origins, means = _average_clusters(
            c, rows, (c.scores[r] * c.wt[r])[pos], np.asarray(bounds), agreement.thr if counted else None
        )
        if counted:
            agreement.add_counted(rows, np.diff(bounds), means.member_area, means.inter, means.group_area)
    else:
        crops, origins = [c.masks[t] for t in top_rows], [c.origins[t] for t in top_rows]
    out["masks"].extend(crops)
    out["origins"].extend(origins)
    if agreement is not None and not counted:
        for k, (crop, origin) in enumerate(zip(crops, origins)):
            agreement.add(crop, origin, support_rows[sbounds[k] : sbounds[k + 1]])
    out["boxes"].append(fb)
    out["scores"].append(fs)
    out["classes"].append(np.full(len(reps), cls, np.int64))


# -- public ----------------------------------------------------------------------------------------
def fuse_instances(
    sources: Sequence[Instances],
    weights: Sequence[float] | None = None,
    method: str = "wbf",
    *,
    iou_thr: float = 0.5,
    skip_box_thr: float = 0.0,
    conf_type: str = "avg",
    allows_overflow: bool = False,
    soft_nms_method: str = "gaussian",
    sigma: float = 0.5,
    soft_nms_thr: float = 0.001,
    mask_threshold: float = 0.5,
    average_masks: bool = True,
    uncertainty: bool = True,
) -> Instances:
    """Fuse the instances of several sources of one image into one :class:`Instances`.

    Args:
        sources: predictions of one image, one Instances per source (model x TTA variant), all with the
            same ``image_size``; classes index the same class names in every source.
        weights: one positive weight per source (default 1 each); see the module docstring.
        method: one of ``METHODS``.
        iou_thr: box IoU (mask IoU for ``"mask_nms"``) above which two instances are the same cell;
            for ``"soft_nms"`` with linear decay, the IoU above which scores decay.
        skip_box_thr: inputs with a raw score below this are dropped before fusion.
        conf_type: how WBF scores a cluster, one of ``CONF_TYPES`` (the package's meanings).
        allows_overflow: WBF with ``conf_type="avg"``: let scores exceed 1 when a cluster has more
            members than there are sources.
        soft_nms_method: ``"gaussian"`` (score x exp(-IoU^2 / sigma)) or ``"linear"``.
        sigma, soft_nms_thr: Soft-NMS's gaussian width and the decayed score an input must exceed to stay.
        mask_threshold: probability at which masks are binarised for ``"mask_nms"`` and the uncertainty.
        average_masks: average the members' masks (weighted); else keep the top member's crop.
        uncertainty: add the per-cell agreement columns (with two sources or more; see
            :mod:`~napari_sartorius.inference.uncertainty`).

    Returns:
        Instances of the image, ordered by decreasing fused score; float32 boxes (clipped to the image),
        scores, int64 classes (kept per class: instances of different classes never fuse), crops, and
        with two sources or more ``columns`` ``uncertainty``, ``found``, ``mask_iou``, ``score_spread``
        (float32 ``(N,)`` each, in [0, 1]).
    """
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}: use one of {', '.join(METHODS)}")
    if conf_type not in CONF_TYPES:
        raise ValueError(f"unknown conf_type {conf_type!r}: use one of {', '.join(CONF_TYPES)}")
    if soft_nms_method not in ("gaussian", "linear"):
        raise ValueError(f"unknown soft_nms_method {soft_nms_method!r}: use 'gaussian' or 'linear'")
    sources = list(sources)
    if not sources:
        raise ValueError("fuse_instances needs at least one source")
    size = sources[0].image_size
    if any(s.image_size != size for s in sources):
        sizes = sorted({s.image_size for s in sources})
        raise ValueError(f"cannot fuse predictions of different image sizes {sizes}")
    w_src = np.ones(len(sources)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if len(w_src) != len(sources):
        raise ValueError(f"{len(w_src)} weights for {len(sources)} sources")
    if not np.all(np.isfinite(w_src)) or np.any(w_src <= 0):
        raise ValueError(f"source weights must be positive numbers, got {w_src.tolist()}")

    c = _flatten(sources, w_src, method, skip_box_thr)
    with_uncertainty = bool(uncertainty) and len(sources) >= 2
    options = {
        "iou_thr": iou_thr,
        "conf_type": conf_type,
        "allows_overflow": allows_overflow,
        "sigma": sigma,
        "soft_nms_thr": soft_nms_thr,
        "soft_nms_method": soft_nms_method,
        "uncertainty": with_uncertainty,
    }
    # mask NMS and the uncertainty read the same flat table of every candidate's crop: built once
    table = CropTable.from_crops(c.masks, c.origins_arr) if method == "mask_nms" else None
    if table is not None:
        options["_mask_nms_crops"] = _mask_nms_crops(table, mask_threshold)
    agreement = (
        ClusterAgreement(c.masks, c.origins, c.src, c.scores, w_src, mask_threshold, table=table)
        if with_uncertainty
        else None
    )
    fuse_class = _FUSERS[method]
    out: dict[str, list] = {"boxes": [], "scores": [], "classes": [], "masks": [], "origins": []}
    rows = c.rows
    for cls in np.unique(c.classes[rows]):
        r = rows[c.classes[rows] == cls]
        r = r[np.argsort(-c.key[r], kind="stable")]
        _assemble(c, cls, r, fuse_class(c, r, options), average_masks, agreement, out)

    if not out["masks"]:
        return Instances(size, columns=agreement.columns() if agreement is not None else {})
    fused_scores = np.concatenate(out["scores"])
    order = np.argsort(-fused_scores, kind="stable")
    return Instances(
        image_size=size,
        boxes=np.concatenate(out["boxes"])[order].astype(np.float32),
        scores=fused_scores[order].astype(np.float32),
        classes=np.concatenate(out["classes"])[order],
        masks=[out["masks"][k] for k in order],
        mask_origins=np.asarray(out["origins"], np.int64).reshape(-1, 2)[order],
        columns=agreement.columns(order) if agreement is not None else {},
    )

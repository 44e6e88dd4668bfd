"""COCO mask AP (AP, AP50, AP75) of predictions against ground truth, beside the competition metric.

Two implementations of COCO's ``COCOeval`` give the same numbers: ``faster-coco-eval`` (C++,
several times faster on dense images; a dependency) and ``pycocotools`` (the reference, used when
the former is missing). The tests check that they agree on the same inputs;
``benchmarks/bench_coco_eval.py`` times them.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np

from .annotations import AnnotationSet

__all__ = ["COCO_MAX_DETS", "COCO_BACKENDS", "coco_mask_ap"]

#: COCOeval ``maxDets``; the AP is reported at the largest (an SH-SY5Y image has up to ~800 cells,
#: an unfiltered prediction a few thousand; COCO's default 100 would silently drop most of them).
COCO_MAX_DETS = (100, 1000, 3000)

COCO_BACKENDS = ("auto", "faster", "pycocotools")


def _quiet(*_args, **_kwargs) -> None:
    """faster-coco-eval's print function: silent, as pycocotools' stdout is."""


def _coco_backend(name: str):
    """``(COCO, COCOeval)`` classes of the backend ``name`` (see :func:`coco_mask_ap`)."""
    if name not in COCO_BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {name!r}: use one of {', '.join(COCO_BACKENDS)}")
    if name in ("auto", "faster"):
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError:
            if name == "faster":
                raise ImportError("backend 'faster' needs the faster-coco-eval package: pip install faster-coco-eval") from None
        else:
            return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def coco_mask_ap(
    pred: AnnotationSet,
    gt: AnnotationSet,
    *,
    use_cats: bool = False,
    max_dets=COCO_MAX_DETS,
    mask_threshold: float = 0.5,
    backend: str = "auto",
) -> dict[str, float]:
    """COCO mask AP, AP50, AP75 (0..1) of ``pred`` against ``gt`` with COCOeval.

    ``backend``: ``"faster"`` (the ``faster-coco-eval`` package: the same algorithm in C++, several
    times faster on dense images, checked against pycocotools in the tests), ``"pycocotools"``, or
    ``"auto"`` (faster-coco-eval when installed, else pycocotools).

    Predictions are evaluated as they are (COCO allows overlapping detections), ground-truth
    instances and predictions are binarised at ``mask_threshold``, images matched by ``image_id``
    (the COCO encoding is :mod:`napari_sartorius.io.coco`'s). Only the ground-truth images are
    evaluated; ``maxDets`` is raised to ``max_dets`` and the values
    are read at the largest, over all object areas. No predictions at all give 0.0; no ground-truth
    objects give NaN (undefined). pycocotools' console output is silenced.
    """
    COCO, COCOeval = _coco_backend(backend)
    from .io.coco import annotation_set_to_coco, annotation_set_to_results

    image_ids = {im.image_id: k + 1 for k, im in enumerate(gt.images)}
    gt_dict = annotation_set_to_coco(gt, threshold=mask_threshold, image_ids=image_ids)
    gt_cats = {c["name"]: int(c["id"]) for c in gt_dict["categories"]}
    pred_sub = AnnotationSet(
        images=[im for im in pred.images if im.image_id in image_ids],
        class_names=pred.class_names,
        category_ids=pred.category_ids,
    )
    results = (
        annotation_set_to_results(
            pred_sub, image_ids, threshold=mask_threshold, category_ids=gt_cats, with_file_name=False
        )
        if len(pred_sub)
        else []
    )
    if not gt_dict.get("annotations"):
        return {"AP": math.nan, "AP50": math.nan, "AP75": math.nan}
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        quiet = {"print_function": _quiet} if COCOeval.__module__.startswith("faster_coco_eval") else {}
        ev = COCOeval(coco_gt, coco_dt, iouType="segm", **quiet)
        ev.params.imgIds = sorted(image_ids.values())
        ev.params.maxDets = list(max_dets)
        ev.params.areaRng = [[0, 1e10]]  # only "all": we report no per-size AP, saves 3/4 of the work
        ev.params.areaRngLbl = ["all"]
        ev.params.useCats = int(bool(use_cats))
        ev.evaluate()
        ev.accumulate()
    # precision: [T thresholds, R recall points, K categories, A area ranges, M maxDets]
    prec = ev.eval["precision"][:, :, :, 0, -1]

    def ap(p):
        p = p[p > -1]
        return float(np.mean(p)) if p.size else math.nan

    t = np.asarray(ev.params.iouThrs)
    return {
        "AP": ap(prec),
        "AP50": ap(prec[np.isclose(t, 0.5)]),
        "AP75": ap(prec[np.isclose(t, 0.75)]),
    }

"""Fixtures shared by the whole suite.

- ``real_data``: the folder of real sample images beside the checkout (``<repo>/../shared/data/real``:
  coco.json, train.csv, images/), found relative to this file, never by a machine path; the test
  is skipped when it is absent.
- ``same_detections``: compares two sets of detections without relying on their order. Detections
  of random-weight models have near-tied scores (e.g. 0.9535879 vs 0.9535851): two computations that
  agree to float noise can list them in another order, and non-maximum suppression or a top-k cut
  can keep the other one of a tied pair. Rows are matched one-to-one instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO / ".." / "shared" / "data" / "real"


@pytest.fixture
def real_data() -> Path:
    """``<repo>/../shared/data/real`` with its coco.json; skips the test when absent."""
    if not (REAL_DATA / "coco.json").is_file():
        pytest.skip(f"real sample data absent (looked for {REAL_DATA.resolve()}/coco.json)")
    return REAL_DATA.resolve()


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def assert_same_detections(boxes_a, scores_a, boxes_b, scores_b, *, labels_a=None, labels_b=None,
                           box_atol: float, score_atol: float, max_tie_breaks: int = 2, nms_iou: float = 0.5) -> list[tuple[int, int]]:
    """Assert that detections a and b are the same set, up to tolerances and the order of ties.

    boxes: (N, 4) xyxy pixels; scores: (N,); labels (optional): (N,) ints that must agree.
    Rows are paired one-to-one (Hungarian matching) where every box coordinate differs by at most
    ``box_atol`` px and the score by at most ``score_atol``. A row left unpaired is accepted only as
    a tie decided the other way: either it pairs with a left-over row of the other set whose score is
    within ``score_atol`` and whose box overlaps it by IoU > ``nms_iou`` (NMS kept the other one of
    two overlapping near-tied boxes), or its score is
    within ``score_atol`` of the other set's lowest score (a top-k cut between tied scores); at most
    ``max_tie_breaks`` such rows per set. Returns the (row in a, row in b) pairs.
    """
    ba, sa, bb, sb = _numpy(boxes_a).reshape(-1, 4), _numpy(scores_a), _numpy(boxes_b).reshape(-1, 4), _numpy(scores_b)
    assert len(ba) == len(sa) and len(bb) == len(sb)
    cost = np.maximum(
        np.abs(ba[:, None, :] - bb[None, :, :]).max(-1) / box_atol,
        np.abs(sa[:, None] - sb[None, :]) / score_atol,
    )
    la, lb = np.zeros(len(sa), np.int64), np.zeros(len(sb), np.int64)
    if labels_a is not None and labels_b is not None:
        la, lb = _numpy(labels_a).astype(np.int64), _numpy(labels_b).astype(np.int64)
        cost[la[:, None] != lb[None, :]] = np.inf
    compatible = cost <= 1.0
    rows, cols = linear_sum_assignment(np.where(compatible, cost, 1e6)) if cost.size else ([], [])
    pairs = [(int(r), int(c)) for r, c in zip(rows, cols) if compatible[r, c]]
    left_a = sorted(set(range(len(sa))) - {r for r, _ in pairs})
    left_b = sorted(set(range(len(sb))) - {c for _, c in pairs})
    assert len(left_a) <= max_tie_breaks and len(left_b) <= max_tie_breaks, (
        f"{len(left_a)} of {len(sa)} detections of a and {len(left_b)} of {len(sb)} of b have no match "
        f"within {box_atol} px / score {score_atol}"
    )
    # swapped NMS survivors: left-overs that overlap as NMS would suppress and have tied scores
    for i in list(left_a):
        partner = next((j for j in left_b if la[i] == lb[j] and abs(sa[i] - sb[j]) <= score_atol
                        and _iou(ba[i], bb[j]) > nms_iou), None)
        if partner is not None:
            left_a.remove(i)
            left_b.remove(partner)
    for left, s_own, s_other in ((left_a, sa, sb), (left_b, sb, sa)):
        floor = s_other.min() if len(s_other) else np.inf
        for i in left:
            assert abs(s_own[i] - floor) <= score_atol, (
                f"detection {i} (score {s_own[i]:.7f}, box {np.round((ba if s_own is sa else bb)[i], 2).tolist()}) "
                f"has no counterpart and is no tie at the other set's lowest score {floor:.7f}"
            )
    return pairs


@pytest.fixture
def same_detections():
    """The function :func:`assert_same_detections` (fixtures are how test modules share helpers here)."""
    return assert_same_detections

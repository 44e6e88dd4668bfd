"""The suite's shared helpers (tests/conftest.py) decide what they claim to decide."""

import numpy as np
import pytest

BOXES = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 5, 60, 25], [5, 40, 15, 60]], np.float64)
SCORES = np.array([0.9535879, 0.9535851, 0.7, 0.2])


def test_order_of_near_ties_does_not_matter(same_detections):
    order = [1, 0, 3, 2]
    pairs = same_detections(BOXES, SCORES, BOXES[order] + 0.01, SCORES[order], box_atol=0.05, score_atol=1e-4)
    assert sorted(pairs) == [(0, 1), (1, 0), (2, 3), (3, 2)]


def test_a_different_box_or_score_or_label_is_caught(same_detections):
    moved = BOXES.copy()
    moved[2] += 5
    with pytest.raises(AssertionError, match="no counterpart"):
        same_detections(BOXES, SCORES, moved, SCORES, box_atol=0.05, score_atol=1e-4)
    with pytest.raises(AssertionError, match="no counterpart"):
        same_detections(BOXES, SCORES, BOXES, SCORES + [0, 0, 0.1, 0], box_atol=0.05, score_atol=1e-4)
    with pytest.raises(AssertionError):
        same_detections(BOXES, SCORES, BOXES, SCORES, labels_a=[1, 1, 1, 1], labels_b=[1, 1, 2, 1],
                        box_atol=0.05, score_atol=1e-4)
    with pytest.raises(AssertionError, match="have no match"):
        same_detections(BOXES, SCORES, BOXES + 3, SCORES, box_atol=0.05, score_atol=1e-4)


def test_a_tie_kept_the_other_way_is_accepted(same_detections):
    # NMS kept box 1 in a and an overlapping box with a tied score in b; a top-k cut dropped a tie
    b = BOXES.copy()
    b[1] = [21, 21, 31, 31]  # IoU 0.68 with a's box 1
    same_detections(BOXES, SCORES, b, SCORES + [0, 2e-6, 0, 0], box_atol=0.05, score_atol=1e-4)
    tied_at_cut = np.array([0.9, 0.8, 0.7, 0.70000001])
    same_detections(BOXES, tied_at_cut, BOXES[:3], tied_at_cut[:3], box_atol=0.05, score_atol=1e-4)
    with pytest.raises(AssertionError, match="no tie"):  # a missing row far above the cut is no tie
        same_detections(BOXES, tied_at_cut, BOXES[[0, 2, 3]], tied_at_cut[[0, 2, 3]], box_atol=0.05, score_atol=1e-4)

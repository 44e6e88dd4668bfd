"""The review priority (inference/review_rank.py): formula, directions, per-plane areas, flags, the fit."""

import math

import numpy as np
import pytest

from napari_sartorius.inference.review_rank import (
    MIN_FLAGGED,
    PRIORITY_COEFFICIENTS,
    fit_priority,
    flag_at,
    flag_top,
    priority_inputs,
    priority_of_table,
    review_priority,
)


def test_the_formula_of_the_docstring():
    b0, bs, bu, ba, ba2 = PRIORITY_COEFFICIENTS
    score, unc, areas = 0.7, 0.3, np.array([50.0, 200.0, 200.0])  # median 200: the first is a quarter
    r = math.log(50.0 / 200.0)
    z = b0 + bs * math.log(0.7 / 0.3) + bu * 0.3 + ba * r + ba2 * r * r
    p = review_priority([score] * 3, [unc] * 3, areas)
    assert p[0] == pytest.approx(1.0 / (1.0 + math.exp(-z)), abs=1e-12)
    z_median = b0 + bs * math.log(0.7 / 0.3) + bu * 0.3
    assert p[1] == pytest.approx(1.0 / (1.0 + math.exp(-z_median)), abs=1e-12)


def test_directions_lower_score_more_disagreement_and_fragments_rank_first():
    area = np.full(3, 150.0)
    by_score = review_priority([0.9, 0.6, 0.3], [0.1] * 3, area)
    assert by_score[0] < by_score[1] < by_score[2]
    by_unc = review_priority([0.7] * 3, [0.0, 0.2, 0.5], area)
    assert by_unc[0] < by_unc[1] < by_unc[2]
    # among same-score, same-uncertainty cells a fragment (a fifth of the median) is the most suspicious
    sizes = review_priority([0.7] * 5, [0.1] * 5, [40.0, 200.0, 200.0, 210.0, 220.0])
    assert sizes[0] == sizes.max() and sizes[0] > sizes[2] + 0.1
    assert np.all((sizes >= 0) & (sizes <= 1))


def test_areas_are_relative_to_their_own_plane():
    # plane 0 holds small cells, plane 1 large ones: a 60 px cell is ordinary in plane 0, a fragment in 1
    area = np.array([60.0, 60.0, 60.0, 60.0, 240.0, 240.0])
    group = np.array([0, 0, 0, 1, 1, 1])
    x = priority_inputs([0.7] * 6, [0.1] * 6, area, group)
    np.testing.assert_allclose(x[:3, 2], 0.0)
    assert x[3, 2] == pytest.approx(math.log(60.0 / 240.0))
    p = review_priority([0.7] * 6, [0.1] * 6, area, group)
    assert p[3] > p[0]


def test_bad_input_raises_with_what_differs():
    with pytest.raises(ValueError, match="differ in length"):
        review_priority([0.5, 0.5], [0.1], [100, 100])
    with pytest.raises(ValueError, match="groups"):
        review_priority([0.5], [0.1], [100], group=[0, 1])
    with pytest.raises(ValueError, match="coefficients"):
        review_priority([0.5], [0.1], [100], coefficients=(1.0, 2.0))


def test_priority_of_a_table():
    assert priority_of_table({"label": [1, 2], "score": [0.5, 0.6]}) is None  # no uncertainty: undefined
    table = {"label": [1, 2, 3], "score": [0.9, 0.5, 0.5], "uncertainty": [0.1, 0.1, np.nan], "area": [100, 100, 100]}
    p = priority_of_table(table)
    assert p.shape == (3,) and np.all(np.isfinite(p))
    assert p[1] > p[0]
    assert p[2] < p[1], "a missing uncertainty counts as no disagreement"
    no_score = priority_of_table({"uncertainty": [0.2, 0.2], "area": [100, 100]})
    np.testing.assert_allclose(no_score, review_priority([0.5, 0.5], [0.2, 0.2], [100, 100]))
    counted = priority_of_table({"uncertainty": [0.2, 0.2], "score": [0.5, 0.5]}, area=np.array([20.0, 200.0]))
    assert counted[0] > counted[1]
    planes = priority_of_table({"uncertainty": [0.1] * 4, "score": [0.7] * 4, "area": [60, 60, 240, 240], "plane": [0, 0, 1, 1]})
    np.testing.assert_allclose(planes, planes[0])


def test_flag_top_takes_a_share_at_least_a_handful_ties_by_row():
    p = np.linspace(0.0, 1.0, 50)
    flags = flag_top(p, 20.0)
    assert flags.sum() == 10 and np.all(flags[-10:])
    assert flag_top(p, 1.0).sum() == MIN_FLAGGED  # 1 % of 50 rounds up to 1, but a handful is flagged
    assert flag_top(p[:3], 20.0).sum() == 3  # fewer cells than the handful: all of them
    assert flag_top(np.zeros(0), 20.0).shape == (0,)
    assert flag_top(np.linspace(0, 1, 11), 10.0, minimum=0).sum() == 2  # ceil(1.1)
    tied = flag_top(np.array([0.5, 0.9, 0.5, 0.5, 0.1]), 40.0, minimum=0)
    assert tied.tolist() == [True, True, False, False, False]
    nan_last = flag_top(np.array([np.nan, 0.2, 0.1]), 50.0, minimum=0)
    assert nan_last.tolist() == [False, True, True]
    with pytest.raises(ValueError, match="0..100"):
        flag_top(p, 120.0)


def test_flag_at_is_an_absolute_threshold():
    assert flag_at([0.1, 0.5, 0.7, np.nan], 0.5).tolist() == [False, True, True, False]


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 2))
    truth = np.array([-0.5, 1.5, -2.0])
    p = 1.0 / (1.0 + np.exp(-(truth[0] + x @ truth[1:])))
    y = rng.random(len(p)) < p
    b = fit_priority(x, y)
    np.testing.assert_allclose(b, truth, atol=0.1)
    with pytest.raises(ValueError, match="both right and wrong"):
        fit_priority(x, np.zeros(len(x), bool))
    with pytest.raises(ValueError, match="must be"):
        fit_priority(x[:, 0], y)

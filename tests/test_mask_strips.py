"""clean_crops (all crops labelled in a few strips) against the per-crop steps, bit for bit."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_sartorius.mask_strips import _strip_width, clean_crops
from napari_sartorius.postprocess import PostprocessSettings
from postprocess_reference import clean_crop


def per_crop(probs, threshold, fill, keep):
    s = PostprocessSettings(mask_threshold=threshold, fill_holes=fill, keep_largest=keep)
    return [clean_crop(p, s) for p in probs]


def assert_same(probs, threshold=0.5, fill=True, keep=True):
    got = clean_crops(probs, threshold, fill, keep)
    want = per_crop(probs, threshold, fill, keep)
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == bool and a.shape == b.shape, k
        np.testing.assert_array_equal(a, b, err_msg=f"crop {k}")


# probabilities from a few levels, so that thresholds cut many small pieces and equal-size pieces tie
_crop = st.tuples(st.integers(0, 12), st.integers(0, 40)).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, 0.2, 0.5, 0.7, 1.0]))
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    probs=st.lists(_crop, min_size=0, max_size=12),
    threshold=st.sampled_from([0.2, 0.5, 0.6, 1.0]),
    fill=st.booleans(),
    keep=st.booleans(),
)
def test_random_crops_match_the_per_crop_steps(probs, threshold, fill, keep):
    assert_same(probs, threshold, fill, keep)


def test_holes_ties_nested_pieces_and_mixed_widths():
    ring = np.zeros((9, 9), np.float32)
    ring[1:8, 1:8] = 1
    ring[3:6, 3:6] = 0
    nested = ring.copy()
    nested[4, 4] = 1  # a piece inside the hole: filling joins it to the ring
    tie = np.zeros((5, 7), np.float32)
    tie[1, 1] = tie[3, 5] = 1  # two single pixels: the first in raster order stays
    tie_later = np.zeros((5, 7), np.float32)
    tie_later[3, 1] = tie_later[1, 5] = 1
    diagonal = np.eye(6, dtype=np.float32)  # one 8-connected piece
    hole_at_edge = np.ones((4, 6), np.float32)
    hole_at_edge[0, 2] = 0  # background touching the border is no hole
    wide = np.zeros((3, 700), np.float32)
    wide[1, 10:20] = wide[1, 30:50] = 1
    probs = [ring, nested, tie, tie_later, diagonal, hole_at_edge, wide, np.zeros((0, 5), np.float32), ring]
    assert_same(probs)
    got = clean_crops(probs, 0.5, True, True)
    assert got[0][4, 4] and got[1][4, 4] and got[1].sum() == 49  # holes filled, the inner piece joined
    assert got[2][1, 1] and not got[2][3, 5]
    assert got[3][1, 5] and not got[3][3, 1]
    assert np.count_nonzero(got[6]) == 20


@pytest.mark.parametrize("w", [0, 1, 7, 8, 9, 25, 64, 65, 130, 704])
def test_strip_width_holds_the_crop_with_little_padding(w):
    sw = _strip_width(w)
    assert sw >= w and sw - w <= max(7, w // 8)


def test_benchmark_crops_match_under_every_switch():
    from test_postprocess import _bench_module

    inst = _bench_module().make_instances(300, seed=2)
    for fill in (True, False):
        for keep in (True, False):
            assert_same(inst.masks, 0.5, fill, keep)
    assert_same(inst.masks, 0.9, True, True)

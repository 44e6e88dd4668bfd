import re

import numpy as np
import pytest

from napari_sartorius.instances import Instances


def _labels():
    lab = np.zeros((20, 30), np.uint16)
    lab[2:6, 3:9] = 1
    lab[10:18, 20:25] = 4  # ids need not be consecutive
    lab[12:14, 2:4] = 7
    return lab


def test_from_label_image_keeps_each_instance_as_a_crop():
    inst = Instances.from_label_image(_labels(), classes={4: 2}, scores={7: 0.25})
    assert len(inst) == 3
    assert inst.image_size == (20, 30)
    assert [m.shape for m in inst.masks] == [(4, 6), (8, 5), (2, 2)]
    np.testing.assert_array_equal(inst.boxes[1], [20, 10, 25, 18])
    np.testing.assert_array_equal(inst.classes, [0, 2, 0])
    np.testing.assert_allclose(inst.scores, [1, 1, 0.25])
    np.testing.assert_array_equal(inst.areas(), [24, 40, 4])


def test_label_image_round_trip_renumbers_consecutively():
    lab = _labels()
    back = Instances.from_label_image(lab).to_label_image()
    remap = {0: 0, 1: 1, 4: 2, 7: 3}
    np.testing.assert_array_equal(back, np.vectorize(remap.get)(lab))


def test_selection_by_bool_index_and_slice():
    inst = Instances.from_label_image(_labels(), scores={1: 0.9, 4: 0.1, 7: 0.5})
    high = inst[inst.scores > 0.3]
    assert len(high) == 2 and np.allclose(high.scores, [0.9, 0.5])
    picked = inst[np.array([2, 0])]
    assert picked.full_mask(0).sum() == 4 and picked.full_mask(1).sum() == 24
    assert len(inst[1:]) == 2 and len(inst[np.zeros(3, bool)]) == 0
    with pytest.raises(IndexError):
        inst[np.array([5])]
    with pytest.raises(IndexError):
        inst[np.ones(2, bool)]


def test_cat_and_full_masks():
    lab = _labels()
    a = Instances.from_label_image(lab)
    full = [a.full_mask(i) for i in range(len(a))]
    b = Instances.from_full_masks(full, scores=[0.5, 0.6, 0.7])
    both = Instances.cat([a, b])
    assert len(both) == 6
    for i in range(3):
        np.testing.assert_array_equal(both.full_mask(i), both.full_mask(i + 3))
    np.testing.assert_array_equal(both.mask_boxes()[:3], both.mask_boxes()[3:])


def test_probability_crops_threshold():
    crop = np.array([[0.2, 0.6], [0.9, 0.4]], np.float32)
    inst = Instances((5, 5), boxes=[[1, 1, 3, 3]], scores=[0.8], classes=[1], masks=[crop], mask_origins=[[1, 1]])
    assert inst.areas(0.5).tolist() == [2]
    assert inst.areas(0.3).tolist() == [3]
    assert inst.full_mask(0, 0.5)[2, 1] and not inst.full_mask(0, 0.5)[1, 1]


def test_invalid_crops_are_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        Instances((4, 4), boxes=[[0, 0, 3, 3]], scores=[1], classes=[0], masks=[np.ones((3, 3))], mask_origins=[[2, 2]])
    with pytest.raises(ValueError, match="rows"):
        Instances((4, 4), boxes=np.zeros((2, 4)), scores=[1], classes=[0], masks=[np.ones((1, 1))], mask_origins=[[0, 0]])
    with pytest.raises(ValueError, match="2-D"):
        Instances.from_label_image(np.zeros((2, 3, 4), np.uint8))


def test_the_first_crop_that_does_not_fit_is_named():
    ok = [np.ones((2, 2))] * 5
    for bad, origin, shown in (
        (np.ones((2, 2)), (-1, 0), "(2, 2) at (-1, 0)"),
        (np.ones((2, 2)), (0, 3), "(2, 2) at (0, 3)"),
        (np.ones((2, 2, 1)), (0, 0), "(2, 2, 1) at (0, 0)"),
        (np.ones(3), (0, 0), "(3,) at (0, 0)"),
    ):
        masks = ok[:2] + [bad] + ok[2:] + [np.ones((9, 9))]  # the last one does not fit either
        origins = [(0, 0)] * 2 + [origin] + [(0, 0)] * 4
        with pytest.raises(ValueError, match=re.escape(f"shape {shown} does not fit an image of size (4, 4)")):
            Instances((4, 4), np.zeros((7, 4)), np.ones(7), np.zeros(7), masks, origins)


def test_empty():
    e = Instances.empty((8, 9))
    assert len(e) == 0 and e.to_label_image().shape == (8, 9) and e.areas().shape == (0,)
    assert len(Instances.cat([e, e])) == 0

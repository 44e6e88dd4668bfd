"""Windows around labelled cells (the quick preset's training data)."""

import numpy as np
import pytest

from napari_sartorius.training.crops import crop_windows, crops_around_cells


def _labels():
    lab = np.zeros((100, 300), np.int32)
    lab[10:20, 10:20] = 1  # two cells close together: one window
    lab[30:40, 40:50] = 2
    lab[60:70, 250:270] = 3  # far away: its own window
    return lab


def test_windows_cover_every_cell_and_stay_inside_the_image():
    lab = _labels()
    wins = crop_windows(lab, 64)
    assert len(wins) == 2
    for top, left, h, w in wins:
        assert (h, w) == (64, 64) and 0 <= top <= 100 - 64 and 0 <= left <= 300 - 64
    for cell in (1, 2, 3):
        ys, xs = np.nonzero(lab == cell)
        assert any(t <= ys.min() and ys.max() < t + h and l <= xs.min() and xs.max() < l + w for t, l, h, w in wins), cell


def test_crops_copy_image_and_labels_and_respect_the_limit():
    lab = _labels()
    image = np.arange(100 * 300, dtype=np.uint16).reshape(100, 300)
    pairs = crops_around_cells(image, lab, 64)
    (im0, lab0), (im1, lab1) = pairs
    assert im0.shape == lab0.shape == (64, 64)
    assert set(np.unique(lab0)) == {0, 1, 2} and set(np.unique(lab1)) == {0, 3}
    im0[:] = 0
    assert image.any()  # copies
    assert len(crop_windows(lab, 64, max_crops=1)) == 1
    assert crop_windows(np.zeros((50, 50), np.int32), 32) == []
    assert crop_windows(lab, 500)[0] == (0, 0, 100, 300)  # a window never exceeds the image
    with pytest.raises(ValueError, match="at least 16"):
        crop_windows(lab, 8)

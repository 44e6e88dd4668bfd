import numpy as np
import pytest

from napari_sartorius.instances import Instances
from napari_sartorius.inference.tiling import (
    Tile,
    merge_tiles,
    needs_tiling,
    predict_tiled,
    shift_instances,
    tile_windows,
)


@pytest.mark.parametrize("size", [(100, 100), (300, 420), (1000, 257), (129, 128)])
def test_tiles_cover_the_image_with_the_requested_overlap_and_cores_partition_it(size):
    tiles = tile_windows(size, max_tile=128, overlap=40)
    h, w = size
    covered = np.zeros(size, int)
    owner = np.zeros(size, int)
    yy, xx = np.mgrid[:h, :w] + 0.5
    for t in tiles:
        assert 0 <= t.y0 < t.y1 <= h and 0 <= t.x0 < t.x1 <= w
        assert t.shape == (min(h, 128), min(w, 128))
        covered[t.slices] += 1
        owner += (yy >= t.cy0) & (yy < t.cy1) & (xx >= t.cx0) & (xx < t.cx1)
    assert covered.min() >= 1
    assert np.all(owner == 1)
    xs = sorted({t.x0 for t in tiles})
    for a, b in zip(xs, xs[1:]):
        assert a + 128 - b >= 40  # neighbours overlap by at least `overlap`
    assert needs_tiling(size, 128) == (len(tiles) > 1)


def test_tile_parameters_are_checked():
    assert len(tile_windows((520, 704), 1024, 128)) == 1
    assert not needs_tiling((520, 704), None)
    with pytest.raises(ValueError, match="max_tile > overlap"):
        tile_windows((500, 500), 100, 100)


def test_shift_moves_boxes_and_crops():
    inst = Instances.from_full_masks([np.pad(np.ones((3, 4)), ((2, 5), (1, 3)))])
    moved = shift_instances(inst, 10, 20, (50, 60))
    assert moved.image_size == (50, 60)
    np.testing.assert_array_equal(moved.boxes[0], [21, 12, 25, 15])
    np.testing.assert_array_equal(moved.mask_origins[0], [12, 21])


@pytest.mark.parametrize("seed", [0, 1])
def test_tiled_result_equals_the_untiled_result(fakes, seed):
    engine = fakes.BlobEngine(big_area=200)
    img = fakes.blob_image((300, 430), n=60, radius=(4, 12), seed=seed)
    untiled = engine.predict_one(img)
    tiles = tile_windows(img.shape, max_tile=128, overlap=48)
    assert len(tiles) >= 12
    # some blobs do straddle inner tile borders
    inner_x = {t.x1 for t in tiles if t.x1 < img.shape[1]}
    assert any(b[0] < x < b[2] for b in untiled.boxes for x in inner_x)
    tiled = predict_tiled(engine.predict_one, img, max_tile=128, overlap=48)
    fakes.assert_same_instances(tiled, untiled)


def _box_inst(boxes, scores, size=(100, 200)):
    masks, origins = [], []
    for x0, y0, x1, y1 in boxes:
        masks.append(np.ones((int(y1 - y0), int(x1 - x0)), np.float32))
        origins.append((int(y0), int(x0)))
    return Instances(size, np.asarray(boxes, np.float32), scores, np.zeros(len(boxes)), masks, origins)


def test_merge_rescues_cells_the_owner_missed_and_drops_duplicates():
    size = (100, 200)
    tiles = tile_windows(size, max_tile=120, overlap=40)
    assert [(t.x0, t.x1, t.cx1) for t in tiles] == [(0, 120, 100.0), (80, 200, 200.0)]
    left = _box_inst([[10, 10, 30, 30], [85, 40, 99, 60]], [0.9, 0.8])  # 2nd: owned by left
    # right tile: the same 2nd cell seen whole (duplicate), a cell left missed (owned by left,
    # whole in right), and a cell cut by the right tile's inner border (x0 = 80)
    right = _box_inst([[86, 40, 99, 61], [88, 70, 98, 80], [80, 10, 95, 20], [150, 50, 170, 70]], [0.7, 0.6, 0.9, 0.5])
    merged = merge_tiles([left, right], tiles, size)
    got = sorted(map(tuple, merged.boxes.tolist()))
    assert got == sorted([(10, 10, 30, 30), (85, 40, 99, 60), (88, 70, 98, 80), (150, 50, 170, 70)])


def test_merge_keeps_one_copy_of_a_cell_larger_than_the_overlap():
    size = (100, 200)
    tiles = tile_windows(size, max_tile=120, overlap=40)
    big_left = _box_inst([[60, 20, 119, 50]], [0.9])  # cut at x = 120 (centre 89.5: owned by left)
    big_right = _box_inst([[81, 20, 140, 50]], [0.8])  # cut at x = 80 (centre 110.5: owned by right)
    merged = merge_tiles([big_left, big_right], tiles, size)
    assert len(merged) == 1 and merged.scores[0] == pytest.approx(0.9)


def test_merge_keeps_one_of_two_owned_copies_but_all_raw_overlaps_of_one_tile():
    size = (100, 200)
    tiles = tile_windows(size, max_tile=120, overlap=40)
    # one cell predicted by both tiles with its centre on either side of the core border (x = 100)
    left = _box_inst([[90, 30, 109, 50], [91, 31, 108, 50]], [0.9, 0.4])  # two raw candidates
    right = _box_inst([[92, 30, 110, 50]], [0.8])
    merged = merge_tiles([left, right], tiles, size)
    assert sorted(merged.scores.tolist()) == pytest.approx([0.4, 0.9])


def test_merge_checks_its_inputs():
    tiles = tile_windows((100, 200), 120, 40)
    with pytest.raises(ValueError, match="2 tiles"):
        merge_tiles([Instances.empty((100, 200))], tiles, (100, 200))
    with pytest.raises(ValueError, match="image size"):
        merge_tiles([Instances.empty((100, 120))] * 2, tiles, (100, 200))
    assert len(merge_tiles([Instances.empty((100, 200))] * 2, tiles, (100, 200))) == 0
    assert isinstance(tiles[0], Tile)

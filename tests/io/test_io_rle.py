import numpy as np
import pytest
from pycocotools import mask as mask_utils

from napari_sartorius.instances import Instances
from napari_sartorius.io.rle import (
    coco_rle_runs,
    coco_rle_to_crop,
    coco_rle_to_mask,
    instance_to_coco_rle,
    instance_to_rle,
    mask_crop,
    mask_to_coco_rle,
    parse_rle,
    polygons_to_mask,
    rle_decode,
    rle_decode_crop,
    rle_encode,
    segmentation_to_crop,
    segmentation_to_mask,
)


def test_kaggle_rle_is_row_major_and_one_indexed():
    m = np.array([[0, 1, 1], [1, 0, 0]], bool)
    # row-major flat: 0 1 1 1 0 0 -> one run starting at pixel 2 (1-indexed), length 3
    assert rle_encode(m) == "2 3"
    np.testing.assert_array_equal(rle_decode("2 3", (2, 3)), m)
    # the same mask column-major would be 0 1 1 0 1 0: a different encoding
    assert rle_encode(m.T.copy()) != "2 3"


def test_empty_and_full_masks():
    assert rle_encode(np.zeros((3, 4), bool)) == ""
    assert not rle_decode("", (3, 4)).any()
    assert rle_encode(np.ones((3, 4), bool)) == "1 12"
    assert rle_decode("1 12", (3, 4)).all()


def test_touching_runs_are_accepted():
    np.testing.assert_array_equal(rle_decode("1 2 3 2", (1, 5)), [[1, 1, 1, 1, 0]])


@pytest.mark.parametrize(
    "rle, reason",
    [
        ("1 2 3", "odd number"),
        ("1 0", "non-positive length"),
        ("1 -3", "non-positive length"),
        ("0 2", "1-indexed"),
        ("5 3", "runs past the image"),
        ("7 1", "runs past the image"),
        ("1 3 2 1", "overlaps"),
        ("4 1 1 1", "not sorted"),
        ("1 x", "not an integer"),
        ("1.5 2", "not an integer"),
    ],
)
def test_malformed_rle_raises_with_reason(rle, reason):
    with pytest.raises(ValueError, match=reason):
        rle_decode(rle, (2, 3))


def test_parse_rle_returns_zero_based_runs():
    starts, ends = parse_rle("2 3 6 1", (2, 3))
    assert starts.tolist() == [1, 5] and ends.tolist() == [4, 6]


def test_decode_crop_matches_full_decode():
    m = np.zeros((6, 7), bool)
    m[2, 5:] = True
    m[3, :2] = True  # a run wrapping over the row end
    m[4, 3] = True
    rle = rle_encode(m)
    crop, (y0, x0) = rle_decode_crop(rle, m.shape)
    assert (y0, x0) == (2, 0) and crop.shape == (3, 7)
    full = np.zeros_like(m)
    full[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    np.testing.assert_array_equal(full, m)
    crop, origin = rle_decode_crop("", (6, 7))
    assert crop.shape == (1, 1) and not crop.any() and origin == (0, 0)
    c2, o2 = mask_crop(m)
    np.testing.assert_array_equal(c2, m[2:5, 0:7])
    assert o2 == (2, 0)


def test_instance_encoders_match_full_mask_encoders():
    rng = np.random.default_rng(3)
    for _ in range(50):
        h, w = rng.integers(1, 15, 2)
        m = rng.random((h, w)) < 0.4
        inst = Instances.from_full_masks([m], image_size=(h, w))
        assert instance_to_rle(inst, 0) == rle_encode(m)
        assert instance_to_coco_rle(inst, 0) == mask_to_coco_rle(m)


def test_instance_encoding_uses_the_crop_threshold():
    inst = Instances(
        image_size=(4, 4), boxes=[[1, 1, 3, 3]], scores=[0.9], classes=[0],
        masks=[np.array([[0.2, 0.6], [0.5, 0.49]], np.float32)], mask_origins=[[1, 1]],
    )
    expected = np.zeros((4, 4), bool)
    expected[1, 2] = expected[2, 1] = True
    np.testing.assert_array_equal(rle_decode(instance_to_rle(inst, 0), (4, 4)), expected)
    np.testing.assert_array_equal(coco_rle_to_mask(instance_to_coco_rle(inst, 0)), expected)


def test_encoding_a_crop_never_builds_the_full_image():
    # a 40000 x 40000 image: a full boolean mask would be 1.6 GB
    crop = np.ones((3, 2), np.float32)
    inst = Instances(
        image_size=(40000, 40000), boxes=[[5, 39990, 7, 39993]], scores=[1], classes=[0],
        masks=[crop], mask_origins=[[39990, 5]],
    )
    start = 39990 * 40000 + 5 + 1
    assert instance_to_rle(inst, 0) == f"{start} 2 {start + 40000} 2 {start + 80000} 2"
    rle = instance_to_coco_rle(inst, 0)
    assert rle["size"] == [40000, 40000]
    assert mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}) == 6


def test_coco_rle_matches_pycocotools_and_is_column_major():
    m = np.array([[0, 1, 1], [1, 0, 0]], bool)
    rle = mask_to_coco_rle(m)
    assert isinstance(rle["counts"], str) and rle["size"] == [2, 3]
    ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    assert rle["counts"].encode() == ref["counts"]
    np.testing.assert_array_equal(coco_rle_to_mask(rle), m)
    np.testing.assert_array_equal(coco_rle_to_mask({"size": [2, 3], "counts": rle["counts"].encode()}), m)
    # uncompressed counts, column-major: flat F order is 0 1 1 0 1 0
    np.testing.assert_array_equal(coco_rle_to_mask({"size": [2, 3], "counts": [1, 2, 1, 1, 1]}), m)


def test_coco_rle_errors():
    with pytest.raises(ValueError, match="past"):
        coco_rle_to_mask({"size": [2, 3], "counts": [1, 9]})
    with pytest.raises(ValueError, match="short"):
        coco_rle_to_mask({"size": [2, 3], "counts": [1, 2]})
    with pytest.raises(ValueError, match="disagrees"):
        coco_rle_to_mask({"size": [2, 3], "counts": [6]}, shape=(3, 2))
    with pytest.raises(ValueError, match="size"):
        coco_rle_to_mask({"counts": [6]})


def test_polygons():
    square = [1.0, 1.0, 4.0, 1.0, 4.0, 4.0, 1.0, 4.0]
    m = polygons_to_mask([square], 6, 6)
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([square], 6, 6))).astype(bool)
    np.testing.assert_array_equal(m, ref)
    assert m[2, 2] and not m[5, 5]
    np.testing.assert_array_equal(segmentation_to_mask(square, 6, 6), m)  # a bare flat polygon
    np.testing.assert_array_equal(segmentation_to_mask([square], 6, 6), m)
    with pytest.raises(ValueError, match="even number"):
        polygons_to_mask([[1, 2, 3]], 6, 6)


def test_counts_string_decoder_matches_pycocotools_on_large_masks():
    rng = np.random.default_rng(5)
    for _ in range(20):
        m = np.zeros((520, 704), bool)
        y, x = rng.integers(0, 500), rng.integers(0, 680)
        m[y : y + rng.integers(1, 20), x : x + rng.integers(1, 24)] = True
        m[rng.integers(0, 520, 30), rng.integers(0, 704, 30)] = True  # scattered pixels: long runs
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle = {"size": ref["size"], "counts": ref["counts"].decode()}
        np.testing.assert_array_equal(coco_rle_to_mask(rle), mask_utils.decode(ref).astype(bool))
        crop, (y0, x0) = coco_rle_to_crop(rle)
        c2, o2 = mask_crop(m)
        np.testing.assert_array_equal(crop, c2)
        assert (y0, x0) == o2
    empty = mask_utils.encode(np.zeros((3, 4), np.uint8, order="F"))
    crop, origin = coco_rle_to_crop(empty)
    assert crop.shape == (1, 1) and not crop.any() and origin == (0, 0)


def test_corrupt_counts_strings():
    with pytest.raises(ValueError, match="middle of a number"):
        coco_rle_runs({"size": [3, 4], "counts": "o"})  # 'o' has the continuation bit set
    with pytest.raises(ValueError, match="invalid"):
        coco_rle_runs({"size": [3, 4], "counts": "\x01"})
    with pytest.raises(ValueError, match="add up"):
        coco_rle_runs({"size": [3, 4], "counts": "5"})


def test_segmentation_to_crop():
    square = [1.0, 1.0, 4.0, 1.0, 4.0, 4.0, 1.0, 4.0]
    crop, (y0, x0) = segmentation_to_crop([square], 6, 6)
    full = np.zeros((6, 6), bool)
    full[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    np.testing.assert_array_equal(full, polygons_to_mask([square], 6, 6))
    with pytest.raises(ValueError, match="unsupported"):
        segmentation_to_crop(3, 6, 6)

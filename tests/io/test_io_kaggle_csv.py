import numpy as np
import pytest
from PIL import Image

from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
from napari_sartorius.instances import Instances
from napari_sartorius.io.kaggle_csv import read_kaggle_csv, write_kaggle_csv
from napari_sartorius.io.rle import rle_encode

HEADER = "id,annotation,width,height,cell_type,plate_time,sample_date\n"


def _mask(shape, ys, xs):
    m = np.zeros(shape, bool)
    m[ys, xs] = True
    return m


def test_read_train_style(tmp_path):
    m1 = _mask((4, 5), slice(0, 2), slice(1, 3))
    m2 = _mask((4, 5), slice(1, 4), slice(2, 5))  # overlaps m1 at (1, 2)
    p = tmp_path / "train.csv"
    p.write_text(
        HEADER
        + f"a,{rle_encode(m1)},5,4,astro,11h,2020\n"
        + f"a,{rle_encode(m2)},5,4,astro,11h,2020\n"
        + "b,,5,4,cort,,\n"
    )
    aset = read_kaggle_csv(p)
    assert [im.image_id for im in aset] == ["a", "b"]
    a, b = aset.images
    assert a.cell_type == "astro" and b.cell_type == "cort"
    assert a.instances.image_size == (4, 5) and len(a.instances) == 2 and len(b.instances) == 0
    assert a.instances.classes.tolist() == [1, 1]
    np.testing.assert_array_equal(a.instances.full_mask(0), m1)
    np.testing.assert_array_equal(a.instances.full_mask(1), m2)  # overlap kept
    np.testing.assert_array_equal(a.instances.boxes[1], [2, 1, 5, 4])
    assert a.instances.masks[0].shape == (2, 2)  # crops, not full masks


def test_unknown_cell_type_lists_known_ones(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(HEADER + "a,1 2,5,4,microglia,,\n")
    with pytest.raises(ValueError, match="microglia.*shsy5y, astro, cort") as e:
        read_kaggle_csv(p)
    assert "line 2" in str(e.value)
    aset = read_kaggle_csv(p, extra_class_names=["microglia"])
    assert aset.class_names == ("shsy5y", "astro", "cort", "microglia")
    assert aset.images[0].instances.classes.tolist() == [3]


def test_rle_past_image_names_line_and_id(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(HEADER + "a,1 2,5,4,cort,,\na,18 5,5,4,cort,,\n")
    with pytest.raises(ValueError, match=r"line 3 \(id a\).*runs past the image.*4 x 5"):
        read_kaggle_csv(p)


def test_bad_sizes_and_columns(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(HEADER + "a,1 2,5,4,cort,,\na,3 2,6,4,cort,,\n")
    with pytest.raises(ValueError, match="earlier row"):
        read_kaggle_csv(p)
    p.write_text(HEADER + "a,1 2,five,4,cort,,\n")
    with pytest.raises(ValueError, match="width 'five'"):
        read_kaggle_csv(p)
    p.write_text("image,rle\nx,1 2\n")
    with pytest.raises(ValueError, match="no 'id' column"):
        read_kaggle_csv(p)
    p.write_text("id,rle\nx,1 2\n")
    with pytest.raises(ValueError, match="annotation"):
        read_kaggle_csv(p)
    p.write_text(HEADER)
    with pytest.raises(ValueError, match="no rows"):
        read_kaggle_csv(p)
    p.write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_kaggle_csv(p)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_kaggle_csv(tmp_path / "nope.csv")


def test_submission_style_needs_a_size(tmp_path):
    p = tmp_path / "submission.csv"
    p.write_text("id,predicted\nimg1,1 3\nimg1,9 2\nimg2,\n")
    with pytest.raises(ValueError, match="size of image 'img1' is unknown.*images_dir"):
        read_kaggle_csv(p)
    aset = read_kaggle_csv(p, image_size=(3, 4), cell_type="shsy5y")
    assert [len(im.instances) for im in aset] == [2, 0]
    assert aset.images[0].cell_type == "shsy5y"
    # sizes from the image files
    imgs = tmp_path / "images"
    imgs.mkdir()
    for name in ("img1", "img2"):
        Image.fromarray(np.zeros((3, 4), np.uint8)).save(imgs / f"{name}.png")
    aset = read_kaggle_csv(p, images_dir=imgs)
    assert aset.images[1].instances.image_size == (3, 4)
    assert aset.images[0].cell_type is None and aset.images[0].instances.classes.tolist() == [0, 0]


def test_size_disagreeing_with_image(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(HEADER + "a,1 2,5,4,cort,,\n")
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"4 x 5.*a\.png is 4 x 6"):
        read_kaggle_csv(p, images_dir=tmp_path)


def _aset():
    h, w = 6, 8
    m = [_mask((h, w), slice(0, 3), slice(0, 3)), _mask((h, w), slice(2, 6), slice(2, 8))]
    inst = Instances.from_full_masks(m, classes=[2, 0], scores=[0.9, 0.4])
    return AnnotationSet(
        [
            ImageAnnotations("x1", inst, "cort", "x1.png"),
            ImageAnnotations("x2", Instances.empty((h, w)), "astro"),
        ]
    )


def test_write_read_roundtrip_keeps_overlaps(tmp_path):
    aset = _aset()
    p = tmp_path / "out.csv"
    assert write_kaggle_csv(aset, p) == 2
    lines = p.read_text().splitlines()
    assert lines[0] == "id,annotation,width,height,cell_type"
    assert lines[-1] == "x2,,8,6,astro"
    back = read_kaggle_csv(p)
    assert [im.image_id for im in back] == ["x1", "x2"]
    src, got = aset.images[0].instances, back.images[0].instances
    for i in range(2):
        np.testing.assert_array_equal(got.full_mask(i), src.full_mask(i))
    assert got.classes.tolist() == [2, 0]
    assert back.images[1].cell_type == "astro" and len(back.images[1].instances) == 0


def test_write_submission_and_errors(tmp_path):
    p = tmp_path / "sub.csv"
    write_kaggle_csv(_aset(), p, submission=True)
    text = p.read_text().splitlines()
    assert text[0] == "id,predicted" and text[-1] == "x2,"
    with pytest.raises(ValueError, match="no images"):
        write_kaggle_csv(AnnotationSet([]), tmp_path / "e.csv")
    assert not (tmp_path / "e.csv").exists()

import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
from napari_sartorius.instances import Instances
from napari_sartorius.io.label_images import (
    instances_to_label_image,
    labels_to_instances,
    list_label_files,
    read_label_file,
    read_label_image,
    read_label_images,
    read_label_metadata,
    write_label_image,
    write_label_images,
)


def _gappy():
    lab = np.zeros((6, 7), np.uint32)
    lab[0:2, 0:3] = 3
    lab[3:6, 4:7] = 17
    lab[5, 0] = 40000
    return lab


def test_labels_with_gaps_become_instances_in_id_order():
    inst, ids = labels_to_instances(_gappy(), classes={17: 2}, scores={3: 0.5})
    assert ids.tolist() == [3, 17, 40000]
    assert len(inst) == 3 and inst.image_size == (6, 7)
    assert inst.classes.tolist() == [0, 2, 0] and inst.scores.tolist() == [0.5, 1, 1]
    np.testing.assert_array_equal(inst.full_mask(1), _gappy() == 17)
    np.testing.assert_array_equal(inst.boxes[0], [0, 0, 3, 2])
    assert [m.shape for m in inst.masks] == [(2, 3), (3, 3), (1, 1)]


def test_huge_ids_do_not_allocate_per_id():
    lab = np.zeros((3, 3), np.uint32)
    lab[1, 1] = 4_000_000_000
    inst, ids = labels_to_instances(lab)
    assert ids.tolist() == [4_000_000_000] and len(inst) == 1


def test_label_image_without_background():
    inst, ids = labels_to_instances(np.array([[1, 1], [2, 2]], np.uint16))
    assert ids.tolist() == [1, 2]
    np.testing.assert_array_equal(inst.full_mask(1), [[0, 0], [1, 1]])


@pytest.mark.parametrize("ext", [".tif", ".png"])
def test_write_read_keeps_ids_exactly(tmp_path, ext):
    lab = _gappy().astype(np.uint16)
    p = write_label_image(lab, tmp_path / f"a{ext}")
    out = read_label_image(p)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, lab)


def test_uint32_needs_tiff(tmp_path):
    lab = np.zeros((4, 4), np.int64)
    lab[0, 0] = 70000
    write_label_image(lab, tmp_path / "big.tif")
    out = read_label_image(tmp_path / "big.tif")
    assert out.dtype == np.uint32 and out[0, 0] == 70000
    with pytest.raises(ValueError, match="PNG holds at most 16-bit.*save as .tif"):
        write_label_image(lab, tmp_path / "big.png")
    assert not (tmp_path / "big.png").exists()
    with pytest.raises(ValueError, match="use one of"):
        write_label_image(lab, tmp_path / "big.jpg")


def test_bad_label_images(tmp_path):
    tifffile.imwrite(tmp_path / "neg.tif", np.array([[-1, 0]], np.int16))
    with pytest.raises(ValueError, match="negative"):
        read_label_image(tmp_path / "neg.tif")
    tifffile.imwrite(tmp_path / "frac.tif", np.array([[0.5, 1.0]], np.float32))
    with pytest.raises(ValueError, match="whole-number"):
        read_label_image(tmp_path / "frac.tif")
    tifffile.imwrite(tmp_path / "whole.tif", np.array([[0.0, 2.0]], np.float32))
    assert read_label_image(tmp_path / "whole.tif").tolist() == [[0, 2]]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="colour"):
        read_label_image(tmp_path / "rgb.png")
    with pytest.raises(FileNotFoundError):
        read_label_image(tmp_path / "none.tif")


def test_overlaps_higher_score_wins_and_are_counted(caplog):
    a = np.zeros((4, 4), bool)
    a[0:3, 0:3] = True
    b = np.zeros((4, 4), bool)
    b[1:4, 1:4] = True  # 4 pixels shared with a
    inst = Instances.from_full_masks([a, b], scores=[0.9, 0.2])
    with caplog.at_level(logging.DEBUG):
        lab, n = instances_to_label_image(inst)
    assert n == 4 and "4 overlapping pixels" in caplog.text
    assert lab[1, 1] == 1 and lab[3, 3] == 2 and lab.dtype == np.uint16
    # equal scores: the later instance wins
    lab, n = instances_to_label_image(Instances.from_full_masks([a, b]))
    assert n == 4 and lab[1, 1] == 2
    # a fully covered instance disappears
    lab, n = instances_to_label_image(Instances.from_full_masks([b, a | b], scores=[0.1, 0.5]))
    assert set(np.unique(lab)) == {0, 2} and n == 9


def test_writing_overlaps_warns_once_with_the_count(tmp_path, caplog):
    a = np.zeros((4, 4), bool)
    a[0:3, 0:3] = True
    b = np.zeros((4, 4), bool)
    b[1:4, 1:4] = True
    inst = Instances.from_full_masks([a, b], scores=[0.9, 0.2])
    aset = AnnotationSet([ImageAnnotations(f"o{k}", inst) for k in range(3)])
    with caplog.at_level(logging.WARNING):
        report = write_label_images(aset, tmp_path)
    assert report == {"o0": 4, "o1": 4, "o2": 4}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "12 pixels in 3 of 3 images" in warnings[0].getMessage()
    lab = read_label_image(tmp_path / "o1_labels.tif")
    assert lab[1, 1] == 1 and lab[3, 3] == 2


def test_uint64_and_sparse_ids():
    lab = np.zeros((3, 4), np.uint64)
    lab[0, 0], lab[2, 3] = 2**40, 5
    inst, ids = labels_to_instances(lab)
    assert ids.tolist() == [5, 2**40]
    np.testing.assert_array_equal(inst.full_mask(1), lab == 2**40)
    inst, ids = labels_to_instances(lab.astype(np.uint32) % 7)
    assert ids.tolist() == [5]


def _aset():
    h, w = 5, 6
    m1 = np.zeros((h, w), bool)
    m1[0:2, 0:2] = True
    m2 = np.zeros((h, w), bool)
    m2[3:5, 2:6] = True
    return AnnotationSet(
        [
            ImageAnnotations("p1", Instances.from_full_masks([m1, m2], classes=[1, 2], scores=[0.75, 0.5]), "astro", "p1.png"),
            ImageAnnotations("p2", Instances.empty((h, w)), "cort"),
        ]
    )


@pytest.mark.parametrize("ext", [".tif", ".png"])
def test_folder_roundtrip_keeps_classes_and_scores(tmp_path, ext):
    report = write_label_images(_aset(), tmp_path, ext=ext)
    assert report == {"p1": 0, "p2": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"p1_labels{ext}", f"p2_labels{ext}"]
    meta = read_label_metadata(tmp_path / f"p1_labels{ext}")
    assert meta["classes"] == ["astro", "cort"] and meta["labels"] == [1, 2]
    back = read_label_images(tmp_path)
    assert [im.image_id for im in back] == ["p1", "p2"]
    p1 = back.images[0]
    assert p1.instances.classes.tolist() == [1, 2]
    assert p1.instances.scores.tolist() == [0.75, 0.5]
    assert p1.cell_type == "astro" and p1.file_name == "p1.png" and back.images[1].cell_type == "cort"
    for i in range(2):
        np.testing.assert_array_equal(p1.instances.full_mask(i), _aset().images[0].instances.full_mask(i))


def test_plain_label_files_without_metadata(tmp_path):
    tifffile.imwrite(tmp_path / "img7_labels.tif", _gappy().astype(np.uint16))
    Image.fromarray(np.zeros((6, 7), np.uint8)).save(tmp_path / "img7.png")  # the image: ignored
    assert list_label_files(tmp_path) == [tmp_path / "img7_labels.tif"]
    aset = read_label_images(tmp_path, cell_type="shsy5y")
    im = aset.images[0]
    assert im.image_id == "img7" and im.cell_type == "shsy5y" and len(im.instances) == 3
    assert im.instances.classes.tolist() == [0, 0, 0]
    im, classes = read_label_file(tmp_path / "img7_labels.tif", cell_type="cort")
    assert im.instances.classes.tolist() == [2, 2, 2] and classes == ("shsy5y", "astro", "cort")
    with pytest.raises(ValueError, match="unknown cell type 'nope'"):
        read_label_images(tmp_path, cell_type="nope")


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_label_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no label images"):
        read_label_images(tmp_path / "empty")
    write_label_image(np.ones((2, 2), np.uint16), tmp_path / "k_labels.tif")
    write_label_image(np.ones((2, 2), np.uint16), tmp_path / "k_labels.png")
    with pytest.raises(ValueError, match="same image 'k'"):
        read_label_images(tmp_path)
    with pytest.raises(ValueError, match="no images"):
        write_label_images(AnnotationSet([]), tmp_path / "out")


def test_read_label_metadata_says_none_only_for_files_without_it(tmp_path):
    from PIL import Image

    plain = tmp_path / "plain.png"
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(plain)
    assert read_label_metadata(plain) is None  # a PNG without the writer's text
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all")
    assert read_label_metadata(junk) is None  # undecodable: the pixel reader reports it
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        read_label_metadata(tmp_path / "missing.tif")
    with pytest.MonkeyPatch.context() as mp:  # a bug in the reading code is not swallowed
        import PIL.Image

        mp.setattr(PIL.Image, "open", lambda *a, **k: (_ for _ in ()).throw(TypeError("bug")))
        with pytest.raises(TypeError, match="bug"):
            read_label_metadata(plain)

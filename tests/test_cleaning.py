import numpy as np
import pytest

from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
from napari_sartorius.cleaning import CleanReport, clean_annotation_set, clean_annotations
from napari_sartorius.instances import Instances

S = (50, 60)


def rect(y0, y1, x0, x1):
    m = np.zeros(S, bool)
    m[y0:y1, x0:x1] = True
    return m


def full(inst, i):
    return inst.full_mask(i)


def test_hollow_mask_filled():
    ring = rect(5, 25, 5, 25)
    ring[10:20, 10:20] = False  # 100-px hole
    out, rep = clean_annotations(Instances.from_full_masks([ring], classes=[1]))
    assert out.areas().tolist() == [400]
    assert rep.holes_filled == 1 and rep.hole_pixels_filled == 100
    assert rep.fragments_dropped == 0 and rep.overlap_pixels_resolved == 0 and rep.small_dropped == 0
    assert out.classes.tolist() == [1]
    same, rep2 = clean_annotations(Instances.from_full_masks([ring]), fill_holes=False)
    assert same.areas().tolist() == [300] and rep2.hole_pixels_filled == 0


def test_fragments_dropped_but_large_pieces_kept():
    m = rect(5, 25, 5, 25)  # 400 px main body
    m |= rect(30, 33, 40, 43)  # 9-px stray
    m |= rect(40, 48, 40, 50)  # 80-px piece of a broken mask
    out, rep = clean_annotations(Instances.from_full_masks([m]), min_fragment=25)
    assert out.areas().tolist() == [480]
    assert rep.fragments_dropped == 1 and rep.fragment_pixels_dropped == 9
    only_largest, rep2 = clean_annotations(Instances.from_full_masks([m]), min_fragment=10**9)
    assert only_largest.areas().tolist() == [400]
    assert rep2.fragments_dropped == 2 and rep2.fragment_pixels_dropped == 89
    # the box and crop are tight after cleaning
    assert only_largest.boxes.tolist() == [[5, 5, 25, 25]]
    assert only_largest.masks[0].shape == (20, 20)


def test_overlaps_go_to_the_smaller_instance():
    big = rect(0, 20, 0, 30)  # 600 px
    small = rect(10, 20, 20, 40)  # 200 px, 100 shared
    out, rep = clean_annotations(Instances.from_full_masks([big, small], scores=[1, 1]))
    assert rep.overlap_pixels_resolved == 100
    assert out.areas().tolist() == [500, 200]
    assert not (full(out, 0) & full(out, 1)).any()
    assert full(out, 1).sum() == 200  # the smaller one kept everything


def test_nested_cell_stays_whole_and_hole_is_not_refilled():
    big = rect(0, 30, 0, 30)  # 900 px containing a small cell
    small = rect(10, 15, 10, 15)  # 25 px
    out, rep = clean_annotations(Instances.from_full_masks([big, small]))
    assert out.areas().tolist() == [875, 25]
    assert rep.overlap_pixels_resolved == 25
    assert not (full(out, 0) & full(out, 1)).any()


def test_overlap_split_remainder_loses_small_fragment():
    # a thin bar crosses a blob near its end: the blob loses the bar's pixels and a 2-column stub
    blob = rect(0, 40, 0, 12)  # 480 px
    bar = rect(30, 34, 0, 60)  # 240 px, smaller -> wins the 48 shared pixels
    out, rep = clean_annotations(Instances.from_full_masks([blob, bar]), min_fragment=100)
    # blob: 480 - 48 = 432 left, split into rows 0-30 (360 px) and rows 34-40 (72 px < 100)
    assert out.areas().tolist() == [360, 240]
    assert rep.overlap_pixels_resolved == 48
    assert rep.fragments_dropped == 1 and rep.fragment_pixels_dropped == 72


def test_small_and_empty_instances_dropped():
    tiny = rect(0, 2, 0, 2)  # 4 px
    cell = rect(10, 30, 10, 30)
    empty = np.zeros(S, bool)
    x = Instances.from_full_masks([tiny, cell, empty], scores=[0.5, 0.6, 0.7], classes=[0, 2, 1])
    out, rep = clean_annotations(x, min_area=10)
    assert len(out) == 1 and out.classes.tolist() == [2] and out.scores.tolist() == pytest.approx([0.6])
    assert rep.small_dropped == 2 and rep.n_instances_in == 3 and rep.n_instances_out == 1
    out0, rep0 = clean_annotations(x, min_area=0)
    assert len(out0) == 2 and rep0.small_dropped == 1  # an empty one always goes


def test_overlaps_can_be_left_alone():
    a, b = rect(0, 10, 0, 10), rect(5, 15, 5, 15)
    out, rep = clean_annotations(Instances.from_full_masks([a, b]), resolve_overlaps=False)
    assert out.areas().tolist() == [100, 100]
    assert rep.overlap_pixels_resolved == 0 and rep.overlap_pixels_left == 25
    assert not rep.changed


def test_image_annotations_input_and_bad_arguments():
    im = ImageAnnotations("x", Instances.from_full_masks([rect(0, 10, 0, 10)]))
    out, rep = clean_annotations(im)
    assert len(out) == 1 and not rep.changed
    with pytest.raises(ValueError, match="min_fragment"):
        clean_annotations(im, min_fragment=-1)
    with pytest.raises(TypeError):
        clean_annotations(np.zeros(S))


def test_set_reports_add_up_and_summary():
    ring = rect(5, 25, 5, 25)
    ring[10:20, 10:20] = False
    a = ImageAnnotations("a", Instances.from_full_masks([ring]), cell_type="astro", file_name="a.png")
    b = ImageAnnotations("b", Instances.from_full_masks([rect(0, 20, 0, 30), rect(10, 20, 20, 40)]))
    aset = AnnotationSet([a, b], category_ids={"shsy5y": 1, "astro": 2, "cort": 3})
    out, rep = clean_annotation_set(aset)
    assert [im.image_id for im in out] == ["a", "b"]
    assert out.images[0].cell_type == "astro" and out.images[0].file_name == "a.png"
    assert out.category_ids == aset.category_ids
    assert rep.n_images == 2 and rep.hole_pixels_filled == 100 and rep.overlap_pixels_resolved == 100
    assert rep.n_instances_in == 3 and rep.n_instances_out == 3
    text = rep.summary()
    assert "100 px" in text and "2 image(s)" in text and "smaller instance" in text
    assert (CleanReport(n_images=1) + CleanReport(n_images=2)).n_images == 3


def test_real_annotations_come_out_without_overlaps(real_data):
    from napari_sartorius.io import coco

    aset = coco.read_coco(real_data / "coco.json")
    out, rep = clean_annotation_set(aset)
    assert rep.n_images == 3 and rep.n_instances_out <= rep.n_instances_in
    for im in out:
        cover = np.zeros(im.instances.image_size, np.int32)
        for i in range(len(im.instances)):
            cover[im.instances.crop_slices(i)] += im.instances.masks[i] >= 0.5
        assert cover.max() <= 1


def test_per_instance_columns_follow_the_cells_that_survive():
    """Uncertainty / reviewed columns stay with their cells when overlaps are resolved and small ones dropped."""
    import numpy as np

    from napari_sartorius.cleaning import clean_annotations
    from napari_sartorius.instances import Instances

    big = np.ones((10, 10), np.float32)
    tiny = np.ones((2, 2), np.float32)
    inst = Instances(
        image_size=(40, 40),
        boxes=np.array([[0, 0, 10, 10], [20, 20, 22, 22], [5, 5, 15, 15]], np.float32),
        scores=np.array([0.9, 0.8, 0.7], np.float32),
        classes=np.zeros(3, np.int64),
        masks=[big, tiny, big.copy()],
        mask_origins=np.array([[0, 0], [20, 20], [5, 5]], np.int64),
        columns={"uncertainty": np.array([0.1, 0.5, 0.9]), "reviewed": np.array([True, False, False])},
    )
    cleaned, _ = clean_annotations(inst, min_area=10)
    assert len(cleaned) == 2  # the 2x2 cell is dropped
    np.testing.assert_allclose(cleaned.columns["uncertainty"], [0.1, 0.9])
    assert cleaned.columns["reviewed"].tolist() == [True, False]

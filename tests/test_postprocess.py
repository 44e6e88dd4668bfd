import importlib.util
from pathlib import Path

import numpy as np
import pytest

from napari_sartorius.instances import Instances
from napari_sartorius.postprocess import (
    PostprocessResult,
    PostprocessSettings,
    majority_class,
    postprocess,
)

S = (60, 80)


def rect(y0, y1, x0, x1, shape=S, value=1.0):
    m = np.zeros(shape, np.float32)
    m[y0:y1, x0:x1] = value
    return m


def inst(masks, scores, classes):
    return Instances.from_full_masks(masks, image_size=S, scores=scores, classes=classes)


def no_limits(**kw):
    """Settings with no score threshold and no minimum area unless given."""
    base = dict(score_thresholds=(0.0, 0.0, 0.0), min_areas=(0, 0, 0))
    base.update(kw)
    return PostprocessSettings(**base)


def check_features(res: PostprocessResult):
    f = res.features
    k = len(res)
    assert {"label", "class", "score", "area"} <= set(f)
    assert all(len(v) == k for v in f.values())
    assert f["label"].tolist() == list(range(1, k + 1))
    counts = np.bincount(res.labels.ravel(), minlength=k + 1)[1:]
    assert counts.tolist() == f["area"].tolist()
    assert np.all(np.diff(f["score"]) <= 0)  # id 1 = highest score
    assert res.labels.dtype == np.uint16


def test_defaults_come_from_cell_types():
    s = PostprocessSettings()
    assert s.class_names == ("shsy5y", "astro", "cort")
    assert s.score_thresholds == (0.15, 0.35, 0.55)
    assert s.min_areas == (75, 150, 75)
    assert s.mask_threshold == 0.5 and s.fill_holes and s.keep_largest and s.cell_type is None
    assert 0 < s.max_overlap <= 1
    s2 = s.with_(mask_threshold=0.3, cell_type="astro")
    assert s2.mask_threshold == 0.3 and s2.cell_type == "astro" and s.mask_threshold == 0.5
    assert s.for_type("astro") == (0.35, 150)
    other = PostprocessSettings(class_names=("cell",))
    assert other.score_thresholds == (0.5,) and other.min_areas == (75,)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(score_thresholds=(0.1, 0.2)), "3 classes"),
        (dict(score_thresholds=(0.1, 0.2, 1.5)), r"\[0, 1\]"),
        (dict(min_areas=(1, -1, 3)), ">= 0"),
        (dict(mask_threshold=0.0), "mask_threshold"),
        (dict(max_overlap=1.2), "max_overlap"),
        (dict(cell_type="neuron"), "unknown cell type"),
        (dict(class_names=()), "empty"),
    ],
)
def test_settings_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        PostprocessSettings(**kw)
    with pytest.raises(ValueError, match=match):
        PostprocessSettings().with_(**kw)


def test_auto_cell_type_is_accepted():
    assert PostprocessSettings(cell_type="auto").cell_type is None


def test_score_threshold_of_the_majority_type_applies_to_all():
    # three cort-class cells (threshold 0.55) and one astro-class cell of score 0.5
    masks = [rect(0, 10, 0, 10), rect(0, 10, 20, 30), rect(20, 30, 0, 10), rect(20, 30, 20, 30)]
    x = inst(masks, [0.9, 0.6, 0.5, 0.5], [2, 2, 2, 1])
    s = PostprocessSettings(min_areas=(0, 0, 0))
    res = postprocess(x, s)
    assert res.cell_type == "cort"
    assert res.kept.tolist() == [0, 1]  # both 0.5 instances fall below cort's 0.55
    assert res.features["class"].tolist() == ["cort", "cort"]
    check_features(res)
    # the same instances declared astro: threshold 0.35 keeps all four, all labelled astro
    res2 = postprocess(x, s.with_(cell_type="astro"))
    assert res2.cell_type == "astro" and len(res2) == 4
    assert set(res2.features["class"].tolist()) == {"astro"}


def test_majority_class_ties_go_to_first_class():
    x = inst([rect(0, 5, 0, 5), rect(10, 15, 0, 5)], [0.9, 0.9], [2, 1])
    assert majority_class(x, 3) == 1
    assert majority_class(Instances.empty(S), 3) is None


def test_min_area_of_the_type():
    # astro minimum area 150: a 10x10 cell goes, a 10x20 one stays
    x = inst([rect(0, 10, 0, 10), rect(20, 30, 0, 20)], [0.9, 0.8], [1, 1])
    res = postprocess(x, PostprocessSettings())
    assert res.cell_type == "astro" and res.kept.tolist() == [1]
    assert res.features["area"].tolist() == [200]


def test_overlap_removed_in_score_order():
    a = rect(0, 10, 0, 20)  # 200 px
    b = rect(0, 10, 15, 35)  # 200 px, 50 shared with a
    x = inst([a, b], [0.4, 0.9], [0, 0])
    res = postprocess(x, no_limits())
    assert res.kept.tolist() == [1, 0]  # b (higher score) gets id 1 and keeps all its pixels
    assert np.all(res.labels[0:10, 15:35] == 1)
    assert np.all(res.labels[0:10, 0:15] == 2)
    assert res.features["area"].tolist() == [200, 150]
    check_features(res)


def test_max_overlap_drops_mostly_covered_instances():
    a = rect(0, 10, 0, 20)  # 200 px
    b = rect(0, 10, 5, 25)  # 150 of its 200 px inside a
    x = inst([a, b], [0.9, 0.8], [0, 0])
    assert postprocess(x, no_limits(max_overlap=0.5)).kept.tolist() == [0]
    assert postprocess(x, no_limits(max_overlap=0.8)).kept.tolist() == [0, 1]
    # its 50 px remainder still has to reach the minimum area
    assert postprocess(x, no_limits(max_overlap=1.0, min_areas=(60, 0, 0))).kept.tolist() == [0]


def test_mask_threshold_and_probabilities():
    m = rect(0, 10, 0, 10, value=0.4)
    m[2:8, 2:8] = 0.8
    x = inst([m], [0.9], [0])
    assert postprocess(x, no_limits()).features["area"].tolist() == [36]
    assert postprocess(x, no_limits(mask_threshold=0.3)).features["area"].tolist() == [100]


def test_holes_filled():
    m = rect(10, 30, 10, 30)
    m[15:25, 15:25] = 0  # a 10x10 hole
    x = inst([m], [0.9], [0])
    assert postprocess(x, no_limits()).features["area"].tolist() == [400]
    assert postprocess(x, no_limits(fill_holes=False)).features["area"].tolist() == [300]


def test_stray_fragments_removed():
    m = rect(10, 30, 10, 30)
    m[40:43, 50:53] = 1  # a 9-pixel fragment, far from the cell
    x = inst([m], [0.9], [0])
    res = postprocess(x, no_limits())
    assert res.features["area"].tolist() == [400] and res.labels[41, 51] == 0
    assert postprocess(x, no_limits(keep_largest=False)).features["area"].tolist() == [409]


def test_remainder_split_by_overlap_keeps_largest_piece():
    bar = rect(20, 24, 0, 40)  # a horizontal bar, high score
    blob = rect(10, 40, 10, 20)  # a vertical strip the bar cuts into 10x10 (top) and 16x10 (bottom)
    x = inst([bar, blob], [0.9, 0.8], [0, 0])
    res = postprocess(x, no_limits())
    assert res.features["area"].tolist() == [160, 160]
    assert np.all(res.labels[24:40, 10:20] == 2) and np.all(res.labels[10:20, 10:20] == 0)
    res2 = postprocess(x, no_limits(keep_largest=False))
    assert res2.features["area"].tolist() == [160, 260]


def test_empty_input_and_unknown_class():
    res = postprocess(Instances.empty(S))
    assert len(res) == 0 and res.labels.shape == S and not res.labels.any() and res.cell_type is None
    assert res.features["label"].size == 0
    x = inst([rect(0, 5, 0, 5)], [0.9], [5])
    with pytest.raises(ValueError, match="class_names"):
        postprocess(x)


def test_to_instances_round_trip():
    x = inst([rect(0, 10, 0, 10), rect(20, 30, 20, 35)], [0.5, 0.9], [0, 0])
    res = postprocess(x, no_limits())
    back = res.to_instances()
    assert len(back) == 2
    assert back.scores.tolist() == pytest.approx([0.9, 0.5])
    assert back.areas().tolist() == [150, 100]
    assert np.array_equal(back.to_label_image(), res.labels)


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_postprocess.py"
    spec = importlib.util.spec_from_file_location("bench_postprocess", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_800_benchmark_instances_give_clean_non_overlapping_labels():
    # speed is measured in benchmarks/bench_postprocess.py, not asserted here
    x = _bench_module().make_instances(800, seed=1)
    res = postprocess(x, PostprocessSettings())
    check_features(res)
    assert len(res) > 300
    # every kept label is one 8-connected piece
    from scipy import ndimage

    for k in range(1, len(res) + 1, 37):
        _, n = ndimage.label(res.labels == k, structure=np.ones((3, 3)))
        assert n == 1


def test_cleaned_crop_cache_gives_identical_results_across_setting_changes():
    from napari_sartorius.postprocess import CleanedCrops

    x = _bench_module().make_instances(300, seed=4)
    cache = CleanedCrops(x)
    for s in (
        PostprocessSettings(cell_type="shsy5y"),
        PostprocessSettings(cell_type="shsy5y", score_thresholds=(0.5, 0.35, 0.55), min_areas=(150, 150, 75)),
        PostprocessSettings(cell_type="shsy5y", max_overlap=0.1),
        PostprocessSettings(cell_type="shsy5y", fill_holes=False, mask_threshold=0.3),
        PostprocessSettings(cell_type="shsy5y"),
    ):
        a, b = postprocess(x, s), postprocess(x, s, cache=cache)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.kept, b.kept)
    with pytest.raises(ValueError, match="other instances"):
        postprocess(x[:10], PostprocessSettings(), cache=cache)


def test_instance_columns_become_features_and_survive_to_instances():
    x = inst([rect(0, 10, 0, 10), rect(20, 30, 20, 35), rect(40, 50, 40, 50)], [0.5, 0.9, 0.7], [0, 0, 0])
    x.columns = {"uncertainty": np.array([0.1, 0.2, 0.3], np.float32), "reviewed": np.array([True, False, False])}
    res = postprocess(x, no_limits())
    check_features(res)
    assert res.features["uncertainty"].tolist() == pytest.approx([0.2, 0.3, 0.1])  # label order = score order
    assert res.features["reviewed"].tolist() == [False, False, True]
    back = res.to_instances()
    assert back.columns["uncertainty"].tolist() == pytest.approx([0.2, 0.3, 0.1])
    assert back.columns["reviewed"].tolist() == [False, False, True]
    # without columns, no extra features
    assert set(postprocess(inst([rect(0, 10, 0, 10)], [0.5], [0]), no_limits()).features) == {"label", "class", "score", "area"}


def test_excluded_instances_are_left_out_and_free_their_pixels():
    # two overlapping cells: excluding the stronger one lets the weaker keep all its pixels
    x = inst([rect(0, 10, 0, 10), rect(0, 10, 5, 15)], [0.9, 0.5], [0, 0])
    res = postprocess(x, no_limits(max_overlap=1.0), exclude=np.array([True, False]))
    assert res.kept.tolist() == [1]
    assert res.features["area"].tolist() == [100]
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 instances"):
        postprocess(x, no_limits(), exclude=np.array([True]))


def test_stitch_planes_offsets_ids_and_keeps_shared_columns():
    from napari_sartorius.postprocess import stitch_planes

    a = inst([rect(0, 10, 0, 10), rect(20, 30, 20, 35)], [0.5, 0.9], [0, 0])
    a.columns = {"uncertainty": np.array([0.1, 0.2], np.float32)}
    b = inst([rect(0, 10, 0, 10)], [0.8], [0])
    b.columns = {"uncertainty": np.array([0.4], np.float32)}
    ra, rb = postprocess(a, no_limits()), postprocess(b, no_limits())
    labels, feats = stitch_planes([ra, rb], lead_shape=(2,))
    assert labels.shape == (2,) + S
    assert feats["label"].tolist() == [1, 2, 3] and feats["index"].tolist() == [1, 2, 3]
    assert feats["plane"].tolist() == [0, 0, 1]
    assert feats["uncertainty"].tolist() == pytest.approx([0.2, 0.1, 0.4])
    assert set(np.unique(labels[1])) == {0, 3}
    # a column one plane lacks is left out; 2-D input comes back as it is
    _, feats = stitch_planes([ra, postprocess(inst([rect(0, 10, 0, 10)], [0.8], [0]), no_limits())], (2,))
    assert "uncertainty" not in feats
    labels2d, f2d = stitch_planes([ra])
    assert labels2d is ra.labels and f2d["index"].tolist() == [1, 2]
    # (2, 2) lead axes
    lab4, _ = stitch_planes([ra, rb, rb, ra], lead_shape=(2, 2))
    assert lab4.shape == (2, 2) + S

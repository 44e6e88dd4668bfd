"""Per-cell uncertainty from fusion (inference/uncertainty.py) and its summaries."""

import numpy as np
import pytest

from napari_sartorius.inference.ensemble import METHODS, fuse_instances
from napari_sartorius.inference.segment import run_to_completion, segment_image
from napari_sartorius.inference.uncertainty import (
    ImageSummary,
    combine,
    image_summary,
    order_by_uncertainty,
    read_summary_csv,
    write_summary_csv,
)
from napari_sartorius.instances import Instances

SIZE = (80, 100)


def disc(cy, cx, r, score=0.9, value=1.0, box_r=None):
    """One instance: a disc of radius r centred at (cy, cx); box and crop of radius ``box_r`` (default r)."""
    b = r if box_r is None else box_r
    yy, xx = np.mgrid[: 2 * b + 1, : 2 * b + 1]
    crop = np.where((yy - b) ** 2 + (xx - b) ** 2 <= r * r, value, 0.0).astype(np.float32)
    return Instances(SIZE, [[cx - b, cy - b, cx + b + 1, cy + b + 1]], [score], [0], [crop], [[cy - b, cx - b]])


def cells(*parts):
    return Instances.cat(list(parts)) if parts else Instances.empty(SIZE)


@pytest.mark.parametrize("method", METHODS)
def test_sources_that_agree_give_zero_uncertainty(method):
    a = cells(disc(20, 20, 6), disc(50, 60, 8, score=0.7))
    fused = fuse_instances([a, a, a], method=method)
    assert set(fused.columns) >= {"uncertainty", "found", "mask_iou", "score_spread"}
    np.testing.assert_allclose(fused.columns["found"], 1.0)
    np.testing.assert_allclose(fused.columns["mask_iou"], 1.0)
    np.testing.assert_allclose(fused.columns["score_spread"], 0.0)
    np.testing.assert_allclose(fused.uncertainty, 0.0, atol=1e-6)


def test_a_cell_few_sources_found_is_more_uncertain():
    common, rare = disc(20, 20, 6), disc(50, 60, 8)
    sources = [cells(common, rare), cells(common), cells(common), cells(common)]
    fused = fuse_instances(sources, method="wbf")
    u = dict(zip(fused.boxes[:, 0].round().tolist(), fused.uncertainty.tolist()))
    found = dict(zip(fused.boxes[:, 0].round().tolist(), fused.columns["found"].tolist()))
    assert found[14.0] == pytest.approx(1.0) and found[52.0] == pytest.approx(0.25)
    assert u[52.0] > u[14.0]
    # weights: the source that found the rare cell weighs 3 of 6
    fused = fuse_instances(sources, [3.0, 1.0, 1.0, 1.0], method="wbf")
    rare_row = int(np.argmin(np.abs(fused.boxes[:, 0] - 52)))
    assert fused.columns["found"][rare_row] == pytest.approx(0.5)


def test_disagreeing_masks_and_scores_raise_the_uncertainty():
    big, small = disc(30, 40, 9, score=0.9), disc(30, 40, 5, score=0.3, box_r=9)
    same = fuse_instances([big, big], method="wbf")
    mixed = fuse_instances([big, small], method="wbf")
    assert len(mixed) == 1
    assert mixed.columns["score_spread"][0] == pytest.approx(0.0)  # the small mask does not match (IoU < 0.5)
    assert mixed.columns["found"][0] == pytest.approx(0.5)
    assert mixed.uncertainty[0] > same.uncertainty[0]
    near = disc(30, 40, 8, score=0.5)
    spread = fuse_instances([big, near], method="wbf")
    assert spread.columns["found"][0] == pytest.approx(1.0)
    assert spread.columns["score_spread"][0] == pytest.approx(0.2, abs=1e-6)
    assert 0.0 < spread.columns["mask_iou"][0] < 1.0
    assert spread.uncertainty[0] > same.uncertainty[0]


def test_soft_nms_counts_the_overlapping_inputs_as_support():
    a = disc(20, 20, 6)
    fused = fuse_instances([a, a, a, Instances.empty(SIZE)], method="soft_nms")
    top = int(np.argmax(fused.scores))
    assert fused.columns["found"][top] == pytest.approx(0.75)


def test_one_source_leaves_the_uncertainty_undefined():
    fused = fuse_instances([cells(disc(20, 20, 6))])
    assert "uncertainty" not in fused.columns and fused.uncertainty is None
    assert fuse_instances([cells(disc(20, 20, 6))] * 2, uncertainty=False).columns == {}
    empty = fuse_instances([Instances.empty(SIZE)] * 2)
    assert len(empty) == 0 and len(empty.columns["uncertainty"]) == 0


def test_columns_follow_selection_and_concatenation():
    fused = fuse_instances([cells(disc(20, 20, 6), disc(50, 60, 8)), cells(disc(20, 20, 6))])
    u = fused.uncertainty
    np.testing.assert_array_equal(fused[[1, 0]].uncertainty, u[[1, 0]])
    both = Instances.cat([fused, fused[:1]])
    np.testing.assert_array_equal(both.uncertainty, np.concatenate([u, u[:1]]))
    assert Instances.cat([fused, cells(disc(5, 5, 3))]).columns == {}  # not every part has it
    with pytest.raises(ValueError, match="column 'uncertainty' has 1 rows"):
        Instances(SIZE, fused.boxes, fused.scores, fused.classes, fused.masks, fused.mask_origins, {"uncertainty": [0.5]})


def test_combine_is_in_unit_range_and_checks_its_weights():
    u = combine([1.0, 0.0, 0.5], [1.0, 0.0, 0.5], [0.0, 0.5, 0.1])
    assert u[0] == pytest.approx(0.0) and u[1] == pytest.approx(1.0) and 0 < u[2] < 1
    assert combine([0.5], [1.0], [0.0], weights=(1, 0, 0))[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="weights"):
        combine([1.0], [1.0], [0.0], weights=(0, 0, 0))


def test_one_engine_with_tta_has_uncertainty_and_without_it_none(fakes):
    image = fakes.blob_image(shape=(64, 80), n=6, seed=1)
    engine = fakes.BlobEngine()
    with_tta = run_to_completion(segment_image(image, [engine], tta="flips"))
    assert with_tta.uncertainty is not None and len(with_tta.uncertainty) == len(with_tta)
    assert np.all((with_tta.uncertainty >= 0) & (with_tta.uncertainty <= 1))
    # the blob engine is exactly flip-equivariant: every variant agrees
    np.testing.assert_allclose(with_tta.columns["found"], 1.0)
    plain = run_to_completion(segment_image(image, [engine], tta="none"))
    assert plain.uncertainty is None


def test_image_summary_and_summary_csv_round_trip(tmp_path):
    s = image_summary("a.png", np.array([0.1, 0.2, 0.3, 0.9]))
    assert s.count == 4 and s.mean == pytest.approx(0.375) and s.p90 == pytest.approx(0.72)
    undefined = image_summary("b.png", None, count=7)
    assert undefined == ImageSummary("b.png", 7, None, None)
    path = tmp_path / "summary.csv"
    write_summary_csv([s, undefined], path)
    text = path.read_text()
    assert text.splitlines()[0] == "image,cells,mean_uncertainty,p90_uncertainty,expected_wrong"
    assert "nan" not in text.lower()
    back = read_summary_csv(path)
    assert back[1] == undefined and back[0].p90 == pytest.approx(0.72, abs=1e-4)
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="not a summary.csv"):
        read_summary_csv(tmp_path / "bad.csv")


def test_expected_wrong_cells_sum_the_review_priority(tmp_path):
    from napari_sartorius.inference.review_rank import review_priority

    u, s, a = np.array([0.05, 0.4, 0.9]), np.array([0.95, 0.6, 0.3]), np.array([200.0, 180.0, 40.0])
    row = image_summary("a.png", u, scores=s, areas=a)
    assert row.expected_wrong == pytest.approx(review_priority(s, u, a).sum())
    assert 0 < row.expected_wrong < 3
    # a doubtful image expects more wrong cells than a confident one with the same count
    calm = image_summary("calm.png", np.full(3, 0.02), scores=np.full(3, 0.97), areas=np.full(3, 200.0))
    assert calm.expected_wrong < row.expected_wrong
    # undefined without scores/areas, with a missing value, or without uncertainty
    assert image_summary("b.png", u).expected_wrong is None
    assert image_summary("b.png", u, scores=s, areas=np.array([200.0, np.nan, 40.0])).expected_wrong is None
    assert image_summary("b.png", None, count=3, scores=s, areas=a).expected_wrong is None
    write_summary_csv([row, calm], tmp_path / "summary.csv")
    back = read_summary_csv(tmp_path / "summary.csv")
    assert back[0].expected_wrong == pytest.approx(row.expected_wrong, abs=1e-4)
    # a summary.csv of an earlier version (no expected_wrong column) still reads
    (tmp_path / "old.csv").write_text("image,cells,mean_uncertainty,p90_uncertainty\na.png,3,0.4500,0.8000\n")
    assert read_summary_csv(tmp_path / "old.csv") == [ImageSummary("a.png", 3, 0.45, 0.8)]


def test_order_by_uncertainty_puts_the_most_uncertain_images_first():
    summaries = [
        ImageSummary("calm", 10, 0.1, 0.2),
        ImageSummary("wild", 10, 0.5, 0.8),
        ImageSummary("unknown", 10, None, None),
    ]
    pairs = [("unknown", 1), ("calm", 2), ("missing", 3), ("wild", 4)]
    ordered = order_by_uncertainty(pairs, key_of=lambda p: p[0], summaries=summaries)
    assert [p[0] for p in ordered] == ["wild", "calm", "unknown", "missing"]


def test_images_are_ordered_by_expected_wrong_cells_when_all_have_them():
    summaries = [
        ImageSummary("agree_but_doubtful", 10, 0.0, 0.0, 3.5),  # sources agree, low scores / odd sizes
        ImageSummary("wild", 10, 0.5, 0.8, 1.2),
        ImageSummary("unknown", 10, None, None),
    ]
    pairs = [("wild", 1), ("unknown", 2), ("agree_but_doubtful", 3)]
    ordered = order_by_uncertainty(pairs, key_of=lambda p: p[0], summaries=summaries)
    assert [p[0] for p in ordered] == ["agree_but_doubtful", "wild", "unknown"]
    # one defined image without the count: all fall back to p90, so the orders stay comparable
    summaries[1] = ImageSummary("wild", 10, 0.5, 0.8)
    ordered = order_by_uncertainty(pairs, key_of=lambda p: p[0], summaries=summaries)
    assert [p[0] for p in ordered] == ["wild", "agree_but_doubtful", "unknown"]


def test_summary_from_a_layers_features():
    from napari_sartorius.inference.uncertainty import summary_from_features

    s = summary_from_features("img", {"label": [1, 2, 3], "uncertainty": [0.2, np.nan, 0.4]})
    assert s.count == 3 and s.mean == pytest.approx(0.3)
    assert summary_from_features("plain", {"label": [1, 2]}) == ImageSummary("plain", 2, None, None)
    assert summary_from_features("none", None) == ImageSummary("none", 0, None, None)
    assert s.expected_wrong is None  # no score / area columns
    full = summary_from_features("img", {"label": [1, 2], "uncertainty": [0.2, 0.4], "score": [0.9, 0.5],
                                         "area": [150.0, 90.0]})
    assert full.expected_wrong is not None and 0 < full.expected_wrong < 2

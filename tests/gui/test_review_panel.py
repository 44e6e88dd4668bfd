"""The review panel of the Segment dock in a real viewer (run under xvfb-run): next / accept / delete /
counter, review marks and deletions surviving re-renders, edits never overwritten, undefined uncertainty,
the relative default flags and the absolute threshold."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_sartorius._widgets._review_panel import SHORTCUTS, UNDEFINED, ReviewPanel, _camera
from napari_sartorius.inference.review_rank import review_priority
from napari_sartorius._widgets.segment import SegmentCellsWidget
from napari_sartorius.cell_types import DEFAULT_CLASSES
from napari_sartorius.instances import Instances

pytestmark = pytest.mark.gui

SHAPE = (120, 160)
# five square cells (y0, x0, side) with scores and uncertainties; their review priorities (areas
# 144, 196, 100, 256, 144 px, median 144) are about 0.02, 0.49, 0.36, 0.19, 0.04: at P(wrong) >= 0.1 the
# panel flags (10, 60), (60, 20), (60, 90) in that order
CELLS = [(10, 10, 12), (10, 60, 14), (60, 20, 10), (60, 90, 16), (90, 130, 12)]
SCORES = [0.95, 0.4, 0.8, 0.6, 0.9]
UNCERTAINTY = [0.05, 0.7, 0.3, 0.5, 0.1]
PRIORITY = review_priority(SCORES, UNCERTAINTY, [s * s for _, _, s in CELLS])


def flag_at(panel, threshold=0.1):
    panel.flag_mode.value = "at"
    panel.threshold.value = threshold


def test_the_fixture_priorities():
    np.testing.assert_allclose(PRIORITY, [0.017, 0.488, 0.364, 0.191, 0.039], atol=0.002)


def raw_cells(with_uncertainty=True) -> Instances:
    masks = [np.ones((s, s), np.float32) for _, _, s in CELLS]
    inst = Instances(
        SHAPE,
        boxes=[(x, y, x + s, y + s) for y, x, s in CELLS],
        scores=SCORES,
        classes=[2] * len(CELLS),
        masks=masks,
        mask_origins=[(y, x) for y, x, _ in CELLS],
    )
    if with_uncertainty:
        inst.columns = {"uncertainty": np.array(UNCERTAINTY, np.float32)}
    return inst


@pytest.fixture
def viewer_and_dock(make_napari_viewer):
    viewer = make_napari_viewer()
    image = viewer.add_image(np.full(SHAPE, 100, np.uint8), name="cells")
    dock = SegmentCellsWidget(viewer)
    for row in dock.class_rows:
        row.score.value = 0.0
        row.min_area.value = 0
    flag_at(dock.review)
    return viewer, dock, image


def cell_of(layer, label):
    ys, xs = np.nonzero(np.asarray(layer.data) == label)
    return (int(ys.min()), int(xs.min())) if ys.size else None


def test_next_accept_delete_and_the_counter(viewer_and_dock):
    viewer, dock, image = viewer_and_dock
    dock.set_predictions([raw_cells()], DEFAULT_CLASSES, image)
    layer = dock.labels_layer
    panel = dock.review
    assert panel.layer.value is layer
    np.testing.assert_allclose(sorted(layer.features["uncertainty"]), sorted(UNCERTAINTY), atol=1e-6)
    assert not layer.features["reviewed"].any()
    assert panel.counter.value == "reviewed 0 of 3 flagged"

    first = panel.next_cell()
    assert cell_of(layer, first) == (10, 60)  # priority 0.49
    assert panel.cell_info.value.startswith(f"cell {first}: P(wrong) 0.49, score 0.40, uncertainty 0.70, area 196 px")
    assert layer.selected_label == first
    assert np.allclose(_camera(viewer).center[-2:], (10 + 6.5, 60 + 6.5), atol=0.6)
    assert _camera(viewer).zoom > 1.0

    second = panel.accept()
    assert cell_of(layer, second) == (60, 20)  # priority 0.36
    assert bool(layer.features.set_index("label").loc[first, "reviewed"])
    assert panel.counter.value.startswith("reviewed 1 of 3 flagged")

    third = panel.delete()
    assert cell_of(layer, second) is None, "the deleted cell's pixels are gone"
    assert second not in set(layer.features["label"])
    assert cell_of(layer, third) == (60, 90)  # priority 0.19
    assert panel.counter.value.startswith("reviewed 1 of 2 flagged")
    assert not dock.layer_was_edited(), "a deletion from the panel is not a hand edit"

    assert panel.accept() is None
    assert panel.counter.value.startswith("reviewed 2 of 2 flagged")
    assert "nothing left" in panel.counter.value


def test_review_survives_slider_re_renders(viewer_and_dock):
    viewer, dock, image = viewer_and_dock
    dock.set_predictions([raw_cells()], DEFAULT_CLASSES, image)
    layer = dock.labels_layer
    panel = dock.review
    panel.next_cell()
    panel.accept()  # (10, 60) reviewed; now at (60, 20)
    panel.delete()  # (60, 20) deleted
    dock.mask_threshold.value = 0.4  # a slider move re-renders (same masks, new ids possible)
    dock.rerender()
    assert dock.labels_layer is layer, "an unedited layer is re-rendered in place"
    tops = {cell_of(layer, lab): bool(rev) for lab, rev in zip(layer.features["label"], layer.features["reviewed"])}
    assert tops[(10, 60)] is True
    assert (60, 20) not in tops and not np.any(np.asarray(layer.data)[60:70, 20:30])
    assert panel.counter.value.startswith("reviewed 1 of 2 flagged")


def test_edits_are_never_overwritten_and_reviews_move_to_the_new_layer(viewer_and_dock, qtbot):
    viewer, dock, image = viewer_and_dock
    dock.set_predictions([raw_cells()], DEFAULT_CLASSES, image)
    edited = dock.labels_layer
    panel = dock.review
    panel.next_cell()
    panel.accept()  # (10, 60) reviewed through the dock
    edited.paint((110, 5), 99, refresh=True)  # a hand edit
    snapshot = np.asarray(edited.data).copy()
    assert dock.layer_was_edited()
    # reviewing the edited layer works in place and never goes through the dock
    panel.layer.value = edited
    label = panel.next_cell()
    panel.delete()
    assert cell_of(edited, label) is None
    snapshot[snapshot == label] = 0
    dock.rerender()
    assert dock.labels_layer is not edited
    assert np.array_equal(edited.data, snapshot), "the edited layer changed"
    new = dock.labels_layer
    assert panel.layer.value is new
    tops = {cell_of(new, lab): bool(rev) for lab, rev in zip(new.features["label"], new.features["reviewed"])}
    assert tops[(10, 60)] is True  # reviewed before the edit, through the dock's record
    assert (60, 20) in tops  # deleted on the edited layer only


def test_undefined_uncertainty_is_said_and_never_nan(viewer_and_dock):
    viewer, dock, image = viewer_and_dock
    dock.set_predictions([raw_cells(with_uncertainty=False)], DEFAULT_CLASSES, image)
    layer = dock.labels_layer
    assert "uncertainty" not in layer.features.columns
    assert not layer.features.isna().any().any()
    assert dock.review.counter.value == UNDEFINED
    assert not dock.review.next_button.enabled
    assert dock.review.next_cell() is None


def test_other_layers_are_reviewed_in_place(make_napari_viewer):
    viewer = make_napari_viewer()
    plain = viewer.add_labels(np.zeros(SHAPE, np.uint16), name="other plugin")
    panel = ReviewPanel(viewer)
    panel.layer.value = plain
    assert panel.counter.value == UNDEFINED
    labels = np.zeros(SHAPE, np.uint16)
    labels[5:15, 5:15] = 1
    labels[30:40, 30:40] = 2
    labels[50:60, 50:60] = 3  # painted by hand: no features row
    read = viewer.add_labels(
        labels, name="from a file",
        features={"index": [1, 2], "label": [1, 2], "uncertainty": [0.3, 0.8], "reviewed": [False, False]},
    )
    panel.layer.value = read
    assert panel.flag_mode.value == "top"  # the default: all of these two, fewer than a handful
    assert panel.counter.value == "reviewed 0 of 2 flagged"
    assert panel.next_cell() == 2  # no score column, equal areas: the more uncertain one first
    assert panel.accept() == 1
    assert panel.delete() is None
    assert not np.any(read.data == 1) and np.any(read.data == 3)
    assert panel.counter.value.startswith("reviewed 1 of 1 flagged")


def test_shortcuts_and_uncertain_points(viewer_and_dock):
    viewer, dock, image = viewer_and_dock
    dock.set_predictions([raw_cells()], DEFAULT_CLASSES, image)
    panel = dock.review
    keymap = viewer.keymap

    def bound(key):
        hits = [f for k, f in keymap.items() if str(k).lower().replace("+", "-") == key.lower() or str(k) == key]
        assert hits, key
        return hits[0]

    bound(SHORTCUTS["next"])(viewer)
    assert dock.review.current is not None and cell_of(dock.labels_layer, dock.review.current) == (10, 60)
    bound(SHORTCUTS["accept"])(viewer)
    assert dock.review.counter.value.startswith("reviewed 1 of 3 flagged")
    bound(SHORTCUTS["delete"])(viewer)
    assert dock.review.counter.value.startswith("reviewed 1 of 2 flagged")
    dock.set_predictions([raw_cells()], DEFAULT_CLASSES, image)  # a fresh result: nothing reviewed
    pts = panel.mark_uncertain()
    assert pts is not None and len(pts.data) == 3
    np.testing.assert_allclose(sorted(pts.features["uncertainty"]), [0.3, 0.5, 0.7], atol=1e-6)
    np.testing.assert_allclose(sorted(pts.features["priority"]), sorted(PRIORITY[1:4]), atol=1e-6)
    panel.next_cell()
    panel.accept()
    assert len(pts.data) == 2, "the marks follow the queue"
    assert panel.mark_uncertain() is pts and len(pts.data) == 2


def test_a_run_with_tta_fills_the_queue(qtbot, make_napari_viewer):
    """Uncertainty flows from fusion to the layer's features and the panel (weight-free engine, flips)."""
    from napari_sartorius.synthetic import make_sample

    viewer = make_napari_viewer()
    viewer.add_image(make_sample("cort", seed=3, shape=(128, 160)).image, name="cells")
    dock = SegmentCellsWidget(viewer)
    for row in dock.class_rows:
        row.score.value = 0.05
    dock.tta.value = "flips"
    dock.cell_type.value = "cort"
    assert dock.run() is not None
    qtbot.waitUntil(lambda: not dock.is_running, timeout=60_000)
    assert dock.last_error is None, dock.last_error
    feats = dock.labels_layer.features
    assert len(feats) > 0
    assert {"uncertainty", "found", "mask_iou", "score_spread", "reviewed"} <= set(feats.columns)
    assert feats["uncertainty"].between(0, 1).all() and not feats.isna().any().any()
    n = len(feats)
    assert dock.review.counter.value == f"reviewed 0 of {min(n, max(5, -(-n // 5)))} flagged"
    flag_at(dock.review, 0.0)  # every cell flagged
    assert dock.review.counter.value == f"reviewed 0 of {n} flagged"
    first = dock.review.next_cell()
    p = review_priority(feats["score"], feats["uncertainty"], feats["area"])
    assert first == int(feats["label"].to_numpy()[np.lexsort((feats["label"].to_numpy(), -p))[0]])


def test_review_of_a_stack_moves_the_slider_to_the_cells_plane(make_napari_viewer):
    viewer = make_napari_viewer()
    image = viewer.add_image(np.full((2,) + SHAPE, 100, np.uint8), name="stack")
    dock = SegmentCellsWidget(viewer)
    for row in dock.class_rows:
        row.score.value = 0.0
        row.min_area.value = 0
    flag_at(dock.review)
    calm = raw_cells()
    calm.scores = np.full(len(CELLS), 0.99, np.float32)
    calm.columns = {"uncertainty": np.zeros(len(CELLS), np.float32)}
    dock.set_predictions([calm, raw_cells()], DEFAULT_CLASSES, image, lead_shape=(2,))
    layer = dock.labels_layer
    assert layer.data.shape == (2,) + SHAPE
    assert dock.review.counter.value == "reviewed 0 of 3 flagged"
    label = dock.review.next_cell()
    plane = int(layer.features.set_index("label").loc[label, "plane"])
    assert plane == 1 and viewer.dims.current_step[0] == 1
    dock.review.accept()
    dock.rerender()
    reviewed = layer.features[layer.features["reviewed"]]
    assert reviewed["label"].tolist() == [label] and reviewed["plane"].tolist() == [1]


def test_finetune_pairs_can_be_ordered_by_uncertainty(make_napari_viewer):
    from napari_sartorius._widgets._review_panel import order_pairs_by_uncertainty

    viewer = make_napari_viewer()
    img = viewer.add_image(np.zeros(SHAPE, np.uint8), name="img")
    lab = np.zeros(SHAPE, np.uint16)
    lab[:5, :5] = 1
    calm = viewer.add_labels(lab, name="calm", features={"label": [1], "uncertainty": [0.1]})
    wild = viewer.add_labels(lab, name="wild", features={"label": [1], "uncertainty": [0.7]})
    hand = viewer.add_labels(lab, name="hand")
    pairs = [(img, hand), (img, calm), (img, wild)]
    assert [p[1].name for p in order_pairs_by_uncertainty(pairs)] == ["wild", "calm", "hand"]


def test_the_default_flags_a_share_of_the_cells_and_says_so(make_napari_viewer):
    """Flips-like agreement (uncertainty ~0 everywhere): an absolute threshold flags nothing, the default
    top 20 % always flags a handful, ranked by priority; the absolute threshold is still there."""
    viewer = make_napari_viewer()
    labels = np.zeros((60, 200), np.uint16)
    for k in range(30):  # 30 cells of 8 x 5 px in a row, every other column
        y, x = 5 + 25 * (k % 2), 6 * k
        labels[y : y + 8, x : x + 5] = k + 1
    rng = np.random.default_rng(0)
    score = np.round(rng.uniform(0.6, 0.99, 30), 3)
    unc = np.round(rng.uniform(0.0, 0.03, 30), 3)
    layer = viewer.add_labels(
        labels, name="calm", features={"label": np.arange(1, 31), "score": score, "area": np.full(30, 40), "uncertainty": unc}
    )
    panel = ReviewPanel(viewer)
    panel.layer.value = layer
    assert panel.flag_mode.value == "top" and panel.top_percent.value == 20.0
    assert not panel.top_percent.native.isHidden() and panel.threshold.native.isHidden()
    assert panel.counter.value == "reviewed 0 of 6 flagged"
    assert panel.flag_info.value == "6 of 30 cells flagged: the 20 % most likely wrong (at least 5)"
    p = review_priority(score, unc, np.full(30, 40))
    expected = (np.lexsort((np.arange(1, 31), -p))[:6] + 1).tolist()
    assert panel.queue()[0] == expected
    assert panel.next_cell() == expected[0]
    panel.top_percent.value = 50.0
    assert panel.counter.value.startswith("reviewed 0 of 15 flagged")
    panel.flag_mode.value = "at"
    assert not panel.threshold.native.isHidden() and panel.top_percent.native.isHidden()
    panel.threshold.value = 0.5
    assert panel.counter.value.startswith(f"reviewed 0 of {int(np.count_nonzero(p >= 0.5))} flagged")
    assert panel.flag_info.value == f"{int(np.count_nonzero(p >= 0.5))} of 30 cells flagged: P(wrong) >= 0.50"
    panel.threshold.value = 0.99
    assert panel.counter.value.startswith("reviewed 0 of 0 flagged")

"""The "Fine-tune" dock in a real viewer (run under xvfb-run): training from layers into the Segment dock's
ensemble, cancel, bad input refused before anything starts, errors as notifications."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_sartorius._widgets.finetune import (
    AUG_STRENGTHS,
    AUG_SWITCHES,
    FineTuneWidget,
    default_output_path,
    find_segment_docks,
)
from napari_sartorius._widgets.segment import SegmentCellsWidget
from napari_sartorius.synthetic import make_sample

pytestmark = pytest.mark.gui

SHAPE = (128, 128)
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised R50-FPN with tiny sizes, few proposals and a frozen body (fast on a CPU)."""
    from napari_sartorius._widgets._torch_import import guard_torch_import

    guard_torch_import()
    import torch  # a dependency: a broken install fails here, never skips
    from napari_sartorius.models.checkpoint import init_checkpoint
    from napari_sartorius.models.config import ModelConfig

    torch.set_num_threads(1)
    config = ModelConfig(
        "mask_rcnn_R_50_FPN", min_size_train=(128,), max_size_train=192, min_size_test=128, max_size_test=192,
        roi_batch_size_per_image=16, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_head_dim=64, freeze_at=5,
        detections_per_img=100,
    )
    return init_checkpoint("mask_rcnn_R_50_FPN", tmp_path_factory.mktemp("ckpt") / "tiny.pt", config=config)


@pytest.fixture
def errors(monkeypatch):
    import napari.utils.notifications as notes

    shown: list[str] = []
    monkeypatch.setattr(notes, "show_error", lambda msg: shown.append(str(msg)))
    return shown


@pytest.fixture
def viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    s = make_sample("cort", seed=1, shape=SHAPE)
    viewer.add_image(s.image, name="cells", metadata={"cell_type": "cort"})
    viewer.add_labels(s.labels, name="cells labels")
    v = make_sample("cort", seed=2, shape=SHAPE)
    viewer.add_image(v.image, name="held out")
    viewer.add_labels(v.labels, name="held out labels")
    viewer.layers.selection.active = viewer.layers["cells"]
    return viewer


def _dock(viewer, tmp_path, start=None, iterations=3):
    dock = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Fine-tune")
    if start is not None:
        dock.start_checkpoint.value = start
    dock.iterations.value = iterations
    dock.batch_size.value = 1
    dock.learning_rate.value = 0.005
    dock.device.value = "cpu"
    dock.output.value = tmp_path / "finetuned.pt"
    return dock


def _wait(qtbot, dock):
    qtbot.waitUntil(lambda: not dock.is_running, timeout=WAIT_MS)


def test_augmentation_controls_mirror_the_settings():
    """The dock names the augmentations without importing torch; they must match the real dataclass."""
    from napari_sartorius._widgets._torch_import import guard_torch_import

    guard_torch_import()  # torch in a process with an OpenGL context: never without the guard
    from napari_sartorius.training.augment import AugmentationSettings

    defaults = {f.name: f.default for f in dataclasses.fields(AugmentationSettings)}
    for name, value in AUG_SWITCHES.items():
        assert defaults[name] == value, name
    for name, (value, *_rest) in AUG_STRENGTHS.items():
        assert defaults[name] == value, name


def test_defaults_pick_the_selected_image_and_its_labels(viewer, tmp_path):
    _, dock = viewer.window.add_plugin_dock_widget("napari-sartorius", "Fine-tune")
    assert isinstance(dock, FineTuneWidget)
    (row,) = dock.pair_rows
    assert row.image_layer.value is viewer.layers["cells"]
    assert row.labels_layer.value is viewer.layers["cells labels"]
    assert row.cell_type.value == "cort"  # from the image's metadata
    assert dock.validation.image_layer.value is None
    # another image in a new row finds its own labels by name
    row2 = dock.add_pair(viewer.layers["held out"])
    assert row2.labels_layer.value is viewer.layers["held out labels"]
    dock.remove_pair(row2)
    assert len(dock.pair_rows) == 1
    # the default output never names an existing file
    (tmp_path / "finetuned.pt").write_bytes(b"x")
    assert default_output_path(tmp_path) == tmp_path / "finetuned_2.pt"
    # a starting checkpoint brings its own architecture
    dock.start_checkpoint.value = tmp_path / "finetuned.pt"
    assert not dock.architecture.enabled and dock.resume.enabled


def test_controls_map_onto_the_training_settings(viewer, tmp_path):
    from napari_sartorius._widgets._torch_import import guard_torch_import

    guard_torch_import()  # run alone this test is the first to import torch: the guard comes first
    from napari_sartorius.training.augment import AugmentationSettings
    from napari_sartorius.training.trainer import TrainSettings

    dock = _dock(viewer, tmp_path, iterations=40)
    kw, aug = dock.train_settings(tmp_path / "m.pt", validating=False)
    assert "freeze_at" not in kw and kw["eval_period"] == 0 and kw["warmup_iters"] == 4
    assert "short_edges" not in aug  # training size 0: the model's own sizes
    dock.train_size.value = 128
    dock.freeze.value = 2
    dock.aug_strengths["brightness"].value = 0.3
    kw, aug = dock.train_settings(tmp_path / "m.pt", validating=True)
    assert kw["freeze_at"] == 2 and kw["eval_period"] == dock.eval_period.value
    assert aug["short_edges"] == (102, 115, 128, 141, 154) and aug["brightness"] == 0.3
    settings = TrainSettings(**kw, augment=AugmentationSettings(**aug))
    assert settings.out == str(tmp_path / "m.pt") and settings.augment.resize
    dock.aug_switches["resize"].value = False  # a single scale: exactly the training size
    _, aug = dock.train_settings(tmp_path / "m.pt", validating=False)
    assert aug["short_edges"] == (128,) and aug["resize"]


def test_stacks_give_one_pair_per_plane(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    samples = [make_sample("astro", seed=k, shape=SHAPE) for k in range(2)]
    viewer.add_image(np.stack([s.image for s in samples]).astype(np.uint16), name="stack")
    viewer.add_labels(np.stack([s.labels for s in samples]), name="stack labels")
    dock = _dock(viewer, tmp_path)
    (row,) = dock.pair_rows
    assert row.labels_layer.value is viewer.layers["stack labels"]
    (pair,), val = dock.checked_pairs()
    assert val is None and len(pair.planes) == 2
    for (im, lab), s in zip(pair.planes, samples):
        assert im.dtype == np.uint8 and np.array_equal(im, s.image) and np.array_equal(lab, s.labels)


def test_train_from_layers_and_join_the_segment_dock(qtbot, viewer, tmp_path, tiny_checkpoint):
    _, segment = viewer.window.add_plugin_dock_widget("napari-sartorius", "Segment cells")
    assert find_segment_docks(viewer) == [segment]
    dock = _dock(viewer, tmp_path, start=tiny_checkpoint, iterations=3)
    dock.set_validation(viewer.layers["held out"], viewer.layers["held out labels"], "cort")
    dock.eval_period.value = 0  # validate once, at the end
    for k in ("crop", "resize", "rot90"):
        dock.aug_switches[k].value = False
    dock.train_size.value = 128
    dock.freeze.value = 5
    worker = dock.run()
    assert worker is not None and dock.is_running and not dock.run_button.enabled
    _wait(qtbot, dock)
    assert dock.last_error is None, dock.last_error
    out = dock.last_outcome
    assert out is not None and not out.cancelled and out.iterations == 3
    assert (tmp_path / "finetuned.pt").is_file()
    assert out.best_path == tmp_path / "finetuned_best.pt" and out.best_path.is_file()
    # live curve, progress and validation label were fed
    assert [it for it, _ in dock.loss_plot.losses] == [1, 2, 3]
    assert all(np.isfinite(v) for _, v in dock.loss_plot.losses)
    assert len(dock.loss_plot.scores) == 1
    assert dock.progress.value == dock.progress.max == 3
    assert dock.validation_score.value.startswith("validation score")
    dock.loss_plot.grab()  # paints without error
    # the model (best by validation) joined the open Segment dock's ensemble
    paths = [e.path for e in segment.models.entries]
    assert out.best_path.resolve() in paths
    assert dock.added_entries and dock.added_entries[0].path == out.best_path.resolve()
    assert "added to Segment cells" in dock.status.value
    # the next run gets a fresh default name only when the default was used; here the user chose one
    assert dock.output.value == tmp_path / "finetuned.pt"
    # the Segment dock can use the new model right away
    segment.models.set_enabled(segment.models.entries[0], False)
    segment.image_layer.value = viewer.layers["cells"]
    segment.device.value = "cpu"
    segment.run()
    qtbot.waitUntil(lambda: not segment.is_running, timeout=WAIT_MS)
    assert segment.last_error is None, segment.last_error


def test_opens_a_segment_dock_when_none_is_open(viewer, tmp_path, tiny_checkpoint):
    dock = _dock(viewer, tmp_path)
    assert find_segment_docks(viewer) == []
    (entry,) = dock.add_to_segment(tiny_checkpoint)
    (segment,) = find_segment_docks(viewer)
    assert isinstance(segment, SegmentCellsWidget) and entry in segment.models.entries
    # adding the same file again replaces the entry (new weights load on the next run), weight kept
    segment.models.set_weight(entry, 2.5)
    (again,) = dock.add_to_segment(tiny_checkpoint)
    assert [e.path for e in segment.models.entries].count(entry.path) == 1
    assert again.weight == 2.5


def test_cancel_keeps_the_checkpoint_reached(qtbot, viewer, tmp_path, tiny_checkpoint):
    _, segment = viewer.window.add_plugin_dock_widget("napari-sartorius", "Segment cells")
    before = len(segment.models.entries)
    dock = _dock(viewer, tmp_path, start=tiny_checkpoint, iterations=500)
    dock.train_size.value = 128
    assert dock.run() is not None
    qtbot.waitUntil(lambda: len(dock.loss_plot.losses) >= 1, timeout=WAIT_MS)
    dock.cancel_button.clicked.emit()
    _wait(qtbot, dock)
    out = dock.last_outcome
    assert dock.last_error is None, dock.last_error
    assert out.cancelled and 1 <= out.iterations < 500
    assert out.checkpoint_path == tmp_path / "finetuned.pt" and out.checkpoint_path.is_file()
    assert "Cancelled" in dock.status.value and "kept" in dock.status.value
    # not added automatically; the button adds it
    assert len(segment.models.entries) == before
    assert dock.add_to_segment_button.enabled
    dock.add_to_segment_button.clicked.emit()
    assert len(segment.models.entries) == before + 1
    assert dock.run_button.enabled and not dock.cancel_button.enabled


@pytest.mark.parametrize("case", ["mismatched shapes", "no labels layer", "no pair", "empty labels"])
def test_bad_input_is_refused_before_starting(make_napari_viewer, tmp_path, errors, case):
    viewer = make_napari_viewer()
    s = make_sample("cort", seed=1, shape=SHAPE)
    viewer.add_image(s.image, name="cells")
    if case == "mismatched shapes":
        viewer.add_labels(np.ones((64, 64), np.uint16), name="small labels")
    elif case == "empty labels":
        viewer.add_labels(np.zeros(SHAPE, np.uint16), name="cells labels")
    elif case == "no pair":
        viewer.add_labels(s.labels, name="cells labels")
    dock = _dock(viewer, tmp_path)
    (row,) = dock.pair_rows
    if case == "mismatched shapes":
        row.labels_layer.value = viewer.layers["small labels"]
    if case == "no pair":
        dock.remove_pair(row)
    assert dock.run() is None
    assert not dock.is_running and dock.last_outcome is None
    assert len(errors) == 1
    expected = {
        "mismatched shapes": "64x64 but image 'cells' is 128x128",
        "no labels layer": "no Labels layer is open",
        "no pair": "choose at least one image/labels pair",
        "empty labels": "hold no cell",
    }[case]
    assert expected in errors[0]
    assert not (tmp_path / "finetuned.pt").exists()


def test_training_errors_become_notifications(qtbot, viewer, tmp_path, errors):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    dock = _dock(viewer, tmp_path, start=bad)
    assert dock.run() is not None
    _wait(qtbot, dock)
    assert dock.last_outcome is None
    assert errors and "corrupt.pt" in errors[-1] and errors[-1].startswith("Fine-tune failed")
    assert "corrupt.pt" in dock.last_error
    assert not (tmp_path / "finetuned.pt").exists()
    assert dock.run_button.enabled


def test_loss_plot_scale_and_decimation(qtbot):
    from napari_sartorius._widgets._loss_plot import LossPlot, decimate, loss_range

    pts = [(float(i), float(i % 7)) for i in range(1, 1001)]
    small = decimate(pts, 100)
    assert len(small) <= 101 and small[0] == pts[0] and small[-1] == pts[-1]
    xs = [x for x, _ in small]
    assert xs == sorted(xs)
    assert decimate(pts[:50], 100) == pts[:50]
    assert loss_range([]) == (0.0, 1.0)
    lo, hi = loss_range([2.0, 3.0])
    assert lo == pytest.approx(1.95) and hi == pytest.approx(3.05)
    assert loss_range([0.1, 3.0])[0] == 0.0  # a span reaching near 0 starts at 0
    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.clear(10)
    plot.add_loss(1, float("nan"))  # skipped: it would wreck the scale
    for i, v in enumerate([3.0, 2.5, 2.0], start=1):
        plot.add_loss(i, v)
    plot.add_score(3, 0.4)
    assert [v for _, v in plot.losses] == [3.0, 2.5, 2.0]
    assert plot.smoothed[-1][1] < 3.0 and plot.scores == [(3.0, 0.4)]
    plot.resize(300, 120)
    assert not plot.grab().isNull()

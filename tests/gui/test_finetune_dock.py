"""The "Fine-tune" dock in a real viewer (run under xvfb-run): training from layers into the viewer's
ensemble, cancel, bad input refused before anything starts, every failure ends the run with a message."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_sartorius._widgets.finetune import FineTuneWidget, default_output_path
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
    dock.apply_preset("full")  # whole images at the model's own (tiny) sizes
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
    from napari_sartorius.training.settings import warmup_length

    dock = _dock(viewer, tmp_path, iterations=40)
    s = dock.train_settings(tmp_path / "m.pt", validating=False)
    assert s.freeze_at is None and s.eval_period == 0 and warmup_length(s) == 8
    assert s.augment.short_edges is None  # training size 0: the model's own sizes
    dock.train_size.value = 128
    dock.freeze.value = 2
    dock.aug_strengths["brightness"].value = 0.3
    s = dock.train_settings(tmp_path / "m.pt", validating=True)
    assert s.freeze_at == 2 and s.eval_period == dock.eval_period.value
    assert s.augment.short_edges == (96, 128, 160) and s.augment.brightness == 0.3  # multiples of 32
    assert s.out == str(tmp_path / "m.pt") and s.augment.resize
    dock.aug_switches["resize"].value = False  # a single scale: exactly the training size
    s = dock.train_settings(tmp_path / "m.pt", validating=False)
    assert s.augment.short_edges == (128,) and s.augment.resize


def test_presets_set_the_controls_and_show_an_estimate(viewer, tmp_path):
    dock = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Fine-tune")
    assert dock.preset.value == "quick"
    assert dock.freeze.value == 6 and dock.crop_cells.value == 256 and dock.train_size.value == 384
    quick = dock.estimated_seconds()
    assert dock.estimate.value.startswith("Estimated time: about")
    dock.apply_preset("full")
    assert dock.freeze.value == -1 and dock.crop_cells.value == 0 and dock.iterations.value == 300
    assert dock.estimated_seconds() > 10 * quick  # whole model, whole upscaled images, more iterations
    dock.iterations.value = 10  # leaving the preset's values makes it "Custom"
    assert dock.preset.value == "custom"
    dock.device.value = "cuda"
    assert "a GPU" in dock.estimate.value


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


def test_a_model_joins_the_viewers_ensemble_even_before_the_segment_dock_opens(viewer, tmp_path, tiny_checkpoint):
    dock = _dock(viewer, tmp_path)
    (entry,) = dock.add_to_segment(tiny_checkpoint)
    _, segment = viewer.window.add_plugin_dock_widget("napari-sartorius", "Segment cells")
    assert isinstance(segment, SegmentCellsWidget) and entry in segment.models.entries
    # adding the same file again replaces the entry (new weights load on the next run), weight kept
    segment.models.set_weight(entry, 2.5)
    (again,) = dock.add_to_segment(tiny_checkpoint)
    assert [e.path for e in segment.models.entries].count(entry.path) == 1
    assert again in segment.models.entries and again.weight == 2.5
    assert len(segment.models._rows) == len(segment.models.entries)  # one row per member


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


@pytest.mark.parametrize(
    "failure, expected",
    [
        ("training", "the loss became nan at iteration 2"),
        ("memory", "out of memory: lower the batch size"),
        ("vanished", "No such file"),
        ("bug", "IndexError: pop from empty list (an unexpected error"),
    ],
)
def test_every_worker_failure_ends_the_run_with_a_message(qtbot, viewer, tmp_path, errors, monkeypatch, failure, expected):
    """A RuntimeError escaping a napari generator worker never signals "finished": the dock hung."""
    import napari_sartorius.training.trainer as trainer
    from napari_sartorius.training.settings import TrainingError, TrainProgress

    def failing_train(begin, data, settings, val_data=None, stop=None):
        yield TrainProgress(1, settings.iters, {"total": 2.0}, 0.01, 14.0)
        if failure == "training":
            raise TrainingError("the loss became nan at iteration 2 (loss_mask nan): lower the learning rate")
        if failure == "memory":
            raise MemoryError()
        if failure == "vanished":
            open(tmp_path / "vanished.png", "rb")
        [].pop()

    monkeypatch.setattr(trainer, "train", failing_train)
    dock = _dock(viewer, tmp_path, iterations=3)
    assert dock.run() is not None
    _wait(qtbot, dock)
    assert expected in dock.last_error and expected in errors[-1]
    assert dock.status.value.startswith("Fine-tune failed") and "left" not in dock.status.value
    assert dock.run_button.enabled and not dock.cancel_button.enabled and not dock.is_running


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
    plot.resize(300, 160)
    assert not plot.grab().isNull()
    assert plot.minimumHeight() >= 150
    from napari_sartorius._widgets._loss_plot import use_log_scale

    assert not use_log_scale([3.0, 2.5, 2.0])
    assert use_log_scale([3.0, 2.9e9, 1.5])  # a blow-up must not flatten the rest of the curve
    plot.add_loss(4, 7.9e9)
    assert not plot.grab().isNull()


def test_pairs_are_ordered_most_uncertain_first(viewer, tmp_path):
    """'Most uncertain first' puts the pair whose labels carry the higher uncertainty on top; a pair
    without uncertainty (labels painted by hand) goes last."""
    for name, values in (("cells labels", 0.1), ("held out labels", 0.6)):
        layer = viewer.layers[name]
        ids = np.unique(layer.data)
        ids = ids[ids > 0]
        layer.features = {"label": ids, "uncertainty": np.full(len(ids), values)}
    viewer.add_labels(np.zeros(SHAPE, np.int32), name="painted")
    dock = _dock(viewer, tmp_path)
    (row,) = dock.pair_rows
    row.set_pair(viewer.layers["cells"], viewer.layers["cells labels"], "cort")
    dock.add_pair(viewer.layers["cells"], viewer.layers["painted"], "cort")
    dock.add_pair(viewer.layers["held out"], viewer.layers["held out labels"], "cort")
    order = dock.order_pairs_by_uncertainty()
    assert order == ["held out labels", "cells labels", "painted"]
    assert [r.labels_layer.value.name for r in dock.pair_rows] == order
    assert dock.pair_rows[0].image_layer.value.name == "held out"

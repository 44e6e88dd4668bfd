"""The "Segment cells" dock in a real viewer (run under xvfb-run): segmenting with the classical engine
and a checkpoint, cancelling, live controls without model calls, protection of user edits, export."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_sartorius._widgets.segment import SegmentCellsWidget
from napari_sartorius.cell_types import DEFAULT_CLASSES
from napari_sartorius.classical import ClassicalEngine
from napari_sartorius.synthetic import make_sample

pytestmark = pytest.mark.gui

SHAPE = (192, 256)
WAIT_MS = 60_000


class CountingEngine:
    """Wraps an engine and counts ``predict_batch`` calls (to prove the live controls call no model)."""

    def __init__(self, inner, name="counting"):
        self.inner = inner
        self.name = name
        self.class_names = tuple(inner.class_names)
        self.calls = 0

    def predict_batch(self, images):
        self.calls += 1
        return self.inner.predict_batch(images)


class BlockingEngine(CountingEngine):
    """Blocks inside ``predict_batch`` until released (to cancel a run while a model is busy)."""

    def __init__(self, inner):
        super().__init__(inner, name="blocking")
        self.entered = threading.Event()
        self.release = threading.Event()

    def predict_batch(self, images):
        self.entered.set()
        self.release.wait(30)
        return super().predict_batch(images)


class TruthEngine:
    """Returns the exact cells of known synthetic images, with scores 0.3..1 (a deterministic model)."""

    name = "truth"
    class_names = DEFAULT_CLASSES

    def __init__(self, samples):
        self.by_image = {np.asarray(s.image, np.uint8).tobytes(): s for s in samples}
        self.calls = 0

    def predict_batch(self, images):
        self.calls += 1
        out = []
        for im in images:
            s = self.by_image[np.asarray(im).astype(np.uint8).tobytes()]
            inst = s.instances
            inst.scores = np.linspace(1.0, 0.3, len(inst), dtype=np.float32)
            out.append(inst)
        return out


class FailingEngine(CountingEngine):
    def predict_batch(self, images):
        raise RuntimeError("the model file is corrupt")


@pytest.fixture
def sample():
    return make_sample("cort", seed=3, shape=SHAPE)


@pytest.fixture
def viewer_and_dock(make_napari_viewer, sample):
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="cells")
    dock = SegmentCellsWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Segment cells")
    _low_thresholds(dock)
    return viewer, dock


def _low_thresholds(dock):
    # The tests are about the dock, not about how confident the weight-free engine is on a tiny image.
    for row in dock.class_rows:
        row.score.value = 0.05


def _use_only(dock, engine):
    dock.models.set_enabled(dock.models.entries[0], False)
    return dock.models.add_engine(engine)


def _run_and_wait(qtbot, dock):
    worker = dock.run()
    assert worker is not None
    qtbot.waitUntil(lambda: not dock.is_running, timeout=WAIT_MS)
    return worker


def test_dock_opens_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.uint8), name="img")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sartorius", "Segment cells")
    assert isinstance(widget, SegmentCellsWidget)
    assert widget.image_layer.value is viewer.layers["img"]


def test_layers_segment_menu_offers_the_dock(make_napari_viewer):
    from napari._app_model import get_app_model

    make_napari_viewer()
    items = get_app_model().menus.get_menu("napari/layers/segment")
    ids = [getattr(getattr(i, "command", None), "id", None) for i in items]
    assert "napari-sartorius.segment_cells" in ids


def test_segment_with_the_classical_engine(qtbot, viewer_and_dock, sample):
    viewer, dock = viewer_and_dock
    assert dock.image_layer.value is viewer.layers["cells"]
    _run_and_wait(qtbot, dock)
    assert dock.last_error is None, dock.last_error
    layer = viewer.layers["cells labels"]
    assert layer is dock.labels_layer
    assert layer.data.shape == SHAPE
    n = int(layer.data.max())
    assert n >= 1
    feats = layer.features
    assert {"label", "class", "score", "area"} <= set(feats.columns)
    assert len(feats) == n
    assert sorted(feats["label"]) == sorted(np.unique(layer.data[layer.data > 0]))
    # area column agrees with the pixels
    lab = int(feats["label"].iloc[0])
    assert int(feats["area"].iloc[0]) == int(np.count_nonzero(layer.data == lab))
    assert set(feats["class"]) == {"cort"}
    assert dock.progress.value == dock.progress.max


@pytest.mark.slow
def test_segment_with_a_small_checkpoint(qtbot, viewer_and_dock, tmp_path):
    """A randomly initialised Mask R-CNN checkpoint runs through the dock (the output may be empty)."""
    from napari_sartorius._widgets._torch_import import guard_torch_import

    guard_torch_import()  # the viewer's OpenGL context is up: see _torch_import's notes
    from napari_sartorius.models import checkpoint as ckpt_mod
    import torch

    torch.set_num_threads(1)
    from napari_sartorius.models.config import ModelConfig

    path = tmp_path / "tiny.pt"
    # small test size and few proposals keep the CPU forward pass to a second or two
    tiny = ModelConfig(
        "mask_rcnn_R_50_FPN", min_size_test=96, max_size_test=160, rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=100, box_head_dim=64, detections_per_img=20,
    )
    ckpt_mod.init_checkpoint("mask_rcnn_R_50_FPN", path, DEFAULT_CLASSES, config=tiny)
    viewer, dock = viewer_and_dock
    dock.models.set_enabled(dock.models.entries[0], False)
    entry = dock.models.add_checkpoint(path)
    dock.device.value = "cpu"
    _run_and_wait(qtbot, dock)
    assert dock.last_error is None, dock.last_error
    layer = viewer.layers["cells labels"]
    assert layer.data.shape == SHAPE
    assert len(layer.features) == int(len(np.unique(layer.data)) - 1)
    # the loaded engine is kept for the next run
    assert "cpu" in entry._cache


def test_cancel_a_run(qtbot, viewer_and_dock):
    viewer, dock = viewer_and_dock
    engine = BlockingEngine(ClassicalEngine())
    _use_only(dock, engine)
    dock.run()
    assert dock.is_running and dock.cancel_button.enabled and not dock.segment_button.enabled
    assert engine.entered.wait(WAIT_MS / 1000)
    dock.cancel_button.clicked.emit()  # as a click
    engine.release.set()
    qtbot.waitUntil(lambda: not dock.is_running, timeout=WAIT_MS)
    assert "cells labels" not in [lay.name for lay in viewer.layers]
    assert dock.labels_layer is None
    assert dock.status.value == "cancelled"
    assert dock.segment_button.enabled and not dock.cancel_button.enabled
    assert dock.last_error is None


def test_errors_become_notifications(qtbot, viewer_and_dock, monkeypatch):
    import napari.utils.notifications as notes

    shown = []
    monkeypatch.setattr(notes, "show_error", lambda msg: shown.append(msg))
    viewer, dock = viewer_and_dock
    _use_only(dock, FailingEngine(ClassicalEngine(), name="broken"))
    _run_and_wait(qtbot, dock)
    assert shown and "the model file is corrupt" in shown[-1]
    assert "corrupt" in dock.last_error
    assert dock.labels_layer is None


def test_live_controls_rerender_without_a_model_call(qtbot, viewer_and_dock):
    viewer, dock = viewer_and_dock
    engine = CountingEngine(ClassicalEngine())
    _use_only(dock, engine)
    _run_and_wait(qtbot, dock)
    calls = engine.calls
    assert calls >= 1
    layer = dock.labels_layer
    before = layer.data.copy()
    renders = dock.render_count
    # a stricter cort score threshold drops cells: labels change, no model runs
    dock.class_row("cort").score.value = 0.97
    qtbot.waitUntil(lambda: dock.render_count > renders, timeout=5000)
    assert layer is dock.labels_layer and len(viewer.layers) == 2
    assert int(layer.data.max()) < int(before.max())
    assert len(layer.features) == int(layer.data.max())
    # the other controls re-render too
    for change in (
        lambda: setattr(dock.class_row("cort").score, "value", 0.0),
        lambda: setattr(dock.class_row("cort").min_area, "value", 400),
        lambda: setattr(dock.mask_threshold, "value", 0.8),
        lambda: setattr(dock.max_overlap, "value", 0.1),
        lambda: setattr(dock.fill_holes, "value", False),
        lambda: setattr(dock.keep_largest, "value", False),
    ):
        renders = dock.render_count
        change()
        qtbot.waitUntil(lambda: dock.render_count > renders, timeout=5000)
    assert engine.calls == calls
    assert dock.last_render_ms < 1000
    assert not np.array_equal(layer.data, before)


def test_fixed_cell_type_changes_the_thresholds(qtbot, viewer_and_dock):
    viewer, dock = viewer_and_dock
    _run_and_wait(qtbot, dock)
    assert dock.last_cell_type == "cort"
    dock.class_row("shsy5y").score.value = 1.0
    dock.cell_type.value = "shsy5y"
    dock.rerender()
    assert dock.last_cell_type == "shsy5y"
    assert int(dock.labels_layer.data.max()) == 0 or set(dock.labels_layer.features["class"]) == {"shsy5y"}


def test_edits_are_never_overwritten(qtbot, viewer_and_dock):
    viewer, dock = viewer_and_dock
    _run_and_wait(qtbot, dock)
    edited = dock.labels_layer
    # paint a new cell with napari's own paint method, as the brush does
    new_id = int(edited.data.max()) + 1
    edited.paint((5, 5), new_id, refresh=True)
    snapshot = edited.data.copy()
    assert dock.layer_was_edited()
    dock.mask_threshold.value = 0.7
    qtbot.waitUntil(lambda: dock.labels_layer is not edited, timeout=5000)
    assert np.array_equal(edited.data, snapshot), "the edited layer changed"
    assert dock.labels_layer.name == "cells labels (uncorrected)"  # named for what it is
    assert len([lay for lay in viewer.layers if lay.name.startswith("cells labels")]) == 2
    # the viewer's store knows which layer the user corrected; Export keeps pointing at it
    from napari_sartorius._widgets.ensemble_store import store_for

    assert store_for(viewer).edited_labels("cells", viewer.layers) is edited
    assert dock.export_layer.value is edited
    # the new layer is the dock's target now: further moves update it in place
    fresh = dock.labels_layer
    dock.mask_threshold.value = 0.6
    dock.rerender()
    assert dock.labels_layer is fresh
    assert np.array_equal(edited.data, snapshot)
    # a new run also leaves the edited layer alone
    _run_and_wait(qtbot, dock)
    assert np.array_equal(edited.data, snapshot)


def test_a_new_run_after_an_edit_writes_a_new_layer(qtbot, viewer_and_dock):
    viewer, dock = viewer_and_dock
    _run_and_wait(qtbot, dock)
    first = dock.labels_layer
    _run_and_wait(qtbot, dock)
    assert dock.labels_layer is first  # unedited: updated in place
    first.data = np.zeros_like(first.data)  # the user cleared it
    _run_and_wait(qtbot, dock)
    assert dock.labels_layer is not first
    assert not first.data.any()


def test_a_deleted_result_layer_is_recreated(qtbot, viewer_and_dock):
    viewer, dock = viewer_and_dock
    _run_and_wait(qtbot, dock)
    viewer.layers.remove(dock.labels_layer)
    dock.mask_threshold.value = 0.55
    dock.rerender()
    assert dock.labels_layer in viewer.layers


def test_a_stack_is_segmented_plane_by_plane(qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    samples = [make_sample("cort", seed=s, shape=(128, 160)) for s in (1, 2)]
    viewer.add_image(np.stack([s.image for s in samples]), name="stack")
    dock = SegmentCellsWidget(viewer)
    _low_thresholds(dock)
    engine = TruthEngine(samples)
    _use_only(dock, engine)
    _run_and_wait(qtbot, dock)
    assert dock.last_error is None, dock.last_error
    layer = viewer.layers["stack labels"]
    assert layer.data.shape == (2, 128, 160)
    ids0 = set(np.unique(layer.data[0])) - {0}
    ids1 = set(np.unique(layer.data[1])) - {0}
    assert ids0 and ids1 and not ids0 & ids1, "label ids must be unique across planes"
    for z, s in enumerate(samples):  # each plane holds its own image's cells
        assert len(np.unique(layer.data[z])) - 1 == s.n_cells
    assert set(layer.features["plane"]) == {0, 1}
    assert len(layer.features) == len(ids0) + len(ids1)
    calls = engine.calls
    dock.mask_threshold.value = 0.7
    dock.rerender()
    assert engine.calls == calls


def test_rgb_image(qtbot, make_napari_viewer, sample):
    viewer = make_napari_viewer()
    viewer.add_image(np.repeat(sample.image[..., None], 3, axis=-1), name="rgb", rgb=True)
    dock = SegmentCellsWidget(viewer)
    _low_thresholds(dock)
    _run_and_wait(qtbot, dock)
    assert dock.last_error is None, dock.last_error
    assert viewer.layers["rgb labels"].data.shape == SHAPE


def test_model_list(tmp_path, viewer_and_dock):
    _, dock = viewer_and_dock
    ml = dock.models
    with pytest.raises(ValueError, match="cannot be removed"):
        ml.remove(ml.entries[0])
    with pytest.raises(FileNotFoundError):
        ml.add_checkpoint(tmp_path / "missing.pt")
    text = tmp_path / "notes.pt"
    text.write_text("my weights are on the server\n")
    with pytest.raises(ValueError, match="not a checkpoint: .*notes.pt is a text file"):
        ml.add_checkpoint(text)  # refused when added, saying why, not at the next run
    assert len(ml.entries) == 1
    f = tmp_path / "m.pt"
    _torch_like_file(f)
    e = ml.add_checkpoint(f)
    with pytest.raises(ValueError, match="already"):
        ml.add_checkpoint(f)
    ml.set_weight(e, 2.5)
    assert e.weight == 2.5
    assert [x.name for x in ml.selected()] == [ml.entries[0].name, "m.pt"]
    ml.remove("m.pt")
    assert len(ml.entries) == 1


def _torch_like_file(path):
    """A zip laid out as torch.save writes one (the add-time check reads no further; no torch here)."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{path.stem}/data.pkl", b"\x80\x02}q\x00.")


def test_a_failing_member_never_costs_the_others_result(qtbot, viewer_and_dock):
    viewer, dock = viewer_and_dock
    dock.models.add_engine(FailingEngine(ClassicalEngine(), name="broken"))
    _run_and_wait(qtbot, dock)
    assert dock.last_error is None
    assert dock.labels_layer is not None and int(dock.labels_layer.data.max()) >= 1  # the classical result
    assert any("broken" in w and "left out" in w and "corrupt" in w for w in dock.last_warnings)
    assert "left out" in dock.status.value


def test_a_failure_line_goes_when_the_input_changes(qtbot, viewer_and_dock, sample):
    viewer, dock = viewer_and_dock
    _use_only(dock, FailingEngine(ClassicalEngine(), name="broken"))
    _run_and_wait(qtbot, dock)
    assert dock.status.value.startswith("failed")
    other = viewer.add_image(sample.image[::-1], name="other")
    dock.image_layer.value = other
    assert dock.status.value == ""


def test_mask_controls_are_disabled_for_the_weight_free_engines_binary_masks(qtbot, viewer_and_dock):
    viewer, dock = viewer_and_dock
    _run_and_wait(qtbot, dock)  # the classical engine alone
    for w in (dock.mask_threshold, dock.max_overlap, dock.fill_holes):
        assert not w.enabled and "binary" in w.tooltip
    assert dock.keep_largest.enabled and all(r.score.enabled for r in dock.class_rows)
    dock.models.add_engine(CountingEngine(ClassicalEngine(), name="a model"))
    _run_and_wait(qtbot, dock)  # fused with another member: probabilities, overlaps possible
    for w in (dock.mask_threshold, dock.max_overlap, dock.fill_holes):
        assert w.enabled and "binary" not in (w.tooltip or "")


def test_export_names_the_image_file_not_a_path(qtbot, make_napari_viewer, sample, tmp_path):
    import json

    from PIL import Image

    (tmp_path / "data" / "images").mkdir(parents=True)
    Image.fromarray(sample.image).save(tmp_path / "data" / "images" / "well_a1.png")
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "data" / "images" / "well_a1.png"))
    dock = SegmentCellsWidget(viewer)
    _low_thresholds(dock)
    _run_and_wait(qtbot, dock)
    out = tmp_path / "exports" / "deep" / "cells.json"
    out.parent.mkdir(parents=True)
    assert dock.export(out) == [str(out)]  # the image has a file: nothing else written
    coco = json.loads(out.read_text())
    assert [im["file_name"] for im in coco["images"]] == ["well_a1.png"]


def test_export_coco_and_csv(qtbot, viewer_and_dock, tmp_path):
    from napari_sartorius.io import load_annotations

    viewer, dock = viewer_and_dock
    _run_and_wait(qtbot, dock)
    layer = dock.labels_layer
    layer.paint((3, 3), int(layer.data.max()) + 1, refresh=True)  # a user-painted cell, no features row
    n = len(np.unique(layer.data)) - 1
    for name in ("cells.json", "cells.csv"):
        written = dock.export(tmp_path / name)
        # the sample image has no file: it is written beside the annotations so they open together
        assert written == [str(tmp_path / name), str(tmp_path / "cells.png")]
        aset = load_annotations(tmp_path / name)
        assert len(aset) == 1
        ann = aset.images[0]
        assert ann.image_id == "cells"
        assert len(ann.instances) == n
        assert ann.instances.image_size == SHAPE
        assert ann.cell_type == "cort"
        back = ann.instances.to_label_image()
        assert np.array_equal(back > 0, layer.data > 0)
    with pytest.raises(ValueError, match="json"):
        dock.export(tmp_path / "cells.txt")


@pytest.mark.slow
def test_napari_with_the_plugin_leaves_torch_alone_and_imports_it_safely_later(make_napari_viewer):
    """In a fresh process: open napari, a sample and every dock of the plugin: torch stays unloaded.
    Then import torchvision as the dock does on its first run: without the guard this dies with
    SIGSEGV where triton and Mesa's LLVM meet (see _widgets/_torch_import.py)."""
    import subprocess
    import sys

    code = (  # torch and torchvision are dependencies: a broken install fails here, never skips
        "import sys, numpy as np, napari, npe2\n"
        "from qtpy.QtWidgets import QApplication\n"
        "v = napari.Viewer(show=True)\n"
        "v.open_sample('napari-sartorius', 'cort')\n"
        "mf = npe2.PluginManifest.from_distribution('napari-sartorius')\n"
        "for w in mf.contributions.widgets: v.window.add_plugin_dock_widget('napari-sartorius', w.display_name)\n"
        "QApplication.instance().processEvents()\n"
        "print('torch loaded at start:', 'torch' in sys.modules)\n"
        "from napari_sartorius._widgets._torch_import import guard_torch_import\n"
        "guard_torch_import()\n"
        "import torch, torchvision.ops\n"
        "print('ok', float(torchvision.ops.box_iou(torch.zeros(1, 4), torch.zeros(1, 4)).sum()))\n"
        "v.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch loaded at start: False" in out.stdout
    assert "ok" in out.stdout


def test_both_docks_fit_a_1366x768_screen(make_napari_viewer, sample):
    """The Segment and Fine-tune docks opened together in a 768-px-high window go into tabs (stacked
    they need ~1,200 px); their run controls keep a place, the rest scrolls, and the window does not
    grow past the screen."""
    viewer = make_napari_viewer(show=True)
    viewer.add_image(sample.image, name="cells")
    window = viewer.window._qt_window
    window.resize(1366, 768)
    viewer.window.add_plugin_dock_widget("napari-sartorius", "Segment cells")
    viewer.window.add_plugin_dock_widget("napari-sartorius", "Fine-tune")
    from qtpy.QtWidgets import QApplication, QDockWidget, QWidget

    from napari_sartorius._widgets._layout import DOCK_OBJECT_NAME

    for _ in range(5):
        QApplication.processEvents()
    assert window.height() <= 768, window.height()
    assert window.minimumSizeHint().height() <= 768
    ours = [d for d in window.findChildren(QDockWidget) if d.findChild(QWidget, DOCK_OBJECT_NAME) is not None]
    assert len(ours) == 2 and window.tabifiedDockWidgets(ours[0]) == [ours[1]]

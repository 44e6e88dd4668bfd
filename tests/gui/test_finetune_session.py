"""The whole correct-then-fine-tune session a biologist plays, scripted in a real viewer (xvfb-run):
segment, correct the labels, fine-tune 3 iterations from a fresh model, cancel a run, fine-tune with
the quick preset; the model joins the ensemble. It must end without a hang."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
pytest.importorskip("torch")

from napari_sartorius.synthetic import make_sample

pytestmark = pytest.mark.gui

WAIT_MS = 600_000  # a loaded 2-core machine; a hang still fails


def _finetune(qtbot, dock):
    assert dock.run() is not None
    qtbot.waitUntil(lambda: not dock.is_running, timeout=WAIT_MS)
    assert dock.last_error is None, dock.last_error
    assert dock.run_button.enabled and not dock.cancel_button.enabled
    return dock.last_outcome


def test_segment_correct_finetune_cancel_quick_and_join_the_ensemble(qtbot, make_napari_viewer, tmp_path):
    import torch

    torch.set_num_threads(1)
    viewer = make_napari_viewer()
    s = make_sample("cort", seed=5, shape=(128, 160))
    viewer.add_image(s.image, name="cells", metadata={"cell_type": "cort"})

    # 1. segment with the weight-free engine
    _, segment = viewer.window.add_plugin_dock_widget("napari-sartorius", "Segment cells")
    segment.device.value = "cpu"
    assert segment.run() is not None
    qtbot.waitUntil(lambda: not segment.is_running, timeout=WAIT_MS)
    assert segment.last_error is None, segment.last_error
    corrected = segment.labels_layer

    # 2. correct it (here: the exact cells), then move a slider: the re-render goes to a new layer
    corrected.data = s.labels.astype(corrected.data.dtype)
    segment.mask_threshold.value = 0.6
    qtbot.waitUntil(lambda: segment.labels_layer is not corrected, timeout=10_000)
    assert segment.labels_layer.name.endswith("(uncorrected)")

    # 3. the Fine-tune dock pairs the image with the corrected layer, not the newer re-render
    _, dock = viewer.window.add_plugin_dock_widget("napari-sartorius", "Fine-tune")
    (row,) = dock.pair_rows
    assert row.image_layer.value.name == "cells"
    assert row.labels_layer.value.name == corrected.name
    assert row.cell_type.value == "cort"
    assert dock.preset.value == "quick" and dock.estimate.value.startswith("Estimated time")

    # 4. three iterations from a fresh model (quick preset: frozen body, crops around the cells)
    dock.device.value = "cpu"
    dock.iterations.value = 3
    dock.train_size.value = 128  # a small test image: keep the preset's crops and sizes small too
    dock.crop_cells.value = 128
    dock.batch_size.value = 1
    dock.output.value = tmp_path / "fresh.pt"
    out = _finetune(qtbot, dock)
    assert out is not None and out.iterations == 3 and not out.cancelled
    assert all(np.isfinite(v) and v < 20 for _, v in dock.loss_plot.losses), dock.loss_plot.losses
    fresh = (tmp_path / "fresh.pt").resolve()
    assert fresh in [e.path for e in segment.models.entries]  # joined the ensemble

    # 5. a long run, cancelled after its first iteration: it returns within an iteration
    dock.start_checkpoint.value = fresh
    dock.iterations.value = 500
    dock.output.value = tmp_path / "cancelled.pt"
    assert dock.run() is not None
    qtbot.waitUntil(lambda: len(dock.loss_plot.losses) >= 1, timeout=WAIT_MS)
    dock.cancel_button.clicked.emit()
    qtbot.waitUntil(lambda: not dock.is_running, timeout=WAIT_MS)
    assert dock.last_outcome.cancelled and dock.last_outcome.iterations < 500
    assert "Cancelled" in dock.status.value and dock.run_button.enabled

    # 6. the quick preset from the fresh checkpoint; the model joins the ensemble
    dock.apply_preset("quick")
    assert dock.freeze.value == 6 and dock.crop_cells.value > 0
    dock.iterations.value = 2
    dock.train_size.value = 128
    dock.batch_size.value = 1
    dock.output.value = tmp_path / "quick.pt"
    out = _finetune(qtbot, dock)
    assert out.iterations == 2 and (tmp_path / "quick.pt").is_file()
    paths = [e.path for e in segment.models.entries]
    assert (tmp_path / "quick.pt").resolve() in paths and fresh in paths
    assert "added to Segment cells" in dock.status.value

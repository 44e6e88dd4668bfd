"""Pretrained models in napari (run under xvfb-run): the Segment dock's "Add pretrained..." picker
downloads in a worker with progress and Cancel against a loopback server; the Fine-tune dock starts
from a registry name and gives a one-class model's cell class to every class."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_download import _entry, d2_file, home, server  # noqa: E402,F401 - fixtures shared with the download tests

from napari_sartorius.models import download, zoo  # noqa: E402

pytestmark = pytest.mark.gui
WAIT_MS = 120_000


@pytest.fixture
def errors(monkeypatch):
    import napari.utils.notifications as notes

    shown: list[str] = []
    monkeypatch.setattr(notes, "show_error", lambda msg: shown.append(str(msg)))
    return shown


def _registered(monkeypatch, entry):
    monkeypatch.setitem(zoo.REGISTRY, entry.name, entry)
    return entry


def test_add_pretrained_downloads_in_a_worker_and_adds_the_model(qtbot, server, d2_file, home, monkeypatch):
    from napari_sartorius._widgets._model_list import ModelList

    body, cfg, _ = d2_file
    entry = _registered(monkeypatch, _entry(server.serve("/gui/model_final.pth", body), cfg, name="test-gui"))
    models = ModelList()
    assert models.pretrained_button.text == "Add pretrained..."
    picker = models.open_pretrained()
    assert "test-gui" in picker.choice.choices and "livecell-shsy5y" in picker.choice.choices
    assert "imagenet-r50" not in picker.choice.choices  # body weights are no segmentation model
    picker.choice.value = "test-gui"
    assert "to download" in picker.about.value and str(download.download_path(entry)) in picker.about.value
    seen = []
    worker = picker.start()
    worker.yielded.connect(seen.append)
    qtbot.waitUntil(lambda: not picker.is_running, timeout=WAIT_MS)
    assert picker.last_error is None
    assert [e.path for e in models.entries[1:]] == [download.checkpoint_path(entry).resolve()]
    assert picker.progress.value == 1000 and "ready" in picker.status.value
    assert any(total == len(body) for _, _, total in seen)
    assert "in the cache" in picker.about.value
    # a second time: instant from the cache, not added twice
    picker.start("test-gui")
    qtbot.waitUntil(lambda: not picker.is_running, timeout=WAIT_MS)
    assert len(models.entries) == 2 and "already in the model list" in picker.status.value


def test_cancel_and_errors(qtbot, server, home, errors, monkeypatch):
    from napari_sartorius._widgets._model_list import ModelList

    gated = _registered(monkeypatch, _entry(server.serve("/gate/model.pth", bytes(3 << 20)), "unused.yaml",
                                            name="test-gated"))
    _registered(monkeypatch, _entry(server.base + "/nothing/model.pth", "unused.yaml", name="test-404"))
    models = ModelList()
    picker = models.open_pretrained()
    server.gate.clear()
    picker.start("test-gated")
    picker.cancel()
    server.gate.set()
    qtbot.waitUntil(lambda: not picker.is_running, timeout=WAIT_MS)
    assert "cancelled" in picker.last_error and errors == []
    assert len(models.entries) == 1 and not download.download_path(gated).exists()
    picker.start("test-404")
    qtbot.waitUntil(lambda: not picker.is_running, timeout=WAIT_MS)
    assert "HTTP 404" in picker.last_error and len(errors) == 1 and "\n" not in errors[0]
    assert len(models.entries) == 1


def test_finetune_starts_from_a_registry_name(qtbot, make_napari_viewer, home, tmp_path, monkeypatch):
    from napari_sartorius._widgets._torch_import import guard_torch_import

    guard_torch_import()
    import torch

    from napari_sartorius._widgets.finetune import FineTuneWidget
    from napari_sartorius.models.checkpoint import init_checkpoint
    from napari_sartorius.models.config import ModelConfig
    from napari_sartorius.synthetic import make_sample

    torch.set_num_threads(1)
    # a one-class model already in the cache, as `pretrained get` leaves it (no network needed)
    entry = _registered(monkeypatch, _entry("https://example.invalid/cell.pth", "unused.yaml", name="test-cell"))
    config = ModelConfig(
        "mask_rcnn_R_50_FPN", class_names=("cell",), min_size_train=(128,), max_size_train=192, min_size_test=128,
        max_size_test=192, roi_batch_size_per_image=16, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_head_dim=64, freeze_at=5, detections_per_img=50,
    )  # fmt: skip
    ckpt = init_checkpoint("mask_rcnn_R_50_FPN", download.checkpoint_path(entry), config=config)
    download._write_marker(ckpt, entry, "0" * 64)

    viewer = make_napari_viewer()
    s = make_sample("cort", seed=1, shape=(128, 128))
    viewer.add_image(s.image, name="cells", metadata={"cell_type": "cort"})
    viewer.add_labels(s.labels, name="cells labels")
    viewer.layers.selection.active = viewer.layers["cells"]
    dock = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Fine-tune")
    assert "livecell-shsy5y" in dock.pretrained.choices and "test-cell" in dock.pretrained.choices
    dock.pretrained.value = "test-cell"
    assert not dock.architecture.enabled
    dock.iterations.value = 1
    dock.batch_size.value = 1
    dock.device.value = "cpu"
    dock.output.value = tmp_path / "finetuned.pt"
    assert dock.run() is not None
    qtbot.waitUntil(lambda: not dock.is_running, timeout=WAIT_MS)
    assert dock.last_error is None, dock.last_error
    assert any("start from its cell class" in m for m in dock.messages), dock.messages
    assert dock.last_outcome.checkpoint_path.is_file()

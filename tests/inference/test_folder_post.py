"""Folder inference with post-processing in worker processes behind the engines (post_workers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_sartorius.classical import ClassicalEngine, ClassicalSettings
from napari_sartorius.inference import folder_run
from napari_sartorius.inference.folder_run import FolderSettings, segment_folder
from napari_sartorius.synthetic import make_sample

SHAPE = (96, 128)


def quiet(_line):
    return None


@pytest.fixture
def folder(tmp_path):
    from skimage.io import imsave

    d = tmp_path / "images"
    d.mkdir()
    for k in range(5):
        s = make_sample(("cort", "astro", "shsy5y")[k % 3], seed=k, shape=SHAPE)
        imsave(d / f"im{k}.png", s.image, check_contrast=False)
    (d / "im2b.png").write_bytes(b"not an image")  # unreadable, in the middle
    stack = np.stack([make_sample("shsy5y", seed=s, shape=SHAPE).image for s in (7, 8)])
    tifffile.imwrite(d / "stack.tif", stack, photometric="minisblack")
    return d


def outputs(out: Path) -> dict:
    """Everything a run leaves that must not depend on where post-processing ran."""
    parts = [json.loads(line) for line in (out / "parts" / "rank0.jsonl").read_text().splitlines()]
    return {
        "predictions": json.loads((out / "predictions.json").read_text()),
        "order": [p["file"] for p in parts],
        "failures": (out / "failures.txt").read_text(),
        "summary": (out / "summary.csv").read_text(),
        "labels": {p.name: tifffile.imread(p).tolist() for p in sorted(out.glob("*_labels.tif"))},
    }


@pytest.mark.parametrize("batch", [1, 2])
def test_post_processing_workers_give_the_same_outputs_in_the_same_order(folder, tmp_path, batch):
    imgs = sorted(p for p in folder.iterdir())
    engines = [ClassicalEngine(ClassicalSettings())]
    settings = FolderSettings(batch=batch)
    here = segment_folder(imgs, engines, tmp_path / "here", settings, post_workers=0, say=quiet)
    behind = segment_folder(imgs, engines, tmp_path / "behind", settings, post_workers=2, say=quiet)
    assert (here.processed, here.merged_images) == (behind.processed, behind.merged_images) == (6, 7)
    assert [f for f, _ in here.failed] == [f for f, _ in behind.failed] == ["im2b.png"]
    a, b = outputs(tmp_path / "here"), outputs(tmp_path / "behind")
    assert len(a["labels"]) == 6 and a["order"] == [p.name for p in imgs if p.name != "im2b.png"]
    assert a == b


@pytest.mark.parametrize("post_workers", [0, 2])
def test_a_value_error_in_post_processing_skips_that_image_only(folder, tmp_path, monkeypatch, post_workers):
    real = folder_run._finish_planes

    def picky(raws, planes, path, class_names, settings):
        if path.name == "im3.png":
            raise ValueError("this image's predictions are not usable")
        return real(raws, planes, path, class_names, settings)

    monkeypatch.setattr(folder_run, "_finish_planes", picky)
    imgs = sorted(p for p in folder.iterdir() if p.suffix == ".png" and p.name != "im2b.png")
    res = segment_folder(imgs, [ClassicalEngine(ClassicalSettings())], tmp_path / "o", post_workers=post_workers,
                         say=quiet)
    assert res.failed == [("im3.png", "this image's predictions are not usable")]
    assert res.processed == 4 and not (tmp_path / "o" / "im3_labels.tif").exists()


def test_negative_post_workers_are_refused(folder, tmp_path):
    with pytest.raises(ValueError, match="post_workers -1"):
        segment_folder(sorted(folder.glob("*.png"))[:1], [ClassicalEngine(ClassicalSettings())], tmp_path / "o",
                       post_workers=-1, say=quiet)


def _die(*_args):
    import os

    os._exit(3)  # a worker killed mid-image (e.g. by the kernel's out-of-memory killer)


def test_a_dead_post_processing_worker_stops_the_run_in_one_line(folder, tmp_path, monkeypatch):
    from napari_sartorius.inference.folder_run import FolderRunError

    monkeypatch.setattr(folder_run, "_finish_file", _die)
    imgs = sorted(folder.glob("im*.png"))[:2]
    with pytest.raises(FolderRunError, match="worker process died.*--resume"):
        segment_folder(imgs, [ClassicalEngine(ClassicalSettings())], tmp_path / "o", post_workers=1, say=quiet)
    assert not (tmp_path / "o" / ".segment.lock").exists()

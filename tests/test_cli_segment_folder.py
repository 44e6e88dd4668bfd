"""``segment`` on folders: steps inside an image, multi-plane TIFFs, --resume, failures, exit statuses."""

import json

import numpy as np
import pytest

from napari_sartorius.cli import main
from napari_sartorius.synthetic import make_sample

SHAPE = (96, 128)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def images(tmp_path):
    from skimage.io import imsave

    d = tmp_path / "images"
    d.mkdir()
    for k in range(3):
        imsave(d / f"im{k}.png", make_sample("shsy5y", seed=k + 1, shape=SHAPE).image, check_contrast=False)
    return d


def test_steps_inside_an_image_are_shown(images, tmp_path, capsys):
    code, _, err = run(capsys, "segment", images / "im0.png", "--out", tmp_path / "o", "--tta", "flips")
    assert code == 0, err
    assert "step 1/2: model 1/1 (classical), flips" in err  # the 4 flips in one batch
    assert "step 2/2: fused" in err
    assert "[1/1] im0.png:" in err


def test_a_multi_plane_tiff_is_segmented_plane_by_plane(tmp_path, capsys):
    import tifffile

    stack = np.stack([make_sample("shsy5y", seed=s, shape=SHAPE).image for s in (1, 2)])
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    code, out, err = run(capsys, "segment", tmp_path / "stack.tif", "--out", tmp_path / "o")
    assert code == 0, err
    assert tifffile.imread(tmp_path / "o" / "stack_labels.tif").shape == (2,) + SHAPE
    assert "in 2 planes" in err and "for 2 image(s)" in out
    preds = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert {p["file_name"] for p in preds} == {"stack_z0.tif", "stack_z1.tif"}


def test_resume_skips_finished_images_and_failures_exit_1(images, tmp_path, capsys):
    (images / "im1.png").write_bytes(b"broken")
    code, out, err = run(capsys, "segment", images, "--out", tmp_path / "o")
    assert code == 1
    assert "im1.png: skipped" in err and "listed in" in err and "failures.txt" in err
    assert "for 2 image(s)" in out
    from skimage.io import imsave

    imsave(images / "im1.png", make_sample("shsy5y", seed=2, shape=SHAPE).image, check_contrast=False)
    code, out, err = run(capsys, "segment", images, "--out", tmp_path / "o", "--resume")
    assert code == 0, err
    assert "2 already done" in err and "[1/1] im1.png" in err and "for 3 image(s)" in out
    assert not (tmp_path / "o" / "failures.txt").exists()


def test_bad_batch_or_workers_is_one_line(images, tmp_path, capsys):
    code, _, err = run(capsys, "segment", images, "--out", tmp_path / "o", "--batch", 0)
    assert code == 2 and "--batch 0" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "segment", images, "--out", tmp_path / "o", "--workers", -1)
    assert code == 2 and "--workers -1" in err

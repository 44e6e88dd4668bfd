"""``segment`` writes summary.csv (cells, mean and p90 uncertainty per image) and the uncertainty of
each prediction, regular and ``--raw``."""

import csv
import json

import pytest

from napari_sartorius.cli import main
from napari_sartorius.synthetic import make_sample

SHAPE = (96, 128)


@pytest.fixture
def images(tmp_path):
    from skimage.io import imsave

    folder = tmp_path / "images"
    folder.mkdir()
    for style, seed in (("cort", 1), ("cort", 4)):
        imsave(folder / f"{style}_{seed}.png", make_sample(style, seed=seed, shape=SHAPE).image, check_contrast=False)
    return folder


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("raw", [False, True])
def test_segment_with_tta_writes_summary_and_uncertainty(images, tmp_path, capsys, raw):
    out = tmp_path / "seg"
    argv = ["segment", str(images), "--out", str(out), "--tta", "flips", "--cell-type", "cort"] + (["--raw"] if raw else [])
    assert main(argv) == 0, capsys.readouterr().err
    preds = json.loads((out / "predictions.json").read_text())
    assert preds and all(0.0 <= p["uncertainty"] <= 1.0 for p in preds)
    table = rows(out / "summary.csv")
    assert [r["image"] for r in table] == ["cort_1.png", "cort_4.png"]
    for r in table:
        mine = [p for p in preds if p["file_name"] == r["image"]]
        assert int(r["cells"]) == len(mine)
        if mine:
            u = sorted(p["uncertainty"] for p in mine)
            assert float(r["mean_uncertainty"]) == pytest.approx(sum(u) / len(u), abs=1e-3)
            assert min(u) - 1e-3 <= float(r["p90_uncertainty"]) <= max(u) + 1e-3


def test_segment_without_tta_leaves_the_uncertainty_empty(images, tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["segment", str(images / "cort_1.png"), "--out", str(out)]) == 0, capsys.readouterr().err
    preds = json.loads((out / "predictions.json").read_text())
    assert not any("uncertainty" in p for p in preds)
    (row,) = rows(out / "summary.csv")
    assert row["image"] == "cort_1.png" and int(row["cells"]) == len(preds)
    assert row["mean_uncertainty"] == "" and row["p90_uncertainty"] == ""

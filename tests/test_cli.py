"""The command line is a contract: names, outputs, exit statuses, one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from napari_sartorius.annotations import AnnotationSet
from napari_sartorius.cli import main
from napari_sartorius.io import load_annotations, save_annotations
from napari_sartorius.io.label_images import read_label_image
from napari_sartorius.synthetic import make_sample

SHAPE = (96, 128)


@pytest.fixture
def truth(tmp_path):
    """Two small synthetic images with their ground truth as COCO JSON, plus the image files."""
    from skimage.io import imsave

    images = tmp_path / "images"
    images.mkdir()
    anns = []
    for style, seed in (("cort", 1), ("astro", 2)):
        s = make_sample(style, seed=seed, shape=SHAPE)
        name = f"{style}_{seed}"
        imsave(images / f"{name}.png", s.image, check_contrast=False)
        im = s.to_annotations(name)
        im.file_name = f"{name}.png"
        anns.append(im)
    gt = tmp_path / "gt.json"
    save_annotations(AnnotationSet(anns), gt, "coco")
    return gt, images


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_json_contract_and_perfect_score(truth, capsys):
    gt, _ = truth
    code, out, _ = run(capsys, "evaluate", "--pred", gt, "--gt", gt, "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"score", "per_class", "coco_ap", "n_images"}
    assert result["score"] == pytest.approx(1.0)
    assert result["n_images"] == 2
    assert set(result["per_class"]) == {"cort", "astro"}


def test_convert_between_all_formats_is_lossless(truth, tmp_path, capsys):
    gt, images = truth
    csv = tmp_path / "a.csv"
    labels = tmp_path / "labels"
    coco = tmp_path / "back.json"
    assert run(capsys, "convert", gt, "--to", "csv", "--out", csv)[0] == 0
    assert run(capsys, "convert", csv, "--to", "labels", "--out", labels)[0] == 0
    assert run(capsys, "convert", labels, "--to", "coco", "--out", coco, "--images", images)[0] == 0
    a, b = load_annotations(gt).by_id(), load_annotations(coco).by_id()
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key].instances.to_label_image() > 0, b[key].instances.to_label_image() > 0)
        assert len(a[key].instances) == len(b[key].instances)
    code, out, _ = run(capsys, "evaluate", "--pred", labels, "--gt", gt, "--json")
    assert code == 0 and json.loads(out)["score"] == pytest.approx(1.0)


def test_bad_input_gives_one_line_and_nonzero_status(tmp_path, capsys):
    code, out, err = run(capsys, "evaluate", "--pred", tmp_path / "missing.json", "--gt", tmp_path / "missing.json")
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and "missing.json" in err
    broken = tmp_path / "broken.csv"
    broken.write_text("id,annotation,width,height,cell_type\nx,1 5 99999 3,10,10,cort\n")
    code, _, err = run(capsys, "convert", broken, "--to", "coco", "--out", tmp_path / "o.json")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


def test_help_everywhere(capsys):
    for cmd in ("demo", "segment", "evaluate", "convert", "models", "init-model", "import-detectron2", "train"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: napari-sartorius" in capsys.readouterr().out


def test_models_lists_the_registered_architectures(capsys):
    from napari_sartorius.models.registry import ARCH_NAMES

    code, out, _ = run(capsys, "models")
    assert code == 0
    rows = [line.split() for line in out.strip().splitlines()[1:]]
    assert [r[0] for r in rows] == list(ARCH_NAMES)
    assert ARCH_NAMES[:6] == (
        "mask_rcnn_R_50_C4", "mask_rcnn_R_50_FPN", "mask_rcnn_R_101_C4", "mask_rcnn_R_101_FPN",
        "mask_rcnn_X_101_32x8d_FPN", "cascade_mask_rcnn_X_152_32x8d_FPN",
    )
    assert "cascade_mask_rcnn_ResNeSt_200_FPN" in ARCH_NAMES
    counts = [float(r[1]) for r in rows]
    assert 40 < counts[1] < 50 and counts[5] > counts[4] > counts[1]


def test_demo_writes_labels_predictions_and_prints_its_score(tmp_path, capsys):
    code, out, _ = run(capsys, "demo", "--out", tmp_path / "demo")
    assert code == 0
    labels = read_label_image(tmp_path / "demo" / "labels.tif")
    assert labels.shape == (520, 704) and labels.max() > 5
    preds = json.loads((tmp_path / "demo" / "predictions.json").read_text())
    assert preds and {"image_id", "category_id", "segmentation", "score", "bbox"} <= set(preds[0])
    score = float(out.split("competition score vs. ground truth:")[1].split()[0])
    assert 0.1 < score <= 1.0


def test_segment_folder_writes_traceable_outputs(truth, tmp_path, capsys):
    gt, images = truth
    out_dir = tmp_path / "seg"
    code, out, err = run(capsys, "segment", images, "--out", out_dir, "--tta", "flips", "--cell-type", "cort")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.glob("*_labels.tif")) == ["astro_2_labels.tif", "cort_1_labels.tif"]
    preds = json.loads((out_dir / "predictions.json").read_text())
    assert {p["file_name"] for p in preds} <= {"astro_2.png", "cort_1.png"}
    assert all(p["category_id"] == 3 for p in preds)  # --cell-type cort
    # what was written scores against the truth through the same contract
    code, out, _ = run(capsys, "evaluate", "--pred", out_dir / "predictions.json", "--gt", gt, "--json")
    assert code == 0 and 0.0 <= json.loads(out)["score"] <= 1.0


def test_segment_raw_keeps_overlapping_candidates_and_writes_no_labels(truth, tmp_path, capsys):
    _, images = truth
    out_dir = tmp_path / "raw"
    code, _, err = run(capsys, "segment", images / "cort_1.png", "--out", out_dir, "--raw")
    assert code == 0, err
    assert not list(out_dir.glob("*_labels.tif"))
    raw = json.loads((out_dir / "predictions.json").read_text())
    code, _, err = run(capsys, "segment", images / "cort_1.png", "--out", tmp_path / "clean")
    cleaned = json.loads((tmp_path / "clean" / "predictions.json").read_text())
    # post-processing only removes (thresholds, overlaps, sizes); --raw keeps every candidate
    assert len(raw) >= len(cleaned) and len(raw) > 0


def test_segment_rejects_unknown_cell_type_and_missing_model(truth, tmp_path, capsys):
    _, images = truth
    code, _, err = run(capsys, "segment", images, "--out", tmp_path / "o", "--cell-type", "glia")
    assert code == 2 and "glia" in err and "shsy5y" in err
    code, _, err = run(capsys, "segment", images, "--out", tmp_path / "o", "--model", tmp_path / "none.pt")
    assert code == 2 and "none.pt" in err


@pytest.mark.slow
def test_train_writes_a_checkpoint_that_segment_can_use(truth, tmp_path, capsys):
    gt, images = truth
    ckpt = tmp_path / "model.pt"
    code, out, err = run(capsys, "train", "--data", gt, "--images", images, "--arch", "mask_rcnn_R_50_FPN",
                         "--iters", 2, "--batch", 1, "--size", 96, "--out", ckpt, "--device", "cpu")
    assert code == 0, err
    assert ckpt.is_file() and "iter 2/2" in err and str(ckpt) in out
    code, _, err = run(capsys, "segment", images / "cort_1.png", "--out", tmp_path / "seg", "--model", ckpt, "--raw")
    assert code == 0, err
    assert (tmp_path / "seg" / "predictions.json").is_file()


def test_train_refuses_bad_options_before_any_work(truth, tmp_path, capsys):
    gt, images = truth
    code, _, err = run(capsys, "train", "--data", gt, "--arch", "mask_rcnn_R_18", "--iters", 2, "--out", tmp_path / "m.pt")
    assert code == 2 and "mask_rcnn_R_50_FPN" in err
    code, _, err = run(capsys, "train", "--data", gt, "--images", images, "--iters", 2, "--folds", 2,
                       "--val", gt, "--out", tmp_path / "m.pt")
    assert code == 2 and "--folds" in err
    code, _, err = run(capsys, "train", "--data", tmp_path / "none.json", "--iters", 2, "--out", tmp_path / "m.pt")
    assert code == 2 and "none.json" in err
    assert not (tmp_path / "m.pt").exists()


def test_init_model_and_train_refuses_a_base_of_another_architecture(truth, tmp_path, capsys):
    gt, images = truth
    ckpt = tmp_path / "c4.pt"
    code, out, err = run(capsys, "init-model", "mask_rcnn_R_50_C4", "--out", ckpt, "--classes", "shsy5y,astro,cort")
    assert code == 0, err
    assert ckpt.is_file() and "mask_rcnn_R_50_C4" in out
    code, _, err = run(capsys, "train", "--data", gt, "--images", images, "--base", ckpt,
                       "--arch", "mask_rcnn_R_50_FPN", "--iters", 1, "--out", tmp_path / "m.pt")
    assert code == 2 and "mask_rcnn_R_50_C4" in err and not (tmp_path / "m.pt").exists()

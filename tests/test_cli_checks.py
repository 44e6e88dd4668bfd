"""Bad command-line input ends in one line that says what to do, exit status 2."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from napari_sartorius.annotations import AnnotationSet
from napari_sartorius.cli import main
from napari_sartorius.cli_checks import CLIError, check_label_predictions, output_folder, unit_interval
from napari_sartorius.io import load_annotations, save_annotations
from napari_sartorius.synthetic import make_sample


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_out_naming_an_existing_file_is_refused(tmp_path, capsys):
    taken = tmp_path / "result.txt"
    taken.write_text("keep me")
    for argv in (("demo", "--out", taken), ("segment", tmp_path / "x.png", "--out", taken)):
        if argv[0] == "segment":
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "x.png")
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == ""
        assert "is an existing file, not a folder" in one_line(err)
    assert taken.read_text() == "keep me"
    with pytest.raises(CLIError, match="part of this path is an existing file"):
        output_folder(taken / "sub")
    assert output_folder(tmp_path / "a" / "b").is_dir()


def test_iou_outside_the_unit_interval_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--iou", "1.5"])
    assert e.value.code == 2
    assert "--iou: 1.5 is outside (0, 1]" in capsys.readouterr().err
    assert unit_interval("0.5") == 0.5 and unit_interval("1") == 1.0
    for bad in ("0", "-0.1", "nan", "half"):
        with pytest.raises(argparse.ArgumentTypeError):
            unit_interval(bad)


def test_a_text_file_as_model_is_not_a_checkpoint(tmp_path, capsys):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "x.png")
    notes = tmp_path / "model.pt"
    notes.write_text("weights are on the shared drive\n")
    code, _, err = run(capsys, "segment", tmp_path / "x.png", "--out", tmp_path / "o", "--model", notes)
    assert code == 2
    assert f"--model {notes}: not a checkpoint: {notes} is a text file" in one_line(err)
    code, _, err = run(capsys, "train", "--data", tmp_path / "gt.json", "--out", tmp_path / "m.pt", "--base", notes)
    assert code == 2 and "--base" in one_line(err) and "not a checkpoint" in err


def _truth_and_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    anns = []
    for style, seed in (("cort", 1), ("shsy5y", 2)):
        s = make_sample(style, seed=seed, shape=(64, 96))
        Image.fromarray(s.image).save(images / f"{style}.png")
        im = s.to_annotations(style)
        im.file_name = f"{style}.png"
        anns.append(im)
    gt = tmp_path / "gt.json"
    save_annotations(AnnotationSet(anns), gt, "coco")
    return gt, images


def test_evaluate_with_raw_images_as_predictions_says_what_it_found(tmp_path, capsys):
    gt, images = _truth_and_images(tmp_path)
    code, out, err = run(capsys, "evaluate", "--pred", images, "--gt", gt)
    assert code == 2 and out == ""
    line = one_line(err)
    assert "look like raw microscopy images, not label images" in line and "segment them first" in line
    # real label images pass the check
    labels = tmp_path / "labels"
    save_annotations(load_annotations(gt), labels, "labels")
    check_label_predictions(load_annotations(labels), labels)


def test_evaluate_json_lists_notes(tmp_path, capsys):
    gt, _ = _truth_and_images(tmp_path)
    aset = load_annotations(gt)
    one = tmp_path / "one.json"
    save_annotations(AnnotationSet([aset.images[0]], class_names=aset.class_names), one, "coco")
    code, out, _ = run(capsys, "evaluate", "--pred", one, "--gt", gt, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["notes"] == ["1 image(s) without predictions (scored 0): shsy5y"]
    code, out, _ = run(capsys, "evaluate", "--pred", one, "--gt", gt)
    assert "1 image(s) without predictions (scored 0): shsy5y" in out


def test_convert_takes_several_image_folders(tmp_path, capsys):
    gt, images = _truth_and_images(tmp_path)
    labels = tmp_path / "labels"
    save_annotations(load_annotations(gt), labels, "labels")
    other = tmp_path / "more"
    other.mkdir()
    (images / "shsy5y.png").rename(other / "shsy5y.png")
    out = tmp_path / "back.json"
    code, _, err = run(capsys, "convert", labels, "--to", "coco", "--out", out, "--images", images, "--images", other)
    assert code == 0, err
    assert {im.image_id for im in load_annotations(out)} == {"cort", "shsy5y"}
    code, _, err = run(capsys, "convert", labels, "--to", "coco", "--out", out, "--images", images,
                       "--images", tmp_path / "nowhere")
    assert code == 2 and "nowhere" in one_line(err)

"""The review fields (per-cell ``uncertainty`` and ``reviewed``) through COCO, Kaggle CSV, the napari
writer's label conversion and the reader's features table."""

import json

import numpy as np
import pytest

from napari_sartorius._reader import _features, read_annotations
from napari_sartorius._writer import labels_to_annotations, write_layers
from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
from napari_sartorius.instances import Instances
from napari_sartorius.io import load_annotations, save_annotations

SIZE = (40, 50)


def predictions(columns=True) -> AnnotationSet:
    labels = np.zeros(SIZE, np.uint16)
    labels[2:10, 2:12] = 1
    labels[15:30, 20:35] = 2
    labels[32:38, 40:48] = 3
    inst = Instances.from_label_image(labels, classes=2, scores={1: 0.9, 2: 0.8, 3: 0.7})
    if columns:
        inst.columns = {
            "uncertainty": np.array([0.1, 0.6, 0.35], np.float32),
            "reviewed": np.array([False, True, False]),
        }
    return AnnotationSet([ImageAnnotations("img", inst, cell_type="cort", file_name="img.png")])


@pytest.mark.parametrize("fmt", ["coco", "results"])
def test_coco_files_carry_uncertainty_and_reviewed(tmp_path, fmt):
    path = tmp_path / "out.json"
    save_annotations(predictions(), path, fmt)
    d = json.loads(path.read_text())
    records = d["annotations"] if fmt == "coco" else d
    assert [r["uncertainty"] for r in records] == pytest.approx([0.1, 0.6, 0.35])
    assert [r["reviewed"] for r in records] == [False, True, False]
    back = load_annotations(path).images[0].instances
    np.testing.assert_allclose(back.uncertainty, [0.1, 0.6, 0.35], atol=1e-6)
    assert back.columns["reviewed"].tolist() == [False, True, False]


def test_no_columns_no_keys_and_gaps_drop_the_uncertainty(tmp_path):
    path = tmp_path / "plain.json"
    save_annotations(predictions(columns=False), path, "coco")
    d = json.loads(path.read_text())
    assert not any("uncertainty" in a or "reviewed" in a for a in d["annotations"])
    assert load_annotations(path).images[0].instances.columns == {}
    # one annotation without uncertainty (a cell drawn by hand): the column is left out, not NaN
    d["annotations"][0]["uncertainty"] = 0.2
    d["annotations"][2]["uncertainty"] = 0.4
    path.write_text(json.dumps(d))
    assert "uncertainty" not in load_annotations(path).images[0].instances.columns


def test_undefined_uncertainty_of_one_cell_is_not_written(tmp_path):
    aset = predictions()
    aset.images[0].instances.columns["uncertainty"][2] = np.nan
    path = tmp_path / "p.json"
    save_annotations(aset, path, "results")
    d = json.loads(path.read_text())
    assert ["uncertainty" in r for r in d] == [True, True, False]
    assert "NaN" not in path.read_text()


def test_kaggle_csv_ignores_the_review_fields(tmp_path):
    path = tmp_path / "p.csv"
    save_annotations(predictions(), path, "csv")
    text = path.read_text()
    assert "uncertainty" not in text and "reviewed" not in text
    back = load_annotations(path, images_dir=None).images[0].instances
    assert len(back) == 3


def test_writer_takes_the_columns_from_the_features_and_the_reader_gives_them_back(tmp_path):
    labels = np.zeros(SIZE, np.uint16)
    labels[2:10, 2:12] = 1
    labels[15:30, 20:35] = 2
    features = {"label": [1, 2], "class": ["cort", "cort"], "uncertainty": [0.25, 0.75], "reviewed": [True, False]}
    aset = labels_to_annotations(labels, image_id="img", features=features)
    inst = aset.images[0].instances
    np.testing.assert_allclose(inst.uncertainty, [0.25, 0.75])
    assert inst.columns["reviewed"].tolist() == [True, False]
    # a painted cell without a features row: no uncertainty column (never NaN), reviewed False
    labels[32:38, 40:48] = 3
    inst3 = labels_to_annotations(labels, image_id="img", features=features).images[0].instances
    assert "uncertainty" not in inst3.columns
    assert inst3.columns["reviewed"].tolist() == [True, False, False]
    # through a file and the napari reader
    out = tmp_path / "reviewed.json"
    write_layers(out, labels[..., :], {"name": "img labels", "features": features, "metadata": {}}, fmt="coco")
    layers = read_annotations(out)
    feats = [m for _, m, t in layers if t == "labels"][0]["features"]
    assert "uncertainty" not in feats and feats["reviewed"].tolist() == [True, False, False]
    labels[32:38, 40:48] = 0
    write_layers(out, labels, {"name": "img labels", "features": features, "metadata": {}}, fmt="coco")
    feats = [m for _, m, t in read_annotations(out) if t == "labels"][0]["features"]
    np.testing.assert_allclose(feats["uncertainty"], [0.25, 0.75])
    assert feats["reviewed"].tolist() == [True, False]


def test_reader_features_have_no_nan_uncertainty():
    aset = predictions()
    aset.images[0].instances.columns["uncertainty"][0] = np.nan
    f = _features(aset.images[0], aset.class_names)
    assert "uncertainty" not in f and f["reviewed"].tolist() == [False, True, False]

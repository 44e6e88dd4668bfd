"""Training data from memory, COCO JSON and the Kaggle CSV; bad inputs give clear errors."""

import json

import numpy as np
import pytest
import torch

from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
from napari_sartorius.instances import Instances
from napari_sartorius.training.augment import AugmentationSettings, TrainTransform
from napari_sartorius.training.data import (
    collate,
    concat_datasets,
    dataset_from_annotations,
    dataset_from_file,
    dataset_from_pairs,
)


def _pair(h=32, w=40, cells=((2, 2, 10, 12), (15, 20, 28, 36))):
    img = np.random.default_rng(0).integers(0, 255, (h, w)).astype(np.uint8)
    lab = np.zeros((h, w), np.uint16)
    for k, (y0, x0, y1, x1) in enumerate(cells, start=1):
        lab[y0:y1, x0:x1] = k
    return img, lab


def test_pairs_give_targets_with_class_plus_one():
    ds = dataset_from_pairs([_pair(), _pair()], ["astro", "cort"], names=["a", "b"])
    assert len(ds) == 2 and ds.n_cells == 4 and ds.cell_types == ["astro", "cort"]
    img, tgt = ds[1]
    assert img.shape == (3, 32, 40) and img.dtype == torch.float32
    assert tgt["labels"].tolist() == [3, 3]  # cort is class 2 -> label 3
    torch.testing.assert_close(tgt["boxes"], torch.tensor([[2.0, 2, 12, 10], [20, 15, 36, 28]]))
    assert tgt["masks"].dtype == torch.uint8 and tgt["masks"].shape == (2, 32, 40)
    assert int(tgt["masks"][0].sum()) == 8 * 10
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 2


def test_single_pair_and_empty_negatives_are_allowed():
    ds = dataset_from_pairs([_pair()], "shsy5y")
    assert len(ds) == 1
    empty = (np.zeros((32, 40), np.uint8), np.zeros((32, 40), np.uint16))
    ds2 = dataset_from_pairs([_pair(), empty], "shsy5y")
    img, tgt = ds2[1]
    assert tgt["boxes"].shape == (0, 4) and tgt["masks"].shape == (0, 32, 40)


def test_mismatched_shapes_name_the_pair():
    img, lab = _pair()
    with pytest.raises(ValueError, match=r"pair 'cells'.*labels are 32x39"):
        dataset_from_pairs([(img, lab[:, :39])], "cort", names=["cells"])


def test_no_cells_anywhere_is_an_error():
    empty = (np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint16))
    with pytest.raises(ValueError, match="none of the 2 training image"):
        dataset_from_pairs([empty, empty], "cort")
    with pytest.raises(ValueError, match="no .*pair"):
        dataset_from_pairs([], "cort")


def test_unknown_cell_type_and_bad_values():
    with pytest.raises(ValueError, match="unknown cell type 'neuron'"):
        dataset_from_pairs([_pair()], "neuron")
    img, lab = _pair()
    with pytest.raises(ValueError, match="outside 0..255"):
        dataset_from_pairs([(img.astype(np.float32) * 10, lab)], "cort")


def test_seeded_augmented_items_are_reproducible():
    t = TrainTransform(AugmentationSettings(), short_edges=(24, 32), max_size=64)
    ds = dataset_from_pairs([_pair()], "cort", transform=t)
    a, ta = ds[(0, 5)]
    b, tb = ds[(0, 5)]
    assert torch.equal(a, b) and torch.equal(ta["masks"], tb["masks"])
    assert min(a.shape[1:]) in (24, 32)


def test_annotation_set_in_memory_and_subset():
    img, lab = _pair()
    aset = AnnotationSet([ImageAnnotations("x", Instances.from_label_image(lab, classes=1), "astro")])
    ds = dataset_from_annotations(aset, [img])
    assert ds.cell_types == ["astro"]
    with pytest.raises(ValueError, match="is 32x40 but its annotations are for 16x40"):
        bad = AnnotationSet([ImageAnnotations("x", Instances.from_label_image(lab[:16], classes=1))])
        dataset_from_annotations(bad, [img])
    two = concat_datasets([ds, dataset_from_pairs([_pair()], "cort")])
    assert len(two) == 2 and len(two.subset([1])) == 1
    with pytest.raises(ValueError, match="not in"):
        dataset_from_annotations(aset, ds_dir := __import__("pathlib").Path(__file__).parent)  # noqa: F841


def _write_png(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)


def _kaggle_rle(mask):
    flat = np.concatenate([[0], mask.ravel().astype(np.uint8), [0]])
    runs = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def test_coco_json_with_image_folder(tmp_path):
    from pycocotools import mask as mask_utils

    img, lab = _pair()
    (tmp_path / "images").mkdir()
    _write_png(tmp_path / "images" / "abc.png", img)
    anns = []
    for k in (1, 2):
        rle = mask_utils.encode(np.asfortranarray(lab == k))
        rle["counts"] = rle["counts"].decode()
        ys, xs = np.nonzero(lab == k)
        anns.append({"id": k, "image_id": 7, "category_id": 2, "segmentation": rle, "area": int((lab == k).sum()),
                     "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)], "iscrowd": 0})
    coco = {"images": [{"id": 7, "file_name": "abc.png", "height": 32, "width": 40}], "annotations": anns,
            "categories": [{"id": 1, "name": "shsy5y"}, {"id": 2, "name": "astro"}, {"id": 3, "name": "cort"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    ds = dataset_from_file(tmp_path / "coco.json")
    assert len(ds) == 1 and ds.n_cells == 2 and ds.cell_types == ["astro"]
    image, tgt = ds[0]
    assert image.shape == (3, 32, 40) and tgt["labels"].tolist() == [2, 2]
    np.testing.assert_array_equal(image[0].numpy(), img.astype(np.float32))


def test_kaggle_csv_with_image_folder(tmp_path):
    img, lab = _pair()
    _write_png(tmp_path / "abc.png", img)
    rows = ["id,annotation,width,height,cell_type"]
    rows += [f"abc,{_kaggle_rle(lab == k)},40,32,cort" for k in (1, 2)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    ds = dataset_from_file(tmp_path / "train.csv", tmp_path)
    assert ds.n_cells == 2 and ds.cell_types == ["cort"]
    _, tgt = ds[0]
    np.testing.assert_array_equal(tgt["masks"][0].numpy(), (lab == 1).astype(np.uint8))
    with pytest.raises(ValueError, match="does not exist"):
        dataset_from_file(tmp_path / "train.csv", tmp_path / "no_such_dir")


def test_clean_masks_on_request():
    img, lab = _pair()
    lab[5, 5] = 0  # a hole
    ds = dataset_from_pairs([(img, lab)], "cort", clean=True)
    assert any(src.startswith("masks cleaned") for src in ds.sources)
    _, tgt = ds[0]
    assert int(tgt["masks"][0][5, 5]) == 1


def test_images_in_several_folders(tmp_path):
    from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
    from napari_sartorius.instances import Instances

    img, lab = _pair()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write_png(tmp_path / "a" / "one.png", img)
    _write_png(tmp_path / "b" / "two.png", img)
    inst = Instances.from_label_image(lab)
    aset = AnnotationSet([ImageAnnotations("one", inst, "cort"), ImageAnnotations("two", inst, "cort")])
    ds = dataset_from_annotations(aset, [tmp_path / "a", str(tmp_path / "b")])
    assert [s.path.parent.name for s in ds.samples] == ["a", "b"]
    with pytest.raises(ValueError, match=r"'two' of the annotations is not in .*a: pass the folder"):
        dataset_from_annotations(aset, [tmp_path / "a"])
    with pytest.raises(ValueError, match="does not exist"):
        dataset_from_annotations(aset, [tmp_path / "a", tmp_path / "nope"])

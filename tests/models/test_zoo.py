"""The pretrained-weights registry: every entry well-formed, its config resolves to its architecture
with its class count, and its architecture builds."""

from __future__ import annotations

import re
from urllib.parse import urlparse

import pytest

from napari_sartorius.models import zoo
from napari_sartorius.models.config import ARCH_NAMES

ENTRIES = list(zoo.REGISTRY.values())


def test_registry_holds_the_three_families():
    names = zoo.registry_names()
    livecell = [n for n in names if n.startswith("livecell")]
    assert len(livecell) == 9 and "livecell" in livecell and "livecell-shsy5y" in livecell
    assert len(zoo.registry_names("detectron2")) == 9 + 6
    coco_archs = {zoo.REGISTRY[n].arch for n in names if n.startswith("coco-")}
    assert coco_archs == {"mask_rcnn_R_50_C4", "mask_rcnn_R_50_FPN", "mask_rcnn_R_101_C4", "mask_rcnn_R_101_FPN",
                          "mask_rcnn_X_101_32x8d_FPN", "cascade_mask_rcnn_X_152_32x8d_FPN"}
    assert {zoo.REGISTRY[n].arch for n in zoo.registry_names("imagenet")} == {
        "mask_rcnn_R_50_FPN", "mask_rcnn_R_101_FPN", "mask_rcnn_X_101_32x8d_FPN"}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_entry_is_well_formed(entry):
    url = urlparse(entry.url)
    assert url.scheme == "https" and url.netloc and url.path.endswith(entry.url.rsplit("/", 1)[1])
    assert " " not in entry.url
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", entry.name)
    assert re.fullmatch(r"[A-Za-z0-9_.-]+\.(pth|pkl)", entry.filename)
    assert entry.kind in zoo.KINDS
    assert entry.description and entry.provenance
    if entry.sha256 is not None:
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
    if entry.sha256_prefix is not None:
        assert re.fullmatch(r"[0-9a-f]{8,64}", entry.sha256_prefix)


def test_cache_file_names_are_unique():
    names = [e.filename for e in ENTRIES]
    assert len(set(names)) == len(names)


def test_urls_match_their_published_sources():
    e = zoo.get_entry("livecell-shsy5y")
    assert e.url == ("https://livecell-dataset.s3.eu-central-1.amazonaws.com/LIVECell_dataset_2021/models/"
                     "Anchor_based/SHSY5Y/LIVECell_anchor_based_shsy5y_model.pth")
    assert zoo.get_entry("livecell").url.endswith("/Anchor_based/ALL/LIVECell_anchor_based_model.pth")
    assert zoo.get_entry("coco-r50-fpn").url == (
        "https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/"
        "137849600/model_final_f10217.pkl")
    assert zoo.get_entry("imagenet-r50").url == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert zoo.get_entry("imagenet-r50").sha256_prefix == "0676ba61"


def test_imagenet_entries_match_torchvision_weights_enums():
    from torchvision.models import ResNet50_Weights, ResNet101_Weights, ResNeXt101_32X8D_Weights

    for name, enum in (("imagenet-r50", ResNet50_Weights), ("imagenet-r101", ResNet101_Weights),
                       ("imagenet-x101-32x8d", ResNeXt101_32X8D_Weights)):
        w = enum.IMAGENET1K_V1
        assert zoo.get_entry(name).url == w.url
        assert zoo.get_entry(name).approx_mb == pytest.approx(w.meta["_file_size"])


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.kind == "detectron2"], ids=lambda e: e.name)
def test_detectron2_entry_config_resolves_to_its_architecture(entry):
    assert entry.arch in ARCH_NAMES
    from napari_sartorius.models.d2_config import config_to_model_config, load_d2_config

    cfg = load_d2_config(entry.config)
    config = config_to_model_config(cfg, entry.classes)
    assert config.arch == entry.arch
    assert config.num_classes == entry.num_classes == int(cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"])


@pytest.mark.parametrize("arch", sorted({e.arch for e in ENTRIES}))
def test_entry_architectures_build(arch):
    assert arch in ARCH_NAMES
    import torch

    from napari_sartorius.models.architectures import build_model
    from napari_sartorius.models.config import ModelConfig

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(ModelConfig(arch, class_names=("cell",)))
    assert model.roi_heads is not None


def test_classes():
    assert zoo.get_entry("livecell-bv2").classes == ("cell",)
    assert len(zoo.COCO_CLASSES) == 80 == len(set(zoo.COCO_CLASSES))
    assert zoo.get_entry("coco-x152-cascade").num_classes == 80
    assert zoo.get_entry("imagenet-r101").classes == ()


def test_lookup_is_case_insensitive_and_errors_name_the_choices():
    assert zoo.get_entry(" LIVECell-SHSY5Y ").name == "livecell-shsy5y"
    assert zoo.is_registry_name("Coco-R50-FPN") and not zoo.is_registry_name("model.pth")
    assert not zoo.is_registry_name(None)
    with pytest.raises(ValueError, match="no pretrained model called 'livecell-foo'.*livecell-shsy5y"):
        zoo.get_entry("livecell-foo")
    with pytest.raises(ValueError, match="imagenet-r50 is ImageNet body weights.*a detection model is needed"):
        zoo.get_entry("imagenet-r50", kinds=("detectron2",))


def test_zoo_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, napari_sartorius.models.zoo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""MMDetection Python configs read as data: what evaluates, what is refused, and inheritance."""

from __future__ import annotations

import pytest

from napari_sartorius.models.mmdet_pyconfig import (
    ConfigNeedsExecutionError,
    load_config_file,
    merge_configs,
    parse_config_text,
)


def test_literals_dict_calls_names_and_arithmetic():
    cfg = parse_config_text(
        "data_root = 'data/coco/'\n"
        "norm = dict(mean=[1.0, 2.0, 3.0], std=(4, 5, 6), to_rgb=True)\n"
        "pipeline = [dict(type='Normalize', **norm), dict(type='Pad', size_divisor=16 * 2)]\n"
        "ann = data_root + 'annotations/x.json'\n"
        "neg = -0.5\n"
        "first = pipeline[0]['type']\n"
        "merged = {**norm, 'extra': None}\n"
        "t = tuple([1, 2])\n"
        "__private = 1\n"
    )
    assert cfg["pipeline"][0] == {"type": "Normalize", "mean": [1.0, 2.0, 3.0], "std": (4, 5, 6), "to_rgb": True}
    assert cfg["pipeline"][1]["size_divisor"] == 32
    assert cfg["ann"] == "data/coco/annotations/x.json"
    assert cfg["neg"] == -0.5 and cfg["first"] == "Normalize" and cfg["t"] == (1, 2)
    assert cfg["merged"]["extra"] is None and cfg["merged"]["to_rgb"] is True
    assert "__private" not in cfg


def test_names_are_copies():
    cfg = parse_config_text("a = dict(x=[1])\nb = a\n")
    cfg["b"]["x"].append(2)
    assert cfg["a"]["x"] == [1]


@pytest.mark.parametrize(
    "text, what",
    [
        ("import os\nmodel = dict()\n", "imports code"),
        ("from mmengine.config import read_base\n", "imports code"),
        ("with read_base():\n    from .base import *\n", "new-style mmengine config"),
        ("x = open('f')\n", "a call of open()"),
        ("x = __import__('os').system('true')\n", "a call of __import__('os').system()"),
        ("x = dict(a=1).keys()\n", "a call of dict(a=1).keys()"),
        ("import numpy as np\n", "imports code"),
        ("x = (lambda: 1)\n", "a lambda"),
        ("x = [i for i in range(3)]\n", "a comprehension"),
        ("x = f'{1}'\n", "an f-string"),
        ("x = 1\nx += 1\n", "AugAssign statement"),
        ("a = dict()\na['k'] = 1\n", "only `name = value` assignments"),
        ("if True:\n    x = 1\n", "If statement"),
        ("x = 'a%s' % 'b'\n", "%-formatting"),
        ("x = 2 ** 3\n", "the operator Pow"),
        ("x = y\n", "name 'y' is not assigned"),
    ],
)
def test_code_is_refused_with_its_line(text, what):
    with pytest.raises(ConfigNeedsExecutionError, match="line") as info:
        parse_config_text(text, source="cfg.py")
    assert what in str(info.value) and "cfg.py" in str(info.value)


def test_nothing_is_executed(tmp_path):
    marker = tmp_path / "ran"
    text = f"x = __import__('pathlib').Path({str(marker)!r}).touch()\n"
    with pytest.raises(ConfigNeedsExecutionError):
        parse_config_text(text)
    assert not marker.exists()


def test_merge_follows_mmengine():
    base = {"model": {"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]}, "keep": 1}
    child = {"model": {"b": {"c": 20}, "l": [9]}, "new": 2}
    out = merge_configs(base, child)
    assert out == {"model": {"a": 1, "b": {"c": 20, "d": 3}, "l": [9]}, "keep": 1, "new": 2}
    out = merge_configs(base, {"model": {"b": {"_delete_": True, "e": 5}}})
    assert out["model"]["b"] == {"e": 5}
    assert base["model"]["b"] == {"c": 2, "d": 3}  # base untouched


def test_bases_on_disk_with_references_and_predefined_vars(tmp_path):
    (tmp_path / "_base_").mkdir()
    (tmp_path / "_base_" / "model.py").write_text("model = dict(type='MaskRCNN', backbone=dict(depth=50, style='pytorch'))\n")
    (tmp_path / "_base_" / "data.py").write_text("test_pipeline = [dict(type='Resize', scale=(1333, 800))]\n")
    leaf = tmp_path / "leaf.py"
    leaf.write_text(
        "_base_ = ['./_base_/model.py', './_base_/data.py']\n"
        "model = dict(backbone=dict(depth=101))\n"
        "pipe = {{_base_.test_pipeline}}\n"
        "depth_copy = '{{_base_.model.backbone.depth}}'\n"
        "name = '{{fileBasenameNoExtension}}'\n"
    )
    cfg = load_config_file(leaf)
    assert cfg["model"] == {"type": "MaskRCNN", "backbone": {"depth": 101, "style": "pytorch"}}
    assert cfg["pipe"] == [{"type": "Resize", "scale": (1333, 800)}]
    assert cfg["depth_copy"] == 50 and cfg["name"] == "leaf"
    assert "_base_" not in cfg


def test_duplicate_keys_among_bases_and_cycles_are_errors(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("x = 2\n")
    (tmp_path / "leaf.py").write_text("_base_ = ['a.py', 'b.py']\n")
    with pytest.raises(ValueError, match="more than once"):
        load_config_file(tmp_path / "leaf.py")
    (tmp_path / "c.py").write_text("_base_ = 'd.py'\n")
    (tmp_path / "d.py").write_text("_base_ = 'c.py'\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config_file(tmp_path / "c.py")


def test_missing_base_says_what_to_do(tmp_path):
    (tmp_path / "leaf.py").write_text("_base_ = '../nowhere/custom_base.py'\n")
    with pytest.raises(FileNotFoundError, match="neither beside it nor one of the bundled"):
        load_config_file(tmp_path / "leaf.py")


def test_syntax_error_is_a_value_error():
    with pytest.raises(ValueError, match="not valid Python"):
        parse_config_text("model = dict(\n")

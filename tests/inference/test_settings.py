"""SegmentSettings: torch-free, validated, and the lists of choices the engine modules use."""

import subprocess
import sys

import pytest

from napari_sartorius.inference.settings import FUSION_METHODS, TTA_MODES, SegmentSettings


def test_defaults_and_kwargs():
    s = SegmentSettings()
    assert s.as_kwargs() == {"tta": "none", "ensemble": "wbf", "iou_thr": 0.5}
    assert SegmentSettings(tta="flips", ensemble="nms", iou_thr=1).iou_thr == 1.0


@pytest.mark.parametrize(
    "kw, words",
    [({"tta": "mirror"}, "flips+rot90"), ({"ensemble": "vote"}, "mask_nms"), ({"iou_thr": 1.5}, "(0, 1]"),
     ({"iou_thr": 0}, "(0, 1]")],
)
def test_bad_values_name_what_is_allowed(kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        SegmentSettings(**kw)


def test_the_engine_modules_use_the_same_lists():
    from napari_sartorius.inference.ensemble import METHODS
    from napari_sartorius.inference.tta import TTA_MODES as TTA

    assert METHODS == FUSION_METHODS and TTA == TTA_MODES


def test_importing_the_settings_needs_no_torch():
    code = "import sys, napari_sartorius.inference.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

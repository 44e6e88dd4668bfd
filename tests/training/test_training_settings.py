"""The torch-free training settings: importable without torch, sizes in multiples of 32."""

import subprocess
import sys

import pytest

from napari_sartorius.training.settings import AugmentationSettings, TrainSettings, multiscale_sizes


def test_settings_module_imports_neither_torch_nor_numpy():
    code = (
        "import sys; import napari_sartorius.training.settings as s; s.TrainSettings(iters=3); "
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_multiscale_sizes_are_multiples_of_32():
    assert multiscale_sizes(512) == (416, 448, 512, 576, 608)
    assert multiscale_sizes(300, (0.8, 1.0, 1.2)) == (256, 288, 352)
    assert all(v % 32 == 0 for v in multiscale_sizes(1000))
    assert multiscale_sizes(40) == (32, 64)  # 40 x 0.8..1.1 -> 32, 40 x 1.2 = 48 -> 64 (ties round to even: 1.5 -> 2)
    with pytest.raises(ValueError, match="at least 32"):
        multiscale_sizes(16)


def test_settings_round_trip_through_a_dict():
    s = TrainSettings(iters=7, clip_grad_norm=5.0, clip_type="value", augment=AugmentationSettings(short_edges=(256,)))
    assert TrainSettings.from_dict(s.to_dict()) == s

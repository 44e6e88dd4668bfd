"""The Fine-tune presets and time estimate (no Qt needed)."""

import pytest

from napari_sartorius._widgets._finetune_presets import (
    CPU_SECONDS_PER_IMAGE,
    CPU_SECONDS_PER_MEGAPIXEL,
    PRESETS,
    estimate_seconds,
)


def test_estimate_adds_a_per_image_cost_and_scales_with_the_input():
    one = estimate_seconds(1, 1, 1000, 1000, frozen_body=True)
    assert one == pytest.approx(CPU_SECONDS_PER_IMAGE + CPU_SECONDS_PER_MEGAPIXEL["frozen"])
    assert estimate_seconds(10, 2, 1000, 1000, True) == pytest.approx(20 * one)
    assert estimate_seconds(1, 1, 1000, 1000, False) > one  # a trainable body costs more
    assert estimate_seconds(1, 1, 1000, 1000, True, device="cuda") < one / 10


def test_the_quick_preset_fits_five_minutes_on_the_development_cpu():
    q = PRESETS["quick"]
    sec = estimate_seconds(q["iterations"], q["batch_size"], q["train_size"], q["train_size"], q["freeze"] == 5)
    assert sec <= 5 * 60
    f = PRESETS["full"]
    assert f["freeze"] == -1 and f["crop_cells"] == 0 and f["iterations"] > q["iterations"]

"""The Fine-tune presets, the window sampling and the time estimate (no Qt needed)."""

import pytest

from napari_sartorius._widgets._finetune_presets import (
    CPU_CALIBRATION_SECONDS_PER_MEGAPIXEL,
    CPU_SECONDS_PER_IMAGE,
    CPU_SECONDS_PER_MEGAPIXEL,
    CPU_STARTUP_SECONDS,
    PRESETS,
    WINDOW_SAMPLING,
    estimate_seconds,
    training_part,
    with_window_sampling,
)
from napari_sartorius.training.settings import TrainSettings


def test_estimate_adds_start_up_per_image_and_per_megapixel_costs():
    one = estimate_seconds(1, 1, 1000, 1000, 5)
    assert one == pytest.approx(CPU_STARTUP_SECONDS + CPU_SECONDS_PER_IMAGE["whole"] + CPU_SECONDS_PER_MEGAPIXEL["fpn"])
    step = one - CPU_STARTUP_SECONDS
    assert estimate_seconds(10, 2, 1000, 1000, 5) == pytest.approx(CPU_STARTUP_SECONDS + 20 * step)
    # what trains decides the per-megapixel cost: backbone frozen < FPN trains < part of the body trains
    costs = [estimate_seconds(1, 1, 1000, 1000, f) for f in (6, 5, 2, -1)]
    assert costs[0] < costs[1] < costs[2] == costs[3]
    assert estimate_seconds(1, 1, 1000, 1000, 5, windows=True) < one  # fewer RoIs per window
    # a fresh model first calibrates on two images at the training size
    assert estimate_seconds(1, 1, 1000, 1000, 5, fresh=True) == pytest.approx(one + 2 * CPU_CALIBRATION_SECONDS_PER_MEGAPIXEL)
    assert estimate_seconds(100, 1, 1000, 1000, 5, device="cuda") < estimate_seconds(100, 1, 1000, 1000, 5) / 10
    assert [training_part(f) for f in (6, 5, 4, 0, -1)] == ["backbone", "fpn", "body", "body", "body"]


def test_the_quick_preset_fits_five_minutes_on_the_development_cpu_even_from_a_fresh_model():
    q = PRESETS["quick"]
    sec = estimate_seconds(q["iterations"], q["batch_size"], q["train_size"], q["train_size"], q["freeze"],
                           windows=q["crop_cells"] > 0, fresh=True)
    assert sec <= 5 * 60
    assert q["freeze"] == 6  # the body and the FPN only run forward (no gradient into the backbone)
    f = PRESETS["full"]
    assert f["freeze"] == -1 and f["crop_cells"] == 0 and f["iterations"] > q["iterations"]


def test_window_sampling_fills_only_what_the_settings_leave_unset():
    s = with_window_sampling(TrainSettings(rpn_post_nms_top_n_train=300))
    assert s.rpn_post_nms_top_n_train == 300
    assert s.roi_batch_size_per_image == WINDOW_SAMPLING["roi_batch_size_per_image"]
    assert s.rpn_pre_nms_top_n_train == WINDOW_SAMPLING["rpn_pre_nms_top_n_train"]
    full = TrainSettings(**{k: 7 for k in WINDOW_SAMPLING})
    assert with_window_sampling(full) is full

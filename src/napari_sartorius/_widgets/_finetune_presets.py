"""The Fine-tune dock's presets and its time estimate (no Qt, no torch).

"Quick (CPU)" freezes the whole backbone (body and FPN: freeze level 6) and trains the RPN and heads
on windows around the labelled cells at a small size, with few sampled RoIs and proposals
(:data:`WINDOW_SAMPLING`), for a few dozen iterations; "Full (GPU)" trains the whole model on whole
images. :func:`estimate_seconds` turns a run's size into a rough wall time shown before starting. The
dock's choice tables (frozen stages, augmentation labels) live here too.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "PRESET_CHOICES", "estimate_seconds", "training_part", "CPU_SECONDS_PER_IMAGE",
           "CPU_SECONDS_PER_MEGAPIXEL", "WINDOW_SAMPLING", "with_window_sampling"]

#: Control values of each preset (see the module's docstring); "crop_cells" 0 = whole images.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(iterations=20, learning_rate=0.01, batch_size=2, train_size=384, freeze=6, crop_cells=256,
                  resize=False),
    "full": dict(iterations=300, learning_rate=0.0025, batch_size=2, train_size=0, freeze=-1, crop_cells=0,
                 resize=True),
}
#: RoI and proposal counts of a run on windows around the cells (``crop_cells`` > 0), where the
#: settings leave them unset. A 256-px window holds a few cells (5-10 in the real cort images), so 64
#: sampled RoIs (at most 16 positive: ~2 per cell) and 500 proposals per image, instead of
#: detectron2's 512 and 2000 for a whole 1333 x 800 image, still give every cell positives. The mask
#: head costs ~3 GFLOP per positive RoI forward and backward (2 shared cores: 64 positive RoIs
#: 4.2 s, 32 2.5 s), so with a good starting model (every positive slot filled) 512 RoIs per window
#: would make the mask head alone ~15 s per iteration of 2 windows, and 64 bound it to ~2.5 s.
WINDOW_SAMPLING: dict[str, int] = dict(roi_batch_size_per_image=64, rpn_pre_nms_top_n_train=1000,
                                       rpn_post_nms_top_n_train=500)
PRESET_CHOICES = [("Quick (CPU: RPN and heads only, crops around the cells)", "quick"), ("Full (GPU: whole model, whole images)", "full"),
                  ("Custom", "custom")]
#: CPU cost of one R50-FPN training step on the development machine (2 cores shared with other jobs,
#: 2 threads; see README, "Figures"), per image: a part that depends on the RoIs sampled (windows: 64
#: RoIs and 500 proposals, :data:`WINDOW_SAMPLING`; whole images: the model's 512 and 2000) plus one
#: per megapixel of network input that depends on what trains: "backbone" (freeze level 6: the body
#: and the FPN only run forward), "fpn" (5: the FPN trains), "body" (< 5: part of the body trains
#: too). Fitted between the machine's quiet and busy moments, so that both are within 2x:
#: ``benchmarks/bench_finetune_loop.py --compare`` gave the quick preset (2 windows at 384 x ~430 px)
#: 4.4 s per iteration at load ~3 and 7.9-11.5 s at load ~5-6 (the old preset, body frozen and 512
#: RoIs: 13.4 and 14-23 s), ``benchmarks/bench_training.py --short-edge 832 --batch 2`` the full
#: preset's whole-model step 150 s at load ~7, and issue 9 ~70 s at 1024 px.
CPU_SECONDS_PER_IMAGE = {"windows": 1.0, "whole": 4.5}
CPU_SECONDS_PER_MEGAPIXEL = {"backbone": 14.0, "fpn": 19.0, "body": 36.0}
#: Before the first step: loading or building the model and cutting the windows (s; the quick preset's
#: first iteration came 2-37 s after the start, one iteration included), and for a fresh (randomly
#: initialised) model the FrozenBN calibration, a forward pass of the backbone over two images at
#: the training size (s per megapixel of each; 5.6 s for two 384-px windows at load ~4).
CPU_STARTUP_SECONDS = 10.0
CPU_CALIBRATION_SECONDS_PER_MEGAPIXEL = 15.0
#: The same on a CUDA GPU (order of magnitude; the first iterations then give the real figure).
GPU_SECONDS_PER_IMAGE = {"windows": 0.02, "whole": 0.05}
GPU_SECONDS_PER_MEGAPIXEL = {"backbone": 0.04, "fpn": 0.08, "body": 0.2}
GPU_STARTUP_SECONDS = 5.0
GPU_CALIBRATION_SECONDS_PER_MEGAPIXEL = 0.1
_AUG_LABELS = {"crop": "Crop", "resize": "Multi-scale", "hflip": "Flip LR", "vflip": "Flip UD", "rot90": "Rot 90"}
_AUG_TIPS = {
    "crop": "random crop of each image (sides at least 'Crop at least' of the image's)",
    "resize": "multi-scale training: a random short edge per image (see 'Training size')",
    "hflip": "flip left-right with probability 0.5",
    "vflip": "flip up-down with probability 0.5",
    "rot90": "rotate by a random multiple of 90 degrees",
}
#: Frozen stages offered (detectron2's FREEZE_AT); -1 keeps the starting model's setting.
FREEZE_CHOICES = [
    ("as in the model", -1),
    ("0: train everything", 0),
    ("1: freeze the stem", 1),
    ("2: stem + res2", 2),
    ("3: stem + res2-3", 3),
    ("4: stem + res2-4", 4),
    ("5: whole backbone body", 5),
    ("6: body + FPN (RPN and heads learn)", 6),
]


def training_part(freeze_at: int) -> str:
    """What trains at freeze level ``freeze_at`` (-1: the model's own, 2 for the zoo's models), as a
    key of :data:`CPU_SECONDS_PER_MEGAPIXEL`."""
    return "backbone" if freeze_at >= 6 else "fpn" if freeze_at == 5 else "body"


def estimate_seconds(iterations: int, batch_size: int, short_edge: int, long_edge: int, freeze_at: int,
                     device: str = "cpu", *, windows: bool = False, fresh: bool = False) -> float:
    """Rough wall time (s) of a run: a start-up (plus the calibration pass of a ``fresh`` model) and
    ``iterations x batch x (per image + input megapixels x per megapixel)``, with the CPU figures
    above (the GPU ones for a CUDA device). The input is ``short_edge x long_edge`` pixels after the
    model's resize; ``windows``: the run trains on windows around the cells (the window sampling);
    ``freeze_at``: the freeze level (see :func:`training_part`)."""
    gpu = device.startswith("cuda")
    per_image = (GPU_SECONDS_PER_IMAGE if gpu else CPU_SECONDS_PER_IMAGE)["windows" if windows else "whole"]
    per_mp = (GPU_SECONDS_PER_MEGAPIXEL if gpu else CPU_SECONDS_PER_MEGAPIXEL)[training_part(int(freeze_at))]
    mp = short_edge * long_edge / 1e6
    start = GPU_STARTUP_SECONDS if gpu else CPU_STARTUP_SECONDS
    if fresh:
        start += 2 * mp * (GPU_CALIBRATION_SECONDS_PER_MEGAPIXEL if gpu else CPU_CALIBRATION_SECONDS_PER_MEGAPIXEL)
    return start + float(iterations) * batch_size * (per_image + mp * per_mp)


def with_window_sampling(settings):
    """``settings`` (a :class:`~napari_sartorius.training.settings.TrainSettings`) with the
    :data:`WINDOW_SAMPLING` counts where it leaves them None (what a run on windows uses)."""
    from dataclasses import replace

    unset = {k: v for k, v in WINDOW_SAMPLING.items() if getattr(settings, k) is None}
    return replace(settings, **unset) if unset else settings

"""The Fine-tune dock's presets and its time estimate (no Qt, no torch).

"Quick (CPU)" freezes the backbone body and trains the FPN, RPN and heads on windows around the
labelled cells at a small size for a few dozen iterations; "Full (GPU)" trains the whole model on whole
images. :func:`estimate_seconds` turns a run's size into a rough wall time shown before starting. The
dock's choice tables (frozen stages, augmentation labels) live here too.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "PRESET_CHOICES", "estimate_seconds", "CPU_SECONDS_PER_IMAGE", "CPU_SECONDS_PER_MEGAPIXEL",
           "WINDOW_SAMPLING", "with_window_sampling"]

#: Control values of each preset (see the module's docstring); "crop_cells" 0 = whole images.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(iterations=20, learning_rate=0.01, batch_size=2, train_size=384, freeze=5, crop_cells=256,
                  resize=False),
    "full": dict(iterations=300, learning_rate=0.0025, batch_size=2, train_size=0, freeze=-1, crop_cells=0,
                 resize=True),
}
#: RoI and proposal counts of a run on windows around the cells (``crop_cells`` > 0), where the
#: settings leave them unset: a 256-px window holds a few cells, so 128 sampled RoIs (at most 32
#: positive) and 500 proposals per image train the heads as well as detectron2's 512 and 2000 for a
#: whole 1333 x 800 image, at a fraction of the cost (the mask head is ~0.9 GFLOP per positive RoI).
WINDOW_SAMPLING: dict[str, int] = dict(roi_batch_size_per_image=128, rpn_pre_nms_top_n_train=1000,
                                       rpn_post_nms_top_n_train=500)
PRESET_CHOICES = [("Quick (CPU: heads only, crops around the cells)", "quick"), ("Full (GPU: whole model, whole images)", "full"),
                  ("Custom", "custom")]
#: CPU cost of one R50-FPN training step on the development machine (2 shared cores, 2 threads):
#: seconds per image (RoI heads, mostly independent of the input size) and seconds per image and
#: megapixel of network input, body frozen / trainable. Fitted to two measurements: the quick
#: preset, 15.3 s per iteration (batch 2 at 384 x 384, ``benchmarks/bench_finetune_loop.py``), and
#: ~70 s per iteration for the whole model at a 1024-px short edge, batch 2 (issue 9).
CPU_SECONDS_PER_IMAGE = 5.0
CPU_SECONDS_PER_MEGAPIXEL = {"frozen": 15.0, "trainable": 24.0}
#: The same on a CUDA GPU (order of magnitude; the first iterations then give the real figure).
GPU_SECONDS_PER_IMAGE = 0.05
GPU_SECONDS_PER_MEGAPIXEL = {"frozen": 0.08, "trainable": 0.2}
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
]


def estimate_seconds(iterations: int, batch_size: int, short_edge: int, long_edge: int, frozen_body: bool,
                     device: str = "cpu") -> float:
    """Rough wall time (s) of a run: ``iterations x batch x (per image + input megapixels x per
    megapixel)`` with the CPU figures above (the GPU ones for a CUDA device). The input is
    ``short_edge x long_edge`` pixels after the model's resize."""
    gpu = device.startswith("cuda")
    per_image = GPU_SECONDS_PER_IMAGE if gpu else CPU_SECONDS_PER_IMAGE
    table = GPU_SECONDS_PER_MEGAPIXEL if gpu else CPU_SECONDS_PER_MEGAPIXEL
    mp = short_edge * long_edge / 1e6
    return float(iterations) * batch_size * (per_image + mp * table["frozen" if frozen_body else "trainable"])


def with_window_sampling(settings):
    """``settings`` (a :class:`~napari_sartorius.training.settings.TrainSettings`) with the
    :data:`WINDOW_SAMPLING` counts where it leaves them None (what a run on windows uses)."""
    from dataclasses import replace

    unset = {k: v for k, v in WINDOW_SAMPLING.items() if getattr(settings, k) is None}
    return replace(settings, **unset) if unset else settings

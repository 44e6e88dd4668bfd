"""Torch-free settings, progress and result types of training (a dock builds and checks them directly).

:class:`AugmentationSettings` and :class:`TrainSettings` hold every default of a run in one place;
:class:`TrainProgress` is what :func:`~.trainer.train` yields and :class:`TrainResult` what it returns.
:func:`lr_at` is the learning-rate schedule and
:func:`multiscale_sizes` the short edges of multi-scale training (multiples of 32). Importing this
module loads neither torch nor numpy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AugmentationSettings",
    "TrainSettings",
    "TrainProgress",
    "TrainResult",
    "TrainingError",
    "lr_at",
    "warmup_length",
    "multiscale_sizes",
    "SCHEDULES",
    "CLIP_TYPES",
]

@dataclass(frozen=True)
class AugmentationSettings:
    """Which augmentations run during training and how strong they are (every default is here).

    A strength of 0 (or ``False``) switches an augmentation off.

    Attributes:
        crop: take a random crop of each image before anything else.
        crop_relative_range: ``(min_h, min_w)`` fractions; the crop's height is ``H * U(min_h, 1)`` and
            its width ``W * U(min_w, 1)`` (detectron2's ``RandomCrop("relative_range", ...)``).
        resize: multi-scale training: resize each image so that the short edge is one of ``short_edges``
            (chosen uniformly) and the long edge at most ``max_size`` (detectron2's
            ``ResizeShortestEdge(..., "choice")``). The trainer hands these sizes to the model's own
            resize step; off = a single scale, the model's test size.
        short_edges: candidate short-edge lengths in pixels; ``None`` = the model's ``min_size_train``.
        max_size: long-edge limit in pixels; ``None`` = the model's training maximum.
        hflip, vflip: flip left-right / up-down, each with probability 0.5.
        rot90: rotate by a uniformly chosen multiple of 90 degrees.
        rotation_degrees: additionally rotate by an angle uniform in ``[-deg, deg]`` (0 = off);
            the uncovered corners are filled with the image's mean.
        brightness: multiply the image by ``U(1 - b, 1 + b)``.
        contrast: blend with the image's mean: ``mean + (x - mean) * U(1 - c, 1 + c)``.
        saturation: blend with the luma (0.299 R + 0.587 G + 0.114 B) by ``U(1 - s, 1 + s)``. A
            grayscale image replicated to 3 channels equals its luma, so this is a no-op there; it
            acts on real RGB input only. It runs before ``lighting``, which may tint the channels.
        lighting: standard deviation of AlexNet's PCA lighting noise (ImageNet eigenvectors), in
            units of the 0..1 range (the offset is multiplied by 255; detectron2 adds it to 0..255
            pixels unscaled, which makes its version ~255 times weaker).
        min_instance_area: instances with fewer mask pixels after augmentation are dropped.
        min_box_size: instances whose box is thinner than this (pixels) are dropped.
    """

    crop: bool = True
    crop_relative_range: tuple[float, float] = (0.7, 0.7)
    resize: bool = True
    short_edges: tuple[int, ...] | None = None
    max_size: int | None = None
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    rotation_degrees: float = 0.0
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.0
    lighting: float = 0.0
    min_instance_area: int = 8
    min_box_size: float = 2.0

    def __post_init__(self) -> None:
        lo_h, lo_w = self.crop_relative_range
        if not (0 < lo_h <= 1 and 0 < lo_w <= 1):
            raise ValueError(f"crop_relative_range must hold two fractions in (0, 1], got {self.crop_relative_range}")
        if self.short_edges is not None and (not self.short_edges or min(self.short_edges) < 1):
            raise ValueError(f"short_edges must be positive pixel sizes, got {self.short_edges}")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"{name} strength must be in [0, 1), got {v}")
        if self.lighting < 0 or self.rotation_degrees < 0:
            raise ValueError("lighting and rotation_degrees must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AugmentationSettings:
        d = dict(d)
        for k in ("crop_relative_range", "short_edges"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def none(cls) -> AugmentationSettings:
        """Every augmentation off (resizing too): what validation and overfitting tests use."""
        return cls(crop=False, resize=False, hflip=False, vflip=False, rot90=False, brightness=0.0, contrast=0.0)


SCHEDULES = ("multistep", "cosine", "constant")
#: detectron2's ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE``: the global norm of all gradients ("full_model"),
#: each parameter's gradient norm ("norm"), or each gradient element ("value").
CLIP_TYPES = ("full_model", "norm", "value")
#: the warm-up never takes more than this fraction of the run (a 3-iteration run is not all warm-up)
MAX_WARMUP_FRACTION = 0.2


class TrainingError(RuntimeError):
    """Training cannot go on (out of memory, diverged, unusable checkpoint); the message says what to do."""


@dataclass(frozen=True)
class TrainSettings:
    """Every knob of a training run, with its default.

    Attributes:
        iters: optimizer steps of the whole run (a resumed run continues up to this number).
        lr: peak learning rate (detectron2 uses 0.02 for 16 images a step; 0.0025 per 2 images).
        batch_size: images per forward pass (per process).
        warmup_iters: linear warm-up length in iterations (at most ``MAX_WARMUP_FRACTION`` of ``iters``,
            at least 1 when > 0, so a short run gets a short warm-up instead of being all warm-up).
        warmup_factor: learning-rate fraction at iteration 0 of the warm-up.
        schedule: "multistep" (x ``gamma`` at each fraction of ``steps``), "cosine" (to 0 at ``iters``),
            or "constant".
        steps: fractions of ``iters`` at which a multi-step schedule multiplies the lr by ``gamma``.
        gamma: multi-step factor.
        weight_decay: L2 penalty on weights (normalisation parameters are not decayed).
        momentum: SGD momentum.
        grad_accum: micro-batches whose gradients are summed before each step (memory-bound GPUs).
        clip_grad_norm: the gradient clipping threshold (None: no clipping); what it bounds is
            ``clip_type``.
        clip_type: "full_model" (the global norm of all gradients), "norm" (each parameter's gradient
            norm) or "value" (each gradient element), as detectron2's ``CLIP_GRADIENTS.CLIP_TYPE``.
        freeze_at: None keeps the model's setting; 0 trains the whole backbone, 1 freezes the stem,
            k >= 2 the stem and res2..res``k`` (detectron2's ``FREEZE_AT``; 5 freezes the whole body);
            6 freezes the body and the FPN (only the RPN and the RoI heads learn; the checkpoint's
            config records 5).
        amp: mixed precision on CUDA (ignored on CPU).
        checkpoint_period: save a checkpoint every this many iterations (0: only at the end).
        eval_period: score the validation data every this many iterations (0: only at the end).
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        seed: seeds the model init (fresh models), the image order and the augmentations.
        num_workers: DataLoader worker processes (0: load in the training thread).
        out: where the final (and periodic) checkpoint goes; the best by validation score goes to
            ``<stem>_best<suffix>`` beside it. None: nothing is written.
        resume: when starting from a checkpoint that holds a training state, continue it
            (iteration, optimizer) instead of starting a new run from its weights.
        save_on_cancel: on a stop request, save the state reached (atomically) so it can be resumed.
        augment: the augmentations (their resize sizes default to the model's training sizes).
        min_size_train, max_size_train: override the model's training sizes (None: keep them).
        roi_batch_size_per_image: RoIs sampled per image for the box and mask heads' losses (a quarter
            of them at most positive); None keeps the model's (detectron2's 512). The mask head costs
            ~0.9 GFLOP per positive RoI, so a window with a few cells trains as well on 128 and
            several times faster (the quick preset). Training only: the checkpoint keeps the model's.
        rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train: RPN proposals kept per level before NMS
            and per image after it while training; None keeps the model's (2000 each). Training only.
    """

    iters: int = 2000
    lr: float = 0.0025
    batch_size: int = 2
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    schedule: str = "multistep"
    steps: tuple[float, ...] = (0.75, 0.9)
    gamma: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    clip_type: str = "full_model"
    freeze_at: int | None = None
    amp: bool = True
    checkpoint_period: int = 500
    eval_period: int = 0
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    out: str | None = None
    resume: bool = True
    save_on_cancel: bool = True
    augment: AugmentationSettings = field(default_factory=AugmentationSettings)
    min_size_train: tuple[int, ...] | None = None
    max_size_train: int | None = None
    roi_batch_size_per_image: int | None = None
    rpn_pre_nms_top_n_train: int | None = None
    rpn_post_nms_top_n_train: int | None = None

    def __post_init__(self) -> None:
        def bad(msg: str):
            raise ValueError(f"TrainSettings: {msg}")

        if self.iters < 1:
            bad(f"iters must be >= 1, got {self.iters}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr must be a positive number, got {self.lr}")
        if self.batch_size < 1 or self.grad_accum < 1:
            bad("batch_size and grad_accum must be >= 1")
        if self.warmup_iters < 0 or not 0 < self.warmup_factor <= 1:
            bad("warmup_iters must be >= 0 and warmup_factor in (0, 1]")
        if self.schedule not in SCHEDULES:
            bad(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if any(not 0 < s < 1 for s in self.steps) or list(self.steps) != sorted(self.steps):
            bad(f"steps must be increasing fractions of iters in (0, 1), got {self.steps}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            bad("weight_decay must be >= 0 and momentum in [0, 1)")
        if self.freeze_at is not None and not 0 <= self.freeze_at <= 6:
            bad(f"freeze_at must be in 0..6, got {self.freeze_at}")
        if self.checkpoint_period < 0 or self.eval_period < 0 or self.num_workers < 0:
            bad("checkpoint_period, eval_period and num_workers must be >= 0")
        if self.clip_type not in CLIP_TYPES:
            bad(f"clip_type must be one of {', '.join(CLIP_TYPES)}, got {self.clip_type!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            bad(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm}")
        if self.min_size_train is not None and (not self.min_size_train or min(self.min_size_train) < 1):
            bad(f"min_size_train must be positive sizes, got {self.min_size_train}")
        for name in ("roi_batch_size_per_image", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
                bad(f"{name} must be a positive whole number or None, got {v!r}")
        object.__setattr__(self, "steps", tuple(float(s) for s in self.steps))
        if self.min_size_train is not None:
            object.__setattr__(self, "min_size_train", tuple(int(s) for s in self.min_size_train))
        if self.out is not None:
            object.__setattr__(self, "out", str(self.out))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainSettings:
        d = dict(d)
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        if isinstance(d.get("augment"), dict):
            d["augment"] = AugmentationSettings.from_dict(d["augment"])
        for k in ("steps", "min_size_train"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class TrainProgress:
    """One report of a running training.

    Attributes:
        iteration: optimizer steps done so far (1..total; 0 before the first).
        total: the run's ``iters``.
        losses: the last iteration's losses by name (``loss_classifier``, ``loss_box_reg``,
            ``loss_mask``, ``loss_objectness``, ``loss_rpn_box_reg``, ...) plus ``total``; empty for
            event-only reports.
        lr: learning rate of the last iteration.
        seconds_left: estimated seconds to the end (median iteration time x iterations left), or None.
        val_score: competition score on the validation data when it was just computed, else None.
        message: a sentence for the user ("" when nothing notable happened).
    """

    iteration: int
    total: int
    losses: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    seconds_left: float | None = None
    val_score: float | None = None
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.iteration / max(self.total, 1)


@dataclass
class TrainResult:
    """The outcome of :func:`train`.

    Attributes:
        model: the trained network (on the training device, eval mode; unwrapped from DDP).
        config: its :class:`~napari_sartorius.models.config.ModelConfig`, provenance included.
        iterations: optimizer steps done in total (including those of a resumed checkpoint).
        cancelled: the run stopped on request before ``iters``.
        checkpoint_path: the last checkpoint written (None when ``out`` is None or nothing was saved).
        best_path: the checkpoint with the best validation score (None without validation data).
        best_score: that score.
        history: one dict per iteration: ``iteration``, ``lr``, ``total`` and each loss.
        val_scores: ``(iteration, competition score, per-cell-type scores)`` of each validation.
        messages: every non-empty progress message, in order.
    """

    model: Any
    config: Any
    iterations: int
    cancelled: bool = False
    checkpoint_path: Path | None = None
    best_path: Path | None = None
    best_score: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    val_scores: list[tuple[int, float, dict[str, float]]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        """Total loss per iteration."""
        return [h["total"] for h in self.history]


# -- learning rate -----------------------------------------------------------------------------


def lr_at(iteration: int, s: TrainSettings) -> float:
    """Learning rate of 0-based ``iteration``: warm-up factor x schedule factor x ``s.lr``."""
    it = int(iteration)
    warm = warmup_length(s)
    f = 1.0
    if it < warm:
        alpha = it / warm
        f = s.warmup_factor * (1 - alpha) + alpha
    if s.schedule == "multistep":
        f *= s.gamma ** sum(1 for frac in s.steps if it >= int(frac * s.iters))
    elif s.schedule == "cosine":
        f *= 0.5 * (1.0 + math.cos(math.pi * min(it, s.iters) / s.iters))
    return s.lr * f


def warmup_length(s: TrainSettings) -> int:
    """Iterations of linear warm-up: ``s.warmup_iters``, at most ``MAX_WARMUP_FRACTION`` of the run
    (and at least 1 when a warm-up is asked for)."""
    if s.warmup_iters <= 0:
        return 0
    return max(1, min(s.warmup_iters, int(round(s.iters * MAX_WARMUP_FRACTION))))


#: short-edge factors of multi-scale training around a chosen training size
MULTISCALE_FACTORS = (0.8, 0.9, 1.0, 1.1, 1.2)
#: the stride every FPN input side is padded to: training sizes are multiples of it
SIZE_DIVISIBILITY = 32


def multiscale_sizes(size: int, factors: tuple[float, ...] = MULTISCALE_FACTORS) -> tuple[int, ...]:
    """Short edges (px) of multi-scale training around ``size``: ``size x factor``, each rounded to
    the nearest multiple of 32 (an FPN pads its input to one anyway; an odd size only costs padding),
    distinct and increasing. ``multiscale_sizes(512) == (416, 448, 512, 576, 608)``."""
    if size < SIZE_DIVISIBILITY:
        raise ValueError(f"training size must be at least {SIZE_DIVISIBILITY} px, got {size}")
    out = {max(SIZE_DIVISIBILITY, int(round(size * f / SIZE_DIVISIBILITY)) * SIZE_DIVISIBILITY) for f in factors}
    return tuple(sorted(out))

"""The training loop: a generator that fine-tunes a Mask R-CNN and yields its progress.

``train(model_or_ckpt, train_data, settings, val_data=None, stop=None)`` yields
:class:`TrainProgress` after every iteration (and for notable events: class-head adaptation,
checkpoints, validation scores) and returns a :class:`TrainResult` (``StopIteration.value``; or use
:func:`run_training` to drain it). It never touches a GUI: the Fine-tune dock runs it in a worker
thread and passes a ``threading.Event`` as ``stop``.

Optimisation follows detectron2's defaults for Mask R-CNN: SGD with momentum, linear warm-up from
``warmup_factor * lr``, then a multi-step (x0.1 at 75 % and 90 % of the run) or cosine decay; weight
decay off for normalisation layers. Mixed precision (float16 autocast + gradient scaling) runs on
CUDA only. ``grad_accum`` micro-batches are summed before each optimizer step, so one iteration sees
``batch_size * grad_accum`` images (times the number of processes under ``torchrun``).

Reproducibility and resume: the images of iteration ``i``, their augmentation seeds and the state of
torch's global generator at the start of the iteration are pure functions of ``(seed, i)`` (the
generator is re-seeded every iteration), and the learning rate a function of ``i``; a checkpoint stores the
iteration, settings and loss history in its JSON ``extra``, and the optimizer (momentum buffers) and
gradient scaler in a file beside it, ``<checkpoint>.trainstate`` (tensors and plain data, loaded with
``weights_only=True``), so a resumed run continues where the checkpoint left off. Every checkpoint is written atomically (temporary file + ``os.replace``): a
cancelled, crashed or killed run leaves the previous good file in place.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Sequence

import torch
from torch import nn

from ..device import is_out_of_memory, resolve_device
from ..models.class_surgery import inherit_single_class
from ..stopping import stop_requested
from . import distributed as dist_utils
from .augment import AugmentationSettings, TrainTransform
from .data import TrainingDataset, collate

__all__ = [
    "TrainSettings",
    "TrainProgress",
    "TrainResult",
    "TrainingError",
    "train",
    "run_training",
    "adapt_num_classes",
    "set_freeze_at",
    "prepare_fresh_model",
    "lr_at",
    "best_path_for",
    "train_state_path",
    "evaluate_model",
]

SCHEDULES = ("multistep", "cosine", "constant")


class TrainingError(RuntimeError):
    """Training cannot go on (out of memory, diverged, unusable checkpoint); the message says what to do."""


@dataclass(frozen=True)
class TrainSettings:
    """Every knob of a training run, with its default.

    Attributes:
        iters: optimizer steps of the whole run (a resumed run continues up to this number).
        lr: peak learning rate (detectron2 uses 0.02 for 16 images a step; 0.0025 per 2 images).
        batch_size: images per forward pass (per process).
        warmup_iters: linear warm-up length in iterations (capped at ``iters``).
        warmup_factor: learning-rate fraction at iteration 0 of the warm-up.
        schedule: "multistep" (x ``gamma`` at each fraction of ``steps``), "cosine" (to 0 at ``iters``),
            or "constant".
        steps: fractions of ``iters`` at which a multi-step schedule multiplies the lr by ``gamma``.
        gamma: multi-step factor.
        weight_decay: L2 penalty on weights (normalisation parameters are not decayed).
        momentum: SGD momentum.
        grad_accum: micro-batches whose gradients are summed before each step (memory-bound GPUs).
        clip_grad_norm: clip the global gradient norm to this value (None: no clipping).
        freeze_at: None keeps the model's setting; 0 trains the whole backbone, 1 freezes the stem,
            k >= 2 the stem and res2..res``k`` (detectron2's ``FREEZE_AT``; 5 freezes the whole body).
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
        if self.freeze_at is not None and not 0 <= self.freeze_at <= 5:
            bad(f"freeze_at must be in 0..5, got {self.freeze_at}")
        if self.checkpoint_period < 0 or self.eval_period < 0 or self.num_workers < 0:
            bad("checkpoint_period, eval_period and num_workers must be >= 0")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            bad(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm}")
        if self.min_size_train is not None and (not self.min_size_train or min(self.min_size_train) < 1):
            bad(f"min_size_train must be positive sizes, got {self.min_size_train}")
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

    model: nn.Module
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
    warm = min(s.warmup_iters, s.iters)
    f = 1.0
    if it < warm:
        alpha = it / warm
        f = s.warmup_factor * (1 - alpha) + alpha
    if s.schedule == "multistep":
        f *= s.gamma ** sum(1 for frac in s.steps if it >= int(frac * s.iters))
    elif s.schedule == "cosine":
        f *= 0.5 * (1.0 + math.cos(math.pi * min(it, s.iters) / s.iters))
    return s.lr * f


# -- model preparation -------------------------------------------------------------------------


def _head_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, kind)`` of every class-dependent output layer: ``cls``, ``box`` or ``mask``."""
    out = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "cls_score" and isinstance(mod, nn.Linear):
            out.append((name, mod, "cls"))
        elif leaf == "bbox_pred" and isinstance(mod, nn.Linear) and name.startswith("roi_heads"):
            out.append((name, mod, "box"))
        elif leaf == "mask_fcn_logits" and isinstance(mod, nn.Conv2d):
            out.append((name, mod, "mask"))
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def adapt_num_classes(model: nn.Module, config, class_names: Sequence[str]) -> tuple[nn.Module, Any, str | None]:
    """Make the class-specific outputs fit ``class_names``.

    The class scores (``cls_score``, ``K + 1`` rows, background first), class-specific box deltas
    (``bbox_pred``, ``4 (K + 1)`` rows; class-agnostic ones are left alone) and mask logits
    (``mask_fcn_logits``, ``K + 1`` channels) get one row per new class. Rows of classes the model
    already knows (same name) and the background keep their weights; the others start as in
    detectron2 (normal, std 0.01 for scores, 0.001 for deltas and masks; zero bias).

    Returns:
        ``(model, config, message)``: the same model changed in place, the config with the new class
        names, and a sentence for the user (None when nothing changed).
    """
    new = tuple(str(c) for c in class_names)
    old = tuple(config.class_names)
    if new == old:
        return model, config, None
    k_old, k_new = len(old), len(new)
    # row in the old head of each new row: background 0 -> 0, known class -> 1 + old index, else -1
    src = [0] + [1 + old.index(c) if c in old else -1 for c in new]
    for name, mod, kind in _head_layers(model):
        rows_per = 4 if kind == "box" else 1
        n_out = mod.weight.shape[0]
        if kind == "box" and n_out == 4:
            continue  # class-agnostic deltas (cascade)
        if n_out != rows_per * (k_old + 1):
            raise TrainingError(
                f"layer {name} has {n_out} outputs, not {rows_per} x ({k_old} classes + background) "
                f"as the checkpoint's config says: the checkpoint does not match its architecture"
            )
        std = 0.01 if kind == "cls" else 0.001
        if isinstance(mod, nn.Linear):
            fresh = nn.Linear(mod.in_features, rows_per * (k_new + 1), bias=mod.bias is not None)
        else:
            fresh = nn.Conv2d(mod.in_channels, k_new + 1, mod.kernel_size, mod.stride, mod.padding,
                              bias=mod.bias is not None)
        fresh = fresh.to(device=mod.weight.device, dtype=mod.weight.dtype)
        with torch.no_grad():
            nn.init.normal_(fresh.weight, std=std)
            if fresh.bias is not None:
                nn.init.zeros_(fresh.bias)
            for j, s in enumerate(src):
                if s < 0:
                    continue
                fresh.weight[j * rows_per : (j + 1) * rows_per] = mod.weight[s * rows_per : (s + 1) * rows_per]
                if fresh.bias is not None:
                    fresh.bias[j * rows_per : (j + 1) * rows_per] = mod.bias[s * rows_per : (s + 1) * rows_per]
        fresh.weight.requires_grad_(mod.weight.requires_grad)
        _set_submodule(model, name, fresh)
    config = config.replace(class_names=new)
    if hasattr(model, "config"):
        model.config = config
    kept = [c for c in new if c in old]
    added = [c for c in new if c not in old]
    msg = (
        f"The model was trained for {k_old} class{'es' if k_old != 1 else ''} ({', '.join(old)}); "
        f"its class outputs were re-initialised for {k_new} ({', '.join(new)})"
    )
    if kept:
        msg += f", keeping what it learnt for {', '.join(kept)}"
    if added:
        msg += f"; new: {', '.join(added)}"
    return model, config, msg + "."


def set_freeze_at(model: nn.Module, freeze_at: int) -> None:
    """Train the backbone body from stage ``freeze_at + 1`` on (detectron2's ``FREEZE_AT``).

    0: everything trains; 1: the stem is frozen; k >= 2: the stem and res2..res``k``. The FPN, RPN and
    heads always train. (The C4 models' res5 lives in the RoI heads and always trains.)
    """
    from ..models.backbones import freeze_body

    body = model.backbone.body
    for p in body.parameters():
        p.requires_grad_(True)
    freeze_body(body, int(freeze_at))


def prepare_fresh_model(model: nn.Module, images: Sequence[torch.Tensor]) -> None:
    """Make a randomly initialised model trainable: data-dependent FrozenBN statistics and small heads.

    The bodies use ``FrozenBatchNorm2d`` (fixed statistics, right for pre-trained weights). With random
    weights and the identity statistics, activations grow through the 50+ layers and the first steps
    diverge. One forward pass over ``images`` sets every FrozenBN's mean/variance to those of its
    input (in network order, so each layer sees already normalised inputs: a data-dependent
    initialisation in the spirit of LSUV). The class/box/mask output layers already have detectron2's
    small initial weights from the model builders (``build_model``). Not for pre-trained models.

    Args:
        images: a few training images, float ``(3, H, W)`` 0..255 on the model's device.

    Training a whole random ResNet body with frozen statistics is unstable (its activations drift
    with nothing to renormalise them); from scratch, freeze the body (``freeze_at=5``: FPN, RPN and
    heads learn on fixed random features) or use a small learning rate with ``clip_grad_norm``.
    Real use starts from pre-trained (LIVECell) weights.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    def calibrate(mod, inputs):
        x = inputs[0].detach().float()
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6))
        mod.weight.fill_(1.0)
        mod.bias.zero_()

    norms = (FrozenBatchNorm2d, nn.BatchNorm2d)  # BatchNorm: the ResNeSt bodies, FPN and heads
    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, norms)]
    was_training = model.training
    # Only the statistics matter: keep the pass cheap (few proposals, one detection for the mask head).
    roi, rpn = getattr(model, "roi_heads", None), getattr(model, "rpn", None)
    saved_det = getattr(roi, "detections_per_img", None)
    saved_post = dict(getattr(rpn, "_post_nms_top_n", {}) or {})
    try:
        model.eval()
        if saved_det is not None:
            roi.detections_per_img = 1
        if saved_post:
            rpn._post_nms_top_n = {**saved_post, "testing": min(64, saved_post.get("testing", 64))}
        with torch.no_grad():
            model(list(images))
    finally:
        for h in hooks:
            h.remove()
        if saved_det is not None:
            roi.detections_per_img = saved_det
        if saved_post:
            rpn._post_nms_top_n = saved_post
        model.train(was_training)


def _param_groups(model: nn.Module, s: TrainSettings) -> list[dict]:
    norm_types = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)
    decay, no_decay = [], []
    seen: set[int] = set()
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(mod, norm_types) else decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _set_train_sizes(model: nn.Module, config, s: TrainSettings):
    """Configure the model's own training resize (detectron2's ResizeShortestEdge, sizes chosen per
    image); returns the config with the sizes used."""
    aug = s.augment
    sizes = s.min_size_train or config.min_size_train
    max_size = s.max_size_train or config.max_size_train
    if aug.resize:
        if aug.short_edges is not None:
            sizes = aug.short_edges
        if aug.max_size is not None:
            max_size = aug.max_size
    else:  # a single scale: the test-time one (0 = the image's own size)
        sizes = (config.min_size_test,) if config.min_size_test > 0 else (max(1, min(sizes)),)
        max_size = config.max_size_test
    transform = getattr(model, "transform", None)
    if transform is not None and hasattr(transform, "min_size"):
        transform.min_size = tuple(int(v) for v in sizes)
        transform.max_size = int(max_size)
    if aug.resize or s.min_size_train or s.max_size_train:
        config = config.replace(min_size_train=tuple(int(v) for v in sizes), max_size_train=int(max_size))
    return config


# -- data order ------------------------------------------------------------------------------------


class _Plan:
    """Which images (and augmentation seeds) each iteration uses: a pure function of (seed, iteration).

    The stream of samples is an endless sequence of shuffled passes over the data (pass ``e`` shuffled
    with seed ``seed + e``); iteration ``i`` takes the next ``per_iter = batch * accum * world``
    positions, process ``rank`` the ``rank``-th share of each micro-batch.
    """

    def __init__(self, n: int, seed: int, batch: int, accum: int, world: int = 1, rank: int = 0) -> None:
        self.n, self.seed, self.batch, self.accum, self.world, self.rank = n, seed, batch, accum, world, rank
        self._perm_cache: dict[int, list[int]] = {}

    def _at(self, pos: int) -> int:
        e, k = divmod(pos, self.n)
        if e not in self._perm_cache:
            self._perm_cache = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e)).tolist()}
        return self._perm_cache[e][k]

    def keys(self, iteration: int, micro: int) -> list[tuple[int, int]]:
        per_micro = self.batch * self.world
        base = (iteration * self.accum + micro) * per_micro + self.rank * self.batch
        return [(self._at(p), (self.seed * 1_000_003 + p) % (2**31)) for p in range(base, base + self.batch)]


class _PlanSampler(torch.utils.data.Sampler):
    def __init__(self, plan: _Plan, start: int, stop: int) -> None:
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for it in range(self.start, self.stop):
            for micro in range(self.plan.accum):
                yield self.plan.keys(it, micro)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.plan.accum


# -- checkpoints -----------------------------------------------------------------------------------


def best_path_for(out: str | Path) -> Path:
    """Where the best-by-validation checkpoint of ``out`` goes: ``<stem>_best<suffix>`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}_best{out.suffix or '.pt'}")


def train_state_path(checkpoint: str | Path) -> Path:
    """The file beside ``checkpoint`` that holds its optimizer state: ``<name>.trainstate``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".trainstate")


def _train_state_json(iteration, s: TrainSettings, history, best_score) -> dict:
    """The JSON part of the training state (goes into the checkpoint's ``extra``)."""
    return {
        "iteration": int(iteration),
        "settings": s.to_dict(),
        "loss_history": [round(float(h["total"]), 6) for h in history],
        "best_score": None if best_score is None else float(best_score),
    }


def _save_optimizer_state(path: Path, iteration: int, optimizer, scaler) -> None:
    """Write the optimizer (momentum buffers) and AMP scaler state atomically (tensors and plain data)."""
    from ..io.atomic import atomic_path

    payload = {
        "iteration": int(iteration),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_optimizer_state(path: Path, iteration: int) -> dict | None:
    """The optimizer state saved with a checkpoint of ``iteration``, or None (missing or out of step)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable side file only costs the momentum
        return None
    if not isinstance(data, dict) or data.get("iteration") != int(iteration):
        return None
    return data


def _with_provenance(config, base: str, data: TrainingDataset, s: TrainSettings, iteration: int, val):
    prov = dict(getattr(config, "provenance", {}) or {})
    previous = prov.get("training")
    entry = {
        "base": base,
        "data": list(data.sources),
        "images": len(data),
        "cells": data.n_cells,
        "iterations": int(iteration),
        "settings": s.to_dict(),
        "validation": None if val is None else {"sources": list(val.sources), "images": len(val)},
    }
    if isinstance(previous, dict) and previous.get("base") == base and previous.get("settings") == entry["settings"]:
        entry["history"] = previous.get("history", [])
    elif previous is not None:
        entry["history"] = [*(previous.get("history", []) if isinstance(previous, dict) else []), previous]
    prov["training"] = entry
    return config.replace(provenance=prov)


def _save(path: Path, model, config, extra) -> None:
    from ..models.checkpoint import save_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, config, extra=extra)


def _load_start(model_or_ckpt, class_names: Sequence[str]):
    """``(model, config, base description, train_state or None, fresh)`` from any accepted start
    (a fresh model is built for ``class_names``)."""
    from ..models.config import ModelConfig

    if isinstance(model_or_ckpt, (str, Path)):
        from ..models.architectures import build_model
        from ..models.checkpoint import load_state, read_checkpoint

        path = Path(model_or_ckpt)
        if not path.is_file():
            raise TrainingError(f"starting checkpoint {path} does not exist")
        weights, config, extra = read_checkpoint(path)
        model = build_model(config)
        load_state(model, weights, strict=True, source=path)
        state = extra.get("train_state") if isinstance(extra, dict) else None
        if isinstance(state, dict):
            state = {**state, "checkpoint": str(path)}
        return model, config, str(path), state, False
    if isinstance(model_or_ckpt, ModelConfig):
        from ..models.architectures import build_model

        cfg = model_or_ckpt.replace(class_names=tuple(class_names))
        return build_model(cfg), cfg, f"fresh {cfg.arch} (random weights)", None, True
    if isinstance(model_or_ckpt, tuple) and len(model_or_ckpt) == 2:
        model, config = model_or_ckpt
        return model, config, f"{config.arch} in memory", None, False
    if isinstance(model_or_ckpt, nn.Module) and hasattr(model_or_ckpt, "config"):
        return model_or_ckpt, model_or_ckpt.config, f"{model_or_ckpt.config.arch} in memory", None, False
    raise TypeError(
        "train() starts from a checkpoint path, a ModelConfig (fresh model), a (model, config) pair or a "
        f"model with a .config; got {type(model_or_ckpt).__name__}"
    )


def _oom_message(s: TrainSettings, device: torch.device, iteration: int) -> str:
    return (
        f"out of memory on {device} at iteration {iteration + 1} (batch size {s.batch_size}): "
        "lower the batch size (use grad_accum to keep the effective batch), the training sizes "
        "(min_size_train / short_edges), or use a smaller crop; "
        + ("mixed precision (amp) is on" if s.amp and device.type == "cuda" else "mixed precision (amp) helps on CUDA")
    )


# -- validation -----------------------------------------------------------------------------------


def evaluate_model(model: nn.Module, config, data: TrainingDataset, device: torch.device | str = "cpu", batch_size: int = 1):
    """Competition score of ``model`` on ``data`` (its images as they are, no augmentation).

    Predictions go through :class:`~napari_sartorius.models.predictor.MaskRCNNEngine` and
    :func:`~napari_sartorius.postprocess.postprocess` with the per-type defaults (the image's cell
    type when known), then :func:`~napari_sartorius.metrics.evaluate` (no COCO AP: it is slow).

    Returns:
        :class:`~napari_sartorius.metrics.EvaluationResult` (``score``, ``per_class``, ...).
    """
    from ..annotations import AnnotationSet, ImageAnnotations
    from ..metrics import evaluate
    from ..models.predictor import MaskRCNNEngine
    from ..postprocess import PostprocessSettings, postprocess

    was_training = model.training
    model.eval()
    try:
        engine = MaskRCNNEngine(model, config, device)
        names = tuple(config.class_names)
        preds = []
        for start in range(0, len(data), batch_size):
            chunk = data.samples[start : start + batch_size]
            outs = engine.predict_batch([s.load_image() for s in chunk])
            for s, inst in zip(chunk, outs):
                ct = s.cell_type if s.cell_type in names else None
                res = postprocess(inst, PostprocessSettings(class_names=names, cell_type=ct))
                preds.append(ImageAnnotations(s.image_id, res.to_instances(), res.cell_type))
        gt = data.annotation_set()
        gt = AnnotationSet(gt.images, names)
        return evaluate(AnnotationSet(preds, names), gt, coco=False)
    finally:
        model.train(was_training)


# -- the loop ------------------------------------------------------------------------------------


def train(
    model_or_ckpt,
    train_data: TrainingDataset,
    settings: TrainSettings | None = None,
    val_data: TrainingDataset | None = None,
    stop: threading.Event | Callable[[], bool] | None = None,
) -> Generator[TrainProgress, None, TrainResult]:
    """Train a Mask R-CNN; yield progress, return the result.

    Args:
        model_or_ckpt: where to start: a checkpoint path (the project's format, e.g. LIVECell weights
            imported from detectron2), a ``ModelConfig`` (a fresh, randomly initialised model), a
            ``(model, config)`` pair or a model with a ``.config``. A model trained for other classes
            gets new class outputs (see :func:`adapt_num_classes`; the first progress says so).
        train_data: the annotated images (its own transform is replaced by ``settings.augment``).
        settings: every knob (default :class:`TrainSettings()`).
        val_data: images scored with the competition metric every ``eval_period`` iterations and at
            the end; the best scoring state is saved to ``best_path_for(settings.out)``.
        stop: a ``threading.Event`` or a callable; when set/true the run stops between iterations.

    Yields:
        :class:`TrainProgress` after each iteration, and for events (messages).

    Returns:
        :class:`TrainResult` (``cancelled=True`` after a stop request).

    Raises:
        TrainingError: out of memory, non-finite loss, a checkpoint that does not fit; the last good
            checkpoint stays as it was.
        ValueError: bad settings or data.
    """
    s = settings or TrainSettings()
    if not isinstance(train_data, TrainingDataset):
        raise TypeError(f"train_data must be a TrainingDataset (see training.data), got {type(train_data).__name__}")
    ctx = dist_utils.init_from_env(s.device)
    device = ctx.device if ctx is not None else resolve_device(s.device)
    main = ctx is None or ctx.rank == 0
    torch.manual_seed(s.seed)

    model, config, base, state, fresh = _load_start(model_or_ckpt, train_data.class_names)
    messages: list[str] = []

    def note(text: str, iteration: int, **kw) -> TrainProgress:
        messages.append(text)
        return TrainProgress(iteration, s.iters, message=text, **kw)

    start_iter = 0
    history: list[dict[str, float]] = []
    best_score: float | None = None
    if state is not None and s.resume:
        start_iter = int(state.get("iteration", 0))
        lh = state.get("loss_history") or []
        history = [{"iteration": i + 1, "total": float(v)} for i, v in enumerate(lh)]
        best_score = state.get("best_score")
    elif state is not None:
        state = None  # weights only: a new run

    old_names = tuple(config.class_names)
    # a one-class (LIVECell "cell") model starts every new class from its class; others: adapt_num_classes
    inherited = inherit_single_class(model, config, train_data.class_names)
    model, config, adapt_msg = inherited or adapt_num_classes(model, config, train_data.class_names)
    if adapt_msg:
        if state is not None:
            raise TrainingError(
                f"cannot resume {base}: it was trained for the classes {', '.join(old_names)} but the data has "
                f"{', '.join(train_data.class_names)}; start a new run from its weights (resume=False)"
            )
        yield note(adapt_msg, start_iter)
    if val_data is not None and val_data.class_names != train_data.class_names:
        raise ValueError(
            f"validation classes {val_data.class_names} differ from the training classes {train_data.class_names}"
        )
    if s.freeze_at is not None:
        set_freeze_at(model, s.freeze_at)
        config = config.replace(freeze_at=int(s.freeze_at))
    config = _set_train_sizes(model, config, s)
    model.to(device)
    model.train()

    data = train_data.with_transform(TrainTransform(s.augment))
    if fresh:
        first = [data[(i, s.seed)][0].to(device) for i in range(min(len(data), 2))]
        prepare_fresh_model(model, first)
        yield note("Fresh model: FrozenBN statistics set from the first images.", 0)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("no trainable parameter (is freeze_at too high?)")
    optimizer = torch.optim.SGD(_param_groups(model, s), lr=lr_at(start_iter, s), momentum=s.momentum)
    use_amp = bool(s.amp and device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    if state is not None:
        opt_state = _load_optimizer_state(train_state_path(state["checkpoint"]), start_iter)
        if opt_state is None:
            yield note(
                f"No optimizer state for iteration {start_iter} beside {base}: momentum starts from zero.", start_iter
            )
        else:
            try:
                optimizer.load_state_dict(opt_state["optimizer"])
            except (ValueError, KeyError) as e:
                raise TrainingError(
                    f"the optimizer state saved with {base} does not fit this model's trainable parameters "
                    f"({e}); keep the checkpoint's freeze_at or start a new run (resume=False)"
                ) from e
            if scaler is not None and opt_state.get("scaler"):
                scaler.load_state_dict(opt_state["scaler"])
        if start_iter >= s.iters:
            yield note(f"{base} has already done {start_iter} of {s.iters} iterations: nothing to train.", start_iter)
        else:
            yield note(f"Resuming {base} at iteration {start_iter} of {s.iters}.", start_iter)

    train_model = dist_utils.wrap_model(model, ctx) if ctx is not None else model
    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    plan = _Plan(len(data), s.seed, s.batch_size, s.grad_accum, world, rank)
    loader = torch.utils.data.DataLoader(
        data,
        batch_sampler=_PlanSampler(plan, start_iter, s.iters),
        num_workers=s.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )

    out = Path(s.out) if s.out is not None else None
    best = best_path_for(out) if out is not None and val_data is not None else None
    last_saved: Path | None = None
    best_saved: Path | None = best if best is not None and best.is_file() and best_score is not None else None
    val_scores: list[tuple[int, float, dict[str, float]]] = []
    iteration = start_iter
    saved_at = start_iter
    times: list[float] = []
    cancelled = False

    def checkpoint(path: Path, it: int, with_optimizer: bool = True) -> None:
        # optimizer state first; its iteration is checked on resume, so a stale side file is ignored
        path.parent.mkdir(parents=True, exist_ok=True)
        if with_optimizer:
            _save_optimizer_state(train_state_path(path), it, optimizer, scaler)
        cfg = _with_provenance(config, base, train_data, s, it, val_data)
        _save(path, model, cfg, {"train_state": _train_state_json(it, s, history, best_score)})

    def validate(it: int) -> Generator[TrainProgress, None, None]:
        nonlocal best_score, best_saved
        if not main:
            return
        res = evaluate_model(model, config, val_data, device)
        val_scores.append((it, float(res.score), dict(res.per_class)))
        per = ", ".join(f"{k} {v:.3f}" for k, v in res.per_class.items())
        text = f"Validation at iteration {it}: competition score {res.score:.4f}" + (f" ({per})" if per else "")
        if best_score is None or res.score > best_score:
            best_score = float(res.score)
            if best is not None:
                checkpoint(best, it, with_optimizer=False)
                best_saved = best
                text += f"; best so far, saved to {best}"
        yield note(text, it, val_score=float(res.score))

    batches = iter(loader)
    try:
        while iteration < s.iters:
            if dist_utils.any_rank(stop_requested(stop), ctx):
                cancelled = True
                break
            t0 = time.perf_counter()
            # the samplers of the RPN and RoI heads draw from torch's global generator: seeding it per
            # iteration makes a resumed run draw exactly what an uninterrupted one would
            torch.manual_seed((s.seed * 1_000_003 + iteration * 7919 + rank) % (2**63))
            lr = lr_at(iteration, s)
            for g in optimizer.param_groups:
                g["lr"] = lr
            sums: dict[str, float] = {}
            try:
                for micro in range(s.grad_accum):
                    images, targets = next(batches)
                    images = [im.to(device, non_blocking=True) for im in images]
                    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
                    sync = dist_utils.no_sync(train_model) if micro < s.grad_accum - 1 else contextlib.nullcontext()
                    with sync:
                        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                            loss_dict = train_model(images, targets)
                        loss = sum(loss_dict.values()) / s.grad_accum
                        if not torch.isfinite(loss.detach()):
                            parts = ", ".join(f"{k} {float(v):.3g}" for k, v in loss_dict.items())
                            raise TrainingError(
                                f"the loss became {float(loss):g} at iteration {iteration + 1} ({parts}): "
                                f"lower the learning rate (now {lr:.3g}) or lengthen the warm-up"
                            )
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    for k, v in loss_dict.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / s.grad_accum
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if s.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, s.clip_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            except TrainingError:
                raise
            except RuntimeError as e:
                if is_out_of_memory(e):
                    optimizer.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    raise TrainingError(_oom_message(s, device, iteration)) from e
                raise
            iteration += 1
            sums["total"] = sum(v for k, v in sums.items())
            history.append({"iteration": iteration, "lr": lr, **sums})
            times.append(time.perf_counter() - t0)
            recent = times[-20:]
            left = statistics.median(recent) * (s.iters - iteration)
            msg = ""
            if main and out is not None and s.checkpoint_period and iteration % s.checkpoint_period == 0 and iteration < s.iters:
                checkpoint(out, iteration)
                last_saved, saved_at = out, iteration
                msg = f"Checkpoint at iteration {iteration} saved to {out}."
                messages.append(msg)
            yield TrainProgress(iteration, s.iters, dict(sums), lr, left, None, msg)
            if val_data is not None and s.eval_period and iteration % s.eval_period == 0 and iteration < s.iters:
                yield from validate(iteration)
            dist_utils.barrier(ctx)
    except GeneratorExit:
        # the consumer dropped the generator (e.g. the widget closed): treat as a cancel, keep files intact
        raise
    except (TrainingError, KeyboardInterrupt):
        raise
    except torch.OutOfMemoryError as e:
        raise TrainingError(_oom_message(s, device, iteration)) from e

    if not cancelled and val_data is not None and iteration > start_iter:
        yield from validate(iteration)
    if main and out is not None and iteration > saved_at and (not cancelled or s.save_on_cancel):
        checkpoint(out, iteration)
        last_saved = out
        yield note(
            ("Stopped" if cancelled else "Finished") + f" at iteration {iteration}; checkpoint saved to {out}.",
            iteration,
        )
    elif cancelled:
        yield note(f"Stopped at iteration {iteration}" + (f"; last checkpoint {last_saved}." if last_saved else "."), iteration)
    if last_saved is None and out is not None and out.is_file():
        last_saved = out
    final_config = _with_provenance(config, base, train_data, s, iteration, val_data)
    if hasattr(model, "config"):
        model.config = final_config
    model.eval()
    dist_utils.barrier(ctx)
    return TrainResult(
        model=model,
        config=final_config,
        iterations=iteration,
        cancelled=cancelled,
        checkpoint_path=last_saved,
        best_path=best_saved,
        best_score=best_score,
        history=history,
        val_scores=val_scores,
        messages=messages,
    )


def run_training(gen: Generator[TrainProgress, None, TrainResult], callback: Callable[[TrainProgress], Any] | None = None) -> TrainResult:
    """Drain a :func:`train` (or ``run_kfold``) generator, passing each progress to ``callback``; return its result."""
    while True:
        try:
            p = next(gen)
        except StopIteration as fin:
            return fin.value
        if callback is not None:
            callback(p)


"""Model surgery before training: class outputs adapted to new classes, frozen stages, and the
data-dependent FrozenBN calibration that makes a randomly initialised model trainable.

A checkpoint trained for other classes gets new class rows in :func:`adapt_num_classes` (the one place
where base classes are adapted to the data's classes).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .settings import TrainingError, TrainSettings

__all__ = ["adapt_num_classes", "set_freeze_at", "prepare_fresh_model", "calibrated_statistics"]


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

    0: everything trains; 1: the stem is frozen; k >= 2: the stem and res2..res``k``; 5: the whole
    body; 6 (no detectron2 equivalent): the body and the FPN, so that only the RPN and the RoI heads
    learn (the quick CPU preset: no gradient flows into the backbone at all). The RPN and heads
    always train. (The C4 models' res5 lives in the RoI heads and always trains; they have no FPN.)
    """
    from ..models.backbones import freeze_body

    freeze_at = int(freeze_at)
    body = model.backbone.body
    fpn = getattr(model.backbone, "fpn", None)
    if freeze_at >= 6 and fpn is None:
        raise TrainingError("freeze level 6 freezes the FPN, and this model has none: use 5 (the whole body)")
    for p in body.parameters():
        p.requires_grad_(True)
    freeze_body(body, min(freeze_at, 5))
    for p in fpn.parameters() if fpn is not None else ():
        p.requires_grad_(freeze_at < 6)


def prepare_fresh_model(model: nn.Module, images: Sequence[torch.Tensor]) -> None:
    """Make a randomly initialised model trainable: data-dependent FrozenBN statistics and small heads.

    The bodies use ``FrozenBatchNorm2d`` (fixed statistics, right for pre-trained weights). With random
    weights and the identity statistics, activations grow through the 50+ layers and the first steps
    diverge. One forward pass over ``images`` sets every FrozenBN's mean/variance to those of its
    input (in network order, so each layer sees already normalised inputs: a data-dependent
    initialisation in the spirit of LSUV). The class/box/mask output layers already have detectron2's
    small initial weights from the model builders (``build_model``). Not for pre-trained models.

    The pass resizes the images as training does (the model's training sizes, which the trainer has
    set: the statistics are those of what the run trains on) and runs through the backbone only
    when every normalisation layer lives there (the FPN models' FrozenBN bodies); otherwise (BN in the
    heads, a C4 model's res5) through the whole model with few proposals. The whole model at the
    1024-px test size took 111 s on a 2-core CPU; the backbone at the quick preset's 384 px ~2 s.

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
        mean, var = calibrated_statistics(x, mod.eps)
        mod.running_mean.copy_(mean)
        mod.running_var.copy_(var)
        mod.weight.fill_(1.0)
        mod.bias.zero_()

    norms = (FrozenBatchNorm2d, nn.BatchNorm2d)  # BatchNorm: the ResNeSt bodies, FPN and heads
    norm_modules = [m for m in model.modules() if isinstance(m, norms)]
    backbone, transform = getattr(model, "backbone", None), getattr(model, "transform", None)
    in_backbone = {id(m) for m in backbone.modules()} if backbone is not None else set()
    backbone_only = transform is not None and all(id(m) in in_backbone for m in norm_modules)
    hooks = [m.register_forward_pre_hook(calibrate) for m in norm_modules]
    was_training = model.training
    # Only the statistics matter: keep a whole-model pass cheap (few proposals, one detection).
    roi, rpn = getattr(model, "roi_heads", None), getattr(model, "rpn", None)
    saved_det = getattr(roi, "detections_per_img", None)
    saved_pre = dict(getattr(rpn, "_pre_nms_top_n", {}) or {})
    saved_post = dict(getattr(rpn, "_post_nms_top_n", {}) or {})
    try:
        model.eval()  # BatchNorm must not update its statistics from the batch
        if transform is not None:
            transform.train()  # ... but the images are resized to the training sizes
        with torch.no_grad():
            if backbone_only:
                batched, _ = transform(list(images))
                backbone(batched.tensors)
            else:
                if saved_det is not None:
                    roi.detections_per_img = 1
                if saved_pre:
                    rpn._pre_nms_top_n = {**saved_pre, "testing": min(500, saved_pre.get("testing", 500))}
                if saved_post:
                    rpn._post_nms_top_n = {**saved_post, "testing": min(64, saved_post.get("testing", 64))}
                model(list(images))
    finally:
        for h in hooks:
            h.remove()
        if saved_det is not None:
            roi.detections_per_img = saved_det
        if saved_pre:
            rpn._pre_nms_top_n = saved_pre
        if saved_post:
            rpn._post_nms_top_n = saved_post
        model.train(was_training)


#: relative variance below which a channel counts as constant (dead) in :func:`calibrated_statistics`
CONSTANT_CHANNEL_VAR = 1e-12
#: smallest variance a live channel is given, as a fraction of its layer's median channel variance
MIN_RELATIVE_VAR = 1e-2


def calibrated_statistics(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FrozenBN ``(running_mean, running_var)``, each ``(C,)``, that normalise ``x`` ``(B, C, H, W)``.

    Two kinds of channel must not be normalised to unit variance, or the layer becomes a huge gain
    that turns the first optimizer step into an explosion (losses of 1e16 after one step at
    lr 2e-3, then NaN):

    * constant channels (variance <= ``CONSTANT_CHANNEL_VAR`` x (1 + mean^2)): above all the input
      of every bottleneck's last FrozenBN, which follows a zero-initialised conv (Fixup, see
      ``models.backbones._fixup_residuals``). Normalising a zero input clamps its variance to a floor
      and multiplies whatever the first step puts there by ~300 in each of the 16 blocks. They get
      the identity (mean 0, variance ``1 - eps``): the residual branch grows from zero as Fixup means.
    * nearly dead channels: their variance is raised to ``MIN_RELATIVE_VAR`` x the layer's median,
      which bounds the gain of any channel to 10 x that of a typical one.
    """
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    live = var > CONSTANT_CHANNEL_VAR * (1.0 + mean.square())
    if bool(live.any()):
        var = var.clamp_min(float(var[live].median()) * MIN_RELATIVE_VAR)
    identity_var = torch.full_like(var, 1.0 - eps)
    return torch.where(live, mean, torch.zeros_like(mean)), torch.where(live, var, identity_var)


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


def _set_sampling(model: nn.Module, s: TrainSettings) -> None:
    """Apply the run's RoI and proposal counts (``s.roi_batch_size_per_image``,
    ``s.rpn_pre_nms_top_n_train``, ``s.rpn_post_nms_top_n_train``; None keeps the model's) to the
    model's RoI sampler and RPN, in place. Training only: test-time counts and the config (what a
    checkpoint records) stay as they are."""
    sampler = getattr(getattr(model, "roi_heads", None), "fg_bg_sampler", None)
    if s.roi_batch_size_per_image is not None and sampler is not None:
        sampler.batch_size_per_image = int(s.roi_batch_size_per_image)
    rpn = getattr(model, "rpn", None)
    pairs = (("rpn_pre_nms_top_n_train", "_pre_nms_top_n"), ("rpn_post_nms_top_n_train", "_post_nms_top_n"))
    for field_name, attr in pairs:
        value = getattr(s, field_name)
        table = getattr(rpn, attr, None)
        if value is not None and isinstance(table, dict):
            setattr(rpn, attr, {**table, "training": int(value)})

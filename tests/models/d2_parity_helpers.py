"""Shared by the detectron2 parity test (``test_detectron2_parity.py``) and ``benchmarks/bench_detectron2.py``:
random detectron2 weights conditioned to behave like trained ones (spread, decisive scores; smooth masks).

Imports torch only (no detectron2): :func:`condition_` works on any detectron2 ``GeneralizedRCNN``
through module names and hooks, and :class:`FrozenBatchNorm2d` is recognised by its buffers.
"""

from __future__ import annotations

import math

import torch


def _is_frozen_bn(mod: torch.nn.Module) -> bool:
    return type(mod).__name__ == "FrozenBatchNorm2d" and hasattr(mod, "running_var")


def condition_(model: torch.nn.Module, inputs, seed: int) -> None:
    """Make a randomly initialised detectron2 model give spread, decisive outputs.

    Head layers are redrawn with variance ~ 1 / fan_in (scores and deltas of order 1 instead of
    detectron2's near-zero initial outputs, which would make the ranking a matter of rounding); every
    FrozenBN takes the mean/variance of its input on the test image the first time it runs, with a
    random affine, so that activations stay of order 1 through the deep bodies.
    """
    g = torch.Generator().manual_seed(seed)
    heads = ("proposal_generator", "roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.mask_head")
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not name.startswith(heads) or not isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)):
                continue
            w = mod.weight
            if ".mask_head." in f".{name}." and name.rsplit(".", 1)[-1] != "predictor":
                smooth_(mod, g)
                continue
            fan_in = w.shape[0 if isinstance(mod, torch.nn.ConvTranspose2d) else 1] * math.prod(w.shape[2:])
            gain = {"anchor_deltas": 0.05, "bbox_pred": 0.05}
            gain = gain.get(name.rsplit(".", 1)[-1], 1.5)
            w.copy_(torch.randn(w.shape, generator=g) * gain / math.sqrt(fan_in))
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        done: set[int] = set()

        def calibrate(mod, args):
            if id(mod) in done:
                return
            done.add(id(mod))
            x = args[0]
            mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            mod.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)
            mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)

        hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if _is_frozen_bn(m)]
        try:
            model(inputs)
        finally:
            for h in hooks:
                h.remove()

        # Logit spreads of trained models: class logits with a standard deviation of ~1.5 over the
        # proposals, objectness ~3 over the anchors, mask logits ~6 over the mask cells (deep bodies
        # otherwise saturate the softmax / sigmoid, and saturated scores tie: torchvision's RPN ranks
        # sigmoid(logit), which is exactly 1.0 in float32 above ~17; flat mask logits near 0 make the
        # 0.5 threshold a coin toss).
        targets = {"cls_score": 1.5, "objectness_logits": 3.0, "predictor": 6.0}

        def rescale(mod, args, out):
            if id(mod) in done:
                return
            done.add(id(mod))
            shape = (1, -1) + (1,) * (out.dim() - 2)
            pure = out - mod.bias.view(shape)  # the weights' part of the output
            k = mod.target_std / pure.std().clamp(min=1e-6)
            mod.weight.mul_(k)
            dims = [d for d in range(out.dim()) if d != 1]
            mod.bias.copy_(-pure.mean(dim=dims) * k if mod.center else torch.zeros_like(mod.bias))

        done.clear()
        hooks = []
        for n, m in model.named_modules():
            leaf = n.rsplit(".", 1)[-1]
            if leaf in targets and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.target_std, m.center = targets[leaf], leaf == "predictor"
                hooks.append(m.register_forward_hook(rescale))
        try:
            model(inputs)
        finally:
            for h in hooks:
                h.remove()


def smooth_(mod: torch.nn.Module, g: torch.Generator) -> None:
    """Spatially smooth weights for a mask-head conv / deconv: a random channel mix times a blur
    (conv) or times a constant 2x2 (deconv = nearest upsampling). Random 3x3 kernels would make the
    28 x 28 mask logits pixel noise, whose binarisation after any resampling is a coin toss; real mask
    heads predict smooth shapes."""
    w = mod.weight
    if isinstance(mod, torch.nn.ConvTranspose2d):
        mix = torch.randn(w.shape[:2], generator=g) / math.sqrt(w.shape[0])
        w.copy_(mix[:, :, None, None].expand_as(w))
    else:
        blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        mix = torch.randn(w.shape[:2], generator=g) * 1.5 / math.sqrt(w.shape[1])
        w.copy_(mix[:, :, None, None] * blur)
    if mod.bias is not None:
        mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)

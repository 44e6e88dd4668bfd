"""Start the classes of a fine-tuning run from a one-class model's "cell" class instead of at random.

LIVECell's models detect one class (``cell``). Fine-tuning one into the Sartorius types (shsy5y, astro,
cort) needs K class outputs; fresh rows would throw away what the model knows about cells. Here every
new class starts as a copy of the single class:

* class scores (``cls_score``, rows background first): each new row is the cell row, with the cell
  bias lowered by ``ln K``, so that ``sum_k exp(logit_k) = exp(logit_cell)``: after softmax the
  foreground probability of every box is exactly what the one-class model gave, shared equally by the
  K classes; the background row is kept;
* class-specific box deltas (``bbox_pred``, 4 rows per class): each class gets the cell's 4 rows (the
  background block is kept); class-agnostic deltas (cascade stages, 4 rows) are left as they are;
* mask logits (``mask_fcn_logits``, one channel per class, background first): the cell channel for
  each class.

Training then separates the classes (their gradients differ by label). Nothing here reads files.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["class_layers", "inherit_single_class"]


def class_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, kind)`` of every class-dependent output layer of the RoI heads, kind ``"cls"``,
    ``"box"`` or ``"mask"`` (every cascade stage has its own ``cls_score``/``bbox_pred``)."""
    out = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not name.startswith("roi_heads"):
            continue
        if leaf == "cls_score" and isinstance(mod, nn.Linear):
            out.append((name, mod, "cls"))
        elif leaf == "bbox_pred" and isinstance(mod, nn.Linear):
            out.append((name, mod, "box"))
        elif leaf == "mask_fcn_logits" and isinstance(mod, nn.Conv2d):
            out.append((name, mod, "mask"))
    return out


def _expanded(mod: nn.Module, kind: str, k_new: int) -> nn.Module:
    rows = 4 if kind == "box" else 1
    w, b = mod.weight.detach(), None if mod.bias is None else mod.bias.detach()
    keep, cell = slice(0, rows), slice(rows, 2 * rows)  # background block, then the one class
    new_w = torch.cat([w[keep]] + [w[cell]] * k_new)
    new_b = None
    if b is not None:
        cell_b = b[cell] - math.log(k_new) if kind == "cls" else b[cell]
        new_b = torch.cat([b[keep]] + [cell_b] * k_new)
    if isinstance(mod, nn.Linear):
        fresh = nn.Linear(mod.in_features, new_w.shape[0], bias=b is not None)
    else:
        fresh = nn.Conv2d(mod.in_channels, new_w.shape[0], mod.kernel_size, mod.stride, mod.padding,
                          bias=b is not None)
    fresh = fresh.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fresh.weight.copy_(new_w)
        if new_b is not None:
            fresh.bias.copy_(new_b)
    fresh.weight.requires_grad_(mod.weight.requires_grad)
    if fresh.bias is not None:
        fresh.bias.requires_grad_(mod.bias.requires_grad)
    return fresh


def inherit_single_class(model: nn.Module, config, class_names: Sequence[str]) -> tuple[nn.Module, Any, str] | None:
    """Give a one-class model ``len(class_names)`` classes that all start from its single class.

    Args:
        model: a ``CellMaskRCNN`` whose config has exactly one class (changed in place).
        config: its ``ModelConfig``.
        class_names: the run's classes (e.g. ``("shsy5y", "astro", "cort")``).

    Returns:
        ``(model, config with class_names, message for the user)``, or None when it does not apply (the
        model has more than one class, or the classes are already ``class_names``): then the caller
        adapts the classes its own way.

    Raises:
        ValueError: a class layer does not have the shape a one-class model has.
    """
    new = tuple(str(c) for c in class_names)
    old = tuple(config.class_names)
    if len(old) != 1 or new == old or not new:
        return None
    k = len(new)
    for name, mod, kind in class_layers(model):
        rows = 4 if kind == "box" else 1
        n_out = mod.weight.shape[0]
        if kind == "box" and n_out == 4:
            continue  # class-agnostic deltas (cascade stages) serve every class already
        if n_out != 2 * rows:
            raise ValueError(f"layer {name} has {n_out} outputs, not {2 * rows} as a one-class model's: the model does "
                             "not match its config")
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, _expanded(mod, kind, k))
    config = config.replace(class_names=new)
    if hasattr(model, "config"):
        model.config = config
    message = (
        f"The model was trained for one class ({old[0]}); {', '.join(new)} each start from its "
        f"{old[0]} class (scores, boxes and masks), not at random."
    )
    return model, config, message

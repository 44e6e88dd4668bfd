"""Checkpoints of a training run: where they go, the resumable training state beside them, the
provenance they carry, and loading the start of a run (checkpoint, fresh config or model in memory).

Every file is written atomically (temporary name + ``os.replace``): a cancelled, crashed or killed
run leaves the previous good file in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .data import TrainingDataset
from .settings import TrainingError, TrainSettings

__all__ = ["best_path_for", "train_state_path"]


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

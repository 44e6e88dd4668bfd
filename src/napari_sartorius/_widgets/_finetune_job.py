"""The Fine-tune dock's worker job and what it hands back (no Qt: it runs in a worker thread).

:func:`finetune_job` is a generator run by ``napari.qt.threading.create_worker``. It never raises:
napari's (superqt's) generator worker treats a ``RuntimeError`` escaping a generator as a thread
whose Qt object was deleted, emits neither ``errored`` nor ``finished``, and the dock would wait for
ever. Every failure (a training error, out of memory, a file that vanished, a bug) is therefore
returned as a :class:`FineTuneOutcome` with ``error`` set, which the dock shows and then restores
its buttons.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FineTuneOutcome", "finetune_job", "describe_error"]


@dataclass
class FineTuneOutcome:
    """What a finished worker hands back to the GUI thread (the model itself stays behind).

    Attributes:
        cancelled: the run was stopped by Cancel.
        iterations: optimizer steps done.
        total: iterations asked for.
        checkpoint_path: the last checkpoint written (None when nothing was saved).
        best_path: the best checkpoint by validation score (None without validation).
        best_score: its competition score.
        final_loss: the last iteration's total loss (None when no iteration ran).
        messages: every message of the run, in order.
        error: a one-line reason when the run failed (None when it finished or was cancelled).
    """

    cancelled: bool
    iterations: int
    total: int
    checkpoint_path: Path | None
    best_path: Path | None = None
    best_score: float | None = None
    final_loss: float | None = None
    messages: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def model_path(self) -> Path | None:
        """The checkpoint to use: the best by validation score when there is one, else the last."""
        return self.best_path or self.checkpoint_path


def describe_error(exc: BaseException) -> str:
    """A one-line reason for the user: the message of errors that carry one (training, files,
    settings), the exception's type and message otherwise (an unexpected error is a bug: say so)."""
    from ..training.settings import TrainingError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, (TrainingError, ValueError, OSError)):
        return text
    if isinstance(exc, MemoryError):
        return "out of memory: lower the batch size or the training size, or use the quick preset"
    return f"{type(exc).__name__}: {text} (an unexpected error; please report it)"


def finetune_job(train_pairs, val_pairs, start, arch: str, settings, clean: bool, stop: threading.Event,
                 crop_size: int | None = None):
    """Worker generator: build the datasets, run the trainer, return a :class:`FineTuneOutcome`.

    Args:
        train_pairs, val_pairs: lists of ``(name, cell type, image uint8 (H, W[, 3]), labels (H, W))``
            (``val_pairs`` may be empty).
        start: the starting checkpoint file, or None for a fresh model of ``arch``.
        settings: a :class:`~napari_sartorius.training.settings.TrainSettings`.
        clean: clean the masks (fill holes, drop fragments, resolve overlaps) before training.
        stop: set by Cancel; the trainer stops between iterations and saves what it reached.
        crop_size: train on windows of this side (px) around the labelled cells instead of whole
            images (the quick preset), with the RoI and proposal counts of
            :data:`~._finetune_presets.WINDOW_SAMPLING` where ``settings`` leaves them unset; None:
            whole images.

    Yields :class:`~napari_sartorius.training.settings.TrainProgress`. Touches no Qt object and
    never raises (see the module's docstring).
    """
    from ..training.settings import TrainProgress

    total = int(settings.iters)
    try:
        result = yield from _run(train_pairs, val_pairs, start, arch, settings, clean, stop, crop_size)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the dock (see above)
        if isinstance(exc, (GeneratorExit, KeyboardInterrupt, SystemExit)):
            raise
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        yield TrainProgress(0, total, message=f"failed: {detail}")
        return FineTuneOutcome(False, 0, total, None, error=describe_error(exc))
    outcome = FineTuneOutcome(
        cancelled=bool(result.cancelled),
        iterations=int(result.iterations),
        total=total,
        checkpoint_path=Path(result.checkpoint_path) if result.checkpoint_path else None,
        best_path=Path(result.best_path) if result.best_path else None,
        best_score=result.best_score,
        final_loss=float(result.history[-1]["total"]) if result.history else None,
        messages=list(result.messages),
    )
    del result  # the trained network is not needed in the GUI thread: it is in the checkpoint
    return outcome


def _run(train_pairs, val_pairs, start, arch, settings, clean, stop, crop_size):
    from ._torch_import import guard_torch_import

    guard_torch_import()  # the training modules import torch; see _torch_import
    from ..models.config import ModelConfig
    from ..training.crops import crops_around_cells
    from ..training.data import dataset_from_pairs
    from ..training.settings import TrainProgress
    from ..training.trainer import train

    from ._pretrained import fetch_start

    # a registry name (the "or pretrained" choice) becomes its cached checkpoint, downloaded once
    start = yield from fetch_start(start, stop, lambda text: TrainProgress(0, settings.iters, message=text))
    yield TrainProgress(0, settings.iters, message="preparing the training data...")
    if crop_size:
        from ._finetune_presets import with_window_sampling

        settings = with_window_sampling(settings)
        windows = []
        for name, ct, im, lab in train_pairs:
            for k, (cim, clab) in enumerate(crops_around_cells(im, lab, crop_size)):
                windows.append((f"{name} crop {k + 1}", ct, cim, clab))
        train_pairs = windows

    def dataset(pairs):
        return dataset_from_pairs(
            [(im, lab) for _, _, im, lab in pairs],
            [ct for _, ct, _, _ in pairs],
            names=[name for name, _, _, _ in pairs],
            clean=clean,
        )

    data = dataset(train_pairs)
    val_data = dataset(val_pairs) if val_pairs else None
    where = f"from {start}" if start is not None else f"from a fresh {arch} (random weights)"
    yield TrainProgress(0, settings.iters, message=f"training on {data.describe()} {where}")
    begin = str(start) if start is not None else ModelConfig(arch)
    return (yield from train(begin, data, settings, val_data, stop))

"""Stratified K-fold cross-validation by cell type.

:func:`stratified_kfold` splits image indices into ``k`` folds so that every cell type is spread as
evenly as possible over the folds (deterministic for a seed). :func:`run_kfold` trains one model per
fold (on the other folds) and scores it on its fold with the competition metric; it yields
:class:`KFoldProgress` and returns a :class:`KFoldResult` with each fold's and the mean scores.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Generator, Sequence

import numpy as np

from ..jobs import relay
from .data import TrainingDataset
from .trainer import TrainProgress, TrainResult, TrainSettings, train

__all__ = ["stratified_kfold", "fold_path", "KFoldProgress", "FoldResult", "KFoldResult", "run_kfold"]


def stratified_kfold(cell_types: Sequence[str | None], k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split ``len(cell_types)`` images into ``k`` folds stratified by cell type.

    Images of each type (None counts as its own type) are shuffled with ``seed`` and dealt to the
    folds in turn, each type continuing where the previous one stopped, so fold sizes differ by at
    most one and each type's count per fold by at most one. A type with fewer than ``k`` images is
    missing from some validation folds.

    Returns:
        ``k`` pairs ``(train_indices, val_indices)`` of sorted int64 arrays; the validation folds
        partition ``range(n)``.

    Raises:
        ValueError: ``k < 2`` or more folds than images.
    """
    n = len(cell_types)
    if k < 2:
        raise ValueError(f"K-fold cross-validation needs k >= 2 folds, got {k}")
    if k > n:
        raise ValueError(f"{k}-fold cross-validation needs at least {k} images, got {n}: use fewer folds")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(cell_types):
        groups.setdefault("" if t is None else str(t), []).append(i)
    nxt = 0
    for key in sorted(groups):
        idx = np.asarray(groups[key])
        rng.shuffle(idx)
        for i in idx:
            folds[nxt].append(int(i))
            nxt = (nxt + 1) % k
    out = []
    all_idx = np.arange(n)
    for f in folds:
        val = np.sort(np.asarray(f, np.int64))
        train_idx = np.setdiff1d(all_idx, val).astype(np.int64)
        out.append((train_idx, val))
    return out


def fold_path(out: str | Path, fold: int) -> Path:
    """``<stem>_fold<fold><suffix>`` beside ``out`` (folds count from 1)."""
    out = Path(out)
    return out.with_name(f"{out.stem}_fold{fold}{out.suffix or '.pt'}")


@dataclass
class KFoldProgress:
    """Progress of fold ``fold`` (1-based) of ``folds``: the fold's own :class:`TrainProgress`."""

    fold: int
    folds: int
    progress: TrainProgress

    @property
    def fraction(self) -> float:
        return ((self.fold - 1) + self.progress.fraction) / self.folds

    @property
    def message(self) -> str:
        return f"fold {self.fold}/{self.folds}: {self.progress.message}" if self.progress.message else ""


@dataclass
class FoldResult:
    """One fold: its images, final validation score (competition metric), per-type scores, checkpoint."""

    fold: int
    train_ids: list[str]
    val_ids: list[str]
    score: float | None
    per_class: dict[str, float]
    iterations: int
    checkpoint_path: Path | None
    best_path: Path | None
    cancelled: bool = False


@dataclass
class KFoldResult:
    """All folds; ``mean_score`` over the folds that finished with a score (None if none did)."""

    folds: list[FoldResult] = field(default_factory=list)
    k: int = 0
    cancelled: bool = False

    @property
    def scores(self) -> list[float]:
        return [f.score for f in self.folds if f.score is not None]

    @property
    def mean_score(self) -> float | None:
        return float(np.mean(self.scores)) if self.scores else None

    @property
    def mean_per_class(self) -> dict[str, float]:
        acc: dict[str, list[float]] = {}
        for f in self.folds:
            for name, v in f.per_class.items():
                acc.setdefault(name, []).append(v)
        return {name: float(np.mean(v)) for name, v in acc.items()}

    def format(self) -> str:
        """A plain-text table: one line per fold, then the mean."""
        lines = [f"{'fold':<6}{'images':>8}{'score':>9}  per cell type"]
        for f in self.folds:
            per = ", ".join(f"{k} {v:.4f}" for k, v in f.per_class.items())
            sc = "n/a" if f.score is None else f"{f.score:.4f}"
            lines.append(f"{f.fold:<6}{len(f.val_ids):>8}{sc:>9}  {per}")
        mean = "n/a" if self.mean_score is None else f"{self.mean_score:.4f}"
        per = ", ".join(f"{k} {v:.4f}" for k, v in self.mean_per_class.items())
        lines.append(f"{'mean':<6}{'':>8}{mean:>9}  {per}")
        if self.cancelled:
            lines.append(f"stopped after {len(self.folds)} of {self.k} folds")
        return "\n".join(lines)


def run_kfold(
    model_or_ckpt,
    data: TrainingDataset,
    k: int,
    settings: TrainSettings | None = None,
    *,
    seed: int | None = None,
    stop: threading.Event | Callable[[], bool] | None = None,
) -> Generator[KFoldProgress, None, KFoldResult]:
    """Cross-validate: for each of ``k`` stratified folds, train on the others and score on it.

    Args:
        model_or_ckpt: the start of every fold (as for :func:`~.trainer.train`; an in-memory model is
            copied per fold, so each fold starts from the same weights).
        data: all annotated images.
        k: number of folds (2..number of images).
        settings: training settings of each fold; with ``out`` set, fold ``i`` writes
            ``fold_path(out, i)`` (and its ``_best`` beside it). ``resume`` is off for folds.
        seed: the split's seed (default ``settings.seed``).
        stop: a stop request ends the current fold and skips the rest.

    Yields:
        :class:`KFoldProgress` for every progress of every fold.

    Returns:
        :class:`KFoldResult` with each fold's final validation score and their mean.

    Raises:
        ValueError: ``k`` out of range, or a fold whose training images hold no cell.
    """
    s = settings or TrainSettings()
    splits = stratified_kfold(data.cell_types, k, s.seed if seed is None else seed)
    subsets = []
    for i, (tr, va) in enumerate(splits, start=1):
        try:
            subsets.append((data.subset(tr), data.subset(va, require_cells=False)))
        except ValueError as e:
            raise ValueError(f"fold {i} of {k}: {e}") from e
    result = KFoldResult(k=k)
    for i, (train_set, val_set) in enumerate(subsets, start=1):
        fold_settings = replace(s, out=None if s.out is None else str(fold_path(s.out, i)), resume=False)
        start = copy.deepcopy(model_or_ckpt) if not isinstance(model_or_ckpt, (str, Path)) else model_or_ckpt
        gen = train(start, train_set, fold_settings, val_data=val_set, stop=stop)
        res: TrainResult = yield from relay(gen, lambda p, i=i: KFoldProgress(i, k, p))
        last = res.val_scores[-1] if res.val_scores and res.val_scores[-1][0] == res.iterations else None
        result.folds.append(
            FoldResult(
                fold=i,
                train_ids=[x.image_id for x in train_set.samples],
                val_ids=[x.image_id for x in val_set.samples],
                score=None if last is None else last[1],
                per_class={} if last is None else dict(last[2]),
                iterations=res.iterations,
                checkpoint_path=res.checkpoint_path,
                best_path=res.best_path,
                cancelled=res.cancelled,
            )
        )
        del res, start, gen  # free this fold's model before the next one
        if result.folds[-1].cancelled:
            result.cancelled = True
            break
    return result


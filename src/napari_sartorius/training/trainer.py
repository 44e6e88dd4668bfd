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
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Sequence

import torch
from torch import nn

from ..device import is_out_of_memory, resolve_device
from ..jobs import run_job
from ..models.class_surgery import inherit_single_class
from ..stopping import stop_requested
from . import distributed as dist_utils
from .augment import TrainTransform
from .checkpointing import (
    _load_optimizer_state,
    _load_start,
    _oom_message,
    _save,
    _save_optimizer_state,
    _train_state_json,
    _with_provenance,
    best_path_for,
    train_state_path,
)
from .data import TrainingDataset, collate
from .model_surgery import (
    _param_groups,
    _set_sampling,
    _set_train_sizes,
    adapt_num_classes,
    calibrated_statistics,
    prepare_fresh_model,
    set_freeze_at,
)
from .settings import (
    CLIP_TYPES,
    MAX_WARMUP_FRACTION,
    SCHEDULES,
    AugmentationSettings,
    TrainingError,
    TrainProgress,
    TrainResult,
    TrainSettings,
    lr_at,
    warmup_length,
)

__all__ = [
    "TrainSettings",
    "TrainProgress",
    "TrainResult",
    "TrainingError",
    "AugmentationSettings",
    "train",
    "run_training",
    "adapt_num_classes",
    "set_freeze_at",
    "prepare_fresh_model",
    "calibrated_statistics",
    "clip_gradients",
    "lr_at",
    "warmup_length",
    "best_path_for",
    "train_state_path",
    "evaluate_model",
    "SCHEDULES",
    "CLIP_TYPES",
    "MAX_WARMUP_FRACTION",
    "EXPLOSION_FACTOR",
]

#: a finite loss this many times the median of the run's first losses stops the run: it diverged
EXPLOSION_FACTOR = 50.0


def clip_gradients(params: Sequence[torch.Tensor], threshold: float | None, clip_type: str = "full_model") -> float:
    """Clip the gradients of ``params`` in place (nothing when ``threshold`` is None); return the
    global gradient norm measured before clipping (``inf``/``nan`` when a gradient is not finite)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if threshold is not None and clip_type == "full_model":
        return float(torch.nn.utils.clip_grad_norm_(grads, threshold))
    norm = float(torch.nn.utils.clip_grad_norm_(grads, float("inf")))
    if threshold is not None and clip_type == "norm":
        for p in grads:
            torch.nn.utils.clip_grad_norm_([p], threshold)
    elif threshold is not None:
        torch.nn.utils.clip_grad_value_(grads, threshold)
    return norm


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
        config = config.replace(freeze_at=min(int(s.freeze_at), 5))  # 6 (body + FPN) is a training choice
    config = _set_train_sizes(model, config, s)
    _set_sampling(model, s)
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
                        _check_loss(loss_dict, float(loss.detach()) * s.grad_accum, history, iteration, lr)
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    for k, v in loss_dict.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / s.grad_accum
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = clip_gradients(params, s.clip_grad_norm, s.clip_type)
                if not math.isfinite(grad_norm) and scaler is None:
                    # stop before the step: the weights stay those of the last good iteration
                    raise TrainingError(
                        f"the gradients became {grad_norm:g} at iteration {iteration + 1}: lower the learning "
                        f"rate (now {lr:.3g}) or turn on gradient clipping"
                    )
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
    # A consumer that drops the generator (GeneratorExit) or an error ends the run here: every
    # checkpoint is written atomically, so the last good file stays as it was.
    except torch.OutOfMemoryError as e:  # e.g. during validation; the step's own OOM is handled above
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


def _check_loss(loss_dict: dict, total: float, history: list[dict], iteration: int, lr: float) -> None:
    """Raise :class:`TrainingError` when the loss is not finite or exploded (``EXPLOSION_FACTOR``
    times the median of the run's first five losses): the weights are then still those of the last
    good iteration, and no checkpoint is written over the last good one."""
    finite = math.isfinite(total)
    first = [h["total"] for h in history[:5]]
    exploded = finite and first and total > EXPLOSION_FACTOR * max(statistics.median(first), 1e-3)
    if finite and not exploded:
        return
    parts = ", ".join(f"{k} {float(v.detach()):.3g}" for k, v in loss_dict.items())
    what = f"became {total:g}" if not finite else f"exploded to {total:.3g} (it started near {statistics.median(first):.3g})"
    raise TrainingError(
        f"the loss {what} at iteration {iteration + 1} ({parts}): lower the learning rate (now {lr:.3g}), "
        "lengthen the warm-up or turn on gradient clipping; the last good checkpoint is kept"
    )


def run_training(gen: Generator[TrainProgress, None, TrainResult], callback: Callable[[TrainProgress], Any] | None = None) -> TrainResult:
    """Drain a :func:`train` (or ``run_kfold``) generator, passing each progress to ``callback``; return its result."""
    return run_job(gen, callback)


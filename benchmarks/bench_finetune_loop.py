"""The correct-then-fine-tune loop, played on the CPU with the Fine-tune dock's quick preset.

1. Base model: a fresh ``mask_rcnn_R_50_FPN`` (random weights, body frozen) trained for
   ``--base-iters`` iterations on synthetic images of one style (``cort`` cells at their usual size).
   ``--base PATH`` keeps it (a later run with the same path reuses it instead of training again).
2. The user's images are of a shifted style (the same type drawn ``--shift-scale`` times larger, on
   other seeds), at the real images' size, 520 x 704. Two of them are "corrected": their ground truth
   stands for the corrected labels.
3. Quick fine-tune: the dock's worker job (:func:`napari_sartorius._widgets._finetune_job.finetune_job`)
   with the settings the dock builds for its "Quick (CPU)" preset (frozen backbone, windows of 256 px
   around the cells, trained at a 384-px short edge, batch 2, lr 0.01, flips and rotations), from the
   base checkpoint, for ``--iters`` iterations.
4. Prints the competition score on ``--held-out`` held-out images of the shifted style before and
   after (score threshold ``--score-threshold`` for every class: the per-type defaults, cort 0.55,
   hide everything a briefly trained model finds), the fine-tuning wall time, the time to the first
   iteration and the median seconds per iteration.

Speed comparison (``--compare ROUNDS``): before the quality run, the ``--compare-variants`` are run in
turn, ``--compare-iters`` iterations each, ``ROUNDS`` times (alternating, so that a busy shared
machine slows all alike); it prints each one's median seconds per iteration (the first two
iterations of each run left out as warm-up) and the ratio to ``old``. Variants: ``old``, the preset as
it was before the window sampling (body frozen, the model's 512 RoIs and 2000 proposals per image);
``sampling``, body frozen with the window sampling; ``fpn``, body and FPN frozen with the window
sampling; ``quick``, the current preset. It also prints the positive RoIs sampled per image (the mask
head's cost grows with them; a weak base model has few, a pretrained one fills every slot) and the
process CPU time per iteration. ``--quality-variants old quick`` fine-tunes and scores each named
variant (default: ``quick`` only; none: speed only). With 2 threads on 2 cores shared with other
jobs the times swing 3-7x; ``--threads 1`` gives steadier figures there.

    python benchmarks/bench_finetune_loop.py [--threads 2] [--base-iters 60] [--iters 20]
    python benchmarks/bench_finetune_loop.py --base /tmp/base.pt --compare 2 --compare-iters 6

The fine-tuned models are written to a temporary folder that is deleted at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from napari_sartorius._widgets._finetune_job import finetune_job
from napari_sartorius._widgets._finetune_presets import PRESETS
from napari_sartorius.models.checkpoint import load_checkpoint
from napari_sartorius.models.config import ModelConfig
from napari_sartorius.synthetic import make_dataset, make_sample
from napari_sartorius.training.data import dataset_from_annotations, dataset_from_pairs
from napari_sartorius.training.settings import AugmentationSettings, TrainSettings
from napari_sartorius.training.trainer import run_training, train

SHAPE = (260, 352)  # held-out and base images: half the competition's 520 x 704 (scoring stays quick)
REAL_SHAPE = (520, 704)  # the corrected images: the competition's size
#: The RoI and proposal counts of the model (detectron2's), which the preset used before the window sampling.
MODEL_SAMPLING = dict(roi_batch_size_per_image=512, rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000)
#: variant -> (freeze level, RoI/proposal counts; None = the quick preset's own)
VARIANTS = {"old": (5, MODEL_SAMPLING), "sampling": (5, {}), "fpn": (6, {}), "quick": (None, {})}
#: positive RoIs per image of every training step (the mask head's cost grows with them: ~3 GFLOP
#: each, forward and backward), counted by :func:`_count_positives`
POSITIVES: list[int] = []


def _count_positives() -> None:
    """Count the positive RoIs each training step samples (benchmark instrumentation only)."""
    from napari_sartorius.models.architectures import ChunkedMaskRoIHeads

    original = ChunkedMaskRoIHeads.select_training_samples

    def counting(self, proposals, targets):
        out = original(self, proposals, targets)
        POSITIVES.extend(int((lab > 0).sum()) for lab in out[2])
        return out

    ChunkedMaskRoIHeads.select_training_samples = counting


def base_config() -> ModelConfig:
    return ModelConfig(
        "mask_rcnn_R_50_FPN", min_size_train=(320,), max_size_train=640, min_size_test=384, max_size_test=768,
        freeze_at=5, detections_per_img=300,
    )


def shifted(n: int, seed: int, scale: float, shape=SHAPE) -> list[tuple[str, str, object, object]]:
    out = []
    for k in range(n):
        s = make_sample("cort", seed=seed + k, shape=shape, scale=scale)
        out.append((f"shifted_{seed + k}", "cort", s.image, s.labels))
    return out


def quick_settings(variant: str, iters: int, out: Path) -> TrainSettings:
    """What the dock's train_settings() builds for the quick preset (default augmentations, the
    preset's training size as the single short edge), for ``variant`` (see the module's docstring).
    The window sampling itself is applied by the job (fields left None)."""
    q = PRESETS["quick"]
    freeze, sampling = VARIANTS[variant]
    freeze = q["freeze"] if freeze is None else freeze
    return TrainSettings(
        iters=iters, lr=q["learning_rate"], batch_size=q["batch_size"], warmup_iters=100, device="cpu",
        resume=False,  # a new run from the base weights, as the dock does by default
        out=str(out), checkpoint_period=0, freeze_at=freeze, **sampling,
        augment=AugmentationSettings(resize=True, short_edges=(q["train_size"],), max_size=2 * q["train_size"]),
    )


def fine_tune(base: Path, corrected, settings: TrainSettings, cpu: list[float] | None = None):
    """Run the dock's job; return ``(outcome, wall s, s to the first iteration, [s per iteration])``;
    ``cpu`` (when given) receives the process CPU seconds of each iteration after the first."""
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    job = finetune_job(corrected, [], base, "mask_rcnn_R_50_FPN", settings, False, threading.Event(),
                       PRESETS["quick"]["crop_cells"])
    t0 = time.perf_counter()
    while True:
        try:
            p = next(job)
        except StopIteration as fin:
            outcome = fin.value
            break
        if p.losses:
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
    wall = time.perf_counter() - t0
    first = stamps[0] - t0 if stamps else float("nan")
    if cpu is not None:
        cpu += [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])]
    return outcome, wall, first, [b - a for a, b in zip(stamps, stamps[1:])]


def score(path: Path, held_out, threshold: float) -> float:
    """Competition score on ``held_out`` with every class's score threshold at ``threshold`` (the
    per-type defaults, cort 0.55, hide what a briefly trained model finds) and minimum areas of 20 px."""
    from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
    from napari_sartorius.metrics import evaluate
    from napari_sartorius.models.predictor import MaskRCNNEngine
    from napari_sartorius.postprocess import PostprocessSettings, postprocess

    model, config = load_checkpoint(path)
    model.eval()
    engine = MaskRCNNEngine(model, config, "cpu")
    names = tuple(config.class_names)
    pp = PostprocessSettings(class_names=names, score_thresholds=(threshold,) * len(names),
                             min_areas=(20,) * len(names), cell_type="cort")
    data = dataset_from_pairs([(im, lab) for _, _, im, lab in held_out], [ct for _, ct, _, _ in held_out],
                              names=[n for n, _, _, _ in held_out])
    preds = []
    for sample in data.samples:
        (inst,) = engine.predict_batch([sample.load_image()])
        preds.append(ImageAnnotations(sample.image_id, postprocess(inst, pp).to_instances(), "cort"))
    gt = data.annotation_set()
    return float(evaluate(AnnotationSet(preds, names), AnnotationSet(gt.images, names), coco=False).score)


def make_base(path: Path, iters: int) -> None:
    images, annots = make_dataset(8, styles=("cort",), seed=0, shape=SHAPE)
    t0 = time.perf_counter()
    res = run_training(train(base_config(), dataset_from_annotations(annots, images), TrainSettings(
        iters=iters, lr=0.01, batch_size=2, device="cpu", out=str(path), checkpoint_period=0,
        roi_batch_size_per_image=128, rpn_post_nms_top_n_train=1000, clip_grad_norm=10.0,
        augment=AugmentationSettings(crop=False, resize=False, rot90=False))))
    print(f"base model: {iters} iterations on 8 synthetic cort images in {time.perf_counter() - t0:.0f} s, "
          f"loss {res.losses[0]:.3f} -> {statistics.mean(res.losses[-10:]):.3f}", flush=True)


def compare(base: Path, corrected, rounds: int, iters: int, tmp: Path, variants, threads: int) -> None:
    per: dict[str, list[float]] = {v: [] for v in variants}
    pos: dict[str, list[int]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            POSITIVES.clear()
            run_cpu: list[float] = []
            settings = quick_settings(v, iters, tmp / f"cmp_{v}.pt")
            outcome, wall, first, dts = fine_tune(base, corrected, settings, run_cpu)
            cpu[v] += run_cpu[1:]
            if outcome.error:
                print(f"  {v}: failed: {outcome.error}", flush=True)
                continue
            per[v] += dts[1:]  # the first interval still warms up (allocator, caches)
            pos[v] += POSITIVES
            print(f"  round {r + 1} {v:8s}: " + " ".join(f"{d:.1f}" for d in dts) + f" s/iteration; "
                  f"first iteration after {first:.1f} s", flush=True)
    ref = statistics.median(per["old"]) if per.get("old") else float("nan")
    print(f"speed ({rounds} alternating rounds of {iters} iterations, median s/iteration without the first two "
          f"of each run):")
    for v in variants:
        if per[v]:
            med = statistics.median(per[v])
            print(f"  {v:8s} {med:6.2f} s/iteration (n={len(per[v])}, min {min(per[v]):.2f}, "
                  f"max {max(per[v]):.2f}), {ref / med:.2f}x faster than old; positive RoIs per image "
                  f"{statistics.mean(pos[v]):.1f} (max {max(pos[v])}); process CPU time {statistics.median(cpu[v]):.2f} "
                  f"s/iteration (/ {threads} threads = {statistics.median(cpu[v]) / threads:.2f} s: about the wall "
                  "time on an idle machine)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-iters", type=int, default=60)
    ap.add_argument("--base", type=Path, default=None, help="keep (or reuse) the base model at this path")
    ap.add_argument("--iters", type=int, default=PRESETS["quick"]["iterations"])
    ap.add_argument("--shift-scale", type=float, default=1.6)
    ap.add_argument("--held-out", type=int, default=3)
    ap.add_argument("--score-threshold", type=float, default=0.3, help="score threshold of every class when scoring")
    ap.add_argument("--compare", type=int, default=0, metavar="ROUNDS", help="alternating speed comparison")
    ap.add_argument("--compare-iters", type=int, default=6)
    ap.add_argument("--compare-variants", nargs="+", default=["old", "quick"], choices=list(VARIANTS))
    ap.add_argument("--quality-variants", nargs="*", default=["quick"], choices=list(VARIANTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _count_positives()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = args.base or tmp / "base.pt"
        if base.is_file():
            print(f"base model: {base} (reused)", flush=True)
        else:
            make_base(base, args.base_iters)
        corrected = shifted(2, 100, args.shift_scale, REAL_SHAPE)
        held_out = shifted(args.held_out, 200, args.shift_scale)
        if args.compare:
            compare(base, corrected, args.compare, args.compare_iters, tmp, args.compare_variants, args.threads)
        if not args.quality_variants:
            return 0
        before = score(base, held_out, args.score_threshold)
        print(f"held-out score of the base model: {before:.4f}", flush=True)
        improved = True
        for v in args.quality_variants:
            outcome, wall, first, dts = fine_tune(base, corrected, quick_settings(v, args.iters, tmp / f"{v}.pt"))
            if outcome.error or len(dts) < 2:
                print(f"fine-tuning ({v}) failed: {outcome.error or outcome.messages}")
                return 1
            after = score(outcome.checkpoint_path, held_out, args.score_threshold)
            improved &= after > before
            print(f"{v} fine-tune: {args.iters} iterations on 2 corrected 520x704 images of the shifted style "
                  f"(cells x{args.shift_scale}), {args.threads} threads: wall {wall:.0f} s, first iteration after "
                  f"{first:.1f} s, {statistics.median(dts[1:] or dts):.2f} s/iteration (median), final loss "
                  f"{outcome.final_loss:.3f}")
            print(f"  held-out competition score ({args.held_out} images of the shifted style): "
                  f"before {before:.4f}, after {after:.4f} ({after - before:+.4f})", flush=True)
    return 0 if improved else 2


if __name__ == "__main__":
    sys.exit(main())

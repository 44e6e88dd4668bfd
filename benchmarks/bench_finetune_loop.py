"""The correct-then-fine-tune loop, played on the CPU with the Fine-tune dock's quick preset.

1. Base model: a fresh ``mask_rcnn_R_50_FPN`` (body frozen) trained for ``--base-iters`` iterations on
   synthetic images of one style (``cort`` cells at their usual size).
2. The user's images are of a shifted style (the same type drawn ``--shift-scale`` times larger, on
   other seeds). Two of them are "corrected": their ground truth stands for the corrected labels.
3. Quick fine-tune: the dock's worker job (:func:`napari_sartorius._widgets._finetune_job.finetune_job`)
   with the settings of the dock's "Quick (CPU)" preset (body frozen, windows of 256 px around the
   cells, trained at a 384-px short edge, 40 iterations, batch 2, lr 0.01), from the base checkpoint.
4. Prints the competition score on ``--held-out`` held-out images of the shifted style before and
   after (score threshold ``--score-threshold`` for every class: the per-type defaults, cort 0.55,
   hide everything a briefly trained model finds), the fine-tuning wall time and the median seconds
   per iteration.

    python benchmarks/bench_finetune_loop.py [--threads 2] [--base-iters 60] [--iters 40]

The base model and the fine-tuned one are written to a temporary folder that is deleted at the end.
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
from napari_sartorius._widgets.finetune import PRESETS
from napari_sartorius.models.checkpoint import load_checkpoint
from napari_sartorius.models.config import ModelConfig
from napari_sartorius.synthetic import make_dataset, make_sample
from napari_sartorius.training.data import dataset_from_annotations, dataset_from_pairs
from napari_sartorius.training.settings import AugmentationSettings, TrainSettings
from napari_sartorius.training.trainer import run_training, train

SHAPE = (260, 352)  # half the competition's 520 x 704


def base_config() -> ModelConfig:
    return ModelConfig(
        "mask_rcnn_R_50_FPN", min_size_train=(320,), max_size_train=640, min_size_test=384, max_size_test=768,
        freeze_at=5, detections_per_img=300,
    )


def shifted(n: int, seed: int, scale: float) -> list[tuple[str, str, object, object]]:
    out = []
    for k in range(n):
        s = make_sample("cort", seed=seed + k, shape=SHAPE, scale=scale)
        out.append((f"shifted_{seed + k}", "cort", s.image, s.labels))
    return out


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-iters", type=int, default=60)
    ap.add_argument("--iters", type=int, default=PRESETS["quick"]["iterations"])
    ap.add_argument("--shift-scale", type=float, default=1.6)
    ap.add_argument("--held-out", type=int, default=3)
    ap.add_argument("--score-threshold", type=float, default=0.3, help="score threshold of every class when scoring")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = PRESETS["quick"]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.pt"
        images, annots = make_dataset(8, styles=("cort",), seed=0, shape=SHAPE)
        t0 = time.perf_counter()
        res = run_training(train(base_config(), dataset_from_annotations(annots, images), TrainSettings(
            iters=args.base_iters, lr=0.01, batch_size=2, device="cpu", out=str(base), checkpoint_period=0,
            augment=AugmentationSettings(crop=False, resize=False, rot90=False))))
        print(f"base model: {args.base_iters} iterations on 8 synthetic cort images in {time.perf_counter() - t0:.0f} s, "
              f"loss {res.losses[0]:.3f} -> {statistics.mean(res.losses[-10:]):.3f}", flush=True)
        corrected = shifted(2, 100, args.shift_scale)
        held_out = shifted(args.held_out, 200, args.shift_scale)
        before = score(base, held_out, args.score_threshold)
        print(f"held-out score of the base model: {before:.4f}", flush=True)

        settings = TrainSettings(
            iters=args.iters, lr=q["learning_rate"], batch_size=q["batch_size"], warmup_iters=100, device="cpu",
            resume=False,  # a new run from the base weights, as the dock does by default
            out=str(Path(tmp) / "quick.pt"), checkpoint_period=0, freeze_at=q["freeze"],
            augment=AugmentationSettings(resize=True, short_edges=(q["train_size"],), max_size=2 * q["train_size"]),
        )
        stamps: list[float] = []
        job = finetune_job(corrected, [], base, "mask_rcnn_R_50_FPN", settings, False, threading.Event(),
                           q["crop_cells"])
        t0 = time.perf_counter()
        while True:
            try:
                p = next(job)
            except StopIteration as fin:
                outcome = fin.value
                break
            if p.losses:
                stamps.append(time.perf_counter())
        wall = time.perf_counter() - t0
        if outcome.error or len(stamps) < 2:
            print(f"fine-tuning failed: {outcome.error or outcome.messages}")
            return 1
        per_iter = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        after = score(outcome.checkpoint_path, held_out, args.score_threshold)
    print(f"quick fine-tune: {args.iters} iterations on 2 corrected images of the shifted style "
          f"(cells x{args.shift_scale}), {args.threads} threads: wall {wall:.0f} s, {per_iter:.2f} s/iteration, "
          f"final loss {outcome.final_loss:.3f}")
    print(f"held-out competition score ({args.held_out} images of the shifted style): "
          f"before {before:.4f}, after {after:.4f} ({after - before:+.4f})")
    return 0 if after > before else 2


if __name__ == "__main__":
    sys.exit(main())

"""Training speed and a convergence figure for the training core.

1. Throughput: ``mask_rcnn_R_50_FPN`` with its default settings (random init; body frozen up to res2
   as ``freeze_at=2``; 512 RoIs per image) trained on synthetic 520 x 704 SH-SY5Y images (~200
   cells, the competition's densest type) with the default augmentations, through the real
   :func:`~napari_sartorius.training.trainer.train` loop. The model resizes each image to a short
   edge of ``--short-edge`` (default 1024: the largest of the default training sizes and the default
   test size). Prints the median iteration time (after warm-up iterations) and images/s, on the CPU
   and, when CUDA is present, on the GPU (AMP on).
2. Convergence: a fresh (randomly initialised) R50-FPN trained for ``--conv-iters`` iterations on
   small synthetic images (``--conv-shape``, all three cell types), then scored with the
   competition metric (``MaskRCNNEngine`` + ``postprocess`` + ``metrics.evaluate``) on held-out
   synthetic images; prints the loss at the start and end and the held-out score, per cell type.
3. Memory (``--memory``, Linux): peak resident memory of one R50-FPN training iteration (batch 1) on
   a synthetic 520 x 704 SH-SY5Y image (``make_sample("shsy5y")``, ~280 cells) at short edge
   ``--short-edge``, per phase (model transform, backbone, RPN, RoI heads, backward): the peak
   (``VmHWM``, reset before each phase through ``/proc/self/clear_refs``) and the RSS before it.

    python benchmarks/bench_training.py [--threads 2] [--iters 3] [--conv-iters 150] [--skip-throughput]
    python benchmarks/bench_training.py --memory --skip-throughput --skip-convergence
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from napari_sartorius.models.config import ModelConfig
from napari_sartorius.synthetic import make_dataset
from napari_sartorius.training.augment import AugmentationSettings
from napari_sartorius.training.data import dataset_from_annotations
from napari_sartorius.training.trainer import TrainSettings, run_training, train


def throughput(device: str, iters: int, warmup: int, batch: int, short_edge: int) -> tuple[float, float]:
    """(median seconds per iteration, images per second) of the default R50-FPN on ``device``."""
    images, aset = make_dataset(max(2, batch), styles=("shsy5y",), seed=11)
    data = dataset_from_annotations(aset, images)
    cfg = ModelConfig("mask_rcnn_R_50_FPN")
    s = TrainSettings(
        iters=warmup + iters, batch_size=batch, warmup_iters=0, checkpoint_period=0, device=device,
        augment=AugmentationSettings(short_edges=(short_edge,)), lr=1e-5, clip_grad_norm=1.0,
    )  # a tiny lr: a random body at freeze_at=2 diverges otherwise; the compute is the same
    stamps: list[float] = []
    run_training(train(cfg, data, s), lambda p: p.losses and stamps.append(time.perf_counter()))
    dts = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:])] if warmup >= 1 else []
    med = statistics.median(dts) if dts else float("nan")
    return med, batch / med


def convergence(iters: int, shape: tuple[int, int], n_train: int, n_val: int, lr: float, freeze_at: int, seed: int = 0):
    """``(result, seconds, (iteration, score, per-type scores))`` of a fresh model trained ``iters``
    iterations and scored on held-out synthetic images."""
    tr_images, tr_set = make_dataset(n_train, shape=shape, seed=seed)
    va_images, va_set = make_dataset(n_val, shape=shape, seed=seed + 10_000)
    train_data = dataset_from_annotations(tr_set, tr_images)
    val_data = dataset_from_annotations(va_set, va_images)
    short = min(shape)
    cfg = ModelConfig(
        "mask_rcnn_R_50_FPN", min_size_train=(short,), max_size_train=max(shape) * 2,
        min_size_test=short, max_size_test=max(shape) * 2, roi_batch_size_per_image=128,
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_test=500, detections_per_img=300, freeze_at=freeze_at,
    )
    s = TrainSettings(
        iters=iters, lr=lr, batch_size=2, warmup_iters=min(20, iters // 5), schedule="multistep",
        checkpoint_period=0, eval_period=0, device="cpu", clip_grad_norm=10.0,
        augment=AugmentationSettings(crop=False, brightness=0.1, contrast=0.1),
    )
    t0 = time.perf_counter()

    def show(p):
        if p.losses and (p.iteration % max(1, iters // 10) == 0 or p.iteration == iters):
            print(f"  it {p.iteration:4d}/{iters}  loss {p.losses['total']:.3f}  lr {p.lr:.4f}  "
                  f"{time.perf_counter() - t0:6.0f} s", flush=True)

    res = run_training(train(cfg, train_data, s, val_data=val_data), show)
    train_s = time.perf_counter() - t0
    after = res.val_scores[-1]
    return res, train_s, after


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def memory(short_edge: int, seed: int = 0) -> tuple[int, list[tuple[str, float, float, float]]]:
    """``(cells, [(phase, RSS before, peak, seconds)])`` in MB of one training iteration (CPU)."""
    import numpy as np

    from napari_sartorius.instances import Instances
    from napari_sartorius.models.architectures import build_model
    from napari_sartorius.synthetic import make_sample
    from napari_sartorius.training.augment import instances_to_masks, masks_to_boxes

    torch.manual_seed(seed)
    sample = make_sample("shsy5y", seed=seed)
    masks = instances_to_masks(Instances.from_label_image(sample.labels))
    image = torch.from_numpy(np.repeat(sample.image[None], 3, axis=0)).float()
    target = {"boxes": masks_to_boxes(masks), "labels": torch.ones(len(masks), dtype=torch.int64), "masks": masks}
    cfg = ModelConfig("mask_rcnn_R_50_FPN", min_size_train=(short_edge,), max_size_train=2 * short_edge)
    model = build_model(cfg).train()
    rows = []

    def phase(name, fn):
        before = _proc_status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current RSS
        t0 = time.perf_counter()
        out = fn()
        rows.append((name, before, _proc_status_mb("VmHWM"), time.perf_counter() - t0))
        return out

    images, targets = phase("transform", lambda: model.transform([image], [target]))
    features = phase("backbone", lambda: model.backbone(images.tensors))
    proposals, rpn_losses = phase("RPN", lambda: model.rpn(images, features, targets))
    _, roi_losses = phase("RoI heads", lambda: model.roi_heads(features, proposals, images.image_sizes, targets))
    losses = {**rpn_losses, **roi_losses}
    phase("backward", lambda: sum(losses.values()).backward())
    return len(masks), rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gpu-iters", type=int, default=20)
    ap.add_argument("--gpu-batch", type=int, default=2)
    ap.add_argument("--short-edge", type=int, default=1024)
    ap.add_argument("--conv-iters", type=int, default=150)
    ap.add_argument("--conv-shape", type=int, nargs=2, default=(128, 128))
    ap.add_argument("--conv-train", type=int, default=12, help="synthetic training images")
    ap.add_argument("--conv-val", type=int, default=6, help="held-out synthetic images")
    ap.add_argument("--conv-lr", type=float, default=0.01)
    ap.add_argument("--conv-freeze-at", type=int, default=5,
                    help="5: the random body stays fixed (FPN, RPN and heads learn); 0: train everything")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-convergence", action="store_true")
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--memory", action="store_true", help="peak RSS of one training iteration, per phase (Linux)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.memory:
        if not sys.platform.startswith("linux"):
            print("Memory: needs Linux (/proc/self/clear_refs); skipped", flush=True)
        else:
            cells, rows = memory(args.short_edge)
            print(f"Memory: R50-FPN training iteration, synthetic 520x704 shsy5y ({cells} cells), "
                  f"short edge {args.short_edge}, CPU ({args.threads} threads)", flush=True)
            print(f"  {'phase':10s} {'RSS before':>10s} {'peak':>8s} {'peak - before':>13s} {'s':>6s}   (MB)")
            for name, before, peak, secs in rows:
                print(f"  {name:10s} {before:10.0f} {peak:8.0f} {peak - before:13.0f} {secs:6.1f}")
            print(f"  iteration peak {max(r[2] for r in rows):.0f} MB", flush=True)

    if not args.skip_throughput:
        if not args.gpu_only:
            med, ips = throughput("cpu", args.iters, args.warmup, args.batch, args.short_edge)
            print(f"CPU ({args.threads} threads) R50-FPN train, short edge {args.short_edge}, batch {args.batch}: "
                  f"{med:.2f} s/iteration, {ips:.3f} images/s", flush=True)
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            med, ips = throughput("cuda", args.gpu_iters, 5, args.gpu_batch, args.short_edge)
            print(f"GPU ({name}, AMP) R50-FPN train, short edge {args.short_edge}, batch {args.gpu_batch}: "
                  f"{med:.3f} s/iteration, {ips:.2f} images/s", flush=True)
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        else:
            print("GPU: CUDA not available here (no GPU figure)", flush=True)

    if not args.skip_convergence:
        shape = tuple(args.conv_shape)
        print(f"Convergence: fresh R50-FPN, {args.conv_iters} iterations x 2 images of {shape[0]}x{shape[1]} "
              f"({args.conv_train} training / {args.conv_val} held-out synthetic images, 3 cell types)", flush=True)
        res, secs, (it, score, per) = convergence(
            args.conv_iters, shape, args.conv_train, args.conv_val, args.conv_lr, args.conv_freeze_at
        )
        per_s = ", ".join(f"{k} {v:.3f}" for k, v in per.items())
        first = sum(res.losses[:10]) / min(10, len(res.losses))
        last = sum(res.losses[-10:]) / min(10, len(res.losses))
        print(f"  loss {first:.3f} (first 10 it) -> {last:.3f} (last 10 it); {secs:.0f} s of training + validation")
        print(f"  held-out competition score after {it} iterations: {score:.4f} ({per_s})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

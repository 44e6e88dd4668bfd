"""The project's CPU path with and without the CPU preparation (FrozenBN folded, channels-last weights).

Times, on one synthetic 520 x 704 SH-SY5Y image, an R50-FPN with random weights whose FrozenBN
statistics are drawn away from the identity (as trained weights), at ``--test-size``:
``network`` (the model's forward: boxes, scores, M x M masks) and ``to results``
(``MaskRCNNEngine.predict``: crops pasted), plain vs. prepared (``fast=True``, what engines loaded
from checkpoints run), median of ``--runs`` after a warm-up, with the ratio prepared / plain and the
largest difference of the backbone features. Use ``bench_detectron2.py`` for the comparison with
detectron2 itself where it is built.

With ``--threads`` above 1 it also times the prepared engine with RoIAlign split over the threads
(:func:`napari_sartorius.models.pooler.pooled`) against one ``roi_align`` call per pyramid level.

    python benchmarks/bench_cpu_fast.py [--test-size 1024] [--runs 3] [--threads 1] [--detections 1000]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    from napari_sartorius.models.architectures import build_model
    from napari_sartorius.models.config import ModelConfig
    from napari_sartorius.models.predictor import MaskRCNNEngine, image_to_tensor
    from napari_sartorius.synthetic import make_sample

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mask_rcnn_R_50_FPN")
    ap.add_argument("--test-size", type=int, default=1024)
    ap.add_argument("--detections", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(args.arch, min_size_test=args.test_size, max_size_test=2 * args.test_size,
                         detections_per_img=args.detections)
    model = build_model(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.weight.numel()
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    plain = MaskRCNNEngine(model, config)
    fast = MaskRCNNEngine(copy.deepcopy(model), config, fast=True)
    image = make_sample("shsy5y", seed=0).image
    x = image_to_tensor(image)
    with torch.inference_mode():
        f0 = plain.model.backbone(x[None] / 255)
        f1 = fast.model.backbone(x[None] / 255)
        diff = max(float((f0[k] - f1[k]).abs().max() / f0[k].abs().max()) for k in f0)
        t_net = [median_time(lambda e=e: e.model([x]), args.runs) for e in (plain, fast)]
    t_full = [median_time(lambda e=e: e.predict(image), args.runs) for e in (plain, fast)]
    n = [len(e.predict(image)) for e in (plain, fast)]
    print(f"{args.arch}, test size {args.test_size}, CPU {args.threads} thread(s), median of {args.runs}; "
          f"features differ by {diff:.1e} (relative)")
    print(f"network:    plain {t_net[0]:6.2f} s, prepared {t_net[1]:6.2f} s, ratio {t_net[1] / t_net[0]:.2f}")
    print(f"to results: plain {t_full[0]:6.2f} s, prepared {t_full[1]:6.2f} s, ratio {t_full[1] / t_full[0]:.2f} "
          f"({n[0]} / {n[1]} instances)")
    if args.threads > 1:
        # RoIAlign split over the threads (models/pooler.pooled) against one roi_align call per level,
        # alternating, on the prepared engine
        import napari_sartorius.models.pooler as pooler
        from torchvision.ops import roi_align

        split = pooler.pooled

        def one_call(fmap, rois, spatial_scale, **kw):
            return roi_align(fmap, rois, spatial_scale=spatial_scale, **kw)

        times = {"split": [], "one": []}
        try:
            for run in range(2 * args.runs):
                name, fn = (("split", split), ("one", one_call))[run % 2]
                pooler.pooled = fn
                times[name].append(median_time(lambda: fast.predict(image), 1))
        finally:
            pooler.pooled = split
        a, b = statistics.median(times["split"]), statistics.median(times["one"])
        print(f"RoIAlign over {args.threads} threads: {a:6.2f} s, one call {b:6.2f} s, ratio {a / b:.2f} (to results, wall)")


if __name__ == "__main__":
    main()

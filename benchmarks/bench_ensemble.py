"""An ensemble end to end on the CPU: 3 Mask R-CNN models x 4 TTA variants on one 520 x 704 image.

Prints, from one run:
- one model's forward time on the image (median of ``--repeats``), at the test size (default 1024 px),
- the time of each model's TTA pass (4 variants in one batch),
- the fusion of the 12 candidate sets (``fuse_instances``) and the post-processing of the result,
  and their sum as a percentage of one model's forward time (target: under 15 %),
- the process's peak resident memory (target: under 3 GB).

The models are randomly initialised (no weights can be downloaded here), so their candidates are not
cells, but the work per candidate is the same: the box and mask heads run on up to
``detections_per_img`` (1000) boxes per variant, which is what a trained model gives on SH-SY5Y.

    python benchmarks/bench_ensemble.py [--arch mask_rcnn_R_50_FPN] [--models 3] [--tta flips]
                                        [--test-size 1024] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mask_rcnn_R_50_FPN")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--tta", default="flips")
    ap.add_argument("--ensemble", default="wbf")
    ap.add_argument("--test-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from napari_sartorius.inference.ensemble import fuse_instances
    from napari_sartorius.inference.tta import run_tta
    from napari_sartorius.models.architectures import build_model
    from napari_sartorius.models.config import ModelConfig
    from napari_sartorius.models.predictor import MaskRCNNEngine
    from napari_sartorius.postprocess import PostprocessSettings, postprocess
    from napari_sartorius.synthetic import make_sample

    torch.set_num_threads(args.threads)
    image = make_sample("shsy5y", seed=0).image
    print(f"{args.models} x {args.arch}, TTA {args.tta}, test size {args.test_size} px, "
          f"{args.threads} thread(s), image {image.shape[0]}x{image.shape[1]}; RSS at start {peak_rss_mb():.0f} MB")

    engines = []
    for i in range(args.models):
        torch.manual_seed(i)
        config = ModelConfig(args.arch, min_size_test=args.test_size)
        engines.append(MaskRCNNEngine(build_model(config).eval(), config, device="cpu", name=f"model{i}"))

    forward = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        single = engines[0].predict(image)
        forward.append(time.perf_counter() - t)
    t_forward = statistics.median(forward)
    print(f"one forward: median {t_forward:.2f} s over {args.repeats} ({', '.join(f'{f:.2f}' for f in forward)}), "
          f"{len(single)} candidates")

    sources = []
    for engine in engines:
        t = time.perf_counter()
        variants = run_tta(engine, image, args.tta)
        sources.extend(variants)
        print(f"{engine.name}: {len(variants)} TTA variants in {time.perf_counter() - t:.2f} s, "
              f"{sum(len(v) for v in variants)} candidates; peak RSS {peak_rss_mb():.0f} MB")

    n_variants = len(sources) // len(engines)
    weights = [1.0] * len(sources)
    t = time.perf_counter()
    fused = fuse_instances(sources, weights, args.ensemble, iou_thr=0.5)
    t_fuse = time.perf_counter() - t
    t = time.perf_counter()
    # random models score low: no score threshold, so every fused candidate is post-processed (worst case)
    result = postprocess(fused, PostprocessSettings(cell_type="shsy5y", score_thresholds=(0.0, 0.0, 0.0)))
    t_post = time.perf_counter() - t
    share = 100 * (t_fuse + t_post) / t_forward
    print(f"fusion ({args.ensemble}) of {len(sources)} sources, {sum(len(s) for s in sources)} candidates -> "
          f"{len(fused)}: {t_fuse * 1000:.0f} ms; post-processing -> {len(result)} cells: {t_post * 1000:.0f} ms")
    print(f"fusion + post-processing = {share:.1f} % of one forward (target < 15 %); "
          f"{len(engines)} models x {n_variants} variants")
    print(f"peak RSS: {peak_rss_mb():.0f} MB (target < 3000 MB)")
    if torch.cuda.is_available():
        gpu_throughput(engines[0].model, engines[0].config, image, args.tta)
    else:
        print("GPU section skipped: no CUDA device")


def gpu_throughput(model, config, image, tta: str, seconds: float = 20.0) -> None:
    """Images per second on the GPU with fp16 autocast, each image with its TTA variants as one batch."""
    import torch

    from napari_sartorius.inference.tta import run_tta
    from napari_sartorius.models.predictor import MaskRCNNEngine

    for amp in (True, False):
        engine = MaskRCNNEngine(model, config, device="cuda", amp=amp, name="gpu")
        run_tta(engine, image, tta)  # warm-up (cuDNN autotuning, allocator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run_tta(engine, image, tta)
            n += 1
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"GPU {torch.cuda.get_device_name()}: {'fp16' if amp else 'fp32'}, TTA {tta}: {n / dt:.2f} images/s "
              f"({n} images in {dt:.1f} s), peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
